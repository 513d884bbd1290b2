"""The training exporter's endpoint with the exporter-toolkit web configuration file: TLS, basic auth and
mutual TLS, scraped by real clients and by a real Prometheus; a bad file stops everything before it starts.

Real parts only: certificates made by the ``openssl`` command line, a TrainingMonitor serving on 127.0.0.1,
``requests`` over TLS, the ``prometheus`` binary scraping with ``scheme: https``, ``tls_config`` and
``basic_auth``; the command line runs as a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
import yaml
from support.certs import Certs, make_certs, openssl_missing

from exporter.config import ConfigError, ExporterConfig
from exporter.core import TrainingMonitor
from exporter.demo.localstack import free_port, missing_binaries, start_prometheus, stop_all, wait_until

pytestmark = pytest.mark.skipif(openssl_missing(), reason="the openssl command line is not installed")

QUIET: dict[str, Any] = {"gpu": False, "host": False, "cuda": False, "drift": False, "evaluation": False,
                         "previews": False, "watchdog": False}
USER, PASSWORD = "prometheus", "scrape-test-password"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def web_config(path: Path, certs: Certs, *, mutual: bool = False, users: bool = True) -> Path:
    tls: dict[str, Any] = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    if mutual:
        tls.update(client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(certs.ca))
    config: dict[str, Any] = {"tls_server_config": tls}
    if users:
        # Cost 4 keeps the test fast; the check is the same at any cost.
        config["basic_auth_users"] = {USER: bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def served(tmp_path: Path, certs: Certs) -> Iterator[TrainingMonitor]:
    cfg = ExporterConfig.from_kwargs(listen_address="127.0.0.1:0", final_scrape_timeout_seconds=0,
                                     web_config_file=str(web_config(tmp_path / "web.yml", certs)), **QUIET)
    mon = TrainingMonitor(cfg, run_id="tls", output_dir=tmp_path)
    mon.start()
    assert mon.port
    yield mon
    mon.stop()


def test_https_with_basic_auth(served: TrainingMonitor, certs: Certs) -> None:
    url = f"https://127.0.0.1:{served.port}/metrics"
    ok = requests.get(url, verify=str(certs.ca), auth=(USER, PASSWORD), timeout=10)
    assert ok.status_code == 200 and 'training_state{run_id="tls",state="idle"} 1.0' in ok.text
    # Any name the certificate holds verifies; the answer is the same.
    by_name = requests.get(f"https://localhost:{served.port}/metrics", verify=str(certs.ca),
                           auth=(USER, PASSWORD), timeout=10)
    assert by_name.status_code == 200
    for auth in (None, (USER, "wrong"), ("nobody", PASSWORD)):
        refused = requests.get(url, verify=str(certs.ca), auth=auth, timeout=10)
        assert refused.status_code == 401, auth
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
        assert "training_state" not in refused.text
    # Plain HTTP on the TLS port gets no exposition.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{served.port}/metrics", auth=(USER, PASSWORD), timeout=10)
    # The server is not fooled by a client that trusts nothing it cannot verify either.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, verify=str(certs.other_ca), auth=(USER, PASSWORD), timeout=10)
    codes = {c: served.registry.get_sample_value("training_exporter_http_requests_total",
                                                 {"run_id": "tls", "code": c}) for c in ("200", "401")}
    assert codes == {"200": 2.0, "401": 3.0}


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path: Path, certs: Certs) -> None:
    cfg = ExporterConfig.from_kwargs(
        listen_address="127.0.0.1:0", final_scrape_timeout_seconds=0,
        web_config_file=str(web_config(tmp_path / "web.yml", certs, mutual=True, users=False)), **QUIET)
    mon = TrainingMonitor(cfg, run_id="mtls", output_dir=tmp_path)
    mon.start()
    try:
        url = f"https://127.0.0.1:{mon.port}/metrics"
        ok = requests.get(url, verify=str(certs.ca), cert=(str(certs.client_cert), str(certs.client_key)),
                          timeout=10)
        assert ok.status_code == 200
        for cert in (None, (str(certs.other_client_cert), str(certs.other_client_key))):
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(url, verify=str(certs.ca), cert=cert, timeout=10)
        assert mon.registry.get_sample_value("training_exporter_http_connections_refused_total",
                                             {"run_id": "mtls", "reason": "tls"}) == 2
    finally:
        mon.stop()


@pytest.mark.skipif(bool(missing_binaries("prometheus")), reason="the prometheus binary is not installed")
def test_prometheus_scrapes_with_tls_and_basic_auth(tmp_path: Path, served: TrainingMonitor, certs: Certs) -> None:
    (tmp_path / "password").write_text(PASSWORD)
    (tmp_path / "wrong").write_text("not-the-password")
    target = {"static_configs": [{"targets": [f"127.0.0.1:{served.port}"]}], "scheme": "https",
              "tls_config": {"ca_file": str(certs.ca)}}
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "training", **target,
             "basic_auth": {"username": USER, "password_file": str(tmp_path / "password")}},
            {"job_name": "wrong-password", **target,
             "basic_auth": {"username": USER, "password_file": str(tmp_path / "wrong")}},
        ],
    }
    prom_file = tmp_path / "prometheus.yml"
    prom_file.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = start_prometheus(prom_file, tmp_path, port)
    try:
        def targets() -> dict[str, dict[str, Any]] | None:
            active = requests.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()["data"]
            got = {t["labels"]["job"]: t for t in active["activeTargets"] if t["health"] != "unknown"}
            return got if len(got) == 2 else None

        seen = wait_until(targets, timeout=30, what="both targets scraped")
        assert seen["training"]["health"] == "up", seen["training"]["lastError"]
        assert seen["wrong-password"]["health"] == "down"
        assert "401" in seen["wrong-password"]["lastError"]
        query = requests.get(f"http://127.0.0.1:{port}/api/v1/query", timeout=5,
                             params={"query": 'training_state{state="idle"}'}).json()["data"]["result"]
        assert [r["metric"]["run_id"] for r in query] == ["tls"]
    finally:
        stop_all([proc])


def test_a_bad_web_config_file_stops_the_callback_before_training(tmp_path: Path, certs: Certs) -> None:
    from exporter import PrometheusCallback

    broken = tmp_path / "web.yml"
    broken.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": str(certs.server_cert),
                                                            "key_file": str(tmp_path / "missing.key")}}))
    with pytest.raises(ConfigError) as err:
        PrometheusCallback(listen_address="127.0.0.1:0", web_config_file=str(broken))
    assert "missing.key" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv", [
    ["demo", "--web.config.file"],
    ["analytics", "--base", ".", "--checkpoint-dir", ".", "--web.config.file"],
])
def test_a_bad_web_config_file_is_one_line_and_exit_2(tmp_path: Path, argv: list[str]) -> None:
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users:\n  prometheus: not-a-bcrypt-hash\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", *argv, str(bad), "--output-dir", str(tmp_path / "o")]
                          if argv[0] == "demo" else [sys.executable, "-m", "exporter.cli", *argv, str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "web.yml" in lines[0] and "prometheus" in lines[0], proc.stderr
    assert "not-a-bcrypt-hash" not in proc.stderr  # a hash (or what stands for one) is never printed
    assert time.monotonic() - started < 60
