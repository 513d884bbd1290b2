"""The project's alerting chain on loopback: Prometheus, Alertmanager, and stand-ins for Slack and SMTP.

``chain`` runs it (:class:`LocalAlerting`), ``processes`` starts and stops the
children, ``configs`` finds the checkout's rules and Alertmanager
configuration and writes the loopback copies, ``receivers`` are the Slack and
SMTP stand-ins. It needs the ``prometheus`` and ``prometheus-alertmanager``
binaries, aiosmtpd, and a checkout of the repository.
"""

from __future__ import annotations

from exporter.demo.localstack.chain import LocalAlerting, check_prerequisites
from exporter.demo.localstack.configs import (
    ALERTMANAGER_CONFIG,
    ALERTMANAGER_TEMPLATES,
    ROOT,
    RULES_DIR,
    ProjectFiles,
    project_rule_files,
    require_project_files,
    write_alertmanager_config,
    write_prometheus_config,
)
from exporter.demo.localstack.errors import LocalStackError
from exporter.demo.localstack.processes import (
    ALERTMANAGER,
    AMTOOL,
    PROMETHEUS,
    Process,
    free_port,
    missing_binaries,
    require_binaries,
    start_alertmanager,
    start_prometheus,
    stop_all,
    wait_http_ok,
    wait_until,
)
from exporter.demo.localstack.receivers import FakeSlack, FakeSMTP, Mail, Notification, SlackPost, WebhookStandIn

__all__ = [
    "ALERTMANAGER",
    "ALERTMANAGER_CONFIG",
    "ALERTMANAGER_TEMPLATES",
    "AMTOOL",
    "PROMETHEUS",
    "ROOT",
    "RULES_DIR",
    "FakeSMTP",
    "FakeSlack",
    "LocalAlerting",
    "LocalStackError",
    "Mail",
    "Notification",
    "Process",
    "ProjectFiles",
    "SlackPost",
    "WebhookStandIn",
    "check_prerequisites",
    "free_port",
    "missing_binaries",
    "project_rule_files",
    "require_binaries",
    "require_project_files",
    "start_alertmanager",
    "start_prometheus",
    "stop_all",
    "wait_http_ok",
    "wait_until",
    "write_alertmanager_config",
    "write_prometheus_config",
]
