"""Process control for the local alerting chain: children started, watched and stopped by their own PID.

Every process started here is stopped by its own handle (terminate, wait,
kill), never by name; every server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import requests

from exporter.demo.localstack.errors import LocalStackError

__all__ = [
    "ALERTMANAGER",
    "AMTOOL",
    "PROMETHEUS",
    "Process",
    "free_port",
    "missing_binaries",
    "require_binaries",
    "start_alertmanager",
    "start_prometheus",
    "stop_all",
    "wait_http_ok",
    "wait_until",
]

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
AMTOOL = "amtool"

T = TypeVar("T")


def missing_binaries(*names: str) -> list[str]:
    """The names among ``names`` that are not on PATH."""
    return [name for name in names if shutil.which(name) is None]


def require_binaries(*names: str) -> None:
    """Raise :class:`LocalStackError` naming every missing binary."""
    missing = missing_binaries(*names)
    if missing:
        raise LocalStackError(
            f"{' and '.join(missing)} not found on PATH (Debian packages prometheus, prometheus-alertmanager)")


def free_port() -> int:
    """A port nobody listens on now (for programs that can't be told to bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; return that, or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Process:
    """A child process with its output in ``log_dir/NAME.log``, stopped by its own PID."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        try:
            self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                          stdin=subprocess.DEVNULL)
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; always reaps the child."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._log.close()


def stop_all(processes: Iterable[Process]) -> None:
    """Stop each process; one that fails to stop does not keep the others running."""
    errors: list[BaseException] = []
    for proc in processes:
        try:
            proc.stop()
        except BaseException as exc:  # collected; the first is re-raised after the others stop
            errors.append(exc)
    if errors:
        raise errors[0]


def wait_http_ok(url: str, process: Process, timeout: float) -> None:
    """Wait until ``url`` answers 200; raise (with the log's tail) if ``process`` exits or time runs out."""

    def ok() -> bool:
        if not process.running():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}")
        try:
            return requests.get(url, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ok, timeout, what=f"{process.name} at {url}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{process.log_tail()}") from None


def _start_server(name: str, binary: str, flags: list[str], workdir: Path, port: int) -> Process:
    """Start one server on 127.0.0.1:port and return it once ``/-/ready`` answers (stopped if it never does)."""
    proc = Process(name, [
        binary,
        *flags,
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url=http://127.0.0.1:{port}",
    ], workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", proc, 30)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_alertmanager(config: Path, workdir: Path, port: int) -> Process:
    """``prometheus-alertmanager`` on 127.0.0.1:port (no clustering), returned once it is ready."""
    storage = workdir / "alertmanager-data"
    storage.mkdir(exist_ok=True)
    flags = [f"--config.file={config}", f"--storage.path={storage}", "--cluster.listen-address=", "--log.level=debug"]
    return _start_server("alertmanager", ALERTMANAGER, flags, workdir, port)


def start_prometheus(config: Path, workdir: Path, port: int, extra_flags: Sequence[str] = ()) -> Process:
    """``prometheus`` on 127.0.0.1:port with its TSDB in ``workdir`` (and ``extra_flags``), returned once it is
    ready."""
    storage = workdir / "prometheus-data"
    storage.mkdir(exist_ok=True)
    flags = [f"--config.file={config}", f"--storage.tsdb.path={storage}", *extra_flags]
    return _start_server("prometheus", PROMETHEUS, flags, workdir, port)
