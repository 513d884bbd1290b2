"""The ``training-exporter`` console script: one entry point, one subcommand per job.

Bad input (flags, environment, config file) ends with one line on stderr and
exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn

from exporter import __version__
from exporter.argtypes import non_negative_number, positive_int
from exporter.config import OPTIONS, ConfigError, ExporterConfig, add_arguments, resolve

EXIT_BAD_INPUT = 2
# Subcommands that live in their own module. Each module has
# ``add_parser(sub, name) -> argparse.ArgumentParser`` (adds the subcommand to
# ``sub``, a parser created with ``sub.add_parser(name, ...)``) and
# ``run(args) -> int``; it is imported when the parser is built, so keep
# heavy imports (torch, transformers) inside ``run``.
SUBCOMMANDS: dict[str, str] = {
    "advise": "exporter.advisor",
    "previews": "exporter.previews_cli",
    "analytics": "analytics_jobs.cli",
}
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
# With --local-alerting and no --linger: long enough for a NaN alert raised on
# the last step to resolve (its rule looks one minute back) and be notified.
LOCAL_ALERTING_LINGER_S = 75.0


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the message; operators and scripts want one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"training-exporter: error: {message}\n")
    raise SystemExit(EXIT_BAD_INPUT)




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
    demo.add_argument("--inject", action="append", type=_fault, default=[], metavar="KIND@STEP",
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
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def _exporter_config(args: argparse.Namespace) -> ExporterConfig:
    try:
        return resolve(args)
    except ConfigError as exc:
        fail(str(exc))


def run_demo(args: argparse.Namespace, config: ExporterConfig) -> int:
    if getattr(args, "local_alerting", False):
        return _run_demo_local_alerting(args, config)
    return _train(args, config)


def _train(args: argparse.Namespace, config: ExporterConfig) -> int:
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
            eval_steps=args.eval_steps,
            train_examples=args.train_examples,
            learning_rate=args.learning_rate,
        )
    except PortInUseError as exc:
        fail(str(exc).removeprefix("training-exporter: "))
    return 0


# --------------------------------------------------------------------------- demo --local-alerting


def _linger_given(args: argparse.Namespace, config: ExporterConfig) -> bool:
    """Whether --linger, its environment variable or the config file set the linger time."""
    env = next(opt.env for opt in OPTIONS if opt.attr == "linger_seconds")
    return (getattr(args, "linger_seconds", None) is not None or env in os.environ
            or config.linger_seconds != ExporterConfig().linger_seconds)


def _scrape_target(config: ExporterConfig) -> tuple[ExporterConfig, str]:
    """The exporter's address as Prometheus on loopback scrapes it; port 0 is replaced by a free port first."""
    from exporter.localstack import free_port

    host, port = config.host_port
    if port == 0:
        port = free_port()
        config = config.replace(listen_address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return config, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _say(line: str) -> None:
    """One line on stdout, above the Trainer's progress bar (which is on stderr)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - transformers depends on tqdm
        print(line, flush=True)
        return
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals(handler: Callable[[int, FrameType | None], None] | int) -> Iterator[None]:
    """Install ``handler`` for SIGINT, SIGTERM and SIGHUP for the block (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM and SIGHUP end the demo like Ctrl-C, so that the `finally` stopping the children runs.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_demo_local_alerting(args: argparse.Namespace, config: ExporterConfig) -> int:
    from exporter.localstack import LocalAlerting, LocalStackError, check_prerequisites

    # What can be checked before anything starts ends as one line with exit code 2.
    try:
        check_prerequisites()
    except LocalStackError as exc:
        fail(f"--local-alerting: {exc}")
    if not _linger_given(args, config):
        config = config.replace(linger_seconds=LOCAL_ALERTING_LINGER_S)
    config, target = _scrape_target(config)
    # aiosmtpd warns on every connection that AUTH without TLS is unsafe: intended, loopback only.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS", category=UserWarning)

    workdir = Path(tempfile.mkdtemp(prefix="training-exporter-alerting-"))
    stack = LocalAlerting([target], workdir, on_event=lambda event: _say(event.line()))
    keep_workdir = False
    with _signals(_interrupt):
        try:
            try:
                stack.start()
            except LocalStackError as exc:
                fail(f"--local-alerting: {exc}")
            except (RuntimeError, TimeoutError, OSError) as exc:
                keep_workdir = True
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                sys.stderr.write(f"training-exporter: error: --local-alerting: {first} (logs in {workdir})\n")
                return EXIT_FAILED
            prom, am = stack.prometheus, stack.alertmanager
            _say(f"local alerting: Prometheus {stack.prometheus_url} (pid {prom.pid if prom else '?'}) "
                 f"scraping {target}, Alertmanager {stack.alertmanager_url} (pid {am.pid if am else '?'}); "
                 "notifications to the Slack and email stand-ins are printed here")
            return _train(args, config)
        except KeyboardInterrupt:
            _say("local alerting: interrupted")
            return EXIT_INTERRUPTED
        finally:
            # A second Ctrl-C must not leave a child running: stop them all first.
            with _signals(signal.SIG_IGN):
                started = stack.prometheus is not None
                try:
                    stack.stop()
                finally:
                    if started:
                        _say(f"local alerting: {stack.summary()}; prometheus and alertmanager stopped")
                    if not keep_workdir:
                        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return run_demo(args, _exporter_config(args))
    if args.command in SUBCOMMANDS:
        return int(importlib.import_module(SUBCOMMANDS[args.command]).run(args))
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
