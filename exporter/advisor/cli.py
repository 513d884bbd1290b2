"""``training-exporter advise``: should this run continue, stop, or which checkpoint should be used?

Reads a run from Prometheus over its HTTP API and reports progress and ETA, the
loss trend, the best evaluation and its checkpoint, overfitting, plateau,
non-finite losses and the run's active alerts, then gives one recommendation:
``continue``, ``stop`` or ``use checkpoint-N``, with the reason. See
``docs/advisor.md``.

Exit codes: 0 with a report or "waiting for data"; 2 with one line on stderr
when Prometheus cannot be reached or answers an error, or the run is unknown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

from exporter.advisor.analysis import Report, Waiting
from exporter.advisor.client import AdvisorError, Prometheus, advise, duration_seconds
from exporter.advisor.render import error_json, to_json, to_text
from exporter.argtypes import EXIT_BAD_INPUT, checked, positive_int, positive_seconds

__all__ = ["add_parser", "run"]

DEFAULT_PROMETHEUS = "http://localhost:9090"
ENV_PROMETHEUS = "TRAINING_EXPORTER_PROMETHEUS_URL"
ENV_RUN_ID = "TRAINING_EXPORTER_ADVISE_RUN_ID"
# Home and clear screen: each refresh redraws the report in place.
CLEAR = "\x1b[H\x1b[2J"


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def _duration(text: str) -> str:
    duration_seconds(text)  # a ValueError names what is wrong
    return text



def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help="Ask Prometheus whether a run should continue, stop, or which checkpoint to use.",
        description="Report a training run's progress, loss trend, best evaluation, overfitting, plateau and "
                    "alerts from Prometheus, with one recommendation: continue, stop or use checkpoint-N.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # `%(default).0s` prints nothing: it only stops the formatter from appending "(default: ...)".
    parser.add_argument("--prometheus", type=_url, metavar="URL",
                        default=os.environ.get(ENV_PROMETHEUS) or DEFAULT_PROMETHEUS,
                        help=f"Base URL of the Prometheus that scrapes the run (env {ENV_PROMETHEUS}).")
    parser.add_argument("--run-id", metavar="ID", default=os.environ.get(ENV_RUN_ID, ""),
                        help="Value of the run's run_id label; empty: the newest run (largest "
                             f"training_start_time_seconds) (env {ENV_RUN_ID}).%(default).0s")
    parser.add_argument("--watch", type=positive_seconds, metavar="SECONDS", default=None,
                        help="Refresh every SECONDS, redrawing in place (one JSON document per line with --json) "
                             "until Ctrl-C.%(default).0s")
    parser.add_argument("--json", action="store_true",
                        help="Print a JSON document (schema in docs/advisor.md) instead of text.")
    parser.add_argument("--timeout", type=positive_seconds, metavar="SECONDS", default=5.0,
                        help="HTTP timeout of each request to Prometheus.")
    parser.add_argument("--lookback", type=checked(_duration), metavar="DURATION", default="7d",
                        help="How far back to look for runs and their series (a Prometheus duration).")
    parser.add_argument("--save-steps", type=positive_int, metavar="N", default=None,
                        help="Checkpoint interval to assume when the exporter publishes no "
                             "training_checkpoint_step (older exporters; plain loops that do not call "
                             "observe_checkpoint).%(default).0s")
    return parser


def _render(result: Report | Waiting, args: argparse.Namespace) -> str:
    return to_json(result, args.prometheus) + "\n" if args.json else to_text(result)


def _error(message: str) -> int:
    sys.stderr.write(f"training-exporter: error: {message}\n")
    return EXIT_BAD_INPUT


def _watch(prom: Prometheus, args: argparse.Namespace, out: TextIO) -> int:
    # Redraw in place only on a terminal; piped output gets the frames one after the other.
    redraw = not args.json and out.isatty()
    first = True
    try:
        while True:
            started = time.monotonic()
            try:
                frame = _render(advise(prom, run_id=args.run_id, lookback=args.lookback,
                                       save_steps=args.save_steps), args)
            except AdvisorError as exc:
                # A wrong URL or run id ends at once; a later outage is shown and retried.
                if first:
                    return _error(str(exc))
                frame = (f"training-exporter: error: {exc} (retrying)\n" if not args.json
                         else error_json(str(exc), args.prometheus) + "\n")
            first = False
            if redraw:
                stamp = time.strftime("%H:%M:%S")
                frame = f"{CLEAR}every {args.watch:g} s, {stamp}; Ctrl-C to stop\n\n{frame}"
            elif not args.json:
                frame += "\n"
            out.write(frame)
            out.flush()
            time.sleep(max(args.watch - (time.monotonic() - started), 0.0))
    except KeyboardInterrupt:
        if redraw:
            out.write("\n")
            out.flush()
        return 0


def run(args: argparse.Namespace) -> int:
    prom = Prometheus(args.prometheus, timeout=args.timeout)
    out = sys.stdout
    try:
        if args.watch is not None:
            return _watch(prom, args, out)
        try:
            result = advise(prom, run_id=args.run_id, lookback=args.lookback, save_steps=args.save_steps)
        except AdvisorError as exc:
            return _error(str(exc))
        out.write(_render(result, args))
        out.flush()
        return 0
    finally:
        prom.session.close()
