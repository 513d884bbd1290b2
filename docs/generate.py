"""Write the generated sections of the docs from the code they describe.

    python docs/generate.py          # rewrite the generated sections in place
    python docs/generate.py --check  # exit 1, naming each stale file, if the committed docs differ

A generated section lies between a ``<!-- BEGIN GENERATED[ NAME] -->`` line and
its ``<!-- END GENERATED[ NAME] -->``; the text around the markers is written
by hand and kept as it is. The sections:

- docs/metrics.md: the metric tables of the training exporter
  (``exporter/metrics.py``) and of the analytics exporter
  (``analytics_jobs/metrics.py``);
- docs/runbook.md: every alert's thresholds and windows, and the values the
  advisor, the checkpoint report and the dashboards use beside them
  (``exporter/thresholds.py``).

tests/test_docs.py fails when the committed docs are not what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analytics_jobs import metrics as analytics_metrics  # noqa: E402  (needs ROOT on the path as a script)
from exporter import metrics, thresholds  # noqa: E402


def _value(value: float) -> str:
    return f"{value:g}"


def _cell(text: str) -> str:
    """Text for a table cell: a ``|`` (as in ``|w|``) would end the cell."""
    return text.replace("|", "\\|")


def thresholds_tables() -> str:
    """Every alert's `for` (and `keep_firing_for`), numbers and windows, then the values that are no alert's."""
    rows = ["| alert | severity | for | fires when | value | why |", "|---|---|---|---|---|---|"]
    for entry in thresholds.ALERTS:
        values = [(name, _value(n.value), n.why) for name, n in entry.numbers.items()]
        values += [(name, w.duration, w.why) for name, w in entry.windows.items()]
        for_ = entry.for_ if entry.keep_firing_for == "0s" else f"{entry.for_}, keeps firing {entry.keep_firing_for}"
        first = f"| [{entry.alert}](#{entry.alert.lower()}) | {entry.severity} | {for_} | {_cell(entry.when)} |"
        if not values:
            rows.append(f"{first} - | - |")
        for i, (name, value, why) in enumerate(values):
            lead = first if i == 0 else "| | | | |"
            rows.append(f"{lead} `{name}` = `{value}` | {_cell(why)} |")
    rows += ["", "Values that are no alert's:", "", "| name | value | used by | why |", "|---|---|---|---|"]
    for name, setting in thresholds.SETTINGS.items():
        rows.append(f"| `{name}` | `{_value(setting.value)}` | {setting.used_by} | {_cell(setting.why)} |")
    return "\n".join(rows) + "\n"


# File (under docs/) -> section name ("" for the unnamed one) -> its content.
SECTIONS: dict[str, dict[str, Callable[[], str]]] = {
    "metrics.md": {
        "": lambda: metrics.markdown_table(metrics.ALL),
        "ANALYTICS": lambda: metrics.markdown_table(analytics_metrics.ALL),
    },
    "runbook.md": {
        "THRESHOLDS": thresholds_tables,
    },
}


def markers(name: str) -> tuple[str, str]:
    suffix = f" {name}" if name else ""
    return f"<!-- BEGIN GENERATED{suffix} -->\n", f"<!-- END GENERATED{suffix} -->"


def fill(text: str, name: str, content: str) -> str:
    """``text`` with the section ``name`` holding ``content``; ValueError when its markers are missing."""
    begin, end = markers(name)
    if text.count(begin) != 1:
        raise ValueError(f"no single {begin.strip()} line")
    head, rest = text.split(begin, 1)
    if end not in rest:
        raise ValueError(f"no {end} after {begin.strip()}")
    return head + begin + content + end + rest.split(end, 1)[1]


def render(docs_dir: Path = HERE) -> dict[Path, str]:
    """Path -> the file's text with every generated section written."""
    out = {}
    for file, sections in SECTIONS.items():
        path = docs_dir / file
        text = path.read_text()
        for name, build in sections.items():
            try:
                text = fill(text, name, build())
            except ValueError as exc:
                raise ValueError(f"{_shown(path)}: {exc}") from None
        out[path] = text
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def differences(docs_dir: Path = HERE) -> list[str]:
    """The files whose generated sections differ from the code (empty when they agree)."""
    return [f"{_shown(path)}: stale, differs from the code" for path, text in render(docs_dir).items()
            if path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="Only compare; exit 1 on any difference.")
    parser.add_argument("--docs", type=Path, default=HERE, help="Directory of the Markdown files.")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = differences(args.docs)
            for problem in problems:
                print(f"docs/generate.py: {problem}", file=sys.stderr)
            if problems:
                print("run: python docs/generate.py (or make docs)", file=sys.stderr)
            return 1 if problems else 0
        for path, text in render(args.docs).items():
            if path.read_text() != text:
                path.write_text(text)
    except ValueError as exc:
        print(f"docs/generate.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
