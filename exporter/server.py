"""The /metrics endpoint of both exporters, safe to expose on a cluster network.

``prometheus_client.start_http_server`` runs every collector and the training exporter's flush in Python on
the training process for every scrape, starts a thread per connection with no bound and no timeout, and
listens with a backlog of 5. Fifty scrapers slowed a 25 ms training step tenfold, 2000 half-open
connections made 2000 threads that never closed, and connections dropped under load were retried by the
kernel after 1, 3 and 7 s. This server bounds each of those costs:

* **Shared render** (:class:`SharedExposition`). A scrape that arrives within ``window`` seconds (1 s by
  default, ``web.scrape_window_seconds``) of the start of the last render of the same format is answered
  with that render. Renders are single-flight: scrapers that arrive while one runs wait for it, so N
  scrapers cost about one render per window whatever N is. A render that started before a scrape arrived
  is older than the scrape by at most the window; with window 0 every scrape gets a render that started
  after it arrived. :meth:`SharedExposition.invalidate` (a state change, the final state) makes the next
  scrape render afresh. The gzip body (Prometheus asks for it) is compressed once per render.
* **Bounded connections.** At most ``max_connections`` are open at once; one more is closed at once and
  counted (reason ``limit``), so a flood costs file descriptors and threads up to the bound only.
* **Timeouts.** A request's head (request line and headers, at most 16 KiB) must arrive within
  ``read_timeout`` seconds of its first byte, or of the connection for the first request (a TLS handshake
  included); a response must be written within the same time; a kept-alive connection waiting for its next
  request is closed after ``idle_timeout``. Half-open and slow connections are closed and counted
  (``timeout``).
* **Paced requests.** At most ``max_requests_per_second`` requests are answered per second (50 by
  default, ``web.max_requests_per_second``); a request over the rate waits on its connection's thread, which
  costs no CPU, so clients that scrape back to back cost the training process a bounded share of the
  interpreter (about 100 µs per answer from a shared render) however fast they ask.
* **Backlog** :data:`BACKLOG` (the kernel caps it at ``net.core.somaxconn``), so a burst of connections
  waits in the kernel instead of being dropped and retried seconds later.
* **TLS and basic auth** from the exporter-toolkit web configuration file (:mod:`exporter.web`), re-read
  when it or a file it names changes. The handshake runs on the connection's thread, never on the accept
  loop. A request without valid credentials gets 401 and costs no render.

HTTP/1.1 with keep-alive (Prometheus keeps its scrape connections open), HTTP/1.0; ``GET`` and ``HEAD``.
Every path but ``/favicon.ico`` serves the exposition, as ``prometheus_client``'s server does; the
``name[]`` query parameter restricts it to the named families. Nothing here raises into the caller after
:meth:`MetricsServer.start`: a failure in a connection is handed to ``on_error`` and the connection closed.
"""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from exporter.web import WebConfig, WebConfigSource

BACKLOG = 1024
MAX_HEAD_BYTES = 16 * 1024
# A GET has no body; a small one is read and ignored, a larger one refused.
MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_WINDOW_S = 1.0
DEFAULT_MAX_RPS = 50.0
# Distinct (format, name[] filter) renders kept; more distinct filters than this start over.
MAX_CACHED = 16
# How often the accept loop looks at the stop flag.
POLL_S = 0.5
GZIP_LEVEL = 6

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 505: "HTTP Version Not Supported"}


@dataclass
class Request:
    """One parsed request; header names are lower case."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    remote_addr: str

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


class Observer(Protocol):
    """Told about each answered request (:class:`exporter.lifecycle.ScrapeLog` is one)."""

    def begin(self, request: Request) -> Any: ...

    def end(self, token: Any, status: int, complete: bool) -> None: ...


@dataclass
class ServerHooks:
    """What the server reports; each is called on a connection's thread and must not raise."""

    on_request: Callable[[int], None] = lambda code: None
    on_refused: Callable[[str], None] = lambda reason: None
    on_render: Callable[[], None] = lambda: None
    on_error: Callable[[Exception], None] = lambda exc: None


@dataclass
class _Render:
    started: float
    generation: int
    content_type: str
    body: bytes
    _gzip: bytes | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def gzipped(self) -> bytes:
        with self._lock:
            if self._gzip is None:
                self._gzip = gzip.compress(self.body, compresslevel=GZIP_LEVEL)
            return self._gzip


class SharedExposition:
    """The registry's exposition, rendered at most once per ``window`` seconds per format (see the module
    docstring)."""

    def __init__(self, registry: CollectorRegistry, window: float = DEFAULT_WINDOW_S,
                 on_render: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.window = window
        self._on_render = on_render
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._generation = 0
        self._cache: dict[tuple[str, tuple[str, ...]], _Render] = {}

    def invalidate(self) -> None:
        """What was rendered is out of date: the next scrape renders afresh."""
        with self._lock:
            self._generation += 1
            self._cache.clear()

    def _fresh(self, key: tuple[str, tuple[str, ...]], arrived: float, generation: int) -> _Render | None:
        with self._lock:
            got = self._cache.get(key)
        if got is not None and got.generation >= generation and got.started >= arrived - self.window:
            return got
        return None

    def get(self, accept: str, names: tuple[str, ...] = ()) -> _Render:
        """The render for an ``Accept`` header and a ``name[]`` filter (sorted; empty: everything)."""
        arrived = time.monotonic()
        with self._lock:
            generation = self._generation
        encoder, content_type = choose_encoder(accept)
        key = (content_type, names)
        got = self._fresh(key, arrived, generation)
        if got is not None:
            return got
        with self._render_lock:
            got = self._fresh(key, arrived, generation)
            if got is not None:
                return got
            started = time.monotonic()
            with self._lock:
                at_start = self._generation
            registry: Any = self.registry.restricted_registry(list(names)) if names else self.registry
            render = _Render(started, at_start, content_type, encoder(registry))
            with self._lock:
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
                if self._generation == at_start:
                    self._cache[key] = render
            if self._on_render is not None:
                self._on_render()
            return render


class _Closed(Exception):
    """The connection is done (peer closed, timed out or sent garbage); nothing more to write."""


class _Reply(Exception):
    """Answer with ``status`` and close the connection."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class MetricsServer:
    """Serves a :class:`SharedExposition` over HTTP or HTTPS (see the module docstring).

    :meth:`start` binds (an ``OSError`` when the address cannot be bound: before anything else starts) and
    serves on daemon threads; ``server_address``, :meth:`shutdown` and :meth:`server_close` are those of the
    ``socketserver`` servers that ``prometheus_client`` returns.
    """

    def __init__(self, host: str, port: int, exposition: SharedExposition, *,
                 web: WebConfigSource | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
                 max_requests_per_second: float = DEFAULT_MAX_RPS,
                 hooks: ServerHooks | None = None,
                 name: str = "training-exporter") -> None:
        self.host, self.port = host, port
        self.exposition = exposition
        self.web = web
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._spacing = 1.0 / max_requests_per_second if max_requests_per_second > 0 else 0.0
        self._next_slot = 0.0
        self.hooks = hooks or ServerHooks()
        self.name = name
        self._observers: list[Observer] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, bool] = {}  # open connection -> waiting for a request
        self.server_address: tuple[Any, ...] = (host, port)

    # ------------------------------------------------------------------ lifecycle

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def start(self) -> MetricsServer:
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            sock.settimeout(POLL_S)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.server_address = sock.getsockname()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-http", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting and close idle connections; answers being written finish."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(POLL_S * 4)
        with self._lock:
            idle = [conn for conn, waiting in self._conns.items() if waiting]
        for conn in idle:
            _shutdown_quietly(conn)

    def server_close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    # ------------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                conn, addr = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                self.hooks.on_error(exc)
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns[conn] = True
            if full:
                self.hooks.on_refused("limit")
                _close_quietly(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, addr), name=f"{self.name}-conn",
                                 daemon=True).start()
            except RuntimeError as exc:  # no more threads
                self._forget(conn)
                _close_quietly(conn)
                self.hooks.on_error(exc)

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)

    def _waiting(self, conn: socket.socket, waiting: bool) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns[conn] = waiting

    def _serve(self, raw: socket.socket, addr: Any) -> None:
        conn: socket.socket = raw
        try:
            web = self.web.current() if self.web is not None else None
            conn.settimeout(self.read_timeout)
            if web is not None and web.ssl_context is not None:
                conn = self._handshake(raw, web)
                with self._lock:  # shutdown() must reach the TLS socket now (the raw one is detached)
                    if self._conns.pop(raw, None) is not None:
                        self._conns[conn] = False
            remote = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            buffer = bytearray()
            first = True
            while not self._stop.is_set():
                self._waiting(conn, True)
                head = self._read_head(conn, buffer, first)
                self._waiting(conn, False)
                first = False
                if not self._answer(conn, head, buffer, remote, web):
                    break
        except _Closed:
            pass
        except Exception as exc:  # never into the caller; the connection is dropped
            self.hooks.on_error(exc)
        finally:
            self._forget(raw)
            self._forget(conn)
            _close_quietly(conn)
            if conn is not raw:
                _close_quietly(raw)

    def _handshake(self, raw: socket.socket, web: WebConfig) -> socket.socket:
        assert web.ssl_context is not None
        try:
            tls = web.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            tls.settimeout(self.read_timeout)
            tls.do_handshake()
        except TimeoutError:
            self.hooks.on_refused("timeout")
            raise _Closed from None
        except (ssl.SSLError, OSError):
            self.hooks.on_refused("tls")
            raise _Closed from None
        if not web.client_allowed(tls.getpeercert()):
            self.hooks.on_refused("tls")
            _close_quietly(tls)
            raise _Closed
        return tls

    def _read_head(self, conn: socket.socket, buffer: bytearray, first: bool) -> bytes:
        """The next request's head (without the blank line), leaving what follows in ``buffer``."""
        deadline = time.monotonic() + self.read_timeout if first else None
        while True:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end >= 0:
                head = bytes(buffer[:end])
                del buffer[:end + 4]
                return head
            if len(buffer) > MAX_HEAD_BYTES:
                self._send(conn, 431, b"", close=True)
                raise _Closed
            if deadline is None:
                if buffer:
                    deadline = time.monotonic() + self.read_timeout
                else:
                    conn.settimeout(self.idle_timeout)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.hooks.on_refused("timeout")
                    raise _Closed
                conn.settimeout(left)
            try:
                chunk = conn.recv(8192)
            except TimeoutError:
                if buffer or first:
                    self.hooks.on_refused("timeout")
                raise _Closed from None
            except (OSError, ssl.SSLError):
                raise _Closed from None
            if not chunk:
                raise _Closed
            if deadline is None:
                deadline = time.monotonic() + self.read_timeout
            buffer += chunk

    def _answer(self, conn: socket.socket, head: bytes, buffer: bytearray, remote: str,
                web: WebConfig | None) -> bool:
        """Answer one request; whether the connection stays open."""
        self._pace()
        try:
            request = _parse(head, remote)
        except _Reply as reply:
            self._send(conn, reply.status, b"", close=True)
            return False
        keep = _keep_alive(request)
        conn.settimeout(self.read_timeout)
        try:
            self._skip_body(conn, request, buffer)
        except _Reply as reply:
            self._send(conn, reply.status, b"", close=True, web=web)
            return False
        if request.method not in ("GET", "HEAD"):
            self._send(conn, 405, b"", close=not keep, web=web, extra=[("Allow", "GET, HEAD")])
            return keep
        if web is not None and not web.authorized(request.headers.get("authorization")):
            self._send(conn, 401, b"Unauthorized\n", close=not keep, web=web,
                       extra=[("WWW-Authenticate", 'Basic realm="' + self.name + '"')])
            return keep
        if request.path == "/favicon.ico":
            self._send(conn, 404, b"", close=not keep, web=web)
            return keep
        tokens = [(o, o.begin(request)) for o in self._observers]
        complete = False
        status = 200
        try:
            names = tuple(sorted(set(parse_qs(request.query).get("name[]", []))))
            try:
                render = self.exposition.get(request.header("accept"), names)
            except Exception as exc:
                self.hooks.on_error(exc)
                status = 500
                self._send(conn, 500, b"the exposition failed; see the exporter's log\n", close=not keep, web=web)
                return keep
            body = render.body
            extra = [("Content-Type", render.content_type)]
            if "gzip" in request.header("accept-encoding"):
                body = render.gzipped()
                extra.append(("Content-Encoding", "gzip"))
            self._send(conn, 200, body, close=not keep, web=web, extra=extra, head_only=request.method == "HEAD")
            complete = True
        finally:
            for observer, token in tokens:
                observer.end(token, status, complete)
        return keep

    def _pace(self) -> None:
        """Wait for this request's slot: one per ``1 / max_requests_per_second`` seconds, first come first served."""
        if not self._spacing:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._spacing
        if slot > now:
            time.sleep(slot - now)

    def _skip_body(self, conn: socket.socket, request: Request, buffer: bytearray) -> None:
        if "transfer-encoding" in request.headers:
            raise _Reply(501)
        length_text = request.headers.get("content-length", "0").strip() or "0"
        if not length_text.isdigit():
            raise _Reply(400)
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise _Reply(413)
        while len(buffer) < length:
            try:
                chunk = conn.recv(length - len(buffer))
            except (OSError, ssl.SSLError):
                raise _Closed from None
            if not chunk:
                raise _Closed
            buffer += chunk
        del buffer[:length]

    def _send(self, conn: socket.socket, status: int, body: bytes, *, close: bool, web: WebConfig | None = None,
              extra: list[tuple[str, str]] | None = None, head_only: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}"]
        headers = list(extra or [])
        if not any(k == "Content-Type" for k, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        headers.append(("Content-Length", str(len(body))))
        headers.append(("Connection", "close" if close else "keep-alive"))
        if web is not None:
            headers.extend(web.headers)
        lines += [f"{k}: {v}" for k, v in headers]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.hooks.on_request(status)
        try:
            conn.settimeout(self.read_timeout)
            conn.sendall(data if head_only else data + body)
        except TimeoutError:
            self.hooks.on_refused("timeout")
            raise _Closed from None
        except (OSError, ssl.SSLError):
            raise _Closed from None


def _parse(head: bytes, remote: str) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _Reply(400) from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _Reply(400)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Reply(505 if version.startswith("HTTP/") else 400)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Reply(400)
        key = name.lower()
        if key in headers and key in ("authorization", "content-length", "host"):
            raise _Reply(400)  # a second one of these is an attack, not a client
        headers[key] = value.strip()
    path, _, query = target.partition("?")
    return Request(method, path, query, version, headers, remote)


def _keep_alive(request: Request) -> bool:
    connection = request.header("connection").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def _close_quietly(conn: socket.socket) -> None:
    try:
        conn.close()
    except OSError:
        pass


def _shutdown_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
