"""The ``demo`` subcommand: its flags, and the exporter's own (``exporter.config``).

Building the parser imports no torch: the run itself (`exporter.demo.run`) is
imported by :func:`run`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from exporter.argtypes import checked, fail, non_negative_number, positive_int
from exporter.config import OPTIONS, ConfigError, ExporterConfig, add_arguments, resolve
from exporter.demo.faults import parse_fault

__all__ = ["LOCAL_ALERTING_LINGER_S", "add_parser", "run"]

# With --local-alerting and no --linger: long enough for a NaN alert raised on
# the last step to resolve (its rule looks one minute back) and be notified.
LOCAL_ALERTING_LINGER_S = 75.0


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand as ``name`` to ``sub`` (the top-level parser's subparsers)."""
    demo: argparse.ArgumentParser = sub.add_parser(
        name,
        help="Fine-tune a tiny GPT-2 + LoRA on synthetic arithmetic on the CPU, serving /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--max-steps", type=positive_int, default=5000,
                      help="Optimizer steps to train (5000: about a minute on one CPU core).")
    demo.add_argument("--output-dir", default="demo-output", help="Checkpoints go to DIR/checkpoint-N.")
    demo.add_argument("--save-steps", type=positive_int, default=500, help="Save a checkpoint every N steps.")
    demo.add_argument("--eval-steps", type=positive_int, default=None,
                      help="Evaluate every N steps; None: a fifth of --max-steps.")
    demo.add_argument("--train-examples", type=positive_int, default=20_000,
                      help="Training examples; a hundred or so are memorised and the eval loss rises (overfitting).")
    demo.add_argument("--learning-rate", type=non_negative_number, default=2e-3,
                      help="Peak learning rate of the cosine schedule; 1e-7 leaves the loss flat (a plateau).")
    demo.add_argument("--logging-steps", type=positive_int, default=50, help="Trainer logging interval.")
    demo.add_argument("--inject", action="append", type=checked(parse_fault), default=[], metavar="KIND@STEP",
                      help="Fault injection for alert demos: nan@STEP or spike@STEP (repeatable).")
    demo.add_argument("--seed", type=int, default=0, help="Random seed.")
    demo.add_argument(
        "--local-alerting", action="store_true",
        help="Also run the project's alerting chain on loopback and print each notification: prometheus "
             "(1 s scrape and evaluation, prometheus/rules/*.yml) -> prometheus-alertmanager "
             "(alertmanager/alertmanager.yml) -> local Slack and SMTP stand-ins. Needs the prometheus and "
             "prometheus-alertmanager binaries on PATH and a checkout of the repository. Without --linger, "
             f"lingers {LOCAL_ALERTING_LINGER_S:.0f} s so that alerts resolve.")
    add_arguments(demo, ExporterConfig())
    return demo


def run(args: argparse.Namespace) -> int:
    """Run the demo as parsed by :func:`add_parser`'s parser; the exit code."""
    try:
        config = resolve(args)
    except ConfigError as exc:
        fail(str(exc))
    if args.local_alerting and not _linger_given(args, config):
        config = config.replace(linger_seconds=LOCAL_ALERTING_LINGER_S)

    from exporter.demo.run import run_demo

    return run_demo(
        config,
        local_alerting=args.local_alerting,
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        faults=args.inject,
        seed=args.seed,
        eval_steps=args.eval_steps,
        train_examples=args.train_examples,
        learning_rate=args.learning_rate,
    )


def _linger_given(args: argparse.Namespace, config: ExporterConfig) -> bool:
    """Whether --linger, its environment variable or the config file set the linger time."""
    env = next(opt.env for opt in OPTIONS if opt.attr == "linger_seconds")
    return (getattr(args, "linger_seconds", None) is not None or env in os.environ
            or config.linger_seconds != ExporterConfig().linger_seconds)
