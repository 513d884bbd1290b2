"""docker-compose.yml: valid for Compose, every mounted file in the repository, the services wired together.

Validated with Debian's ``docker-compose`` 1.29 (``config`` parses, checks
against the schema and interpolates without a Docker engine); the mounts are
read from its resolved output, so a path is checked as Compose sees it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from support.runif import run_if

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PASSWORD_VAR = "GRAFANA_ADMIN_PASSWORD"
DOCKER_COMPOSE = shutil.which("docker-compose")

needs_compose = run_if(docker_compose=True)


def _compose(*args: str, password: str | None = "test-only-password") -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env.pop(PASSWORD_VAR, None)
    if password is not None:
        env[PASSWORD_VAR] = password
    return subprocess.run([DOCKER_COMPOSE, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def _resolved() -> dict[str, Any]:
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def _raw() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def _binds(service: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """Container path -> (host path, mode) of the bind mounts of a resolved service."""
    binds = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":") if isinstance(volume, str) else (
            volume["source"], volume["target"], "ro" if volume.get("read_only") else "rw")
        if source.startswith("/"):
            binds[target] = (Path(source), mode[0] if mode else "rw")
    return binds


def _published(spec: str | dict[str, Any]) -> str:
    """The host port of a port mapping (``[IP:]HOST:CONTAINER[/PROTO]`` or the long syntax)."""
    if isinstance(spec, dict):
        return str(spec.get("published"))
    parts = spec.split("/")[0].split(":")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def _container_to_host(binds: dict[str, tuple[Path, str]], path: str) -> Path:
    """The repository file a container path is mounted from."""
    for target, (source, _) in sorted(binds.items(), key=lambda item: -len(item[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / os.path.relpath(path, target)
    raise AssertionError(f"{path} is not under any bind mount ({sorted(binds)})")


@needs_compose
def test_docker_compose_config_validates() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@needs_compose
def test_the_grafana_password_must_come_from_the_environment() -> None:
    result = _compose("config", "-q", password=None)
    assert result.returncode != 0
    assert PASSWORD_VAR in result.stderr
    grafana = _resolved()["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-only-password"
    assert "test-only-password" not in COMPOSE_FILE.read_text()


@needs_compose
def test_every_mounted_file_is_in_the_repository_and_read_only() -> None:
    services = _resolved()["services"]
    assert set(services) == {"prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        binds = _binds(service)
        assert binds, f"{name} mounts nothing from the repository"
        for target, (source, mode) in binds.items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert source.resolve().is_relative_to(ROOT), f"{name}: {source} is outside the repository"
            assert mode == "ro", f"{name}: {source} is mounted {mode}, not read-only"


def test_images_are_pinned_and_grafana_matches_the_sdk_line() -> None:
    services = _raw()["services"]
    for name, service in services.items():
        image, _, tag = service["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {service['image']} is not pinned"
    pyproject = (ROOT / "pyproject.toml").read_text()
    sdk_line = re.search(r'"grafana-foundation-sdk==\d+!(\d+\.\d+)\.\d+[";]', pyproject)
    assert sdk_line, "grafana-foundation-sdk is not pinned to one Grafana line in pyproject.toml"
    grafana_tag = services["grafana"]["image"].rpartition(":")[2]
    assert grafana_tag.startswith(sdk_line[1] + "."), (grafana_tag, sdk_line[1])


@needs_compose
def test_prometheus_gets_its_config_rules_and_the_exporters_on_the_host() -> None:
    compose = _resolved()
    prometheus = compose["services"]["prometheus"]
    binds = _binds(prometheus)
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if "=" in arg)
    config_path = _container_to_host(binds, flags["--config.file"])
    assert config_path == ROOT / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    config_dir = os.path.dirname(flags["--config.file"])
    rule_files = [path for pattern in config["rule_files"]
                  for path in _container_to_host(binds, os.path.join(config_dir, os.path.dirname(pattern)))
                  .glob(os.path.basename(pattern))]
    assert sorted(rule_files) == sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
    # The exporters run on the Docker host: the scrape targets name it, and Compose maps it.
    jobs = {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            for job in config["scrape_configs"]}
    targets = jobs["training"] + jobs["training-analytics"]
    assert targets and all(t.startswith("host.docker.internal:") for t in targets), targets
    assert "host.docker.internal:host-gateway" in prometheus["extra_hosts"]
    # Meta-monitoring scrapes Prometheus itself and the compose Alertmanager, and nothing else.
    assert {job: targets for job, targets in jobs.items() if job not in ("training", "training-analytics")} == {
        "prometheus": ["localhost:9090"], "alertmanager": ["alertmanager:9093"]}
    # Alerts go to the compose service.
    am_targets = [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert am_targets == ["alertmanager:9093"]
    assert "alertmanager" in compose["services"]


@needs_compose
def test_alertmanager_finds_its_templates_and_secret_files() -> None:
    alertmanager = _resolved()["services"]["alertmanager"]
    binds = _binds(alertmanager)
    flags = dict(arg.split("=", 1) for arg in alertmanager["command"] if "=" in arg)
    config_path = _container_to_host(binds, flags["--config.file"])
    assert config_path == ROOT / "alertmanager" / "alertmanager.yml"
    config = yaml.safe_load(config_path.read_text())
    config_dir = os.path.dirname(flags["--config.file"])
    for pattern in config["templates"]:
        folder = _container_to_host(binds, os.path.join(config_dir, os.path.dirname(pattern)))
        assert list(folder.glob(os.path.basename(pattern))), pattern
    secret_files = {value for receiver in config["receivers"] for kind in ("slack_configs", "email_configs")
                    for item in receiver.get(kind, []) for key, value in item.items() if key.endswith("_file")}
    assert secret_files
    for path in secret_files:
        # The secrets themselves are the operator's (never committed): the folder they go in is mounted.
        assert _container_to_host(binds, path).parent == ROOT / "alertmanager" / "secrets", path


@needs_compose
def test_grafana_is_provisioned_with_the_datasource_and_the_dashboards() -> None:
    compose = _resolved()
    grafana = compose["services"]["grafana"]
    binds = _binds(grafana)
    datasources = _container_to_host(binds, "/etc/grafana/provisioning/datasources")
    providers_dir = _container_to_host(binds, "/etc/grafana/provisioning/dashboards")
    assert datasources == ROOT / "grafana" / "provisioning" / "datasources"
    sources = [ds for path in datasources.glob("*.yml") for ds in yaml.safe_load(path.read_text())["datasources"]]
    prometheus = next(ds for ds in sources if ds["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    providers = [p for path in providers_dir.glob("*.yml") for p in yaml.safe_load(path.read_text())["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    dashboards = _container_to_host(binds, providers[0]["options"]["path"])
    assert dashboards == ROOT / "grafana" / "dashboards"
    assert len(list(dashboards.glob("*.json"))) >= 4
    home = _container_to_host(binds, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.is_file()
    # Notifications link to Grafana at the URL it is served on.
    template = (ROOT / "alertmanager" / "templates" / "training.tmpl").read_text()
    grafana_url = re.search(r'define "training.grafana_url" \}\}(\S+?)\{\{', template)
    assert grafana_url and grafana_url[1] == grafana["environment"]["GF_SERVER_ROOT_URL"]
    port = grafana_url[1].rsplit(":", 1)[1]
    assert port in {_published(spec) for spec in grafana["ports"]}, grafana["ports"]
