"""The ``demo`` subcommand: its flags, and the exporter's own (``exporter.config``).

Building the parser imports no torch: the run itself (`exporter.demo.run`) is
imported by :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

from exporter.argtypes import checked, fail, integer, non_negative_number, positive_int
from exporter.config import OPTIONS, ConfigError, ExporterConfig, add_arguments, resolve
from exporter.demo.faults import parse_fault
from exporter.files import dir_problem

__all__ = ["LOCAL_ALERTING_LINGER_S", "add_parser", "run"]

# With --local-alerting and no --linger: long enough for a NaN alert raised on
# the last step to resolve (its rule looks one minute back) and be notified.
LOCAL_ALERTING_LINGER_S = 75.0
# About 0.8 KB and 12 us an example, built up front: a million is 0.8 GB and 12 s. Two-digit operands make
# only 10 000 distinct sums, so more than that only repeats them.
MAX_TRAIN_EXAMPLES = 1_000_000
# The Trainer seeds numpy's legacy generator, which takes 0 .. 2**32 - 1 (a traceback outside it).
MAX_SEED = 2**32 - 1


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
    demo.add_argument("--train-examples", type=integer(1, MAX_TRAIN_EXAMPLES, "built in memory up front"),
                      default=20_000,
                      help="Training examples; a hundred or so are memorised and the eval loss rises (overfitting). "
                           f"At most {MAX_TRAIN_EXAMPLES}.")
    demo.add_argument("--learning-rate", type=non_negative_number, default=2e-3,
                      help="Peak learning rate of the cosine schedule; 1e-7 leaves the loss flat (a plateau).")
    demo.add_argument("--logging-steps", type=positive_int, default=50, help="Trainer logging interval.")
    demo.add_argument("--inject", action="append", type=checked(parse_fault), default=[], metavar="KIND@STEP",
                      help="Fault injection for alert demos: nan@STEP or spike@STEP (repeatable).")
    demo.add_argument("--seed", type=integer(0, MAX_SEED, "numpy's seed range"), default=0,
                      help=f"Random seed, 0 to {MAX_SEED}.")
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
    """Run the demo as parsed by :func:`add_parser`'s parser; the exit code.

    The paths it will write and the listen address are checked before torch is imported and the model
    built (several seconds): a regular file in the way, or a port that is taken, is one line and exit code 2
    at once. The address stays held from then until the exporter binds it, so that no one takes it meanwhile.
    """
    try:
        config = resolve(args)
    except ConfigError as exc:
        fail(str(exc))
    if args.local_alerting and not _linger_given(args, config):
        config = config.replace(linger_seconds=LOCAL_ALERTING_LINGER_S)
    if problem := dir_problem(args.output_dir):
        fail(f"--output-dir: {problem}")
    if config.previews:
        history = config.history_dir or os.path.join(args.output_dir, "logs", "preview")
        if problem := dir_problem(history):
            fail(f"history.dir: {problem}")
    reserved = reserve(*config.host_port)

    from exporter.demo.run import run_demo

    try:
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
            reserved=reserved,
        )
    finally:
        if reserved is not None:
            reserved.close()


def reserve(host: str, port: int) -> socket.socket | None:
    """A socket listening on ``host:port`` as the exporter's server would (``None`` for port 0: any free one).

    The exporter itself can only bind after torch and transformers are imported; this binds at once, so
    that a taken address is reported before that, and holds the address until the caller closes the socket
    just before the exporter binds it. A connection that arrives meanwhile is reset when it closes.
    """
    if port == 0:
        return None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    try:
        # As the server sets it: a connection of an earlier run in TIME_WAIT does not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    return sock


def _linger_given(args: argparse.Namespace, config: ExporterConfig) -> bool:
    """Whether --linger, its environment variable or the config file set the linger time."""
    env = next(opt.env for opt in OPTIONS if opt.attr == "linger_seconds")
    return (getattr(args, "linger_seconds", None) is not None or env in os.environ
            or config.linger_seconds != ExporterConfig().linger_seconds)
