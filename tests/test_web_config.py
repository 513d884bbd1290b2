"""exporter/web.py: the exporter-toolkit web config file, with real certificates and real TLS connections.

The certificates are made once per module with the ``openssl`` CLI (EC P-256 keys: milliseconds each): a CA,
a server certificate for 127.0.0.1 and localhost, a second one for rotation, a client certificate and one
from another CA. Connections go through a small threaded HTTP/1.1 server below that uses the module the way
exporter/server.py does (``current()`` per connection, ``client_allowed`` after the handshake,
``authorized`` per request), and :mod:`http.client` with a verifying :class:`ssl.SSLContext` as the client.
The bcrypt hashes are made in the test with cost 4, the lowest, so that a check costs about a millisecond.
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from exporter import web
from exporter.files import MAX_CONFIG_BYTES
from exporter.web import WebConfig, WebConfigError, WebConfigSource, load_web_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "web" / "web-config.example.yml"
EXAMPLE_PASSWORD = "example-password"  # documented in the example file

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


# --- certificates -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PKI:
    dir: Path

    def __getattr__(self, name: str) -> str:
        # pki.server_crt -> <dir>/server.crt
        if name.startswith("_"):
            raise AttributeError(name)
        stem, _, ext = name.rpartition("_")
        return str(self.dir / f"{stem}.{ext}")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(folder: Path, name: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=folder)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _leaf(folder: Path, name: str, ca: str, cn: str, sans: str, usage: str, serial: int) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=folder)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=folder)
    (folder / f"{name}.ext").write_text(
        f"subjectAltName={sans}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "other")
    _leaf(folder, "server", "ca", "localhost", "IP:127.0.0.1,DNS:localhost", "serverAuth", 1)
    _leaf(folder, "rotated", "ca", "localhost-rotated", "IP:127.0.0.1,DNS:localhost", "serverAuth", 2)
    _leaf(folder, "client", "ca", "prometheus", "DNS:prometheus,URI:spiffe://test/prometheus", "clientAuth", 3)
    _leaf(folder, "stranger", "other", "prometheus", "DNS:prometheus", "clientAuth", 4)
    _openssl("ec", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=folder)
    (folder / "junk.crt").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    return PKI(folder)


def write_config(folder: Path, text: str, name: str = "web.yml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tls_config(pki: PKI, extra: str = "") -> str:
    return f"tls_server_config:\n  cert_file: {pki.server_crt}\n  key_file: {pki.server_key}\n{extra}"


# --- a server and a client ----------------------------------------------------------------------------------

class Server:
    """HTTP/1.1 on 127.0.0.1:0, one request per connection, ``ok`` or 401; refusals are recorded."""

    def __init__(self, source: WebConfigSource | WebConfig) -> None:
        self.source = source
        self.refusals: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def config(self) -> WebConfig:
        return self.source.current() if isinstance(self.source, WebConfigSource) else self.source

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        cfg = self.config()
        conn.settimeout(5)
        try:
            if cfg.ssl_context is not None:
                try:
                    conn = cfg.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.refusals.append(f"handshake: {exc}")
                    return
                if not cfg.client_allowed(conn.getpeercert()):  # type: ignore[attr-defined]
                    self.refusals.append("san")
                    return
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            extra = [f"{k}: {v}\r\n" for k, v in cfg.headers]
            if cfg.authorized(headers.get("authorization")):
                status, body = "200 OK", b"ok\n"
            else:
                status, body = "401 Unauthorized", b"Unauthorized\n"
                extra.append("WWW-Authenticate: Basic\r\n")
            conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                         f"{''.join(extra)}\r\n".encode() + body)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[[WebConfigSource | WebConfig], Server]]:
    servers: list[Server] = []

    def start(source: WebConfigSource | WebConfig) -> Server:
        servers.append(Server(source))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    version: str | None
    cipher: str | None
    peer_cn: str | None


def client_context(pki: PKI, cert: str | None = None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca_crt)  # verifies the server, host name included
    if cert is not None:
        ctx.load_cert_chain(f"{cert}.crt", f"{cert}.key")
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def get(port: int, ctx: ssl.SSLContext | None, auth: tuple[str, str] | None = None) -> Answer:
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", "/metrics", headers=headers)
        sock = conn.sock
        version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        cipher = sock.cipher()[0] if isinstance(sock, ssl.SSLSocket) and sock.cipher() else None
        peer = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        cn = dict(x[0] for x in peer["subject"]).get("commonName") if peer else None
        response = conn.getresponse()
        response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, version, cipher, cn)
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """The server notes a refused handshake just after the client sees it fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def refused(port: int, ctx: ssl.SSLContext | None, auth: tuple[str, str] | None = None) -> bool:
    """True when the connection or the request fails (handshake alert, reset, close before an answer)."""
    try:
        get(port, ctx, auth)
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError):
        return True
    return False


# --- TLS ----------------------------------------------------------------------------------------------------

def test_tls_handshake_with_the_toolkit_defaults(pki: PKI, tmp_path: Path, serve: Any) -> None:
    cfg = load_web_config(write_config(tmp_path, tls_config(pki)))
    assert cfg.ssl_context is not None and cfg.tls
    assert cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2  # the toolkit's default min_version
    assert cfg.ssl_context.verify_mode == ssl.CERT_NONE
    assert cfg.summary() == "TLS (TLS12+)"
    server = serve(cfg)
    answer = get(server.port, client_context(pki))
    assert (answer.status, answer.version, answer.peer_cn) == (200, "TLSv1.3", "localhost")
    assert refused(server.port, None)  # plain HTTP to the TLS port
    assert wait_for(lambda: len(server.refusals) == 1) and server.refusals[0].startswith("handshake")
    # A TLS 1.1 client is refused (OpenSSL 3 at its default security level would refuse it too).
    assert refused(server.port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_1))


def test_min_and_max_version(pki: PKI, tmp_path: Path, serve: Any) -> None:
    only13 = serve(load_web_config(write_config(tmp_path, tls_config(pki, "  min_version: TLS13\n"), "a.yml")))
    assert refused(only13.port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert wait_for(lambda: len(only13.refusals) == 1) and only13.refusals[0].startswith("handshake")
    assert get(only13.port, client_context(pki)).version == "TLSv1.3"
    only12 = serve(load_web_config(write_config(tmp_path, tls_config(pki, "  max_version: TLS12\n"), "b.yml")))
    assert get(only12.port, client_context(pki)).version == "TLSv1.2"


@pytest.mark.parametrize("prefer, expected", [(True, "ECDHE-ECDSA-AES256-GCM-SHA384"),
                                              (False, "ECDHE-ECDSA-AES128-GCM-SHA256")])
def test_cipher_suites_and_who_chooses(pki: PKI, tmp_path: Path, serve: Any, prefer: bool, expected: str) -> None:
    extra = ("  max_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, "
             f"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n  prefer_server_cipher_suites: {str(prefer).lower()}\n")
    server = serve(load_web_config(write_config(tmp_path, tls_config(pki, extra))))
    ctx = client_context(pki)
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")  # the client's order
    assert get(server.port, ctx).cipher == expected
    ctx = client_context(pki)
    ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")  # not in the server's list
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert refused(server.port, ctx)


def test_one_curve(pki: PKI, tmp_path: Path, serve: Any) -> None:
    server = serve(load_web_config(write_config(tmp_path, tls_config(pki, "  curve_preferences: [X25519]\n"))))
    p256 = client_context(pki)
    p256.set_ecdh_curve("prime256v1")
    assert refused(server.port, p256)
    x25519 = client_context(pki)
    x25519.set_ecdh_curve("X25519")
    assert get(server.port, x25519).status == 200


def test_mutual_tls(pki: PKI, tmp_path: Path, serve: Any) -> None:
    required = tls_config(pki, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca_crt}\n")
    cfg = load_web_config(write_config(tmp_path, required, "required.yml"))
    assert cfg.ssl_context is not None and cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    server = serve(cfg)
    assert refused(server.port, client_context(pki))  # no client certificate
    assert refused(server.port, client_context(pki, str(pki.dir / "stranger")))  # signed by another CA
    assert get(server.port, client_context(pki, str(pki.dir / "client"))).status == 200
    assert wait_for(lambda: len(server.refusals) == 2)
    assert all(r.startswith("handshake") for r in server.refusals), server.refusals

    if_given = tls_config(pki, f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {pki.ca_crt}\n")
    optional = serve(load_web_config(write_config(tmp_path, if_given, "optional.yml")))
    assert get(optional.port, client_context(pki)).status == 200
    assert refused(optional.port, client_context(pki, str(pki.dir / "stranger")))
    assert get(optional.port, client_context(pki, str(pki.dir / "client"))).status == 200


def test_client_allowed_sans(pki: PKI, tmp_path: Path, serve: Any) -> None:
    base = f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca_crt}\n"
    good = serve(load_web_config(write_config(
        tmp_path, tls_config(pki, base + "  client_allowed_sans: [grafana, spiffe://test/prometheus]\n"), "a.yml")))
    assert get(good.port, client_context(pki, str(pki.dir / "client"))).status == 200
    bad = serve(load_web_config(write_config(
        tmp_path, tls_config(pki, base + "  client_allowed_sans: [grafana]\n"), "b.yml")))
    assert refused(bad.port, client_context(pki, str(pki.dir / "client")))
    assert bad.refusals == ["san"]


def test_client_allowed_matches_every_kind_of_name_exactly() -> None:
    cfg = WebConfig(allowed_sans=("2001:db8::1", "ops@example.com", "scraper.internal"))
    assert cfg.client_allowed({"subjectAltName": (("IP Address", "2001:DB8:0:0:0:0:0:1\n"),)})
    assert cfg.client_allowed({"subjectAltName": (("email", "ops@example.com"),)})
    assert cfg.client_allowed({"subjectAltName": (("DNS", "x"), ("DNS", "scraper.internal"))})
    assert not cfg.client_allowed({"subjectAltName": (("DNS", "SCRAPER.internal"),)})
    assert not cfg.client_allowed({"subject": ((("commonName", "scraper.internal"),),)})  # the CN is no SAN
    assert not cfg.client_allowed({})
    assert not cfg.client_allowed(None)
    assert WebConfig().client_allowed(None)


def test_relative_paths_are_read_from_the_config_files_folder(pki: PKI, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(pki.dir / name, folder / name)
    write_config(folder, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                         "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_web_config("conf/web.yml")
    assert cfg.files == tuple(str(folder / n) for n in ("server.crt", "server.key", "ca.crt"))


def test_headers_http2_and_an_empty_file(tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, "http_server_config:\n  http2: false\n  headers:\n"
                                                 "    X-Frame-Options: deny\n    X-Content-Type-Options: nosniff\n"
                                                 "    Content-Security-Policy: ''\n"))
    assert cfg.headers == (("X-Frame-Options", "deny"), ("X-Content-Type-Options", "nosniff"))
    empty = load_web_config(write_config(tmp_path, "", "empty.yml"))
    assert (empty.ssl_context, dict(empty.users), empty.headers, empty.allowed_sans) == (None, {}, (), ())
    assert empty.authorized(None) and empty.summary() == "plain HTTP"


# --- basic auth ---------------------------------------------------------------------------------------------

def basic(user: str, password: str | bytes) -> str:
    raw = (user.encode() + b":" + (password if isinstance(password, bytes) else password.encode()))
    return "Basic " + base64.b64encode(raw).decode()


def users_config(tmp_path: Path, **passwords: str) -> WebConfig:
    lines = "".join(f"  {user}: {bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}\n"
                    for user, pw in passwords.items())
    return load_web_config(write_config(tmp_path, "basic_auth_users:\n" + lines, f"users-{time.monotonic_ns()}.yml"))


class CountingCheckpw:
    """bcrypt.checkpw, counted, with the most calls seen running at once."""

    def __init__(self, real: Callable[[bytes, bytes], bool], delay: float = 0.0) -> None:
        self.real, self.delay = real, delay
        self.calls: list[bytes] = []
        self.refused: list[bytes] = []
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self.lock:
            self.calls.append(hashed)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return self.real(password, hashed)
        except ValueError:  # a hash bcrypt refuses at once: no work done, so no equal cost either
            self.refused.append(hashed)
            raise
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def checkpw(monkeypatch: pytest.MonkeyPatch) -> CountingCheckpw:
    counting = CountingCheckpw(bcrypt.checkpw)
    monkeypatch.setattr(web.bcrypt, "checkpw", counting)
    return counting


def test_basic_auth_answers(tmp_path: Path) -> None:
    cfg = users_config(tmp_path, prometheus="s3cret", grafana="other")
    assert cfg.authorized(basic("prometheus", "s3cret"))
    assert cfg.authorized(basic("grafana", "other"))
    assert cfg.authorized("basic " + basic("prometheus", "s3cret").split()[1])  # the scheme is case-insensitive
    assert not cfg.authorized(basic("prometheus", "other"))  # another user's password
    assert not cfg.authorized(basic("prometheus", "s3cret "))
    assert not cfg.authorized(basic("nobody", "s3cret"))
    assert not cfg.authorized(basic("prometheus", b"\xff" * 100))  # over bcrypt's 72 bytes
    for malformed in (None, "", "Basic", "Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(),
                      "Basic cHJvbWV0aGV1czpzM2NyZXQ", "Basic ünïcode"):
        assert not cfg.authorized(malformed), malformed
    assert cfg.summary() == "plain HTTP, basic auth (2 users)"


def test_basic_auth_is_cached_and_unknown_users_cost_the_same(tmp_path: Path, checkpw: CountingCheckpw) -> None:
    cfg = users_config(tmp_path, prometheus="s3cret")
    cost = cfg.users["prometheus"][:7]  # $2b$04$
    assert cfg.authorized(basic("prometheus", "s3cret")) and len(checkpw.calls) == 1
    assert cfg.authorized(basic("prometheus", "s3cret")) and len(checkpw.calls) == 1  # a scrape every 15 s: cached
    assert not cfg.authorized(basic("prometheus", "wrong")) and len(checkpw.calls) == 2
    assert not cfg.authorized(basic("prometheus", "wrong")) and len(checkpw.calls) == 2
    stranger = f"nobody-{time.monotonic_ns()}"  # the decoy hash is the process's: a fresh name, not cached yet
    assert not cfg.authorized(basic(stranger, "s3cret")) and len(checkpw.calls) == 3
    assert checkpw.calls[-1][:7] == cost and checkpw.calls[-1] != cfg.users["prometheus"]  # a decoy of the same cost
    assert checkpw.refused == []  # ...that bcrypt hashed against, as it does for a known user
    assert not cfg.authorized(basic(stranger, "s3cret")) and len(checkpw.calls) == 3
    # A flood of wrong passwords fills the failure cache, not the one the scraper's answer is in.
    for i in range(2 * web._CACHE_SIZE):
        assert not cfg.authorized(basic("prometheus", f"guess-{i}"))
    calls = len(checkpw.calls)
    assert cfg.authorized(basic("prometheus", "s3cret")) and len(checkpw.calls) == calls
    # A re-loaded file with the same hash keeps the cached answer (cert rotation costs no bcrypt).
    again = load_web_config(cfg.path or "")
    assert again.authorized(basic("prometheus", "s3cret")) and len(checkpw.calls) == calls


def test_one_bcrypt_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = users_config(tmp_path, prometheus="s3cret")
    counting = CountingCheckpw(bcrypt.checkpw, delay=0.02)
    monkeypatch.setattr(web.bcrypt, "checkpw", counting)
    threads = [threading.Thread(target=cfg.authorized, args=(basic("prometheus", f"flood-{i}"),)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(counting.calls) == 8 and counting.most == 1


def test_basic_auth_over_tls(pki: PKI, tmp_path: Path, serve: Any) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    cfg = load_web_config(write_config(tmp_path, tls_config(pki, f"basic_auth_users:\n  prometheus: {hashed}\n"
                                                                 "http_server_config:\n  headers:\n"
                                                                 "    X-Content-Type-Options: nosniff\n")))
    server = serve(cfg)
    ok = get(server.port, client_context(pki), ("prometheus", "s3cret"))
    assert ok.status == 200 and ok.headers["x-content-type-options"] == "nosniff"
    wrong = get(server.port, client_context(pki), ("prometheus", "nope"))
    assert wrong.status == 401 and wrong.headers["www-authenticate"] == "Basic"
    assert get(server.port, client_context(pki)).status == 401


# --- bad files ----------------------------------------------------------------------------------------------

HASH = "$2b$04$" + "a" * 53

BAD_CONFIGS = {
    "yaml": ("basic_auth_users:\n  a: [\n", "is not valid YAML at line"),
    "not a mapping": ("- a\n- b\n", "the file must be a mapping, got list"),
    "unknown top key": ("tls_config: {{}}\n", "unknown key tls_config"),
    "unknown tls key": ("{tls}  certfile: x\n", "unknown key tls_server_config.certfile"),
    "unknown http key": ("http_server_config:\n  http3: true\n", "unknown key http_server_config.http3"),
    "empty tls section": ("tls_server_config:\n", "tls_server_config is empty"),
    "key_file missing": ("tls_server_config:\n  cert_file: {server_crt}\n", "tls_server_config.key_file is missing"),
    "cert_file missing": ("tls_server_config:\n  key_file: {server_key}\n", "tls_server_config.cert_file is missing"),
    "inline cert": ("tls_server_config:\n  cert: abc\n  key_file: {server_key}\n",
                    "cert (inline PEM) is not supported"),
    "cert file missing": ("tls_server_config:\n  cert_file: nothere.crt\n  key_file: {server_key}\n",
                          "nothere.crt': No such file or directory"),
    "cert file a directory": ("tls_server_config:\n  cert_file: {dir}\n  key_file: {server_key}\n", "a directory"),
    "cert file /dev/zero": ("tls_server_config:\n  cert_file: /dev/zero\n  key_file: {server_key}\n",
                            "'/dev/zero': not a regular file"),
    "cert not PEM": ("tls_server_config:\n  cert_file: {server_ext}\n  key_file: {server_key}\n",
                     "holds no PEM certificate"),
    "cert garbage PEM": ("tls_server_config:\n  cert_file: {junk_crt}\n  key_file: {server_key}\n",
                         "junk.crt' is not a usable PEM certificate"),
    "key not PEM": ("tls_server_config:\n  cert_file: {server_crt}\n  key_file: {server_crt}\n",
                    "holds no PEM private key"),
    "key of another cert": ("tls_server_config:\n  cert_file: {server_crt}\n  key_file: {client_key}\n",
                            "client.key' does not match cert_file"),
    "encrypted key": ("tls_server_config:\n  cert_file: {server_crt}\n  key_file: {encrypted_key}\n", "is encrypted"),
    "bad client auth type": ("{tls}  client_auth_type: Always\n", "client_auth_type 'Always' is not one of"),
    "RequestClientCert": ("{tls}  client_auth_type: RequestClientCert\n  client_ca_file: {ca_crt}\n",
                          "RequestClientCert (a client certificate asked for but not verified) is not supported"),
    "RequireAnyClientCert": ("{tls}  client_auth_type: RequireAnyClientCert\n",
                             "use RequireAndVerifyClientCert with client_ca_file"),
    "CA required": ("{tls}  client_auth_type: RequireAndVerifyClientCert\n",
                    "client_ca_file is required with client_auth_type RequireAndVerifyClientCert"),
    "CA without policy": ("{tls}  client_ca_file: {ca_crt}\n",
                          "client CA is configured with client_auth_type NoClientCert"),
    "CA file bad": ("{tls}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {junk_crt}\n",
                    "client_ca_file '{junk_crt}' is not a usable PEM CA certificate"),
    "CA file missing": ("{tls}  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca-gone.crt\n",
                        "ca-gone.crt': No such file or directory"),
    "SANs without verification": ("{tls}  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca_crt}\n"
                                  "  client_allowed_sans: [a]\n", "needs client_auth_type RequireAndVerifyClientCert"),
    "empty SANs": ("{tls}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca_crt}\n"
                   "  client_allowed_sans: []\n", "client_allowed_sans is empty"),
    "bad min_version": ("{tls}  min_version: TLS1.2\n", "min_version 'TLS1.2' is not one of TLS10, TLS11"),
    "min above max": ("{tls}  min_version: TLS13\n  max_version: TLS12\n", "min_version is above max_version"),
    "unknown cipher": ("{tls}  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
                       "unknown cipher 'TLS_RSA_WITH_RC4_128_SHA'"),
    "unknown curve": ("{tls}  curve_preferences: [P256]\n", "unknown curve 'P256'"),
    "two curves": ("{tls}  curve_preferences: [X25519, CurveP256]\n", "lists 2 curves; Python's ssl sets one"),
    "prefer not bool": ("{tls}  prefer_server_cipher_suites: yes please\n", "must be true or false"),
    "header not allowed": ("http_server_config:\n  headers:\n    Authorization: x\n",
                           "HTTP header 'Authorization' can not be configured"),
    "header value": ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                     "invalid value for X-Frame-Options: expected one of deny, sameorigin, got 'allow'"),
    "http2 not bool": ("http_server_config:\n  http2: sometimes\n", "http_server_config.http2 must be true or false"),
    "not a bcrypt hash": ("basic_auth_users:\n  alice: plain-text-password\n",
                          "basic_auth_users.alice: not a bcrypt hash"),
    "bcrypt cost 3": ("basic_auth_users:\n  alice: '$2b$03$" + "a" * 53 + "'\n",
                      "basic_auth_users.alice: not a bcrypt"),
    "user not a string": ("basic_auth_users:\n  123: '" + HASH + "'\n", "user name 123 must be a string"),
    "rate limit": ("rate_limit:\n  interval: 1s\n  burst: 5\n", "rate_limit is not supported"),
}


def _expand(text: str, pki: PKI) -> str:
    names = {"tls": tls_config(pki), "dir": str(pki.dir)}
    names.update({n: getattr(pki, n) for n in ("server_crt", "server_key", "server_ext", "client_key", "ca_crt",
                                               "junk_crt", "encrypted_key")})
    return text.format(**names)


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_a_bad_config_is_one_line_naming_the_file(case: str, pki: PKI, tmp_path: Path) -> None:
    text, expected = BAD_CONFIGS[case]
    path = write_config(tmp_path, _expand(text, pki))
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert _expand(expected, pki) in message, message
    assert "plain-text-password" not in message and HASH not in message  # never the secret


def test_every_problem_is_named_in_the_one_line(pki: PKI, tmp_path: Path) -> None:
    path = write_config(tmp_path, "tls_server_config:\n  cert_file: a.crt\n  min_version: TLS9\n"
                                  "http_server_config:\n  headers:\n    Server: x\nbasic_auth_users:\n  bob: nope\n")
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    message = str(info.value)
    for part in ("key_file is missing", "min_version 'TLS9'", "'Server' can not be configured", "basic_auth_users.bob"):
        assert part in message, message
    assert message.count(";") == 3 and "\n" not in message


def _bad_path(kind: str, tmp_path: Path) -> str:
    if kind == "missing":
        return str(tmp_path / "nothere.yml")
    if kind == "directory":
        return str(tmp_path)
    if kind == "/dev/zero":
        return "/dev/zero"
    path = tmp_path / "web.yml"
    if kind == "not UTF-8":
        path.write_bytes(b"basic_auth_users:\n  caf\xe9: x\n")
    else:  # too big
        path.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    return str(path)


@pytest.mark.parametrize("kind, expected", [("missing", "No such file or directory"), ("directory", "a directory"),
                                            ("/dev/zero", "not a regular file"), ("not UTF-8", "is not UTF-8"),
                                            ("too big", "more than the 1048576 accepted")])
def test_an_unreadable_config_file(kind: str, expected: str, tmp_path: Path) -> None:
    path = _bad_path(kind, tmp_path)
    started = time.monotonic()
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    assert time.monotonic() - started < 5  # /dev/zero is refused, not read
    message = str(info.value)
    assert "\n" not in message and path in message and expected in message and "web config file" in message


# --- re-loading ---------------------------------------------------------------------------------------------

def _install(src_dir: Path, stem: str, dest: Path) -> None:
    """Put ``stem``'s cert and key in place as cert-manager or a Kubernetes secret does: new files, renamed in."""
    for ext in ("crt", "key"):
        tmp = dest / f".{ext}.tmp"
        shutil.copy(src_dir / f"{stem}.{ext}", tmp)
        os.replace(tmp, dest / f"server.{ext}")


def test_rotation_is_picked_up_and_a_broken_rewrite_keeps_the_last_good_config(pki: PKI, tmp_path: Path,
                                                                               serve: Any) -> None:
    _install(pki.dir, "server", tmp_path)
    path = write_config(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    errors: list[Exception] = []
    source = WebConfigSource(path, on_error=errors.append, check_every=0)
    server = serve(source)
    first = source.current()
    assert source.current() is first  # nothing changed: not re-loaded
    assert get(server.port, client_context(pki)).peer_cn == "localhost"

    _install(pki.dir, "rotated", tmp_path)
    assert get(server.port, client_context(pki)).peer_cn == "localhost-rotated"
    rotated = source.current()
    assert rotated is not first and errors == []

    (tmp_path / "server.crt").write_text("not a certificate\n")  # a broken rewrite, in place
    for _ in range(3):
        assert source.current() is rotated
    assert get(server.port, client_context(pki)).peer_cn == "localhost-rotated"  # still served, as before
    assert len(errors) == 1 and isinstance(errors[0], WebConfigError)
    assert "holds no PEM certificate" in str(errors[0]) and "\n" not in str(errors[0])

    path.write_text("")  # TLS off: refused too, and reported as a new failure
    assert source.current() is rotated
    assert len(errors) == 2 and "switching it needs a restart" in str(errors[1])

    path.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    _install(pki.dir, "server", tmp_path)  # mended
    assert get(server.port, client_context(pki)).peer_cn == "localhost"
    assert source.current() is not rotated and len(errors) == 2


def test_the_files_are_looked_at_once_per_check_every(pki: PKI, tmp_path: Path) -> None:
    _install(pki.dir, "server", tmp_path)
    path = write_config(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    source = WebConfigSource(path, check_every=3600)
    first = source.current()
    _install(pki.dir, "rotated", tmp_path)
    assert source.current() is first


def test_a_source_refuses_a_bad_file_at_once(tmp_path: Path) -> None:
    path = write_config(tmp_path, "basic_auth_users:\n  alice: nope\n")
    with pytest.raises(WebConfigError, match=r"basic_auth_users\.alice: not a bcrypt hash"):
        WebConfigSource(path)


def test_the_example_file_loads_and_its_documented_password_works(pki: PKI, tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    assert EXAMPLE_PASSWORD in text
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.dir / name, tmp_path / name)
    cfg = load_web_config(write_config(tmp_path, text))
    assert cfg.tls and cfg.users
    user = next(iter(cfg.users))
    assert cfg.authorized(basic(user, EXAMPLE_PASSWORD)) and not cfg.authorized(basic(user, "wrong"))


def test_an_alias_bomb_is_refused_before_it_is_walked(tmp_path: Path) -> None:
    levels = ["a: &a [" + ", ".join(["x"] * 10) + "]"]
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    bomb = tmp_path / "bomb.yml"
    bomb.write_text("\n".join(levels) + "\n")  # under 300 bytes, 10^8 values once expanded
    with pytest.raises(WebConfigError) as err:
        load_web_config(bomb)
    assert "expands to more than" in str(err.value) and "\n" not in str(err.value)
