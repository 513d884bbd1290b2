"""Training-step time with many concurrent scrapers, against none, in one run.

The demo's real Trainer (tiny GPT-2 + LoRA, ``exporter.demo.run.build_trainer``) trains with the exporter
callback at its default settings, serving on 127.0.0.1:0. A timing callback stamps every ``on_step_end``.
After ``--warmup`` seconds the run alternates quiet and loaded blocks of ``--seconds / --rounds`` seconds
each, quiet first and last (Q L Q L ... L Q): ``--scrapers`` concurrent scrapers are at work during the
loaded blocks only, ``--seconds`` seconds in all.

Printed per round: the loaded block's mean step time over the mean of the quiet blocks on either side, by
the wall clock (what training feels) and by the training process's CPU time over all its threads; then the
median over rounds with its min..max, so that a drift of a small, shared machine, which moves the quiet
and the loaded blocks of one round alike, does not pass for the exporter's cost.

The scrapers are one separate process: ``--scrapers`` keep-alive HTTP/1.1 connections driven by one
``asyncio`` loop, each scraping every ``--interval`` seconds (0: back to back, as fast as the endpoint
answers), reading the whole body, and closing at the end of each loaded block. Their answers, failures and
latency percentiles are printed.

``--server prometheus_client`` serves the same registry with ``prometheus_client.start_http_server``
instead, the endpoint both exporters had before, for the figure this one replaces.

Usage::

    .venv/bin/python bench/scrape_load.py                      # 50 scrapers every 1 s, 60 s of load
    .venv/bin/python bench/scrape_load.py --interval 0         # back to back
    .venv/bin/python bench/scrape_load.py --server prometheus_client

Exit status 0 whatever the figures (a benchmark, not a test); bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter import PrometheusCallback  # noqa: E402
from exporter.config import ExporterConfig  # noqa: E402
from exporter.demo.run import build_trainer  # noqa: E402

# One process, one event loop, N keep-alive connections: the client's CPU stays small.
CLIENT = textwrap.dedent('''
    import asyncio, json, sys, time

    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    interval, windows = float(sys.argv[4]), json.loads(sys.argv[5])  # [[start, end], ...] on time.monotonic()
    request = (f"GET /metrics HTTP/1.1\\r\\nHost: {host}\\r\\nUser-Agent: scrape-load\\r\\n"
               "Accept-Encoding: gzip\\r\\n\\r\\n").encode()
    latencies, failures = [], 0

    async def scrape_once(conn):
        reader, writer = conn or await asyncio.open_connection(host, port)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\\r\\n\\r\\n"), 30)
        length = None
        for line in head.split(b"\\r\\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length is None:  # an HTTP/1.0 answer: the body ends with the connection
            await asyncio.wait_for(reader.read(), 30)
        else:
            await asyncio.wait_for(reader.readexactly(length), 30)
        if head.split(b"\\r\\n")[0].split(b" ")[1:2] != [b"200"]:
            raise OSError(head[:40])
        if length is None or head.startswith(b"HTTP/1.0") or b"connection: close" in head.lower():
            writer.close()
            return None
        return reader, writer

    async def scraper(i):
        global failures
        for start, end in windows:
            conn = None
            nxt = start + interval * i / n
            while True:
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                if time.monotonic() >= end:
                    break
                nxt = max(nxt + interval, time.monotonic()) if interval else time.monotonic()
                began = time.monotonic()
                try:
                    conn = await scrape_once(conn)
                    latencies.append(time.monotonic() - began)
                except Exception:
                    failures += 1
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    await asyncio.sleep(0.05)
            if conn is not None:
                conn[1].close()

    async def main():
        await asyncio.gather(*(scraper(i) for i in range(n)))

    asyncio.run(main())
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None
    print(json.dumps({"answers": len(latencies), "failures": failures, "p50_s": q(0.5), "p99_s": q(0.99),
                      "max_s": latencies[-1] if latencies else None}))
''')



class Clock(TrainerCallback):
    """Stamps every step's end (wall and process CPU) and stops training when the schedule is over."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []
        self.stop_at: float | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.monotonic()
        self.stamps.append((now, time.process_time()))
        if self.stop_at is not None and now >= self.stop_at:
            control.should_training_stop = True


def block(stamps: Sequence[tuple[float, float]], start: float, end: float) -> tuple[float, float, int]:
    """Mean wall and CPU step time of the steps that ended within [start, end)."""
    pairs = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(stamps) if start <= b[0] < end]
    if not pairs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs), len(pairs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="Seconds between one scraper's scrapes.")
    parser.add_argument("--seconds", type=float, default=60.0, help="Seconds of load in all.")
    parser.add_argument("--rounds", type=int, default=6, help="Loaded blocks the load is split into.")
    parser.add_argument("--warmup", type=float, default=10.0, help="Seconds of training before the first block.")
    parser.add_argument("--server", choices=("exporter", "prometheus_client"), default="exporter")
    parser.add_argument("--max-requests-per-second", type=float, default=None,
                        help="The exporter's web.max_requests_per_second (default: its default).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    opts = parser.parse_args(argv)
    if opts.scrapers < 1 or opts.interval < 0 or opts.seconds <= 0 or opts.rounds < 1 or opts.warmup < 0:
        parser.error("--scrapers >= 1, --interval >= 0, --seconds > 0, --rounds >= 1, --warmup >= 0")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(tempfile.mkdtemp(prefix="scrape-load-"))
    settings: dict[str, Any] = {"listen_address": "127.0.0.1:0", "final_scrape_timeout_seconds": 0}
    if opts.max_requests_per_second is not None:
        settings["max_requests_per_second"] = opts.max_requests_per_second
    callback = PrometheusCallback(config=ExporterConfig.from_kwargs(**settings))
    clock = Clock()
    trainer = build_trainer([callback, clock], output_dir=str(out), max_steps=10_000_000, save_steps=10_000_000,
                            logging_steps=10)
    result: dict[str, Any] = {}

    class Driver(TrainerCallback):
        """Runs the schedule from the training thread's first step: blocks are timed by the step clock."""

        started = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.started:
                return
            self.started = True
            mon = callback.monitor
            assert mon is not None and mon.port is not None
            port = mon.port
            if opts.server == "prometheus_client":
                from prometheus_client import start_http_server

                mon.stop()
                legacy, _ = start_http_server(0, addr="127.0.0.1", registry=mon.registry)
                port = legacy.server_address[1]
            t0 = time.monotonic() + opts.warmup
            length = opts.seconds / opts.rounds
            marks = [t0 + k * length for k in range(2 * opts.rounds + 2)]  # Q L Q ... L Q
            clock.stop_at = marks[-1]
            result["marks"] = marks
            windows = [[marks[2 * r + 1], marks[2 * r + 2]] for r in range(opts.rounds)]
            result["client"] = subprocess.Popen(
                [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(opts.scrapers), str(opts.interval),
                 json.dumps(windows)], stdout=subprocess.PIPE, text=True)

    trainer.add_callback(Driver())
    trainer.train()
    client: subprocess.Popen[str] = result["client"]
    client_out, _ = client.communicate(timeout=opts.seconds + 120)
    scrapes = json.loads(client_out.strip().splitlines()[-1]) if client_out.strip() else {}
    marks = result["marks"]
    blocks = [block(clock.stamps, a, b) for a, b in itertools.pairwise(marks)]
    rounds = []
    for r in range(opts.rounds):
        before, load, after = blocks[2 * r], blocks[2 * r + 1], blocks[2 * r + 2]
        rounds.append({"quiet_wall_ms": (before[0] + after[0]) / 2 * 1e3, "load_wall_ms": load[0] * 1e3,
                       "ratio_wall": 2 * load[0] / (before[0] + after[0]),
                       "ratio_cpu": 2 * load[1] / (before[1] + after[1]), "load_steps": load[2]})
    mon = callback.monitor
    renders = mon.registry.get_sample_value("training_exporter_exposition_renders_total",
                                            {"run_id": mon.run_id}) if mon is not None else None

    def spread(key: str) -> dict[str, float]:
        values = [x[key] for x in rounds]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    figures = {
        "server": opts.server, "scrapers": opts.scrapers, "interval_s": opts.interval, "seconds": opts.seconds,
        "torch_threads": torch.get_num_threads(), "rounds": rounds,
        "ratio_wall": spread("ratio_wall"), "ratio_cpu": spread("ratio_cpu"),
        "scrapes": scrapes, "renders_total": renders,
    }
    print(f"server {opts.server}: {opts.scrapers} scrapers every {opts.interval:g} s, {opts.seconds:g} s of load "
          f"in {opts.rounds} rounds (torch threads {figures['torch_threads']})")
    for k, x in enumerate(rounds):
        print(f"  round {k + 1}: quiet {x['quiet_wall_ms']:7.2f} ms  loaded {x['load_wall_ms']:7.2f} ms  "
              f"wall {x['ratio_wall']:.4f}  cpu {x['ratio_cpu']:.4f}  ({x['load_steps']} loaded steps)")
    w, c = figures["ratio_wall"], figures["ratio_cpu"]
    print(f"  loaded / quiet, median over rounds: wall {w['median']:.4f} ({w['min']:.4f}..{w['max']:.4f})  "
          f"cpu {c['median']:.4f} ({c['min']:.4f}..{c['max']:.4f}); target wall <= 1.05")
    print(f"  scrapes: {scrapes}; exposition renders over the run: {renders}")
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
