"""Query time of the preview history over a generated 30-day, 100k-record history.

Generates ``--records`` previews spread evenly over ``--days`` UTC days in a
temporary directory, through :class:`exporter.previews.PreviewHistory` with a
fake clock (about 3.3k previews and 2.5 MB a day at the defaults), then runs
its default maintenance, which gzips the days older than 7. It then times
representative queries for one page of 100 rows, newest first:

  latest       no filter
  regime       --regime emoji_think                          (a third of the records)
  failures     --exact-match false --failure-mode wrong_content  (about a tenth)
  offset5000   no filter, --offset 5000                       (spans two day files)
  no_match     --step-min above every step: nothing matches, so every line of
               every file is read and its step pre-checked (the worst case)

each both through the Python API (``PreviewHistory.query``) and as a
subprocess of the console script (``python -m exporter.cli previews ...
--format jsonl``, interpreter start-up included), and prints the median
seconds per query over ``--repeats`` runs. Every answer is checked (100 rows,
0 for no_match) so a fast wrong answer can't pass for a fast one.

Usage::

    .venv/bin/python bench/previews_query.py [--records 100000] [--days 30] [--repeats 5]

``measure_query()`` returns the same figures for other bench scripts.
Exit status is 0 whatever the figures; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from exporter.previews import PreviewFilter, PreviewHistory

REGIMES = ("emoji_think", "regime3", "plain_sft")
SOURCES = ("fixed_eval", "train", "failures")
FAILURE_MODES = ("empty", "wrong_format", "wrong_content", "truncated")
WORDS = ("all men are mortal socrates is a man therefore what follows count the letters in the word "
         "add the numbers and answer with the sum only if every cat sleeps and some cats purr").split()
PAGE = 100
BATCH = 50  # previews per append: one fixed evaluation's worth
END = datetime(2025, 11, 30, 12, 0, tzinfo=timezone.utc).timestamp()

# name -> (PreviewHistory.query filter, its offset, CLI flags, rows expected)
QUERIES: dict[str, tuple[PreviewFilter, int, list[str], int]] = {
    "latest": (PreviewFilter(), 0, [], PAGE),
    "regime": (PreviewFilter(regime="emoji_think"), 0, ["--regime", "emoji_think"], PAGE),
    "failures": (PreviewFilter(exact_match=False, failure_mode="wrong_content"), 0,
                 ["--exact-match", "false", "--failure-mode", "wrong_content"], PAGE),
    "offset5000": (PreviewFilter(), 5000, ["--offset", "5000"], PAGE),
    "no_match": (PreviewFilter(step_min=10**12), 0, ["--step-min", str(10**12)], 0),
}


def _record(rng: random.Random, step: int, index: int) -> dict[str, Any]:
    exact = rng.random() < 0.55
    normalized = exact or rng.random() < 0.3
    golden = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
    answer = golden if exact else " ".join(rng.choices(WORDS, k=rng.randint(0, 16)))
    prompt = " ".join(rng.choices(WORDS, k=rng.randint(60, 140)))
    return {
        "step": step,
        "checkpoint_id": f"checkpoint-{step - step % 500}",
        "example_id": f"syllo_{index:06d}",
        "dataset_id": "syllo_train_v3",
        "regime": rng.choice(REGIMES),
        "source_pool": rng.choice(SOURCES),
        "prompt": prompt,
        "golden": golden,
        "model_answer": answer,
        "exact_match": exact,
        "normalized_match": normalized,
        "failure_mode": None if exact else rng.choice(FAILURE_MODES),
        "ce": round(rng.uniform(0.01, 3.0), 4),
        "prompt_tokens": len(prompt.split()),
        "golden_tokens": len(golden.split()),
        "model_tokens": len(answer.split()),
        "generation_time_ms": round(rng.uniform(20, 400), 1),
        "contract_status": {"emoji_prefix": rng.random() < 0.9, "stop_emoji": rng.random() < 0.9},
    }


def generate_history(directory: Path, records: int = 100_000, days: int = 30, seed: int = 0) -> PreviewHistory:
    """``records`` previews over ``days`` days ending on END's day, then the default maintenance."""
    rng = random.Random(seed)
    now = [END - (days - 1) * 86400.0]
    history = PreviewHistory(directory, clock=lambda: now[0])
    written = 0
    for day in range(days):
        start = END - (days - 1 - day) * 86400.0
        count = records // days + (1 if day >= days - records % days else 0)
        for first in range(0, count, BATCH):
            size = min(BATCH, count - first)
            # Spread over the UTC day the file is named after, so ts and file agree.
            now[0] = start - 43000 + 86000 * first / max(count, 1)
            history.append(_record(rng, written + i, written + i) for i in range(size))
            written += size
    now[0] = END
    history.maintain()
    return history


def _median_seconds(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure_query(records: int = 100_000, days: int = 30, repeats: int = 3) -> dict[str, float]:
    """Median seconds per query, ``api_<name>_seconds`` and ``cli_<name>_seconds`` for each of QUERIES."""
    with tempfile.TemporaryDirectory(prefix="previews-bench-") as tmp:
        return _time_queries(generate_history(Path(tmp) / "preview", records, days), repeats)


def _time_queries(history: PreviewHistory, repeats: int) -> dict[str, float]:
    results: dict[str, float] = {}
    repo = Path(__file__).resolve().parent.parent
    for name, (where, offset, flags, expected) in QUERIES.items():
        def api(where: PreviewFilter = where, offset: int = offset, expected: int = expected) -> None:
            rows = history.query(where, limit=PAGE, offset=offset)
            if len(rows) != expected:
                raise AssertionError(f"{where}, offset {offset}: {len(rows)} rows, expected {expected}")

        argv = [sys.executable, "-m", "exporter.cli", "previews", "--dir", str(history.directory),
                "--limit", str(PAGE), "--format", "jsonl", *flags]

        def cli(argv: list[str] = argv, expected: int = expected) -> None:
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=repo, check=False)
            lines = proc.stdout.splitlines()
            if proc.returncode != 0 or len(lines) != expected:
                raise AssertionError(f"{argv}: rc={proc.returncode}, {len(lines)} rows: {proc.stderr[-500:]}")

        api()  # one untimed run each, so that the page cache is warm for every query alike
        results[f"api_{name}_seconds"] = _median_seconds(api, repeats)
        results[f"cli_{name}_seconds"] = _median_seconds(cli, repeats)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="Previews in the generated history.")
    parser.add_argument("--days", type=int, default=30, help="Days the history spans.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per query (the median is printed).")
    opts = parser.parse_args(argv)
    if opts.records < PAGE * 60 or opts.days < 1 or opts.repeats < 1:
        parser.error(f"need --records >= {PAGE * 60} (the offset query skips 5000), --days >= 1, --repeats >= 1")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="previews-bench-") as tmp:
        history = generate_history(Path(tmp) / "preview", opts.records, opts.days)
        files = sorted(path.name for path in history.directory.iterdir())
        size = sum(path.stat().st_size for path in history.directory.iterdir())
        print(f"history: {opts.records} previews over {opts.days} days, {len(files)} files "
              f"({sum(name.endswith('.gz') for name in files)} gzipped), {size / 1e6:.1f} MB on disk, "
              f"generated in {time.perf_counter() - begin:.1f} s", flush=True)
        results = _time_queries(history, opts.repeats)
    print(f"seconds per query for {PAGE} rows, newest first (median of {opts.repeats}):")
    print(f"  {'query':<12} {'api':>8} {'cli':>8}")
    for name in QUERIES:
        print(f"  {name:<12} {results[f'api_{name}_seconds']:8.4f} {results[f'cli_{name}_seconds']:8.4f}")
    print("api: PreviewHistory.query in this process; cli: `python -m exporter.cli previews --format jsonl`, "
          "interpreter start-up included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
