"""Test-only helpers for the end-to-end alerting tests: the real chain on loopback.

demo training -> exporter /metrics -> ``prometheus`` (the project's rule files)
-> ``prometheus-alertmanager`` (the project's configuration) -> a local HTTP
server standing in for Slack and a local SMTP server (aiosmtpd) standing in
for the mail relay.

The chain itself (processes, configuration copies, the Slack and SMTP
stand-ins) is :mod:`exporter.demo.localstack`, shared with ``training-exporter demo
--local-alerting``; this module re-exports it for the tests and adds what only
the tests need: starting demo runs, launching torchrun workers, scraping
/metrics (:mod:`support.scrape`, re-exported), and watching Prometheus and
Alertmanager for when things happen.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import requests
import yaml

from exporter.demo.localstack import (
    ALERTMANAGER,
    ALERTMANAGER_CONFIG,
    ALERTMANAGER_TEMPLATES,
    AMTOOL,
    PROMETHEUS,
    ROOT,
    RULES_DIR,
    FakeSlack,
    FakeSMTP,
    Mail,
    Process,
    SlackPost,
    free_port,
    missing_binaries,
    project_rule_files,
    start_alertmanager,
    start_prometheus,
    stop_all,
    wait_http_ok,
    wait_until,
    write_alertmanager_config,
    write_prometheus_config,
)
from support.scrape import sample, scrape

__all__ = [
    "ALERTMANAGER",
    "ALERTMANAGER_CONFIG",
    "ALERTMANAGER_TEMPLATES",
    "AMTOOL",
    "PROMETHEUS",
    "ROOT",
    "RULES_DIR",
    "AlertWatch",
    "FakeSMTP",
    "FakeSlack",
    "FaultWatch",
    "Mail",
    "Poller",
    "Process",
    "SlackPost",
    "alert_names",
    "alertmanager_alerts",
    "free_port",
    "missing_binaries",
    "project_rule_files",
    "sample",
    "scrape",
    "start_alertmanager",
    "start_demo",
    "start_prometheus",
    "stop_all",
    "wait_http_ok",
    "wait_until",
    "write_alertmanager_config",
    "write_prometheus_config",
]


def free_port_pair() -> int:
    """A free loopback port whose successor is free too (with ranks: all, rank 1 serves on base + 1).

    Both lie below the kernel's ephemeral range (``net.ipv4.ip_local_port_range``): a port the kernel hands
    out (``free_port()``) has neighbours that any outgoing connection of the suite, gloo's among them, may
    take as its local port before rank 1 binds it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1025, low - 12000), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports found")


def torchrun(script: Path, args: list[str], log_path: Path, nproc: int = 2) -> subprocess.Popen[bytes]:
    """``script`` under torchrun on the CPU (one node, ``nproc`` ranks, a free rendezvous port on loopback),
    in its own process group (see kill_group), logging to ``log_path``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after 15 s, and reap the leader."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def start_demo(workdir: Path, run_id: str, port: int, max_steps: int, faults: Iterable[str],
               linger: float, save_steps: int | None = None, extra_args: Sequence[str] = ()) -> Process:
    """The project's demo training (`training-exporter demo`) serving on 127.0.0.1:port.

    Checkpoints every ``save_steps`` steps into ``workdir/run_id``, none by default; ``extra_args`` are
    more demo flags.
    """
    argv = [
        sys.executable, "-m", "exporter.cli", "demo",
        "--max-steps", str(max_steps),
        "--web.listen-address", f"127.0.0.1:{port}",
        "--output-dir", str(workdir / run_id),
        "--run-id", run_id,
        # By default no checkpoint I/O during the test: nothing reads checkpoints unless it asks for them.
        "--save-steps", str(max_steps + 1 if save_steps is None else save_steps),
        "--linger", str(linger),
        *extra_args,
    ]
    for fault in faults:
        argv += ["--inject", fault]
    return Process(f"demo-{run_id}", argv, workdir, cwd=ROOT)


def alert_names(rule_files: Iterable[Path]) -> set[str]:
    names: set[str] = set()
    for path in rule_files:
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            names.update(rule["alert"] for rule in group.get("rules", []) if "alert" in rule)
    return names


# --------------------------------------------------------------------------- observers


class Poller:
    """Runs ``check`` every ``interval`` s on a thread until stopped; ``check`` records what it sees."""

    def __init__(self, name: str, check: Callable[[], None], interval: float) -> None:
        self._check = check
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._check()
            except (requests.RequestException, ValueError):
                pass  # not up yet, or gone: the assertions judge the result
            self._stop.wait(self._interval)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class FaultWatch:
    """Time at which an exporter first shows a fault, polled at 50 ms (the fault's time within 50 ms)."""

    def __init__(self, metrics_url: str, is_fault: Callable[[dict[Any, float]], bool]) -> None:
        self.metrics_url = metrics_url
        self.is_fault = is_fault
        self.seen_at: float | None = None
        self.poller = Poller("fault-watch", self._check, 0.05)

    def _check(self) -> None:
        if self.seen_at is None and self.is_fault(scrape(self.metrics_url)):
            self.seen_at = time.time()


class AlertWatch:
    """When Prometheus first reports each (alertname, run_id) firing, and when it stops reporting it."""

    def __init__(self, prometheus_url: str) -> None:
        self.url = prometheus_url.rstrip("/") + "/api/v1/alerts"
        self.firing_at: dict[tuple[str, str], float] = {}
        self.gone_at: dict[tuple[str, str], float] = {}
        self.annotations: dict[tuple[str, str], dict[str, str]] = {}
        self.poller = Poller("alert-watch", self._check, 0.1)

    def _check(self) -> None:
        alerts = requests.get(self.url, timeout=2).json()["data"]["alerts"]
        now = time.time()
        firing = set()
        for alert in alerts:
            if alert.get("state") != "firing":
                continue
            key = (alert["labels"].get("alertname", ""), alert["labels"].get("run_id", ""))
            firing.add(key)
            self.firing_at.setdefault(key, now)
            self.annotations.setdefault(key, alert.get("annotations", {}))
        for key in self.firing_at:
            if key not in firing:
                self.gone_at.setdefault(key, now)


def alertmanager_alerts(alertmanager_url: str) -> list[dict[str, Any]]:
    response = requests.get(alertmanager_url.rstrip("/") + "/api/v2/alerts", timeout=2)
    response.raise_for_status()
    return list(response.json())
