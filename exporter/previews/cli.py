"""``training-exporter previews``: query the preview history from the command line.

Prints the newest matching previews first, one page at a time (``--limit``,
``--offset``), as an aligned table (long texts cut with an ellipsis), as one
JSON array (``json``), as JSON lines (``jsonl``) or as CSV with every field.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from exporter.argtypes import EXIT_FAILED, EXIT_OK, checked, fail, integer
from exporter.previews.history import PreviewHistory
from exporter.previews.query import PreviewFilter
from exporter.previews.records import PREVIEW_FIELDS, PreviewHistoryError, parse_time_bound

FORMATS = ("table", "json", "jsonl", "csv")
# The same variable that sets the directory the training writes to (config option history.dir).
DIR_ENV = "TRAINING_EXPORTER_HISTORY_DIR"
ELLIPSIS = "…"
# (header, field, widest cell): texts are cut, short fields are never wider than their values.
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("TIME (UTC)", "ts", 19),
    ("STEP", "step", 10),
    ("REGIME", "regime", 16),
    ("SOURCE", "source_pool", 12),
    ("EM", "exact_match", 3),
    ("NORM", "normalized_match", 4),
    ("FAILURE", "failure_mode", 16),
    ("CE", "ce", 8),
    ("EXAMPLE", "example_id", 16),
    ("PROMPT", "prompt", 40),
    ("GOLDEN", "golden", 20),
    ("ANSWER", "model_answer", 30),
)
_RIGHT_ALIGNED = {"step", "ce"}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _time(end: bool) -> Callable[[str], datetime]:
    def parse(text: str) -> datetime:
        return parse_time_bound(text, end=end)

    return checked(parse, "expected an ISO 8601 date or datetime (2025-11-22, 2025-11-22T14:30:00Z), got {text!r}")


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help="Query the preview history (logs/preview/preview_history_*.jsonl[.gz]) with filters and pages.",
        description="Query the preview history, newest first. Reads plain and gzipped day files; "
                    "corrupt lines are skipped with a warning on stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dir", default=os.environ.get(DIR_ENV) or "logs/preview",
                        help=f"The preview history directory (environment: {DIR_ENV}, as for training).")
    parser.add_argument("--regime", help="Only this regime (exact value).")
    parser.add_argument("--source", help="Only this source pool, e.g. fixed_eval, train, failures.")
    parser.add_argument("--exact-match", type=_bool, metavar="true|false", help="Only exact matches, or only misses.")
    parser.add_argument("--failure-mode", help="Only this failure mode, e.g. wrong_content.")
    parser.add_argument("--step-min", type=integer(0), metavar="N", help="Only steps >= N.")
    parser.add_argument("--step-max", type=integer(0), metavar="N", help="Only steps <= N.")
    parser.add_argument("--since", type=_time(end=False), metavar="TIME",
                        help="Only previews at or after TIME (ISO 8601 date or datetime; no zone means UTC).")
    parser.add_argument("--until", type=_time(end=True), metavar="TIME",
                        help="Only previews before TIME; a bare date includes that whole day.")
    parser.add_argument("--limit", type=integer(1), default=20, metavar="N", help="Rows per page.")
    parser.add_argument("--offset", type=integer(0), default=0, metavar="N", help="Matching rows to skip first.")
    parser.add_argument("--oldest-first", action="store_true", help="Oldest first instead of newest first.")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table: aligned columns, long texts cut; json: one JSON array; "
                             "jsonl: one JSON object per line; csv: a header and every field.")
    return parser


# ----------------------------------------------------------------------------- output


def _cell(record: dict[str, Any], field: str, width: int) -> str:
    value = record.get(field)
    if value is None:
        text = "-"
    elif field == "ts":
        text = str(value).replace("T", " ")[:19]
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif field == "ce":
        text = f"{value:.4f}"
    else:
        # One line per row: newlines and tabs in prompts would break the columns.
        text = re.sub(r"\s+", " ", str(value)).strip()
    if len(text) > width:
        text = text[: width - 1] + ELLIPSIS
    return text


def write_table(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    cells = [[_cell(row, field, width) for _, field, width in TABLE_COLUMNS] for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (header, _, _) in enumerate(TABLE_COLUMNS)]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if field in _RIGHT_ALIGNED else value.ljust(width)
            for value, width, (_, field, _) in zip(values, widths, TABLE_COLUMNS, strict=True)
        ]
        return "  ".join(parts).rstrip() + "\n"

    out.write(line([header for header, _, _ in TABLE_COLUMNS]))
    for values in cells:
        out.write(line(values))


def write_json(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        out.write("[]\n")
        return
    out.write("[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n]\n")


def write_jsonl(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PREVIEW_FIELDS)
    for row in rows:
        writer.writerow([_csv_value(row.get(field)) for field in PREVIEW_FIELDS])


WRITERS: dict[str, Callable[[Sequence[dict[str, Any]], TextIO], None]] = {
    "table": write_table,
    "json": write_json,
    "jsonl": write_jsonl,
    "csv": write_csv,
}


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        fail(f"--dir {args.dir}: no such directory")
    if args.step_min is not None and args.step_max is not None and args.step_min > args.step_max:
        fail(f"--step-min {args.step_min} is above --step-max {args.step_max}")
    if args.since is not None and args.until is not None and args.since >= args.until:
        fail("--since must be before --until")
    history = PreviewHistory(directory)
    try:
        rows = history.query(
            PreviewFilter(
                regime=args.regime, source=args.source, exact_match=args.exact_match,
                failure_mode=args.failure_mode, step_min=args.step_min, step_max=args.step_max,
                since=args.since, until=args.until,
            ),
            limit=args.limit, offset=args.offset, newest_first=not args.oldest_first,
        )
    except PreviewHistoryError as exc:
        sys.stderr.write(f"training-exporter: error: {exc}\n")
        return EXIT_FAILED
    try:
        WRITERS[args.format](rows, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # `previews | head`: the reader left, which is not an error. Point stdout at devnull so the
        # interpreter's flush at exit does not raise again (as the Python signal docs recommend).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
