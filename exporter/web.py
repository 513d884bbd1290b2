"""The exporter-toolkit web configuration file (``--web.config.file``): TLS, mutual TLS and basic auth.

Every official Prometheus exporter reads the same YAML file (prometheus/exporter-toolkit,
``docs/web-configuration.md``); this module reads it the way the toolkit does, with Python's :mod:`ssl`
for TLS and the ``bcrypt`` library for passwords::

    tls_server_config:
      cert_file: server.crt            # relative paths: from the web config file's folder
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS12
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}
    basic_auth_users:
      prometheus: $2b$10$...           # a bcrypt hash

A server calls :meth:`WebConfigSource.current` for each new connection, wraps the socket with
``ssl_context`` when it is not ``None``, closes it when :meth:`WebConfig.client_allowed` says no after the
handshake, answers 401 with ``WWW-Authenticate: Basic`` when :meth:`WebConfig.authorized` says no, and adds
``headers`` to every response.

Where Python's :mod:`ssl` cannot do exactly what the toolkit does, the file is refused with a sentence
saying so, never served with less protection than it asks for:

* ``client_auth_type`` ``RequestClientCert`` and ``RequireAnyClientCert`` (a client certificate asked for
  but not verified): OpenSSL verifies every certificate it asks for. ``NoClientCert``,
  ``VerifyClientCertIfGiven`` and ``RequireAndVerifyClientCert`` are exact.
* ``curve_preferences`` with more than one curve: ``SSLContext.set_ecdh_curve`` sets one. One curve is exact
  (for TLS 1.2 and 1.3); without the key, OpenSSL's default groups are used.
* inline ``cert`` and ``key``: :meth:`ssl.SSLContext.load_cert_chain` reads files only, and a private key
  written to a temporary file is worse than asking for ``key_file``. Inline ``client_ca`` is supported.
* ``rate_limit``: not implemented; the server bounds connections instead.

Accepted with the toolkit's meaning: ``cipher_suites`` (Go's names; as in Go they apply up to TLS 1.2, and
the TLS 1.3 names are accepted and change nothing, TLS 1.3 suites not being configurable in either),
``prefer_server_cipher_suites`` (honoured: OpenSSL can; Go 1.18+ ignores it and always chooses itself) and
``http_server_config.http2`` (accepted, but these servers speak HTTP/1.1 only, and say so in ALPN).
Stricter than the toolkit, each with a one-line reason: a ``tls_server_config`` section without
``cert_file`` and ``key_file`` (the toolkit would serve plain HTTP), ``client_allowed_sans`` without
``RequireAndVerifyClientCert`` or as an empty list (the toolkit would then refuse every client),
``VerifyClientCertIfGiven`` without a client CA (Go would fall back to the system roots), an encrypted
key (Go cannot read one either), ``min_version`` above ``max_version``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import bcrypt

from exporter.files import FileProblem, check_expansion, load_yaml, read_text

WHAT = "web config file"

# The toolkit's key names (web/tls_config.go, struct tags); anything else is an error, as its strict unmarshal.
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
             "cipher_suites", "curve_preferences", "min_version", "max_version", "prefer_server_cipher_suites",
             "client_allowed_sans")
_HTTP_KEYS = ("http2", "headers")

_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
             "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

_VERIFY_MODES = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                 "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_UNVERIFIED = {
    "RequestClientCert": "use VerifyClientCertIfGiven with client_ca_file, or NoClientCert",
    "RequireAnyClientCert": "use RequireAndVerifyClientCert with client_ca_file",
    "RequireClientCert": "use RequireAndVerifyClientCert with client_ca_file",  # the toolkit's old alias
}

# Go's tls.CipherSuites() (the ones the toolkit accepts) -> OpenSSL's names for the same IANA suites.
_TLS12_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
_TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")

_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}

# The toolkit's only configurable response headers, and the values it allows where it restricts them
# (web/handler.go, extraHTTPHeaders).
_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

# $2a$, $2b$ and $2y$ are one algorithm (the letters record old bugs of other implementations); bcrypt
# accepts all three, and costs 4 to 31.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")

_CACHE_SIZE = 100  # entries per cache, the toolkit's size
# A check waits at most this long for the one bcrypt at a time; past it the request is refused (401), so a
# flood of wrong passwords queues for seconds, not for ever. Well inside Prometheus's 10 s scrape timeout.
_BCRYPT_WAIT_SECONDS = 5.0

_PEM_CERT = "-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----")


class WebConfigError(ValueError):
    """A web config file that cannot be used; ``str()`` is one line naming the file and every problem."""


class _Problems:
    """The problems found in one file, reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(" ".join(str(text).split()))  # one line, whatever the library said

    def __bool__(self) -> bool:
        return bool(self.items)


def _error(path: str, problems: Iterable[str]) -> WebConfigError:
    return WebConfigError(f"{WHAT} {path!r}: " + "; ".join(problems))


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # load_cert_chain would otherwise prompt on the terminal for an encrypted key's password.
    raise _EncryptedKey


class _BasicAuthChecks:
    """Bcrypt comparisons, cached and one at a time.

    A bcrypt check costs tens of milliseconds by design; Prometheus sends the same credentials every
    scrape. Results are cached under a SHA-256 of (user, password, hash), as the toolkit caches them
    (``web/cache.go``), so a scraper costs one bcrypt per process. Successes and failures are kept in
    separate bounded LRUs, so a flood of wrong passwords cannot push the scraper's entry out. One lock
    lets one comparison run at a time: a flood costs one core, not all of them. Shared by every
    :class:`WebConfig` of the process, so a re-loaded file (cert rotation) keeps its cached results.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._decoys: dict[int, bytes] = {}

    def decoy(self, cost: int) -> bytes:
        """A well-formed hash of ``cost`` that no password matches: unknown users cost one bcrypt too."""
        with self._lock:
            if cost not in self._decoys:
                # A real salt and a digest of dots (a bcrypt digest is that by a 1 in 2**186 chance):
                # checkpw does the whole work, then finds no match.
                self._decoys[cost] = bcrypt.gensalt(rounds=cost) + b"." * 31
            return self._decoys[cost]

    def check(self, user: bytes, password: bytes, hashed: bytes, known: bool) -> bool:
        key = hashlib.sha256(b"\0".join(
            (len(user).to_bytes(4, "big") + user, len(password).to_bytes(4, "big") + password, hashed))).digest()
        with self._lock:
            if key in self._ok:  # only known users get there
                self._ok.move_to_end(key)
                return True
            if key in self._bad:
                self._bad.move_to_end(key)
                return False
        if not self._bcrypt.acquire(timeout=_BCRYPT_WAIT_SECONDS):
            return False
        try:
            ok = bcrypt.checkpw(password, hashed)
        except ValueError:  # a password over bcrypt's 72 bytes: never matches, as in Go
            ok = False
        finally:
            self._bcrypt.release()
        ok = ok and known
        with self._lock:
            cache = self._ok if ok else self._bad
            cache[key] = None
            while len(cache) > _CACHE_SIZE:
                cache.popitem(last=False)
        return ok


_CHECKS = _BasicAuthChecks()


def _parse_basic(authorization: str) -> tuple[bytes, bytes] | None:
    """(user, password) of ``Basic base64(user:password)``, as Go's ``Request.BasicAuth``; None if malformed."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = raw.partition(b":")
    return (user, password) if colon else None


def _san_values(peercert: Mapping[str, Any]) -> set[str]:
    """The DNS, IP, e-mail and URI subject alternative names of a certificate from ``getpeercert()``."""
    values = set()
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI"):
            values.add(str(value))
        elif kind == "IP Address":
            values.add(_ip_text(str(value).strip()))
    return values


def _ip_text(text: str) -> str:
    # OpenSSL writes IPv6 SANs uncompressed and in upper case; Go's net.IP.String() compresses.
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


@dataclass(frozen=True)
class WebConfig:
    """A loaded web config file; ``WebConfig()`` is plain HTTP with no auth (no file given).

    Attributes:
        path: the web config file, or None.
        ssl_context: the server context for every connection; None serves plain HTTP.
        users: ``basic_auth_users``, user -> bcrypt hash; empty: no basic auth.
        headers: ``http_server_config.headers``, to add to every response.
        allowed_sans: ``tls_server_config.client_allowed_sans``; empty: any verified client.
        files: the certificate, key and CA files it was built from (watched by :class:`WebConfigSource`).
    """

    path: str | None = None
    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    headers: tuple[tuple[str, str], ...] = ()
    allowed_sans: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def authorized(self, authorization: str | None) -> bool:
        """Whether a request with this ``Authorization`` header may be answered; True when there are no users.

        A user not in the file costs a bcrypt check like a known one (against a decoy hash of the
        highest cost in the file), so response times do not tell which users exist.
        """
        if not self.users:
            return True
        parsed = _parse_basic(authorization) if authorization else None
        if parsed is None:
            return False
        user, password = parsed
        hashed = self.users.get(user.decode("utf-8", "surrogateescape"))
        if hashed is None:
            return _CHECKS.check(user, password, _CHECKS.decoy(max(int(h[4:6]) for h in self.users.values())),
                                 known=False)
        return _CHECKS.check(user, password, hashed, known=True)

    def client_allowed(self, peercert: Mapping[str, Any] | None) -> bool:
        """After the handshake: whether the client certificate (``getpeercert()``) has an allowed SAN.

        True when ``client_allowed_sans`` is not set. A match is exact, on any DNS, IP, e-mail or URI name,
        as the toolkit matches (IP addresses compared in their canonical form).
        """
        if not self.allowed_sans:
            return True
        if not peercert:
            return False
        allowed = {_ip_text(name) for name in self.allowed_sans}
        return not allowed.isdisjoint(_san_values(peercert))

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    def summary(self) -> str:
        """One line for the start-up log, e.g. ``TLS (TLS12+, client certificates required), basic auth (1 user)``."""
        parts = []
        if self.ssl_context is not None:
            minimum = {v: k for k, v in _VERSIONS.items()}.get(self.ssl_context.minimum_version, "default")
            mode = {ssl.CERT_NONE: "", ssl.CERT_OPTIONAL: ", client certificates verified if given",
                    ssl.CERT_REQUIRED: ", client certificates required"}[self.ssl_context.verify_mode]
            parts.append(f"TLS ({minimum}+{mode})")
        else:
            parts.append("plain HTTP")
        if self.users:
            parts.append(f"basic auth ({len(self.users)} user{'s' if len(self.users) != 1 else ''})")
        return ", ".join(parts)


def _resolve(base_dir: str, name: str) -> str:
    # As the toolkit's SetDirectory (config_util.JoinDir): relative to the web config file's folder. Made
    # absolute here so that a later chdir of the training script does not change what a re-load reads.
    return os.path.abspath(os.path.join(base_dir, name))


def _string(section: Mapping[str, Any], key: str, where: str, problems: _Problems) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.add(f"{where}.{key} must be a string, got {type(value).__name__}")
        return ""
    return value


def _string_list(section: Mapping[str, Any], key: str, where: str, problems: _Problems) -> list[str] | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(f"{where}.{key} must be a list of strings")
        return None
    return value


def _mapping(value: Any, where: str, problems: _Problems) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(f"{where} must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _unknown(section: Mapping[Any, Any], known: tuple[str, ...], where: str, problems: _Problems) -> None:
    for key in section:
        if key not in known:
            problems.add(f"unknown key {where + '.' if where else ''}{key}")


def _read_pem(path: str, what: str, problems: _Problems) -> str | None:
    try:
        return read_text(path, what)
    except FileProblem as exc:
        problems.add(str(exc))
        return None


@dataclass
class _TLSSettings:
    """A ``tls_server_config`` section, checked; paths made absolute."""

    cert: str
    key: str
    ca_file: str
    ca_inline: str
    verify_mode: ssl.VerifyMode
    allowed_sans: tuple[str, ...]
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    ciphers: tuple[str, ...]  # OpenSSL's names of the TLS 1.2 suites asked for
    curve: str | None
    prefer_server_ciphers: bool

    @property
    def files(self) -> tuple[str, ...]:
        return (self.cert, self.key, *((self.ca_file,) if self.ca_file else ()))


def _client_auth(tls: Mapping[str, Any], problems: _Problems) -> tuple[ssl.VerifyMode | None, str, str]:
    """(verify mode, client_ca_file, client_ca) of ``client_auth_type`` and its CA."""
    where = "tls_server_config"
    auth_type = _string(tls, "client_auth_type", where, problems) or "NoClientCert"
    ca_file = _string(tls, "client_ca_file", where, problems)
    ca_inline = _string(tls, "client_ca", where, problems)
    if ca_file and ca_inline:
        problems.add(f"{where}: give one of client_ca_file and client_ca, not both")
    mode = _VERIFY_MODES.get(auth_type)
    if auth_type in _UNVERIFIED:
        problems.add(f"{where}.client_auth_type {auth_type} (a client certificate asked for but not verified) is "
                     f"not supported: Python's ssl verifies every client certificate it asks for; "
                     f"{_UNVERIFIED[auth_type]}")
    elif mode is None:
        problems.add(f"{where}.client_auth_type {auth_type!r} is not one of {', '.join(_VERIFY_MODES)}")
    elif mode == ssl.CERT_NONE and (ca_file or ca_inline):
        problems.add(f"{where}: a client CA is configured with client_auth_type NoClientCert; set "
                     "client_auth_type RequireAndVerifyClientCert (or VerifyClientCertIfGiven)")
    elif mode != ssl.CERT_NONE and not (ca_file or ca_inline):
        problems.add(f"{where}.client_ca_file is required with client_auth_type {auth_type}")
    return mode, ca_file, ca_inline


def _tls_settings(tls: Mapping[str, Any], base_dir: str, problems: _Problems) -> _TLSSettings | None:
    """The checked settings of a ``tls_server_config`` section; None (and ``problems``) when any is wrong."""
    where = "tls_server_config"
    _unknown(tls, _TLS_KEYS, where, problems)
    names = {}
    for key, inline in (("cert_file", "cert"), ("key_file", "key")):
        names[key] = _string(tls, key, where, problems)
        if tls.get(inline) not in (None, ""):
            problems.add(f"{where}.{inline} (inline PEM) is not supported: Python's ssl loads a certificate and "
                         f"key from files only; use {key}")
        elif not names[key]:
            problems.add(f"{where}.{key} is missing (TLS needs cert_file and key_file)")
    mode, ca_file, ca_inline = _client_auth(tls, problems)
    sans = _string_list(tls, "client_allowed_sans", where, problems)
    if sans is not None and not sans:
        problems.add(f"{where}.client_allowed_sans is empty, which would refuse every client: list the "
                     "allowed names or leave it out")
    elif sans and mode is not None and mode != ssl.CERT_REQUIRED:
        problems.add(f"{where}.client_allowed_sans needs client_auth_type RequireAndVerifyClientCert")
    versions = []
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _string(tls, key, where, problems) or default
        if name not in _VERSIONS:
            problems.add(f"{where}.{key} {name!r} is not one of {', '.join(_VERSIONS)}")
        versions.append(_VERSIONS.get(name))
    low, high = versions
    if low is not None and high is not None and low > high:
        problems.add(f"{where}: min_version is above max_version")
    suites = _string_list(tls, "cipher_suites", where, problems) or []
    for suite in suites:
        if suite not in _TLS12_SUITES and suite not in _TLS13_SUITES:
            problems.add(f"{where}.cipher_suites: unknown cipher {suite!r} (Go's names, e.g. "
                         "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)")
    curves = _string_list(tls, "curve_preferences", where, problems) or []
    for curve in curves:
        if curve not in _CURVES:
            problems.add(f"{where}.curve_preferences: unknown curve {curve!r} (one of {', '.join(_CURVES)})")
    if len(curves) > 1:
        problems.add(f"{where}.curve_preferences lists {len(curves)} curves; Python's ssl sets one "
                     "(set_ecdh_curve): give one, or leave the key out for OpenSSL's default groups")
    prefer = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        problems.add(f"{where}.prefer_server_cipher_suites must be true or false")
    if problems or mode is None or low is None or high is None:
        return None
    return _TLSSettings(
        cert=_resolve(base_dir, names["cert_file"]), key=_resolve(base_dir, names["key_file"]),
        ca_file=_resolve(base_dir, ca_file) if ca_file else "", ca_inline=ca_inline, verify_mode=mode,
        allowed_sans=tuple(sans or ()), minimum=low, maximum=high,
        ciphers=tuple(_TLS12_SUITES[s] for s in suites if s in _TLS12_SUITES),
        curve=_CURVES[curves[0]] if curves else None, prefer_server_ciphers=prefer)


def _read_pems(s: _TLSSettings, problems: _Problems) -> str | None:
    """Check that the certificate, key and CA files are small regular PEM files; the CA's text (or None).

    Read here first, bounded (:func:`exporter.files.read_text`), because OpenSSL reads a path it is given
    without limit: ``/dev/zero`` as ``cert_file`` would never end.
    """
    where = "tls_server_config"
    cert_text = _read_pem(s.cert, f"{where}.cert_file", problems)
    if cert_text is not None and _PEM_CERT not in cert_text:
        problems.add(f"{where}.cert_file {s.cert!r} holds no PEM certificate")
    key_text = _read_pem(s.key, f"{where}.key_file", problems)
    if key_text is not None:
        marker = _PEM_KEY.search(key_text)
        if marker is None:
            problems.add(f"{where}.key_file {s.key!r} holds no PEM private key")
        elif "ENCRYPTED" in marker.group(1) or "Proc-Type: 4,ENCRYPTED" in key_text:
            problems.add(_encrypted(s.key))
    ca_text = _read_pem(s.ca_file, f"{where}.client_ca_file", problems) if s.ca_file else s.ca_inline or None
    if ca_text is not None and _PEM_CERT not in ca_text:
        problems.add(f"{_ca_name(s)} holds no PEM certificate")
    return ca_text


def _encrypted(key: str) -> str:
    return f"tls_server_config.key_file {key!r} is encrypted; give an unencrypted key (as the toolkit needs too)"


def _ca_name(s: _TLSSettings) -> str:
    return f"tls_server_config.client_ca_file {s.ca_file!r}" if s.ca_file else "tls_server_config.client_ca"


def _reason(exc: Exception) -> str:
    """OpenSSL's reason, without the ``(_ssl.c:1234)`` of CPython's source."""
    text = getattr(exc, "reason", None) or (exc.args[-1] if exc.args else exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(text)).removeprefix("[SSL] ")


def _cert_problem(path: str) -> str | None:
    """Why OpenSSL cannot parse the certificates of ``path`` (already read once, bounded), or None."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=read_text(path, "cert_file"))
    except (ssl.SSLError, ValueError, FileProblem) as exc:
        return _reason(exc)
    return None


def _tls_context(s: _TLSSettings, problems: _Problems) -> ssl.SSLContext | None:
    """The server context of checked settings; None (and ``problems``) when a file cannot be used."""
    ca_text = _read_pems(s, problems)
    if problems:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(s.cert, s.key, password=_refuse_password)
    except _EncryptedKey:
        problems.add(_encrypted(s.key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problems.add(f"tls_server_config.key_file {s.key!r} does not match cert_file {s.cert!r}")
        elif _cert_problem(s.cert) is not None:
            problems.add(f"tls_server_config.cert_file {s.cert!r} is not a usable PEM certificate: "
                         f"{_cert_problem(s.cert)}")
        else:
            problems.add(f"tls_server_config.key_file {s.key!r} is not a usable PEM private key: {_reason(exc)}")
    except OSError as exc:  # gone since it was read
        problems.add(f"cannot load tls_server_config.cert_file {s.cert!r}: {exc.strerror or exc}")
    ctx.minimum_version, ctx.maximum_version = s.minimum, s.maximum
    # Client-initiated renegotiation only costs the server; Go's server refuses it too.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if s.prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if s.ciphers:
        with contextlib.suppress(ssl.SSLError):  # none of them available: named below
            ctx.set_ciphers(":".join(s.ciphers))
        available = {c["name"] for c in ctx.get_ciphers()}
        missing = [go for go, name in _TLS12_SUITES.items() if name in s.ciphers and name not in available]
        if missing:
            problems.add(f"tls_server_config.cipher_suites: {', '.join(missing)} not available in "
                         f"{ssl.OPENSSL_VERSION}")
    if s.curve is not None:
        try:
            ctx.set_ecdh_curve(s.curve)
        except (ValueError, ssl.SSLError):
            problems.add(f"tls_server_config.curve_preferences: {s.curve} is not available in {ssl.OPENSSL_VERSION}")
    if s.verify_mode != ssl.CERT_NONE and ca_text is not None:
        try:
            ctx.load_verify_locations(cadata=ca_text)
        except (ssl.SSLError, ValueError) as exc:
            problems.add(f"{_ca_name(s)} is not a usable PEM CA certificate: {_reason(exc)}")
        ctx.verify_mode = s.verify_mode
    # HTTP/1.1 only; said in ALPN, so that a client offering h2 knows at once.
    ctx.set_alpn_protocols(["http/1.1"])
    return None if problems else ctx


def _http_headers(http: Mapping[str, Any], problems: _Problems) -> tuple[tuple[str, str], ...]:
    where = "http_server_config"
    _unknown(http, _HTTP_KEYS, where, problems)
    if "http2" in http and not isinstance(http["http2"], bool):
        problems.add(f"{where}.http2 must be true or false")
    headers = []
    for name, value in _mapping(http.get("headers"), f"{where}.headers", problems).items():
        if name not in _HEADERS:
            problems.add(f"{where}.headers: HTTP header {name!r} can not be configured (only "
                         f"{', '.join(_HEADERS)})")
            continue
        if value is None:
            value = ""
        if not isinstance(value, str) or any(ord(ch) < 32 or ord(ch) == 127 for ch in value if ch != "\t"):
            problems.add(f"{where}.headers.{name} must be a one-line string")
            continue
        allowed = _HEADERS[name]
        if allowed and value not in allowed:
            problems.add(f"{where}.headers: invalid value for {name}: expected one of {', '.join(allowed)}, "
                         f"got {value!r}")
        elif value:  # "Unset if blank"
            headers.append((name, value))
    return tuple(headers)


def _users(section: Any, problems: _Problems) -> Mapping[str, bytes]:
    users = {}
    for user, hashed in _mapping(section, "basic_auth_users", problems).items():
        if not isinstance(user, str):
            problems.add(f"basic_auth_users: user name {user!r} must be a string (quote it)")
            continue
        # The user is named, never the hash: the file may be shown in a log with this line.
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            problems.add(f"basic_auth_users.{user}: not a bcrypt hash ($2b$, $2a$ or $2y$, cost 04-31, "
                         "60 characters)")
            continue
        users[user] = hashed.encode("ascii")
    return MappingProxyType(users)


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """The web config file at ``path``, with its certificates, key and CA loaded and checked.

    Raises:
        WebConfigError: the file or a file it names cannot be used; one line naming the file and every
            problem (never a password hash).
    """
    name = os.fspath(path)
    try:
        data = load_yaml(name, WHAT)
        check_expansion(data, f"{WHAT} {name!r}")  # an alias bomb is a few hundred bytes
    except FileProblem as exc:
        raise WebConfigError(str(exc)) from None
    problems = _Problems()
    top = _mapping(data, "the file", problems)
    _unknown(top, _TOP_KEYS, "", problems)
    if "rate_limit" in top:
        problems.add("rate_limit is not supported (the server bounds its connections instead)")
    http = _mapping(top.get("http_server_config"), "http_server_config", problems)
    headers = _http_headers(http, problems)
    users = _users(top.get("basic_auth_users"), problems)
    ctx: ssl.SSLContext | None = None
    sans: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    if "tls_server_config" in top:
        tls = _mapping(top["tls_server_config"], "tls_server_config", problems)
        if not tls:
            problems.add("tls_server_config is empty (TLS needs cert_file and key_file; leave the section out "
                         "for plain HTTP)")
        else:  # every key is checked; the files are read only when nothing else is wrong
            settings = _tls_settings(tls, os.path.dirname(name), problems)
            if settings is not None:
                ctx, sans, files = _tls_context(settings, problems), settings.allowed_sans, settings.files
    if problems:
        raise _error(name, problems.items)
    return WebConfig(path=name, ssl_context=ctx, users=users, headers=headers, allowed_sans=sans, files=files)


_Stamp = tuple[int, int, int] | None


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a Kubernetes secret rotates by swapping one
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class WebConfigSource:
    """The web config of a path, re-read when it or a file it names changes (cert rotation) — the way the
    exporter-toolkit re-reads it for each connection.

    :meth:`current` is called for every connection and is cheap: at most once per ``check_every`` seconds
    it ``stat()``s the web config file and the certificate, key and CA files it names, and re-loads only
    when one of them changed (modification time, size or inode). A re-load that fails keeps the previous
    config and calls ``on_error`` once per distinct failure (the caller logs it once and counts it); while
    it keeps failing the files are re-read at each check, so the fix is picked up whatever it changes.
    Switching TLS on or off is such a failure: a re-load never turns a TLS endpoint into plain HTTP.

    Args:
        path: the web config file.
        on_error: called with the :class:`WebConfigError` of a failed re-load.
        check_every: seconds between looks at the files (0: at every call).

    Raises:
        WebConfigError: the file cannot be used now.
    """

    def __init__(self, path: str | os.PathLike[str], on_error: Callable[[Exception], None] | None = None,
                 check_every: float = 1.0) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._on_error = on_error
        self._every = max(0.0, float(check_every))
        self._lock = threading.Lock()
        self._config = load_web_config(self.path)
        self._stamps = self._stamps_of(self._config)
        self._failing: str | None = None
        self._next = time.monotonic() + self._every

    def _stamps_of(self, config: WebConfig) -> tuple[_Stamp, ...]:
        return tuple(_stamp(p) for p in (self.path, *config.files))

    def current(self) -> WebConfig:
        """The config to serve a new connection with (re-loaded first if its files changed)."""
        config = self._config
        if time.monotonic() < self._next or not self._lock.acquire(blocking=False):
            return config  # not yet time, or another thread is looking: serve what there is
        try:
            self._next = time.monotonic() + self._every
            stamps = self._stamps_of(self._config)
            if self._failing is None and stamps == self._stamps:
                return self._config
            try:
                fresh = load_web_config(self.path)
                if fresh.tls != self._config.tls:
                    raise _error(self.path, [f"TLS was {'on' if self._config.tls else 'off'} at start and is "
                                             f"{'on' if fresh.tls else 'off'} now; switching it needs a restart "
                                             "(the previous config is kept)"])
            except WebConfigError as exc:
                if str(exc) != self._failing:
                    self._failing = str(exc)
                    if self._on_error is not None:
                        with contextlib.suppress(Exception):  # the caller's logging must not break serving
                            self._on_error(exc)
                return self._config
            # Stamps taken before the load: a file changed during it is seen at the next check.
            self._stamps = stamps if fresh.files == self._config.files else self._stamps_of(fresh)
            self._config, self._failing = fresh, None
            return fresh
        finally:
            self._lock.release()
