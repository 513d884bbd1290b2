"""The /metrics endpoint under load and hostile clients: a shared render, bounded connections, timeouts, the
listen backlog, and HTTP edge cases.

Real parts only: a TrainingMonitor serving on 127.0.0.1 with a free port, real sockets and HTTP clients;
the listen backlog is read from the kernel with ``ss``.
"""

from __future__ import annotations

import gzip
import http.client
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.scrape import sample, scrape

from exporter import server
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor

QUIET: dict[str, Any] = {"gpu": False, "host": False, "cuda": False, "drift": False, "evaluation": False,
                         "previews": False, "watchdog": False}


def monitor(tmp_path: Path, **settings: Any) -> TrainingMonitor:
    cfg = ExporterConfig.from_kwargs(listen_address="127.0.0.1:0", final_scrape_timeout_seconds=0,
                                     **{k: v for k, v in QUIET.items() if hasattr(ExporterConfig, k)}, **settings)
    mon = TrainingMonitor(cfg, run_id="srv", output_dir=tmp_path)
    mon.start()
    assert mon.port
    return mon


@pytest.fixture
def mon(tmp_path: Path) -> Iterator[TrainingMonitor]:
    m = monitor(tmp_path, scrape_window_seconds=3600)
    yield m
    m.stop()


def value(mon: TrainingMonitor, name: str, **labels: str) -> float:
    got = mon.registry.get_sample_value(name, {"run_id": "srv", **labels})
    return got or 0.0


def renders(mon: TrainingMonitor) -> float:
    return value(mon, "training_exporter_exposition_renders_total")


def get(port: int, path: str = "/metrics", **kw: Any) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=10, **kw)


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


# ------------------------------------------------------------------------------------------ the shared render


def test_concurrent_scrapers_within_the_window_share_one_render(mon: TrainingMonitor) -> None:
    port = mon.port
    assert port is not None
    before = renders(mon)
    bodies: list[bytes] = []
    lock = threading.Lock()

    def scrape_once() -> None:
        body = get(port).content
        with lock:
            bodies.append(body)

    threads = [threading.Thread(target=scrape_once) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(bodies) == 40
    # One render for 40 scrapers (the window is an hour here), and every one of them got it.
    assert renders(mon) - before == 1
    assert len(set(bodies)) == 1
    # A change of state is never hidden behind a shared render.
    mon._set_state("training")
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert sample(samples, "training_state", state="training") == 1
    assert renders(mon) - before == 2


def test_window_zero_renders_for_every_scrape(tmp_path: Path) -> None:
    m = monitor(tmp_path, scrape_window_seconds=0)
    try:
        assert m.port is not None
        before = renders(m)
        for _ in range(5):
            get(m.port).raise_for_status()
        assert renders(m) - before == 5
    finally:
        m.stop()


def test_gzip_head_and_name_filter(mon: TrainingMonitor) -> None:
    port = mon.port
    assert port is not None
    plain = get(port, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
    data = _read_all(raw)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    assert gzip.decompress(body) == plain.content
    # HEAD: the headers of the GET, no body.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("HEAD", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    assert int(response.getheader("Content-Length") or -1) == len(plain.content)
    conn.close()
    only = get(port, "/metrics?name[]=training_state").text
    names = {f.name for f in text_string_to_metric_families(only)}
    assert names == {"training_state"}


def test_keep_alive_serves_several_requests_on_one_connection(tmp_path: Path) -> None:
    m = monitor(tmp_path, idle_timeout_seconds=0.3)
    try:
        assert m.port is not None
        conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=5)
        for _ in range(3):
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
        sock = conn.sock
        assert sock is not None
        assert wait_for(lambda: m._httpd is not None and m._httpd.connections == 0, 5), \
            "an idle kept-alive connection outlived web.idle_timeout_seconds"
        assert sock.recv(1) == b""  # closed by the server
        conn.close()
    finally:
        m.stop()


def test_bad_requests_get_their_status(mon: TrainingMonitor) -> None:
    port = mon.port
    assert port is not None
    cases = [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/2.0\r\n\r\n", b"505"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", b"405"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (server.MAX_HEAD_BYTES + 10) + b"\r\n\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
        (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
        (b"GET /favicon.ico HTTP/1.1\r\nConnection: close\r\n\r\n", b"404"),
    ]
    for request, status in cases:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        raw.sendall(request)
        answer = _read_all(raw)
        assert answer.startswith(b"HTTP/1.1 " + status), (request[:40], answer[:80])
    assert value(mon, "training_exporter_http_requests_total", code="400") == 1
    # The server still answers afterwards.
    get(port).raise_for_status()


# ------------------------------------------------------------------------------------------ bounded connections


def test_connections_are_bounded_and_half_open_ones_closed(tmp_path: Path) -> None:
    limit, read_timeout = 8, 0.5
    m = monitor(tmp_path, max_connections=limit, read_timeout_seconds=read_timeout)
    socks: list[socket.socket] = []
    try:
        assert m.port is not None and m._httpd is not None
        threads_before = threading.active_count()
        for _ in range(50):
            socks.append(socket.create_connection(("127.0.0.1", m.port), timeout=5))
        # The first `limit` are being read; every other is closed at once (EOF, or a reset).
        assert wait_for(lambda: value(m, "training_exporter_http_connections_refused_total", reason="limit")
                        == 50 - limit, 5)
        assert m._httpd.connections == limit
        assert threading.active_count() - threads_before <= limit
        # None sends a byte: each is closed once its read timeout has passed.
        started = time.monotonic()
        assert wait_for(lambda: m._httpd is not None and m._httpd.connections == 0, read_timeout + 5)
        assert time.monotonic() - started < read_timeout + 5
        assert value(m, "training_exporter_http_connections_refused_total", reason="timeout") == limit
        for s in socks:
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        get(m.port).raise_for_status()
    finally:
        for s in socks:
            s.close()
        m.stop()


def test_a_slow_request_is_cut_at_its_deadline_not_per_byte(tmp_path: Path) -> None:
    read_timeout = 0.6
    m = monitor(tmp_path, read_timeout_seconds=read_timeout)
    try:
        assert m.port is not None
        raw = socket.create_connection(("127.0.0.1", m.port), timeout=5)
        request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"s" * 200 + b"\r\n\r\n"
        started = time.monotonic()
        closed_at = None
        for byte in request:  # one byte every 50 ms: 10 s in all, each gap well inside the timeout
            try:
                raw.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.05)
            if wait_for(lambda: m._httpd is not None and m._httpd.connections == 0, 0):
                closed_at = time.monotonic()
                break
        assert closed_at is not None, "a request trickled in byte by byte was never cut off"
        # Cut at its deadline (plus the 50 ms of one byte and scheduling), not after the ~12 s it takes.
        assert closed_at - started < read_timeout + 2
    finally:
        m.stop()


def test_listen_backlog_is_sized(mon: TrainingMonitor) -> None:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(["ss", "-ltnH", f"sport = :{mon.port}"], capture_output=True, text=True, check=True).stdout
    fields = out.split()
    assert fields, out
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    # For a listening socket, ss shows the backlog as Send-Q (the kernel caps it at somaxconn).
    assert int(fields[2]) == min(server.BACKLOG, somaxconn)


def test_a_taken_port_is_one_line_and_no_endpoint(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        cfg = ExporterConfig.from_kwargs(listen_address=f"127.0.0.1:{port}", **{
            k: v for k, v in QUIET.items() if hasattr(ExporterConfig, k)})
        m = TrainingMonitor(cfg, run_id="srv", output_dir=tmp_path)
        m.start()
        assert m.port is None
        assert value(m, "training_exporter_collector_errors_total", collector="http_server") == 1
    finally:
        holder.close()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def test_requests_are_paced_to_the_configured_rate(tmp_path: Path) -> None:
    rate, n = 40.0, 30
    m = monitor(tmp_path, max_requests_per_second=rate, scrape_window_seconds=3600)
    try:
        assert m.port is not None
        conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=5)
        started = time.monotonic()
        for _ in range(n):
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
        elapsed = time.monotonic() - started
        conn.close()
        # n answers take at least (n - 1) slots of 1 / rate seconds each, however fast the client asks.
        assert elapsed >= (n - 1) / rate
    finally:
        m.stop()
