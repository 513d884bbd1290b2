"""Helpers for the end-to-end alerting tests: the real chain on loopback.

demo training -> exporter /metrics -> ``prometheus`` (the project's rule files)
-> ``prometheus-alertmanager`` (the project's configuration) -> a local HTTP
server standing in for Slack and a local SMTP server (aiosmtpd) standing in
for the mail relay. Slack and the mail relay are the only fakes: they are the
boundary to third-party services.

Every server binds 127.0.0.1 on a free port; every process started here is
stopped by its own handle (terminate, wait, kill).
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
ALERTMANAGER_CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_TEMPLATES = ROOT / "alertmanager" / "templates"
RULES_DIR = ROOT / "prometheus" / "rules"

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
AMTOOL = "amtool"

T = TypeVar("T")


def missing_binaries(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


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


# --------------------------------------------------------------------------- processes


class Process:
    """A child process with its output in a log file, stopped by its own PID."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                      stdin=subprocess.DEVNULL)

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
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._log.close()


def wait_http_ok(url: str, process: Process, timeout: float) -> None:
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


def start_alertmanager(config: Path, workdir: Path, port: int) -> Process:
    storage = workdir / "alertmanager-data"
    storage.mkdir(exist_ok=True)
    proc = Process("alertmanager", [
        ALERTMANAGER,
        f"--config.file={config}",
        f"--storage.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url=http://127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=debug",
    ], workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", proc, 30)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_prometheus(config: Path, workdir: Path, port: int) -> Process:
    storage = workdir / "prometheus-data"
    storage.mkdir(exist_ok=True)
    proc = Process("prometheus", [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url=http://127.0.0.1:{port}",
    ], workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", proc, 30)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_demo(workdir: Path, run_id: str, port: int, max_steps: int, faults: Iterable[str],
               linger: float) -> Process:
    """The project's demo training (`training-exporter demo`) serving on 127.0.0.1:port."""
    argv = [
        sys.executable, "-m", "exporter.cli", "demo",
        "--max-steps", str(max_steps),
        "--web.listen-address", f"127.0.0.1:{port}",
        "--output-dir", str(workdir / run_id),
        "--run-id", run_id,
        # No checkpoint I/O during the test: nothing here reads checkpoints.
        "--save-steps", str(max_steps + 1),
        "--linger", str(linger),
    ]
    for fault in faults:
        argv += ["--inject", fault]
    return Process(f"demo-{run_id}", argv, workdir, cwd=ROOT)


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


# --------------------------------------------------------------------------- configuration copies


def write_alertmanager_config(
    workdir: Path,
    *,
    slack_url: str,
    smtp_port: int,
    smtp_password: str,
    group_wait: str = "1s",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
    source: Path = ALERTMANAGER_CONFIG,
) -> Path:
    """A copy of the project's Alertmanager configuration wired to local stand-ins.

    Only what ties it to production changes: the secret files (temporary files
    with the local webhook URL and SMTP password), the SMTP relay (127.0.0.1,
    no STARTTLS: the local server has no certificate), the template path
    (absolute) and the timings (seconds instead of minutes). Routing, grouping,
    inhibition, receivers and templates are the project's own.
    """
    config = yaml.safe_load(source.read_text())
    secrets = workdir / "secrets"
    secrets.mkdir(exist_ok=True)
    slack_file = secrets / "slack_webhook_url"
    # A trailing newline, as an editor leaves it: Alertmanager trims the URL file.
    slack_file.write_text(slack_url + "\n")
    password_file = secrets / "smtp_password"
    # No newline: Alertmanager 0.25 sends the password file's bytes as they are.
    password_file.write_text(smtp_password)

    config["global"]["smtp_smarthost"] = f"127.0.0.1:{smtp_port}"
    config["global"]["smtp_require_tls"] = False
    config["templates"] = [
        str((source.parent / pattern).resolve()) if not Path(pattern).is_absolute() else pattern
        for pattern in config.get("templates", [])
    ]
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            assert "api_url" not in slack, "a Slack URL is a secret: use api_url_file"
            slack["api_url_file"] = str(slack_file)
        for mail in receiver.get("email_configs", []):
            assert "auth_password" not in mail, "a password is a secret: use auth_password_file"
            mail["auth_password_file"] = str(password_file)
            mail.pop("smarthost", None)
            mail.pop("require_tls", None)

    def retime(route: dict[str, Any]) -> None:
        for key, value in (("group_wait", group_wait), ("group_interval", group_interval),
                           ("repeat_interval", repeat_interval)):
            if key in route or route is config["route"]:
                route[key] = value
        for child in route.get("routes", []):
            retime(child)

    retime(config["route"])
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_prometheus_config(
    workdir: Path,
    *,
    targets: Sequence[str],
    alertmanager: str,
    rule_files: Sequence[Path],
    interval: str = "1s",
) -> Path:
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(path.resolve()) for path in rule_files],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": "training", "static_configs": [{"targets": list(targets)}]}],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def project_rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml")) + sorted(RULES_DIR.glob("*.yaml"))


def alert_names(rule_files: Iterable[Path]) -> set[str]:
    names: set[str] = set()
    for path in rule_files:
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            names.update(rule["alert"] for rule in group.get("rules", []) if "alert" in rule)
    return names


# --------------------------------------------------------------------------- Slack stand-in

# "[FIRING] TrainingLossNonFinite (critical) run nan-run" (templates/training.tmpl, training.slack.title)
_SLACK_TITLE = re.compile(r"^\[(?P<status>FIRING|RESOLVED)(?::\d+)?\] (?P<alertname>\S+) "
                          r"\((?P<severity>[^)]*)\) run (?P<run_id>.+)$")
# "[FIRING] [critical] TrainingLossNonFinite run nan-run" (training.email.subject)
_EMAIL_SUBJECT = re.compile(r"^\[(?P<status>FIRING|RESOLVED)(?::\d+)?\] \[(?P<severity>[^\]]*)\] "
                            r"(?P<alertname>.+?) run (?P<run_id>.+)$")


@dataclass
class SlackPost:
    received_at: float
    path: str
    payload: dict[str, Any]

    @property
    def attachment(self) -> dict[str, Any]:
        attachments = self.payload.get("attachments") or [{}]
        return dict(attachments[0])

    @property
    def title(self) -> str:
        return str(self.attachment.get("title", ""))

    @property
    def text(self) -> str:
        return str(self.attachment.get("text", ""))

    def field(self, name: str) -> str | None:
        match = _SLACK_TITLE.match(self.title)
        return match[name] if match else None

    @property
    def status(self) -> str | None:
        return self.field("status")

    @property
    def alertname(self) -> str | None:
        return self.field("alertname")

    @property
    def run_id(self) -> str | None:
        return self.field("run_id")

    @property
    def severity(self) -> str | None:
        return self.field("severity")


class FakeSlack:
    """Collects what Alertmanager posts to the Slack webhook URL, with arrival times."""

    def __init__(self) -> None:
        self.posts: list[SlackPost] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                now = time.time()
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"invalid_json": body.decode(errors="replace")}
                with owner._lock:
                    owner.posts.append(SlackPost(now, self.path, payload))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-slack", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/services/T0000/B0000/e2e"

    def start(self) -> FakeSlack:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def snapshot(self) -> list[SlackPost]:
        with self._lock:
            return list(self.posts)

    def find(self, **want: str) -> list[SlackPost]:
        return [post for post in self.snapshot() if all(getattr(post, k) == v for k, v in want.items())]


# --------------------------------------------------------------------------- SMTP stand-in


@dataclass
class Mail:
    received_at: float
    mail_from: str
    rcpt_tos: list[str]
    login: str | None
    message: EmailMessage = field(repr=False)

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    def body(self, subtype: str) -> str:
        part = self.message.get_body((subtype,))
        return str(part.get_content()) if part is not None else ""

    def field(self, name: str) -> str | None:
        match = _EMAIL_SUBJECT.match(self.subject)
        return match[name] if match else None

    @property
    def status(self) -> str | None:
        return self.field("status")

    @property
    def alertname(self) -> str | None:
        return self.field("alertname")

    @property
    def run_id(self) -> str | None:
        return self.field("run_id")


class FakeSMTP:
    """An aiosmtpd server on 127.0.0.1 that requires AUTH with the given login and keeps every message.

    Requiring AUTH proves the password really came from ``auth_password_file``;
    AUTH without TLS is allowed only because this is loopback.
    """

    def __init__(self, username: str, password: str) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.messages: list[Mail] = []
        self.failed_logins: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        owner = self

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
            ok = (isinstance(auth_data, LoginPassword) and auth_data.login == username.encode()
                  and auth_data.password == password.encode())
            if not ok:
                with owner._lock:
                    owner.failed_logins.append((mechanism, getattr(auth_data, "password", b"")))
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = email.message_from_bytes(envelope.original_content or envelope.content,
                                                   policy=email.policy.default)
                login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
                mail = Mail(time.time(), envelope.mail_from, list(envelope.rcpt_tos), login,
                            message)
                with owner._lock:
                    owner.messages.append(mail)
                return "250 Message accepted for delivery"

        self.port = free_port()
        self._controller = Controller(
            Handler(), hostname="127.0.0.1", port=self.port,
            authenticator=authenticator, auth_required=True, auth_require_tls=False,
            # Alertmanager's LOGIN client expects the "Username:" challenge;
            # aiosmtpd sends "User Name". PLAIN is what most relays offer anyway.
            auth_exclude_mechanism=["LOGIN"],
        )
        self._log = logging.getLogger("mail.log")
        self._log_level = self._log.level

    def start(self) -> FakeSMTP:
        # aiosmtpd warns on every connection that AUTH without TLS is unsafe: intended here, loopback only.
        self._log.setLevel(logging.ERROR)
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()
        self._log.setLevel(self._log_level)

    def snapshot(self) -> list[Mail]:
        with self._lock:
            return list(self.messages)

    def find(self, **want: str) -> list[Mail]:
        return [mail for mail in self.snapshot() if all(getattr(mail, k) == v for k, v in want.items())]


# --------------------------------------------------------------------------- observers


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of one /metrics page keyed by (name, labels)."""
    text = requests.get(url, timeout=2).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and set(labels.items()) <= sample_labels:
            return value
    return None


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
