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
from typing import TYPE_CHECKING, Any

from exporter.argtypes import EXIT_FAILED, checked, fail, integer, positive_seconds, usable_cpus
from exporter.config import derive_run_id, parse_listen_address
from exporter.files import dir_problem

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from exporter.server import MetricsServer

ENV_PREFIX = "TRAINING_EXPORTER_ANALYTICS_"
DEFAULT_LISTEN = ":9946"
DEFAULT_INTERVAL = 600.0
# A *_history.json is read and rewritten whole on every analysis (a few KiB an entry): 10 000 entries are
# tens of MB, far more than a dashboard shows.
MAX_HISTORY = 10_000

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
    parser.add_argument("--web.config.file", dest="web_config_file", default=env("web.config.file", ""),
                        metavar="FILE",
                        help="The exporter-toolkit web configuration file: TLS, mutual TLS and basic auth "
                             "(docs/security.md); empty: plain HTTP, no auth.")
    parser.add_argument("--run-id", default=env("run-id"), metavar="ID",
                        help="Value of the run_id label (default: the name of --checkpoint-dir, as the training "
                             "exporter derives it from the Trainer's output dir).")
    parser.add_argument("--history", type=integer(1, MAX_HISTORY), default=env("history", "100"), metavar="N",
                        help=f"Entries kept in each *_history.json (at most {MAX_HISTORY}).")
    # torch.set_num_threads(100000) is accepted, and the first matrix product then segfaults. More threads
    # than the CPUs the process may use only make it slower, so those are the bound.
    cpus = usable_cpus()
    parser.add_argument("--threads", type=integer(1, cpus, "the CPUs this process may use"),
                        default=env("threads", "1"), metavar="N",
                        help="CPU threads for the tensor maths, at most the CPUs this process may use "
                             f"({cpus} here). One keeps the daemon a quiet neighbour of training (a 0.6B checkpoint "
                             "takes seconds, an 8B one well under a minute); more only pay off on idle cores, and "
                             "oversubscribed cores make them far slower.")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the analytics exporter as parsed by :func:`add_parser`'s parser; the exit code.

    Everything that can be checked cheaply is checked first, and the endpoint starts before the base model is
    read (seconds for a large one, after importing torch): a taken port or a bad path is one line and exit
    code 2 at once. /metrics serves an empty exposition until the daemon's collectors are registered.
    """
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
    status_dir = Path(args.status_dir)
    problem = dir_problem(status_dir)
    if problem:
        fail(f"analytics: --status-dir: {problem}")

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    server = None
    if not args.once:
        server = serve(registry, args.listen_address, args.web_config_file)
    try:
        return _analyse(args, base_path, checkpoint_dir, status_dir, run_id, registry, server)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def serve(registry: CollectorRegistry, address: tuple[str, int], web_config_file: str) -> MetricsServer:
    """The started endpoint of ``registry`` (exits with one line and code 2 when it cannot be)."""
    from exporter.server import MetricsServer, ServerHooks, SharedExposition
    from exporter.web import WebConfigError, WebConfigSource

    web = None
    if web_config_file:
        try:
            web = WebConfigSource(web_config_file, on_error=_log_once)
        except WebConfigError as exc:
            fail(f"analytics: {exc}")
    host, port = address
    try:
        return MetricsServer(host, port, SharedExposition(registry), web=web, hooks=ServerHooks(on_error=_log_once),
                             name="training-analytics").start()
    except OSError as exc:
        fail(f"analytics: cannot listen on {host}:{port}: {exc.strerror or exc}")


def _log_once(exc: Exception, seen: set[str] = set()) -> None:  # noqa: B006 - one set for the process
    kind = type(exc).__name__
    (log.debug if kind in seen else log.warning)("analytics: /metrics endpoint: %s: %s", kind, exc)
    seen.add(kind)


def _analyse(args: argparse.Namespace, base_path: Path, checkpoint_dir: Path, status_dir: Path, run_id: str,
             registry: CollectorRegistry, server: Any) -> int:
    import torch

    from analytics_jobs.analysis import BaseModel
    from analytics_jobs.daemon import AnalyticsDaemon
    from analytics_jobs.weights import WeightsError

    torch.set_num_threads(args.threads)
    try:
        base = BaseModel(base_path)
    except WeightsError as exc:
        fail(f"analytics: --base: {exc}")
    try:
        status_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"analytics: --status-dir: cannot create {args.status_dir}: {exc.strerror or exc}")
    daemon = AnalyticsDaemon(base, checkpoint_dir, run_id=run_id, status_dir=status_dir, history=args.history,
                             registry=registry)
    if args.once:
        ckpt = daemon.newest_ready(report_skipped=False)
        if ckpt is None:
            sys.stderr.write(f"training-exporter: analytics: no complete checkpoint-N in {checkpoint_dir}\n")
            return EXIT_FAILED
        return 0 if daemon.analyse(ckpt) else EXIT_FAILED

    host = args.listen_address[0]
    log.info("analytics: serving /metrics on %s:%d (run_id %s); watching %s every %g s against %s (%d blocks)",
             host, server.server_address[1], run_id, checkpoint_dir, args.interval, base.name, base.num_blocks)

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop)
    daemon.run_forever(args.interval)
    return 0
