"""The end of a run is seen: the final state is scraped before the endpoint closes (without holding up
``trainer.train()``), and a SIGTERM ends in state terminated, then in the signal's own exit status.

Real parts only: a tiny Trainer (exporter.demo.run.build_trainer) or TrainingMonitor serving on 127.0.0.1 with
a free port, scraped over HTTP; SIGTERM goes to a child process by its PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.scrape import Samples, scrape
from transformers import TrainerCallback

from exporter import PrometheusCallback, lifecycle
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor
from exporter.demo.run import build_trainer

ROOT = Path(__file__).resolve().parents[1]
QUIET: dict[str, Any] = {"gpu": False, "host": False, "drift": False, "evaluation": False, "previews": False}
# Time a close may take after it is due: shutdown() of the HTTP server polls every 0.5 s.
CLOSE_S = 3.0


def metrics(port: int, agent: str = "lifecycle-test") -> Samples:
    return scrape(f"http://127.0.0.1:{port}/metrics", timeout=5, headers={"User-Agent": agent})


def state_of(samples: Samples) -> str | None:
    return next((dict(labels)["state"] for (name, labels), v in samples.items()
                 if name == "training_state" and v == 1), None)


def listening(port: int) -> bool:
    """A bare TCP connect: it sends no HTTP request, so it is no scrape."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def closed_within(port: int, timeout: float) -> float | None:
    """Seconds until ``port`` refuses connections, or None if it still listens after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not listening(port):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # As a server binds it: connections of the old one in TIME_WAIT do not count, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- a real Trainer, default settings


class EndTimer(TrainerCallback):
    """Scrapes the endpoint at chosen steps (as Prometheus does during a run) and notes when the end began."""

    def __init__(self, exporter: PrometheusCallback, steps: set[int]) -> None:
        self.exporter = exporter
        self.steps = steps
        self.ended_at: float | None = None
        self.states: list[str | None] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step in self.steps and self.exporter.monitor is not None:
            port = self.exporter.monitor.port
            assert port is not None
            self.states.append(state_of(metrics(port)))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ended_at = time.monotonic()


def train_tiny(tmp_path: Path, name: str, scrape_steps: set[int], **settings: Any) -> tuple[int, float, float]:
    """A tiny Trainer run scraped at ``scrape_steps``: (port, time from on_train_end to train()'s return,
    when it returned)."""
    cb = PrometheusCallback(listen_address="127.0.0.1:0", run_id=name, **QUIET, **settings)
    timer = EndTimer(cb, scrape_steps)
    # The timer's on_train_end runs before the exporter's, so the exporter's end is inside the measure.
    trainer = build_trainer([timer, cb], output_dir=str(tmp_path / name), max_steps=6, save_strategy="no",
                            disable_tqdm=True, logging_steps=2)
    trainer.train()
    returned = time.monotonic()
    assert cb.monitor is not None and cb.monitor.port is not None and timer.ended_at is not None
    assert timer.states == ["training"] * len(scrape_steps)
    return cb.monitor.port, returned - timer.ended_at, returned


def test_trainer_returns_at_once_and_the_final_state_is_scraped_before_the_endpoint_closes(tmp_path: Path) -> None:
    assert ExporterConfig().final_scrape_timeout_seconds == 120 and ExporterConfig().linger_seconds == 0
    port, end_s, _ = train_tiny(tmp_path, "final-read", {2, 4})
    # The endpoint waits for the read in the background, up to 120 s: train() does not.
    assert end_s < 3, f"train() took {end_s:.2f} s after on_train_end"
    assert listening(port)
    samples = metrics(port)
    assert state_of(samples) == "completed"
    assert samples[("training_state", frozenset({("run_id", "final-read"), ("state", "completed")}))] == 1
    # That read was the one awaited: the endpoint closes by itself, well before the bound.
    closed = closed_within(port, 10)
    assert closed is not None and closed < CLOSE_S, closed
    assert port_free(port)


def test_a_client_that_does_not_come_back_is_awaited_up_to_the_bound(tmp_path: Path) -> None:
    bound = 2.0
    # Scraped once: its interval is unknown, so it is awaited up to the bound.
    port, end_s, returned = train_tiny(tmp_path, "unread", {3}, final_scrape_timeout_seconds=bound)
    assert end_s < 1.5, end_s
    time.sleep(0.5)
    assert listening(port), "closed before the bound with a scrape still awaited"
    closed = closed_within(port, bound + 5)
    assert closed is not None, "still serving long after the bound"
    closed_at = time.monotonic() - returned
    assert bound - 0.3 < closed_at < bound + CLOSE_S, closed_at
    assert port_free(port)


# --------------------------------------------------------------------------- a plain loop


def monitor(**settings: Any) -> TrainingMonitor:
    mon = TrainingMonitor(ExporterConfig(listen_address="127.0.0.1:0", **QUIET, **settings),
                          run_id="plain")
    mon.start()
    mon.begin(max_steps=10)
    for _ in range(3):
        mon.step_begin()
        mon.observe_loss(1.0)
        mon.step_end()
    return mon


class Scraper:
    """A client scraping every ``interval`` s on a thread, as Prometheus does."""

    def __init__(self, port: int, agent: str, interval: float) -> None:
        self.port, self.agent, self.interval = port, agent, interval
        self.states: list[str | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.states.append(state_of(metrics(self.port, self.agent)))
            except requests.RequestException:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_an_endpoint_nobody_scraped_closes_at_once() -> None:
    mon = monitor()
    port = mon.port
    assert port is not None
    mon.end()
    closed = closed_within(port, 5)
    assert closed is not None and closed < CLOSE_S, closed


def test_a_scraper_that_stops_is_awaited_two_intervals_not_the_bound() -> None:
    mon = monitor(final_scrape_timeout_seconds=60)
    port = mon.port
    assert port is not None
    with Scraper(port, "Prometheus/gone", 0.2) as scraper:
        time.sleep(0.7)
    assert scraper.states and set(scraper.states) == {"training"}
    mon.end()
    # Awaited until 2 x 0.2 + 1 s after its last scrape.
    closed = closed_within(port, 10)
    assert closed is not None and closed < 1.4 + CLOSE_S, closed


def test_every_replica_reads_the_final_state() -> None:
    mon = monitor(final_scrape_timeout_seconds=60)
    port = mon.port
    assert port is not None
    for _ in range(2):
        for agent in ("Prometheus/replica-a", "Prometheus/replica-b"):
            assert state_of(metrics(port, agent)) == "training"
        time.sleep(1.0)
    mon.end()
    assert state_of(metrics(port, "Prometheus/replica-a")) == "completed"
    time.sleep(0.8)
    assert listening(port), "closed before the second replica read the final state"
    assert state_of(metrics(port, "Prometheus/replica-b")) == "completed"
    closed = closed_within(port, 5)
    assert closed is not None and closed < CLOSE_S, closed
    assert lifecycle.scrapes(mon).answered == 6


def test_linger_still_blocks_and_zero_stops_at_once() -> None:
    mon = monitor(linger_seconds=1.0)
    port = mon.port
    assert port is not None
    metrics(port)
    done = threading.Event()

    def end() -> None:
        mon.end()
        done.set()

    threading.Thread(target=end, daemon=True).start()
    time.sleep(0.3)
    assert state_of(metrics(port)) == "completed" and not done.is_set()
    assert done.wait(5)
    closed = closed_within(port, 5)
    assert closed is not None and closed < CLOSE_S, closed

    mon = monitor(final_scrape_timeout_seconds=0)
    port = mon.port
    assert port is not None
    metrics(port)
    mon.end()
    assert not listening(port)


def test_a_new_run_keeps_the_endpoint_the_last_run_was_closing() -> None:
    mon = monitor(final_scrape_timeout_seconds=0.5)
    port = mon.port
    assert port is not None
    metrics(port)
    mon.end()
    mon.start()
    mon.begin(max_steps=5)
    time.sleep(1.0 + CLOSE_S)
    assert mon.port == port and state_of(metrics(port)) == "training"
    mon.end()
    assert state_of(metrics(port)) == "completed"
    closed = closed_within(port, 5)
    assert closed is not None, "the second run's final read did not close the endpoint"


# --------------------------------------------------------------------------- SIGTERM

TRAINING = textwrap.dedent("""
    import os, signal, sys, threading, time
    import torch
    from exporter.config import ExporterConfig
    from exporter.core import TrainingMonitor

    mode = sys.argv[1]
    if mode == "python-handler":
        def handler(signum, frame):
            print("previous handler called", flush=True)
            raise SystemExit(3)

        signal.signal(signal.SIGTERM, handler)
    mon = TrainingMonitor(ExporterConfig(listen_address="127.0.0.1:0", gpu=False, host=False, drift=False,
                                         sigterm=mode != "disabled"), run_id="sigterm-" + mode)
    mon.start()
    print(mon.port, flush=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    mon.begin(max_steps=1_000_000)
    print("training", flush=True)
    if mode == "fork":
        # Like a DataLoader worker: a child forked from the training process, with its SIGTERM handler.
        time.sleep(1.0)
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)

        def reap():
            status = os.waitpid(child, 0)[1]
            print("child exit", os.waitstatus_to_exitcode(status), flush=True)

        threading.Thread(target=reap, daemon=True).start()
    while True:
        mon.step_begin()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mon.observe_loss(loss.detach())
        mon.step_end()
        time.sleep(0.005)
""")


@pytest.fixture
def training(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str) -> tuple[subprocess.Popen[str], int]:
        script = tmp_path / "train.py"
        script.write_text(TRAINING)
        proc = subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"no port printed: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        return proc, int(line)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def sigterm_while_scraped(proc: subprocess.Popen[str], port: int, mode: str) -> tuple[Scraper, float]:
    """SIGTERM mid-run (step 20 or later) while a scraper polls every 0.2 s; returns the scraper (stopped)
    and the seconds from the signal to the exit."""
    step = ("training_step", frozenset({("run_id", f"sigterm-{mode}")}))
    with Scraper(port, "Prometheus/test", 0.2) as scraper:
        deadline = time.monotonic() + 30
        while metrics(port).get(step, 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        exited = time.monotonic() - sent
    return scraper, exited


def test_sigterm_is_scraped_as_terminated_then_the_process_dies_of_it(training: Any) -> None:
    proc, port = training("default")
    scraper, exited = sigterm_while_scraped(proc, port, "default")
    assert proc.returncode == -signal.SIGTERM, proc.stderr.read() if proc.stderr else ""
    assert scraper.states[-1] == "terminated", scraper.states[-5:]
    assert "training" in scraper.states
    # One scrape interval (0.2 s) and some start-up slack, far from the 25 s bound.
    assert exited < 10, exited


def test_sigterm_chains_to_the_handler_installed_before(training: Any) -> None:
    proc, port = training("python-handler")
    scraper, exited = sigterm_while_scraped(proc, port, "python-handler")
    assert proc.stdout is not None and "previous handler called" in proc.stdout.read()
    assert proc.returncode == 3
    # The handler ended the process at once; the exit waited for the scrape of the final state.
    assert scraper.states[-1] == "terminated", scraper.states[-5:]
    assert exited < 10, exited


def test_sigterm_with_nobody_scraping_dies_at_once_and_can_be_left_alone(training: Any) -> None:
    for mode, last in (("unscraped", None), ("disabled", "training")):
        proc, port = training(mode)
        assert proc.stdout is not None and proc.stdout.readline() == "training\n"
        time.sleep(0.3)
        if last is not None:
            assert state_of(metrics(port)) == last
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert proc.returncode == -signal.SIGTERM, (mode, proc.stderr.read() if proc.stderr else "")
        assert time.monotonic() - sent < 3, mode


def test_a_forked_child_inherits_no_wait(training: Any) -> None:
    proc, port = training("fork")
    assert proc.stdout is not None and proc.stdout.readline() == "training\n"
    # A slow scraper: awaited 5 s after each of its scrapes, by the parent.
    with Scraper(port, "Prometheus/test", 2.0):
        child = int(proc.stdout.readline())
        time.sleep(0.5)
        sent = time.monotonic()
        os.kill(child, signal.SIGTERM)
        line = proc.stdout.readline()
        # The parent's awaited scraper is not the child's to wait for: the child dies of the signal at once.
        assert line == f"child exit {-signal.SIGTERM}\n", line
        assert time.monotonic() - sent < 1.5
        # The same client as the scraper's: another one, seen once, would be awaited up to the bound.
        assert state_of(metrics(port, "Prometheus/test")) == "training"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - sent < 10
