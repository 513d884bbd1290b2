"""Training slowdown caused by the fixed evaluation, and the query time of the preview history.

Part 1 trains the demo's real Trainer (tiny GPT-2 + LoRA, ``exporter.demo.run.build_trainer``)
with the exporter in two variants, in interleaved rounds (order rotated each round):

  no_eval   PrometheusCallback, default settings, no eval set
  eval      the same plus the demo's fixed eval set (``exporter.demo.task.make_eval_set``: 48
            fixed + 32 train examples, digits-only contract) at the default interval
            (every 250 steps) and budget (64 examples per evaluation), preview
            history written to a temporary directory

and prints, per variant, the steps per second of ``trainer.train()`` over the same
steps on the wall clock and on the process CPU clock (all threads: the scoring
worker included), the slowdown ratio eval / no_eval (median of the per-round
ratios, min..max as the noise band) and the attributed cost: the wall time the
training thread spent in ``maybe_evaluate`` (generation + teacher-forced pass)
plus the worker's CPU time for scoring and writing, per training step, over the
no_eval step time.

Part 2 imports ``measure_query`` from ``bench/previews_query.py``: the time of a
100-row page of ``previews`` over a generated 30-day, 100k-record history.

Usage::

    .venv/bin/python bench/eval_overhead.py [--steps 1000] [--rounds 3] [--records 100000]

On a shared machine the figures are noisy; the CPU clock and the attributed
figure are the steadier ones. Exit status 0 whatever the figures; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.trainer_callback import PrinterCallback

from exporter.argtypes import positive_int
from exporter.callback import PrometheusCallback
from exporter.config import ExporterConfig
from exporter.demo.run import build_trainer
from exporter.demo.task import DIGITS_ONLY, CharTokenizer, make_eval_set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from previews_query import measure_query  # a sibling script, not a package

VARIANTS = ("no_eval", "eval")


@dataclass
class Run:
    variant: str
    wall_s: float
    cpu_s: float
    held_s: float = 0.0  # training thread inside maybe_evaluate
    worker_cpu_s: float = 0.0  # scoring + history on the worker thread
    evaluations: int = 0
    last_fixed_em: float | None = None


def run_once(variant: str, opts: argparse.Namespace) -> Run:
    config = ExporterConfig(listen_address="127.0.0.1:0", gpu=False)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as out:
        callback = PrometheusCallback(config.replace(history_dir=str(Path(out) / "preview")))
        if variant == "eval":
            callback.set_evaluation(make_eval_set(seed=opts.seed), CharTokenizer(), contract=DIGITS_ONLY)
        trainer = build_trainer([callback], output_dir=out, max_steps=opts.steps, seed=opts.seed,
                                save_strategy="no", eval_strategy="no", logging_steps=50, disable_tqdm=True,
                                report_to=[])
        trainer.remove_callback(PrinterCallback)
        callback.setup(trainer.args, trainer.state, trainer.model)
        monitor = callback.monitor
        assert monitor is not None
        held = [0.0]
        worker = [0.0]
        lock = threading.Lock()
        inner_maybe = monitor.maybe_evaluate

        def maybe_evaluate(*a: Any, **kw: Any) -> bool:
            start = time.perf_counter()
            try:
                return inner_maybe(*a, **kw)
            finally:
                held[0] += time.perf_counter() - start

        inner_set = monitor.set_evaluation

        def set_evaluation(*a: Any, **kw: Any) -> Any:
            evaluator = inner_set(*a, **kw)
            inner_score = evaluator.score

            def score(job: Any) -> Any:
                start = time.thread_time()
                try:
                    return inner_score(job)
                finally:
                    with lock:
                        worker[0] += time.thread_time() - start

            evaluator.score = score  # type: ignore[method-assign]
            return evaluator

        monitor.maybe_evaluate = maybe_evaluate  # type: ignore[method-assign]
        monitor.set_evaluation = set_evaluation  # type: ignore[method-assign]
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result = Run(variant, wall, cpu, held[0], worker[0])
        ev = monitor.evaluator
        if ev is not None:
            result.evaluations = ev.evaluations
            snap = monitor.eval_export.last
            if snap is not None:
                rates = [v[0] for (_, source), v in snap.by_group.items() if source == "fixed_eval"]
                result.last_fixed_em = statistics.fmean(rates) if rates else None
        del trainer
    gc.collect()
    return result


def schedule(rounds: int) -> list[str]:
    order: list[str] = []
    for r in range(rounds):
        order += list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
    return order


def report(runs: Sequence[Run], opts: argparse.Namespace, log: Callable[[str], None]) -> None:
    base = [r for r in runs if r.variant == "no_eval"]
    ev = [r for r in runs if r.variant == "eval"]
    for clock in ("wall", "cpu"):
        per_round = [getattr(e, f"{clock}_s") / getattr(b, f"{clock}_s") for b, e in zip(base, ev, strict=True)]
        sps = {v: statistics.median(opts.steps / getattr(r, f"{clock}_s") for r in runs if r.variant == v)
               for v in VARIANTS}
        log(f"{clock:>4} clock: steps/s no_eval {sps['no_eval']:.1f}, eval {sps['eval']:.1f}; slowdown ratio "
            f"{statistics.median(per_round):.4f} (rounds {min(per_round):.4f}..{max(per_round):.4f})")
    evaluations = statistics.median(r.evaluations for r in ev)
    held = statistics.median(r.held_s for r in ev)
    worker = statistics.median(r.worker_cpu_s for r in ev)
    step = statistics.median(r.wall_s / opts.steps for r in base)
    per_step = (held + worker) / opts.steps
    log(f"evaluations per run: {evaluations:.0f} (every 250 steps, 64 examples); per evaluation: training thread "
        f"held {held / max(evaluations, 1) * 1e3:.1f} ms, worker CPU {worker / max(evaluations, 1) * 1e3:.1f} ms")
    log(f"attributed eval time per step: {per_step * 1e6:.0f} us (held {held / opts.steps * 1e6:.0f} + worker "
        f"{worker / opts.steps * 1e6:.0f}); no_eval step {step * 1e3:.2f} ms; attributed ratio "
        f"{1 + per_step / step:.4f}")
    ems = [r.last_fixed_em for r in ev if r.last_fixed_em is not None]
    if ems:
        log(f"fixed-eval exact match at step {opts.steps} (mean over regimes): {statistics.median(ems):.3f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps per run")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds of both variants")
    p.add_argument("--seed", type=int, default=0, help="model / data seed, the same for every run")
    p.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads")
    p.add_argument("--records", type=positive_int, default=100_000, help="preview history size for the query")
    p.add_argument("--days", type=positive_int, default=30, help="days the history is spread over")
    p.add_argument("--query-repeats", type=positive_int, default=3, help="timed runs per query")
    p.add_argument("--skip-query", action="store_true", help="only part 1")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> int:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    log(f"steps={opts.steps} rounds={opts.rounds} threads={opts.threads} torch={torch.__version__} "
        f"transformers={transformers.__version__}")
    # Untimed: the one-off costs of the process (imports, allocator, first generate()) land on no variant.
    run_once("eval", argparse.Namespace(**{**vars(opts), "steps": 250}))
    runs = [run_once(variant, opts) for variant in schedule(opts.rounds)]
    report(runs, opts, log)
    if not opts.skip_query:
        figures = measure_query(records=opts.records, days=opts.days, repeats=opts.query_repeats)
        log(f"previews query over {opts.records} records / {opts.days} days, median seconds per 100-row page:")
        for name, seconds in figures.items():
            log(f"  {name:<28} {seconds:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
