"""The project's alerting chain on loopback, for ``demo --local-alerting`` and the end-to-end tests.

exporter /metrics -> ``prometheus`` (the project's prometheus/rules/*.yml, 1 s
scrape and evaluation) -> ``prometheus-alertmanager`` (the project's
alertmanager/alertmanager.yml, with local secrets, relay and second-scale
timings) -> a local HTTP server standing in for Slack and a local SMTP server
(aiosmtpd) standing in for the mail relay. Slack and the mail relay are the
only stand-ins: they are the boundary to third-party services.

Every server binds 127.0.0.1 on a free port; every process started here is
stopped by its own handle (terminate, wait, kill), never by name.

The configuration is read from the repository checkout (``prometheus/`` and
``alertmanager/`` next to the ``exporter`` package); an installed wheel does not
ship them, which :func:`require_project_files` reports in one line.
"""

from __future__ import annotations

import email
import email.policy
import html
import importlib.util
import json
import logging
import re
import shutil
import socket
import subprocess
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

ROOT = Path(__file__).resolve().parents[1]
ALERTMANAGER_CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_TEMPLATES = ROOT / "alertmanager" / "templates"
RULES_DIR = ROOT / "prometheus" / "rules"

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
AMTOOL = "amtool"

T = TypeVar("T")

_NO_AIOSMTPD = ("the SMTP stand-in needs the Python package aiosmtpd "
                "(pip install aiosmtpd; it is in the project's [dev] extra)")


class LocalStackError(RuntimeError):
    """Something the person running it has to provide (a binary, the configuration, a package); one line."""


# --------------------------------------------------------------------------- prerequisites


def missing_binaries(*names: str) -> list[str]:
    """The names among ``names`` that are not on PATH."""
    return [name for name in names if shutil.which(name) is None]


def require_binaries(*names: str) -> None:
    """Raise :class:`LocalStackError` naming every missing binary."""
    missing = missing_binaries(*names)
    if missing:
        raise LocalStackError(
            f"{' and '.join(missing)} not found on PATH (Debian packages prometheus, prometheus-alertmanager)")


def require_project_files() -> None:
    """Raise :class:`LocalStackError` unless the project's rules and Alertmanager configuration are there."""
    missing = [str(path.relative_to(ROOT)) for path in (ALERTMANAGER_CONFIG, ALERTMANAGER_TEMPLATES, RULES_DIR)
               if not path.exists()]
    if not missing and not project_rule_files():
        missing = [f"{RULES_DIR.relative_to(ROOT)}/*.yml"]
    if missing:
        raise LocalStackError(
            f"the project's alerting configuration ({', '.join(missing)}) is not under {ROOT}: "
            "run from a checkout of the repository (an installed wheel does not include it)")


def check_prerequisites() -> None:
    """Everything :class:`LocalAlerting` needs, checked before anything starts (:class:`LocalStackError`)."""
    require_binaries(PROMETHEUS, ALERTMANAGER)
    require_project_files()
    if importlib.util.find_spec("aiosmtpd") is None:
        raise LocalStackError(_NO_AIOSMTPD)


def project_rule_files() -> list[Path]:
    """The project's Prometheus rule files (prometheus/rules/*.yml, *.yaml), sorted."""
    return sorted(RULES_DIR.glob("*.yml")) + sorted(RULES_DIR.glob("*.yaml"))


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


def start_prometheus(config: Path, workdir: Path, port: int) -> Process:
    """``prometheus`` on 127.0.0.1:port with its TSDB in ``workdir``, returned once it is ready."""
    storage = workdir / "prometheus-data"
    storage.mkdir(exist_ok=True)
    flags = [f"--config.file={config}", f"--storage.tsdb.path={storage}"]
    return _start_server("prometheus", PROMETHEUS, flags, workdir, port)


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
            if "api_url" in slack:
                raise ValueError(f"{source}: a Slack URL is a secret: use api_url_file")
            slack["api_url_file"] = str(slack_file)
        for mail in receiver.get("email_configs", []):
            if "auth_password" in mail:
                raise ValueError(f"{source}: a password is a secret: use auth_password_file")
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
    """A Prometheus configuration scraping ``targets`` (job "training") with the given rules and Alertmanager."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(path.resolve()) for path in rule_files],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": "training", "static_configs": [{"targets": list(targets)}]}],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- Slack stand-in

# "[FIRING] TrainingLossNonFinite (critical) run nan-run" (templates/training.tmpl, training.slack.title)
_SLACK_TITLE = re.compile(r"^\[(?P<status>FIRING|RESOLVED)(?::\d+)?\] (?P<alertname>\S+) "
                          r"\((?P<severity>[^)]*)\) run (?P<run_id>.+)$")
# "[FIRING] [critical] TrainingLossNonFinite run nan-run" (training.email.subject)
_EMAIL_SUBJECT = re.compile(r"^\[(?P<status>FIRING|RESOLVED)(?::\d+)?\] \[(?P<severity>[^\]]*)\] "
                            r"(?P<alertname>.+?) run (?P<run_id>.+)$")
# "*Recommendation:* ..." (training.slack.text) and "Recommendation: ..." (training.email.text)
_SLACK_RECOMMENDATION = re.compile(r"^\*Recommendation:\* (.*)$", re.MULTILINE)
_EMAIL_RECOMMENDATION = re.compile(r"^Recommendation: (.*)$", re.MULTILINE)


class _Notification:
    """What every received notification tells: parsed from its title (Slack) or subject (email)."""

    def field(self, name: str) -> str | None:
        raise NotImplementedError

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


@dataclass
class SlackPost(_Notification):
    """One webhook call, with its arrival time (``time.time()``)."""

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
    def recommendation(self) -> str:
        """The first alert's recommendation, with Slack's mrkdwn escaping undone ("" if none)."""
        match = _SLACK_RECOMMENDATION.search(self.text)
        return html.unescape(match[1]).strip() if match else ""


class FakeSlack:
    """Collects what Alertmanager posts to the Slack webhook URL, with arrival times.

    ``on_post`` (optional) is called with each post, on the server's thread,
    after it has been recorded.
    """

    def __init__(self, on_post: Callable[[SlackPost], None] | None = None) -> None:
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
                post = SlackPost(now, self.path, payload)
                with owner._lock:
                    owner.posts.append(post)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")
                if on_post is not None:
                    on_post(post)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-slack", daemon=True)

    @property
    def url(self) -> str:
        """The webhook URL to give Alertmanager (any path is accepted)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/services/T0000/B0000/local"

    def start(self) -> FakeSlack:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def snapshot(self) -> list[SlackPost]:
        with self._lock:
            return list(self.posts)

    def find(self, **want: str) -> list[SlackPost]:
        return [post for post in self.snapshot() if all(getattr(post, k) == v for k, v in want.items())]


# --------------------------------------------------------------------------- SMTP stand-in


@dataclass
class Mail(_Notification):
    """One message the SMTP stand-in accepted, with its arrival time (``time.time()``) and AUTH login."""

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
    def recommendation(self) -> str:
        """The first alert's recommendation from the plain-text part ("" if none)."""
        match = _EMAIL_RECOMMENDATION.search(self.body("plain"))
        return match[1].strip() if match else ""


class FakeSMTP:
    """An aiosmtpd server on 127.0.0.1 that requires AUTH with the given login and keeps every message.

    Requiring AUTH proves the password really came from ``auth_password_file``;
    AUTH without TLS is allowed only because this is loopback. ``on_message``
    (optional) is called with each accepted message, on the server's thread.
    """

    def __init__(self, username: str, password: str, on_message: Callable[[Mail], None] | None = None) -> None:
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import AuthResult, LoginPassword
        except ImportError:
            raise LocalStackError(_NO_AIOSMTPD) from None

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
                mail = Mail(time.time(), envelope.mail_from, list(envelope.rcpt_tos), login, message)
                with owner._lock:
                    owner.messages.append(mail)
                if on_message is not None:
                    on_message(mail)
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
        self._started = False

    def start(self) -> FakeSMTP:
        # aiosmtpd logs every connection and warns that AUTH without TLS is
        # unsafe: intended here, loopback only.
        self._log.setLevel(logging.ERROR)
        self._controller.start()
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._controller.stop()
            self._started = False
        self._log.setLevel(self._log_level)

    def snapshot(self) -> list[Mail]:
        with self._lock:
            return list(self.messages)

    def find(self, **want: str) -> list[Mail]:
        return [mail for mail in self.snapshot() if all(getattr(mail, k) == v for k, v in want.items())]


# --------------------------------------------------------------------------- the whole chain


@dataclass(frozen=True)
class Notification:
    """What reached a stand-in, reduced to one line of text."""

    channel: str  # "slack" | "email" | "alertmanager" (an alert held back by an inhibition rule)
    status: str  # FIRING | RESOLVED | INHIBITED
    alertname: str
    run_id: str
    severity: str
    detail: str = ""
    received_at: float = 0.0

    @classmethod
    def from_slack(cls, post: SlackPost) -> Notification:
        return cls("slack", post.status or "?", post.alertname or post.title or "?", post.run_id or "?",
                   post.severity or "?", post.recommendation if post.status == "FIRING" else "", post.received_at)

    @classmethod
    def from_mail(cls, mail: Mail) -> Notification:
        return cls("email", mail.status or "?", mail.alertname or mail.subject or "?", mail.run_id or "?",
                   mail.severity or "?", mail.recommendation if mail.status == "FIRING" else "", mail.received_at)

    def line(self) -> str:
        """``[slack] FIRING TrainingLossSpike run=r severity=warning: <recommendation>``"""
        text = f"[{self.channel}] {self.status} {self.alertname} run={self.run_id} severity={self.severity}"
        return f"{text}: {self.detail}" if self.detail else text


class LocalAlerting:
    """Stand-ins for Slack and SMTP, ``prometheus-alertmanager`` and ``prometheus`` scraping ``targets``.

    Everything lives in ``workdir`` (configuration copies, secrets, TSDB, logs)
    and binds 127.0.0.1 on free ports. ``on_event`` is called, from the
    receivers' threads, for each notification and each alert Alertmanager
    reports inhibited (once per alert and run). Use as a context manager, or
    call :meth:`start` and then :meth:`stop` in a ``finally``.
    """

    def __init__(
        self,
        targets: Sequence[str],
        workdir: Path,
        *,
        on_event: Callable[[Notification], None] | None = None,
        interval: str = "1s",
        smtp_password: str = "local-stand-in-not-a-secret",
    ) -> None:
        self.targets = list(targets)
        self.workdir = workdir
        self.interval = interval
        self._on_event = on_event
        self._smtp_password = smtp_password
        self._events: list[Notification] = []
        self._lock = threading.Lock()
        self._slack: FakeSlack | None = None
        self._smtp: FakeSMTP | None = None
        self.alertmanager: Process | None = None
        self.prometheus: Process | None = None
        self.alertmanager_url = ""
        self.prometheus_url = ""
        self._stop_watch = threading.Event()
        self._watch: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> LocalAlerting:
        """Check the prerequisites, then start everything; on any failure stop what was started and re-raise."""
        require_project_files()
        require_binaries(PROMETHEUS, ALERTMANAGER)
        source = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
        smtp_user = str(source["global"]["smtp_auth_username"])
        try:
            self._slack = FakeSlack(on_post=lambda post: self._record(Notification.from_slack(post))).start()
            self._smtp = FakeSMTP(smtp_user, self._smtp_password,
                                  on_message=lambda mail: self._record(Notification.from_mail(mail))).start()
            am_port, prom_port = free_port(), free_port()
            self.alertmanager_url = f"http://127.0.0.1:{am_port}"
            self.prometheus_url = f"http://127.0.0.1:{prom_port}"
            am_file = write_alertmanager_config(self.workdir, slack_url=self._slack.url, smtp_port=self._smtp.port,
                                                smtp_password=self._smtp_password)
            prom_file = write_prometheus_config(self.workdir, targets=self.targets,
                                                alertmanager=f"127.0.0.1:{am_port}",
                                                rule_files=project_rule_files(), interval=self.interval)
            self.alertmanager = start_alertmanager(am_file, self.workdir, am_port)
            self.prometheus = start_prometheus(prom_file, self.workdir, prom_port)
            self._watch = threading.Thread(target=self._watch_inhibited, name="inhibition-watch", daemon=True)
            self._watch.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything started, Prometheus first (so the exporter's exit is not scraped as an outage)."""
        self._stop_watch.set()
        if self._watch is not None:
            self._watch.join(5)
        try:
            stop_all(proc for proc in (self.prometheus, self.alertmanager) if proc is not None)
        finally:
            for fake in (self._slack, self._smtp):
                if fake is not None:
                    fake.stop()

    def __enter__(self) -> LocalAlerting:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def processes(self) -> list[Process]:
        return [proc for proc in (self.prometheus, self.alertmanager) if proc is not None]

    # ------------------------------------------------------------- what arrived

    def events(self) -> list[Notification]:
        """Everything reported so far, in arrival order."""
        with self._lock:
            return list(self._events)

    def summary(self) -> str:
        """One line: how many notifications reached each stand-in, and how many alerts were inhibited."""
        events = self.events()
        parts = []
        for channel in ("slack", "email"):
            mine = [e for e in events if e.channel == channel]
            by_status = ", ".join(f"{status.lower()} {sum(e.status == status for e in mine)}"
                                  for status in ("FIRING", "RESOLVED") if any(e.status == status for e in mine))
            parts.append(f"{channel} {len(mine)}" + (f" ({by_status})" if by_status else ""))
        inhibited = sum(e.channel == "alertmanager" for e in events)
        sent = sum(e.channel != "alertmanager" for e in events)
        return f"{sent} notification(s): {'; '.join(parts)}; {inhibited} alert(s) inhibited"

    def _record(self, event: Notification) -> None:
        with self._lock:
            self._events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _watch_inhibited(self) -> None:
        """Report each (alertname, run_id) Alertmanager holds back by an inhibition rule, once."""
        seen: set[tuple[str, str]] = set()
        while not self._stop_watch.wait(1.0):
            try:
                response = requests.get(self.alertmanager_url + "/api/v2/alerts", timeout=2)
                alerts = response.json() if response.status_code == 200 else []
            except (requests.RequestException, ValueError):
                continue
            names = {a.get("fingerprint"): a.get("labels", {}).get("alertname", "?") for a in alerts}
            for alert in alerts:
                labels = alert.get("labels", {})
                by = alert.get("status", {}).get("inhibitedBy") or []
                key = (labels.get("alertname", "?"), labels.get("run_id", "?"))
                if not by or key in seen:
                    continue
                seen.add(key)
                sources = ", ".join(sorted({names.get(fp, "another alert") for fp in by}))
                self._record(Notification("alertmanager", "INHIBITED", key[0], key[1], labels.get("severity", "?"),
                                          f"held back while {sources} fires for this run", time.time()))
