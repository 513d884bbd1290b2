"""The stand-ins for Slack and the mail relay, and the records of what reached them.

Slack and the mail relay are the only stand-ins of the local alerting chain:
they are the boundary to third-party services. Each keeps every notification
Alertmanager sends, parsed from the title (Slack) or subject (email) that the
project's templates (alertmanager/templates/training.tmpl) write.
"""

from __future__ import annotations

import email
import email.policy
import html
import importlib.util
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from exporter.demo.localstack.errors import LocalStackError
from exporter.demo.localstack.processes import free_port

__all__ = ["FakeSMTP", "FakeSlack", "Mail", "Notification", "SlackPost", "require_aiosmtpd"]

_NO_AIOSMTPD = ("the SMTP stand-in needs the Python package aiosmtpd "
                "(pip install aiosmtpd; it is in the project's [dev] extra)")


def require_aiosmtpd() -> None:
    """Raise :class:`LocalStackError` unless the SMTP stand-in's package, aiosmtpd, is installed."""
    if importlib.util.find_spec("aiosmtpd") is None:
        raise LocalStackError(_NO_AIOSMTPD)


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


class WebhookStandIn:
    """A local HTTP server on 127.0.0.1 that records each POST, with its arrival time; a subclass says what
    one is (:meth:`_parse`) and where Alertmanager posts (:attr:`path`)."""

    name = "webhook"
    path = "/"

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                item = owner._parse(time.time(), self.path, dict(self.headers.items()), body)
                with owner._lock:
                    owner._items.append(item)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")
                owner._posted(item)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fake-{self.name}", daemon=True)

    def _parse(self, now: float, path: str, headers: dict[str, str], body: bytes) -> Any:
        raise NotImplementedError

    def _posted(self, item: Any) -> None:
        pass

    @property
    def url(self) -> str:
        """The URL to give Alertmanager (any path is accepted)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.path}"

    def start(self) -> Any:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def _snapshot(self) -> list[Any]:
        with self._lock:
            return list(self._items)


class FakeSlack(WebhookStandIn):
    """Collects what Alertmanager posts to the Slack webhook URL, with arrival times.

    ``on_post`` (optional) is called with each post, on the server's thread,
    after it has been recorded.
    """

    name = "slack"
    path = "/services/T0000/B0000/local"

    def __init__(self, on_post: Callable[[SlackPost], None] | None = None) -> None:
        self._on_post = on_post
        super().__init__()

    def _parse(self, now: float, path: str, headers: dict[str, str], body: bytes) -> SlackPost:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {"invalid_json": body.decode(errors="replace")}
        return SlackPost(now, path, payload)

    def _posted(self, item: Any) -> None:
        if self._on_post is not None:
            self._on_post(item)

    def start(self) -> FakeSlack:
        super().start()
        return self

    def snapshot(self) -> list[SlackPost]:
        return self._snapshot()

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


# --------------------------------------------------------------------------- one line per notification


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
