"""The ``training-exporter`` console script: one entry point, one subcommand per job.

Bad input (flags, environment, config file) ends with one line on stderr and
exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from exporter import __version__
from exporter.config import ConfigError, ExporterConfig, add_arguments, resolve

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the message; operators and scripts want one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"training-exporter: error: {message}\n")
    raise SystemExit(EXIT_BAD_INPUT)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fault(text: str) -> str:
    from exporter.demo_task import parse_fault

    try:
        parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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

    demo = sub.add_parser(
        "demo",
        help="Fine-tune a tiny GPT-2 + LoRA on synthetic arithmetic on the CPU, serving /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--max-steps", type=_positive_int, default=5000,
                      help="Optimizer steps to train (5000: about a minute on one CPU core).")
    demo.add_argument("--output-dir", default="demo-output", help="Checkpoints go to DIR/checkpoint-N.")
    demo.add_argument("--save-steps", type=_positive_int, default=500, help="Save a checkpoint every N steps.")
    demo.add_argument("--logging-steps", type=_positive_int, default=50, help="Trainer logging interval.")
    demo.add_argument("--inject", action="append", type=_fault, default=[], metavar="KIND@STEP",
                      help="Fault injection for alert demos: nan@STEP or spike@STEP (repeatable).")
    demo.add_argument("--seed", type=int, default=0, help="Random seed.")
    add_arguments(demo, ExporterConfig())
    return parser


def _exporter_config(args: argparse.Namespace) -> ExporterConfig:
    try:
        return resolve(args)
    except ConfigError as exc:
        fail(str(exc))


def run_demo(args: argparse.Namespace, config: ExporterConfig) -> int:
    from exporter.callback import PrometheusCallback
    from exporter.core import PortInUseError
    from exporter.demo import train_demo

    # On the command line a taken port is bad input: say so before training starts.
    config = config.replace(port_in_use="fail")
    callback = PrometheusCallback(config)
    try:
        train_demo(
            callback,
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            save_steps=args.save_steps,
            logging_steps=args.logging_steps,
            faults=args.inject,
            seed=args.seed,
        )
    except PortInUseError as exc:
        fail(str(exc).removeprefix("training-exporter: "))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return run_demo(args, _exporter_config(args))
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
