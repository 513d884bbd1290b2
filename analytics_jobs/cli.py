"""``training-exporter analytics``: watch a Trainer's checkpoints, publish per-layer drift and stability.

Every flag has an environment twin (``TRAINING_EXPORTER_ANALYTICS_`` + the
flag in upper case with ``.``/``-`` as ``_``); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from exporter.argtypes import EXIT_FAILED, checked, fail, positive_int, positive_seconds
from exporter.config import derive_run_id, parse_listen_address

ENV_PREFIX = "TRAINING_EXPORTER_ANALYTICS_"
DEFAULT_LISTEN = ":9946"
DEFAULT_INTERVAL = 600.0

log = logging.getLogger("training_exporter.analytics")


def env_name(flag: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", flag.upper())



def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help="Watch a Trainer's checkpoints: per-layer drift from the base model and parameter stability, "
             "on /metrics and in status/*.json.",
        description="Analyses the newest complete checkpoint-N of --checkpoint-dir against --base, streaming "
                    "tensors from safetensors files, then every --interval seconds the next new one. Flags "
                    f"have environment twins: {ENV_PREFIX}<FLAG>, e.g. {env_name('checkpoint-dir')}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def env(flag: str, default: str | None = None) -> str | None:
        return os.environ.get(env_name(flag), default)

    parser.add_argument("--base", default=env("base"), metavar="PATH",
                        help="Base model: a directory with model.safetensors (or shards and their index), or a "
                             ".safetensors file. Required.")
    parser.add_argument("--checkpoint-dir", default=env("checkpoint-dir"), metavar="DIR",
                        help="The Trainer's output dir holding checkpoint-N folders (full model or peft adapter). "
                             "Required.")
    parser.add_argument("--status-dir", default=env("status-dir", "status"), metavar="DIR",
                        help="Where layer_drift.json, parameter_stability.json and their *_history.json go.")
    parser.add_argument("--interval", type=positive_seconds, default=env("interval", str(DEFAULT_INTERVAL)),
                        metavar="SECONDS", help="Seconds between looks at --checkpoint-dir.")
    parser.add_argument("--once", action="store_true",
                        help="Analyse the newest complete checkpoint, write the status files and exit "
                             "(0: done, 1: the analysis failed or no complete checkpoint).")
    parser.add_argument("--web.listen-address", dest="listen_address", type=checked(parse_listen_address),
                        default=env("web.listen-address", DEFAULT_LISTEN), metavar="HOST:PORT",
                        help="Where to serve /metrics (not served with --once).")
    parser.add_argument("--run-id", default=env("run-id"), metavar="ID",
                        help="Value of the run_id label (default: the name of --checkpoint-dir, as the training "
                             "exporter derives it from the Trainer's output dir).")
    parser.add_argument("--history", type=positive_int, default=env("history", "100"), metavar="N",
                        help="Entries kept in each *_history.json.")
    parser.add_argument("--threads", type=positive_int, default=env("threads", "1"), metavar="N",
                        help="CPU threads for the tensor maths. One keeps the daemon a quiet neighbour of training "
                             "(a 0.6B checkpoint takes seconds, an 8B one well under a minute); more only pay off on "
                             "idle cores, and oversubscribed cores make them far slower.")
    return parser


def run(args: argparse.Namespace) -> int:

    if not args.base:
        fail(f"analytics: --base is required (or {env_name('base')})")
    if not args.checkpoint_dir:
        fail(f"analytics: --checkpoint-dir is required (or {env_name('checkpoint-dir')})")
    base_path = Path(args.base)
    if not base_path.exists():
        fail(f"analytics: --base: no such file or directory: {args.base}")
    checkpoint_dir = Path(args.checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        fail(f"analytics: --checkpoint-dir: not a directory: {args.checkpoint_dir}")
    if args.once and not checkpoint_dir.is_dir():
        fail(f"analytics: --checkpoint-dir: no such directory: {args.checkpoint_dir}")
    run_id = args.run_id or derive_run_id(args.checkpoint_dir)
    if len(run_id) > 128 or "\n" in run_id:
        fail("analytics: --run-id must be a single line of at most 128 characters")

    import torch

    from analytics_jobs.analysis import BaseModel
    from analytics_jobs.daemon import AnalyticsDaemon
    from analytics_jobs.weights import WeightsError

    torch.set_num_threads(args.threads)
    try:
        base = BaseModel(base_path)
    except WeightsError as exc:
        fail(f"analytics: --base: {exc}")
    status_dir = Path(args.status_dir)
    try:
        status_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"analytics: --status-dir: cannot create {args.status_dir}: {exc.strerror or exc}")
    daemon = AnalyticsDaemon(base, checkpoint_dir, run_id=run_id, status_dir=status_dir, history=args.history)
    if args.once:
        ckpt = daemon.newest_ready(report_skipped=False)
        if ckpt is None:
            sys.stderr.write(f"training-exporter: analytics: no complete checkpoint-N in {checkpoint_dir}\n")
            return EXIT_FAILED
        return 0 if daemon.analyse(ckpt) else EXIT_FAILED

    from prometheus_client import start_http_server

    host, port = args.listen_address
    try:
        server, _ = start_http_server(port, addr=host, registry=daemon.registry)
    except OSError as exc:
        fail(f"analytics: cannot listen on {host}:{port}: {exc.strerror or exc}")
    log.info("analytics: serving /metrics on %s:%d (run_id %s); watching %s every %g s against %s (%d blocks)",
             host, server.server_address[1], run_id, checkpoint_dir, args.interval, base.name, base.num_blocks)

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop)
    try:
        daemon.run_forever(args.interval)
    finally:
        server.shutdown()
        server.server_close()
    return 0
