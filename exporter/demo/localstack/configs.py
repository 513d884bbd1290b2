"""The alerting chain's configuration: the checkout's own files, and copies of them wired to loopback.

The local chain runs the project's real rules and Alertmanager configuration,
which live in the repository checkout (``prometheus/rules/`` and
``alertmanager/`` next to the ``exporter`` package), not in the package: an
installed wheel does not ship them. :func:`require_project_files` is the one
place that finds them, and says in one line what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from exporter.demo.localstack.errors import LocalStackError

__all__ = [
    "ALERTMANAGER_CONFIG",
    "ALERTMANAGER_TEMPLATES",
    "ROOT",
    "RULES_DIR",
    "ProjectFiles",
    "project_rule_files",
    "require_project_files",
    "write_alertmanager_config",
    "write_prometheus_config",
]

# The checkout that holds the exporter package (this file is exporter/demo/localstack/configs.py in it).
ROOT = Path(__file__).resolve().parents[3]
ALERTMANAGER_CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_TEMPLATES = ROOT / "alertmanager" / "templates"
RULES_DIR = ROOT / "prometheus" / "rules"


@dataclass(frozen=True)
class ProjectFiles:
    """The checkout's alerting configuration, as :func:`require_project_files` found it."""

    alertmanager_config: Path
    rule_files: tuple[Path, ...]


def project_rule_files() -> list[Path]:
    """The project's Prometheus rule files (prometheus/rules/*.yml, *.yaml), sorted."""
    return sorted(RULES_DIR.glob("*.yml")) + sorted(RULES_DIR.glob("*.yaml"))


def require_project_files() -> ProjectFiles:
    """The checkout's Alertmanager configuration and rule files; :class:`LocalStackError` if any is missing.

    Raises:
        LocalStackError: one line naming each missing path (as in an installed
            package, which has no ``prometheus/`` or ``alertmanager/``).
    """
    missing = [str(path.relative_to(ROOT)) for path in (ALERTMANAGER_CONFIG, ALERTMANAGER_TEMPLATES, RULES_DIR)
               if not path.exists()]
    rules = project_rule_files()
    if not missing and not rules:
        missing = [f"{RULES_DIR.relative_to(ROOT)}/*.yml"]
    if missing:
        raise LocalStackError(
            f"the project's alerting configuration ({', '.join(missing)}) is not under {ROOT}: "
            "run from a checkout of the repository (an installed wheel does not include it)")
    return ProjectFiles(ALERTMANAGER_CONFIG, tuple(rules))


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
    heartbeat_url: str | None = None,
    heartbeat_token: str = "local-heartbeat-token",
) -> Path:
    """A copy of the project's Alertmanager configuration wired to local stand-ins.

    Only what ties it to production changes: the secret files (temporary files
    with the local webhook URL, SMTP password and heartbeat token), the SMTP
    relay (127.0.0.1, no STARTTLS: the local server has no certificate), the
    heartbeat service's URL (the watchdog's webhook receiver), the template
    path (absolute) and the timings (seconds instead of minutes). Routing,
    grouping, inhibition, receivers and templates are the project's own.

    ``heartbeat_url`` is where the webhook receivers (the watchdog's) post,
    with ``heartbeat_token`` as their bearer token read from a secret file.
    Without one the local chain has no heartbeat service: those receivers keep
    their name and routes but notify nothing, so that the always-firing
    watchdog neither fails nor reaches anyone.
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
    token_file = secrets / "heartbeat_token"
    token_file.write_text(heartbeat_token)

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
        if "webhook_configs" in receiver and heartbeat_url is None:
            del receiver["webhook_configs"]
        for hook in receiver.get("webhook_configs", []):
            authorization = hook.get("http_config", {}).get("authorization", {})
            if "credentials" in authorization:
                raise ValueError(f"{source}: a heartbeat token is a secret: use credentials_file")
            hook.pop("url_file", None)
            hook["url"] = heartbeat_url
            hook["http_config"] = {"authorization": {**authorization, "credentials_file": str(token_file)}}

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
    jobs: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """A Prometheus configuration scraping ``targets`` (job "training") with the given rules and Alertmanager.

    ``jobs`` adds scrape jobs (job name -> targets), such as ``prometheus`` and
    ``alertmanager``, whose own series the meta alerts (meta.alerts.yml) read.
    """
    scrape_configs = [{"job_name": "training", "static_configs": [{"targets": list(targets)}]}]
    scrape_configs += [{"job_name": name, "static_configs": [{"targets": list(addresses)}]}
                       for name, addresses in (jobs or {}).items()]
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(path.resolve()) for path in rule_files],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": scrape_configs,
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
