"""Training-step overhead of the exporter callback, relative to a bare Trainer.

Runs the demo's real Trainer (tiny GPT-2 + LoRA, ``exporter.demo.run.build_trainer``)
in interleaved rounds of five variants and prints each variant's step time
divided by the bare run's:

  bare         no extra callback (the reference)
  default      PrometheusCallback with default settings
  all          every collector on, every interval 1 ("everything on"; samples
               are still taken at most once per intervals.min_period_seconds,
               1 s by default, since a scrape reads only the newest)
  every-step   as all, with min_period_seconds 0: every statistic computed on
               every step, the cost of a sample times the step rate (the worst
               case, not a configuration anyone needs)
  tensorboard  transformers' own TensorBoardCallback, for comparison

Usage (full benchmark; a few minutes on a 2-core CPU)::

    .venv/bin/python bench/overhead.py --json /tmp/overhead.json

Method, chosen so that a ratio is meaningful on a small, noisy machine:

* Every variant trains the same model on the same data with the same seed;
  the Trainer is built outside the timed region, a fresh one per run, with
  ``gc.collect()`` between runs.
* A timing callback, present in every variant (bare included, so its own cost
  cancels), stamps the clock at each ``on_step_end``. A step's time is
  the interval between two consecutive stamps, i.e. one whole loop iteration:
  batch fetch, forward/backward/optimizer, every callback hook and the
  ``on_log`` work that the Trainer runs *after* ``on_step_end``. Timing only
  ``on_step_begin`` -> ``on_step_end`` would miss that logging work, which is
  all of TensorBoardCallback's cost and the exporter's periodic flush.
* Per run, the first ``--warmup`` steps are dropped and the rest summarised
  with ``--stat``: ``mean`` (default) because the exporter's and TensorBoard's
  work is periodic (every 10 logging steps, every N sampled steps, every
  scrape) and a per-step median would by construction hide it; ``median``
  shows the steady-state cost of an ordinary step.
* Variants are interleaved in rounds, the order rotated every round, so a
  drift of the machine (other tenants, thermal) affects all of them alike.
  Reported: the median over rounds of the per-run figure; the ratio is the
  median of the per-round ratios to bare (runs of one round share the
  machine's state), with their min..max as the noise band.
* The step clock is ``--clock``: ``cpu`` (process CPU time, all threads; the
  default on a CPU, where other tenants' steal time dominates the noise of
  wall time) or ``wall`` (the default on a GPU, after a sync).
* Attributed overhead: the exporter's own code (per-step callback events, the
  forward hook and every scrape's collect on the HTTP thread) is wrapped in a
  ``thread_time()`` meter. Its CPU per step over the bare step time is a
  direct, low-noise measure of what the A/B ratio estimates.
* The exporter listens on 127.0.0.1:0 and a separate process scrapes
  /metrics every ``--scrape-interval`` seconds during the exporter runs, so
  the exporter's side of every scrape (collect, render, serve, and its GIL
  contention with training) is included as in production, and the client's
  is not.

Exit status is 0 whatever the figures (a benchmark, not a test); bad
arguments exit 2.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback

from exporter.argtypes import integer, positive_int, positive_seconds
from exporter.callback import PrometheusCallback
from exporter.config import ExporterConfig
from exporter.demo.run import build_trainer

VARIANTS: tuple[str, ...] = ("bare", "default", "all", "every-step", "tensorboard")
# Targets, as ratios to bare (default must also be no worse than TensorBoardCallback).
DEFAULT_LIMIT = 1.02
ALL_LIMIT = 1.05


# --------------------------------------------------------------------------- timing


# wall: perf_counter. cpu: CPU time of the whole process (every thread, the
# exporter's HTTP server and the scraper included), which on a shared 2-core VM
# leaves out the time other tenants steal and so shows the work the callback
# adds with far less noise. On a GPU only wall time (after a sync) is meaningful.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class StepTimer(TrainerCallback):
    """Stamps the end of every optimizer step; added to every variant alike."""

    def __init__(self, sync_cuda: bool, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sync_cuda = sync_cuda
        self.clock = clock
        self.begin: float | None = None
        self.ends: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # Only the first step needs a start stamp; later steps start at the previous end.
        if self.begin is None:
            self.begin = self.clock()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.sync_cuda:
            # The benchmark's own sync, so the stamp sees the step's GPU work
            # finished; every variant (bare included) pays it equally.
            torch.cuda.synchronize()
        self.ends.append(self.clock())

    def step_times(self) -> list[float]:
        """Seconds per step: from the previous step's end (or the first begin) to this end."""
        if self.begin is None:
            return []
        stamps = [self.begin, *self.ends]
        return [b - a for a, b in itertools.pairwise(stamps)]


class CpuMeter:
    """CPU time spent inside the exporter's own code, on whichever thread runs it.

    Wraps the callback's per-step events, the model forward hook (dataset
    drift included) and the registry's collect (run by the HTTP server thread
    on every scrape). Start-up and shutdown (on_train_begin / on_train_end) are
    one-off costs and left out.
    """

    EVENTS = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log", "on_evaluate")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            start = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                spent = time.thread_time() - start
                with self._lock:
                    self.seconds += spent

        return timed

    def instrument(self, callback: PrometheusCallback) -> None:
        for name in self.EVENTS:
            setattr(callback, name, self.wrap(getattr(callback, name)))
        monitor = callback.monitor
        assert monitor is not None
        # watch() registers whatever _forward_hook is at on_train_begin (the
        # dataset-drift profile is taken inside it too).
        monitor._forward_hook = self.wrap(monitor._forward_hook)  # type: ignore[method-assign]
        monitor.registry.collect = self.wrap(monitor.registry.collect)  # type: ignore[method-assign]


class Scraper:
    """Scrapes a /metrics URL every ``interval`` seconds from a separate process.

    A separate process, like Prometheus: a scraper thread inside the benchmark
    would add the HTTP client's own CPU time and GIL contention to the training
    process, which production never pays. Only the exporter's side of a scrape
    (collect, render, serve) stays in the measured process.
    """

    _LOOP = (
        "import sys, time, urllib.request\n"
        "url, interval = sys.argv[1], float(sys.argv[2])\n"
        "while True:\n"
        "    time.sleep(interval)  # like Prometheus, the first scrape comes one interval after start\n"
        "    try:\n"
        "        urllib.request.urlopen(url, timeout=5).read()\n"
        "        print('ok', flush=True)\n"
        "    except OSError:\n"
        "        print('failed', flush=True)  # expected once training ends and the server stops\n"
    )

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.ok = 0
        self.failed = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Scraper:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", self._LOOP, self.url, str(self.interval)],
            stdout=subprocess.PIPE, text=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=30)
        self.ok = out.split().count("ok")
        self.failed = out.split().count("failed")


# --------------------------------------------------------------------------- variants


def exporter_config(variant: str) -> ExporterConfig:
    base = ExporterConfig(listen_address="127.0.0.1:0")
    if variant == "default":
        return base
    return base.replace(
        gpu=True,
        host=True,
        layers=True,
        update_ratio=True,
        predictions=True,
        layers_interval=1,
        update_ratio_interval=1,
        predictions_interval=1,
        drift_sample_every=1,
        min_sample_period_seconds=0.0 if variant == "every-step" else ExporterConfig().min_sample_period_seconds,
    )


def variant_callback(variant: str) -> TrainerCallback | None:
    if variant == "bare":
        return None
    if variant == "tensorboard":
        # Writes under output_dir/runs/, a temporary directory per run.
        return TensorBoardCallback()
    return PrometheusCallback(exporter_config(variant))


@dataclass
class RunResult:
    variant: str
    round: int
    step_times_s: list[float]
    scrapes_ok: int = 0
    exporter_cpu_s: float = math.nan


def run_once(variant: str, round_no: int, opts: argparse.Namespace) -> RunResult:
    """One fresh Trainer run of ``variant``; only ``trainer.train()`` is timed."""
    extra = variant_callback(variant)
    timer = StepTimer(sync_cuda=opts.device == "cuda", clock=CLOCKS[opts.clock])
    callbacks = [timer] if extra is None else [extra, timer]
    overrides: dict[str, Any] = {
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 10,  # the demo's default
        "disable_tqdm": True,
        "report_to": [],
    }
    if opts.device == "cuda":
        overrides["use_cpu"] = False
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as out:
        size = {"n_layer": opts.n_layer, "n_embd": opts.n_embd, "n_head": opts.n_head}
        trainer = build_trainer(
            callbacks, output_dir=out, max_steps=opts.steps, seed=opts.seed, model_size=size, **overrides
        )
        # disable_tqdm swaps the progress bar for a print() of every log dict;
        # neither belongs in a benchmark's output (removed for all variants).
        trainer.remove_callback(PrinterCallback)
        scrapes = 0
        meter = CpuMeter()
        if isinstance(extra, PrometheusCallback):
            scrapes = train_scraped(trainer, extra, opts.scrape_interval, meter)
        else:
            trainer.train()
        times = timer.step_times()
        del trainer
    gc.collect()
    cpu = meter.seconds if isinstance(extra, PrometheusCallback) else math.nan
    return RunResult(variant, round_no, times, scrapes, cpu)


def train_scraped(trainer: Trainer, callback: PrometheusCallback, interval: float, meter: CpuMeter) -> int:
    """Train while scraping the exporter; returns the number of successful scrapes."""
    # Start the server before train() (as `training-exporter demo` does) so the
    # port is known; on_train_begin's setup/start are idempotent.
    callback.setup(trainer.args, trainer.state, trainer.model)
    monitor = callback.monitor
    assert monitor is not None
    meter.instrument(callback)
    monitor.start()
    if monitor.port is None:
        print("warning: exporter did not start a server; no scrapes", file=sys.stderr)
        trainer.train()
        return 0
    with Scraper(f"http://127.0.0.1:{monitor.port}/metrics", interval) as scraper:
        trainer.train()
    return scraper.ok


# --------------------------------------------------------------------------- statistics


@dataclass
class VariantSummary:
    variant: str
    per_round_s: list[float]
    step_s: float  # median over rounds of the per-run statistic
    p50_step_s: float  # median over rounds of the per-run median step (steady state)
    ratio: float = math.nan
    ratio_min: float = math.nan
    ratio_max: float = math.nan
    scrapes: int = 0
    per_round_ratio: list[float] = field(default_factory=list)
    exporter_cpu_per_step_s: float = math.nan  # median over rounds
    attributed_ratio: float = math.nan  # 1 + exporter CPU per step / bare step


def per_run(times: Sequence[float], warmup: int, stat: str) -> float:
    kept = times[warmup:]
    if not kept:
        return math.nan
    return statistics.fmean(kept) if stat == "mean" else statistics.median(kept)


def summarise(results: Sequence[RunResult], opts: argparse.Namespace) -> dict[str, VariantSummary]:
    by_variant: dict[str, list[RunResult]] = {v: [] for v in opts.variants}
    for r in results:
        by_variant[r.variant].append(r)
    out: dict[str, VariantSummary] = {}
    for v, runs in by_variant.items():
        runs.sort(key=lambda r: r.round)
        figures = [per_run(r.step_times_s, opts.warmup, opts.stat) for r in runs]
        medians = [per_run(r.step_times_s, opts.warmup, "median") for r in runs]
        out[v] = VariantSummary(
            variant=v,
            per_round_s=figures,
            step_s=statistics.median(figures),
            p50_step_s=statistics.median(medians),
            scrapes=sum(r.scrapes_ok for r in runs),
            exporter_cpu_per_step_s=statistics.median(r.exporter_cpu_s / opts.steps for r in runs),
        )
    bare = out["bare"]
    for s in out.values():
        # Ratios within the same round share the machine's state at that time,
        # so their median is steadier than a ratio of medians.
        s.per_round_ratio = [a / b for a, b in zip(s.per_round_s, bare.per_round_s, strict=True)]
        s.ratio = statistics.median(s.per_round_ratio)
        s.ratio_min, s.ratio_max = min(s.per_round_ratio), max(s.per_round_ratio)
        s.attributed_ratio = 1 + s.exporter_cpu_per_step_s / bare.step_s
    return out


def targets(summary: dict[str, VariantSummary]) -> list[tuple[str, bool | None, str]]:
    """(target, passed, figures) per target; passed is None where a variant was not run."""

    def ratio(v: str) -> float | None:
        return summary[v].ratio if v in summary else None

    d, a, tb = ratio("default"), ratio("all"), ratio("tensorboard")
    da = summary["default"].attributed_ratio if "default" in summary else None
    aa = summary["all"].attributed_ratio if "all" in summary else None

    def fmt(**figs: float | None) -> str:
        return ", ".join(f"{k}={v:.3f}" for k, v in figs.items() if v is not None)

    return [
        (f"default <= {DEFAULT_LIMIT:.2f} x bare", None if d is None else d <= DEFAULT_LIMIT, fmt(default=d)),
        ("default <= tensorboard", None if d is None or tb is None else d <= tb, fmt(default=d, tensorboard=tb)),
        (f"all     <= {ALL_LIMIT:.2f} x bare", None if a is None else a <= ALL_LIMIT, fmt(all=a)),
        (f"default attributed <= {DEFAULT_LIMIT:.2f}", None if da is None else da <= DEFAULT_LIMIT, fmt(default=da)),
        (f"all     attributed <= {ALL_LIMIT:.2f}", None if aa is None else aa <= ALL_LIMIT, fmt(all=aa)),
    ]


# --------------------------------------------------------------------------- output


def render(summary: dict[str, VariantSummary], opts: argparse.Namespace) -> str:
    header = ("variant", f"{opts.stat} ms/step", "ratio", "round ratios min..max", "p50 ms/step", "scrapes",
              "exporter CPU us/step", "attributed ratio")
    rows = [header]
    for s in summary.values():
        rows.append(
            (
                s.variant,
                f"{s.step_s * 1e3:.2f}",
                f"{s.ratio:.3f}",
                f"{s.ratio_min:.3f}..{s.ratio_max:.3f}",
                f"{s.p50_step_s * 1e3:.2f}",
                str(s.scrapes) if s.variant in ("default", "all", "every-step") else "-",
                "-" if math.isnan(s.exporter_cpu_per_step_s) else f"{s.exporter_cpu_per_step_s * 1e6:.0f}",
                "-" if math.isnan(s.attributed_ratio) else f"{s.attributed_ratio:.4f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for desc, ok, figures in targets(summary):
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"{verdict}  {desc:<30}  ({figures or 'not run'})")
    if opts.repeats < 3:
        lines.append(f"note: only {opts.repeats} round(s); ratios are indicative, use --repeats >= 5")
    return "\n".join(lines)


def write_json(path: Path, summary: dict[str, VariantSummary], opts: argparse.Namespace) -> None:
    payload = {
        "settings": {k: v for k, v in vars(opts).items() if k != "json"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version},
        "variants": {v: asdict(s) for v, s in summary.items()},
        "targets": [{"target": d, "pass": ok} for d, ok, _ in targets(summary)],
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CLI


def variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    # bare is the reference every ratio is taken against.
    return ["bare", *[v for v in VARIANTS if v in names and v != "bare"]]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps per run (default: 100)")
    p.add_argument(
        "--warmup", type=integer(0), default=10, help="leading steps of each run left out (default: 10)"
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch.set_num_threads for every run (default: 1; fixed so runs compare)",
    )
    p.add_argument(
        "--scrape-interval",
        type=positive_seconds,
        default=1.0,
        help="seconds between /metrics scrapes during exporter runs (default: 1.0)",
    )
    p.add_argument(
        "--stat",
        choices=("mean", "median"),
        default="mean",
        help="per-run figure over the measured steps (default: mean, which includes periodic work)",
    )
    p.add_argument(
        "--variants",
        type=variant_list,
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (bare is always run)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=default_device,
        help=f"where to train (default here: {default_device})",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default=None,
        help="step clock: cpu (process CPU time, default on cpu) or wall (default on cuda)",
    )
    p.add_argument("--seed", type=int, default=0, help="model / data seed, the same for every run (default: 0)")
    p.add_argument("--n-layer", type=positive_int, default=2, help="GPT-2 blocks (default: 2, the demo's model)")
    p.add_argument("--n-embd", type=positive_int, default=64, help="hidden size (default: 64, the demo's model)")
    p.add_argument("--n-head", type=positive_int, default=4, help="attention heads (default: 4)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    opts = p.parse_args(argv)
    if opts.clock is None:
        opts.clock = "wall" if opts.device == "cuda" else "cpu"
    if opts.warmup >= opts.steps:
        p.error(f"--warmup ({opts.warmup}) must be smaller than --steps ({opts.steps})")
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if opts.json is not None and not opts.json.parent.is_dir():
        p.error(f"--json: directory {str(opts.json.parent)!r} does not exist")
    return opts


def schedule(variants: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """Interleaved rounds, each rotated by one, so no variant always runs first."""
    order: list[tuple[int, str]] = []
    for r in range(repeats):
        k = r % len(variants)
        order += [(r, v) for v in [*variants[k:], *variants[:k]]]
    return order


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> int:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    log(
        f"device={opts.device} threads={opts.threads} steps={opts.steps} warmup={opts.warmup} "
        f"repeats={opts.repeats} scrape_interval={opts.scrape_interval}s stat={opts.stat} clock={opts.clock} "
        f"model=gpt2(n_layer={opts.n_layer}, n_embd={opts.n_embd}) "
        f"torch={torch.__version__} transformers={transformers.__version__}"
    )
    # One short untimed run first: the process's one-off costs (lazy imports,
    # allocator growth) must not land on whichever variant happens to run first.
    run_once("bare", -1, argparse.Namespace(**{**vars(opts), "steps": min(opts.steps, opts.warmup + 5)}))
    results: list[RunResult] = []
    for round_no, variant in schedule(opts.variants, opts.repeats):
        results.append(run_once(variant, round_no, opts))
    summary = summarise(results, opts)
    log(render(summary, opts))
    if opts.json is not None:
        write_json(opts.json, summary, opts)
        log(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
