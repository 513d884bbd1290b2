"""The ``training-exporter`` console script: one entry point, one subcommand per job.

This module only dispatches: the top-level flags, the table of subcommands,
and :func:`main`. Bad input (flags, environment, config file) ends with one
line on stderr and exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence
from typing import NoReturn

from exporter.argtypes import EXIT_BAD_INPUT
from exporter.version import __version__

# One module per subcommand, in the order --help lists them. Each module has
# ``add_parser(sub, name) -> argparse.ArgumentParser`` (adds the subcommand to
# ``sub``, a parser created with ``sub.add_parser(name, ...)``) and
# ``run(args) -> int``; it is imported when the parser is built, so keep
# heavy imports (torch, transformers) inside ``run``.
SUBCOMMANDS: dict[str, str] = {
    "demo": "exporter.demo.cli",
    "advise": "exporter.advisor.cli",
    "previews": "exporter.previews.cli",
    "analytics": "analytics_jobs.cli",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the message; operators and scripts want one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="training-exporter",
        description="Prometheus-native observability for fine-tuning language models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log.level", dest="log_level", default="info",
                        choices=["debug", "info", "warning", "error"], help="Log level.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in SUBCOMMANDS:
        return int(importlib.import_module(SUBCOMMANDS[args.command]).run(args))
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
