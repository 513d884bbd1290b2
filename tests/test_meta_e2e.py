"""End to end: the alerting chain reports its own failure, through the integration that still works.

Real ``prometheus-alertmanager`` with the project's alertmanager.yml (through
the local chain's writer: local SMTP relay, second-scale timings), but with the
Slack secret file missing: ``api_url_file`` names a file that is not there, as
on a host where nobody put it. Alertmanager still starts and reports ready; it
reads the file only when it notifies. Real ``prometheus`` (1 s scrape and
evaluation) loads the project's rule files as shipped (no rule is rewritten:
TrainingAlertNotificationsFailing has no ``for``) and scrapes Alertmanager and
itself, as the ``alertmanager`` and ``prometheus`` jobs of prometheus.yml do.

A warning alert posted to Alertmanager's API goes to Slack only, and fails.
TrainingAlertNotificationsFailing must then fire in Prometheus with
``integration="slack"`` and reach the email receiver (training-critical
notifies Slack and email), naming the integration. The always-firing
TrainingAlertingWatchdog must reach its own receiver, a local HTTP server
standing in for the heartbeat service, with the token from its secret file,
and nothing else. Nothing may inhibit it while a critical alert without a
run_id (the one above) fires. TrainingScrapesRejected must inhibit
TrainingExporterDown for the same target.

Stand-ins only at the boundary to third-party services: the SMTP relay
(aiosmtpd), the Slack webhook (which gets nothing, its URL file being gone) and
the heartbeat service.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.e2e import (
    ALERTMANAGER_CONFIG,
    FakeSlack,
    FakeSMTP,
    Process,
    alertmanager_alerts,
    free_port,
    project_rule_files,
    start_alertmanager,
    start_prometheus,
    stop_all,
    wait_until,
    write_alertmanager_config,
    write_prometheus_config,
)
from support.runif import run_if

from exporter.demo.localstack import WebhookStandIn

pytestmark = [
    run_if(prometheus=True, alertmanager=True),
    # The local SMTP server requires AUTH on loopback without TLS, on purpose.
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning"),
]

FAILING = "TrainingAlertNotificationsFailing"
WATCHDOG = "TrainingAlertingWatchdog"
REJECTED = "TrainingScrapesRejected"
DOWN = "TrainingExporterDown"
TOKEN = "e2e-heartbeat-token"
# Each hop waits at most its interval: the warning's group_wait (1 s) before Alertmanager tries Slack, the next
# scrape of Alertmanager (1 s), the next evaluation (1 s), the critical route's group_wait (1 s) before the
# email: 4 s. The deadline is five times that, for two loaded cores; the measured latency is printed.
INTERVAL_S = 1.0
CHAIN_S = 4 * INTERVAL_S
DEADLINE_S = 5 * CHAIN_S


@dataclass(frozen=True)
class Ping:
    received_at: float
    authorization: str
    payload: dict[str, Any]

    @property
    def alertnames(self) -> set[str]:
        return {alert["labels"].get("alertname", "") for alert in self.payload.get("alerts", [])}


class FakeHeartbeat(WebhookStandIn):
    """Stands in for the heartbeat service (healthchecks.io and the like): records each webhook call."""

    name = "heartbeat"
    path = "/ping/training-alerting"

    def _parse(self, now: float, path: str, headers: dict[str, str], body: bytes) -> Ping:
        return Ping(now, headers.get("Authorization", ""), json.loads(body or b"{}"))

    def start(self) -> FakeHeartbeat:
        super().start()
        return self

    def snapshot(self) -> list[Ping]:
        return self._snapshot()


def _start_prometheus(config: Path, workdir: Path, port: int) -> Process:
    """``prometheus`` as the local chain starts it, but resending firing alerts every second (1 min by default).

    Prometheus sends an alert when it starts firing, then once per resend delay. The watchdog fires from the
    first evaluation, while the notifier may not have Alertmanager yet (discovery hands targets over every 5 s), so
    its first notification would otherwise come a minute later; in production one a minute is what it is for.
    """
    return start_prometheus(config, workdir, port, [f"--rules.alert.resend-delay={INTERVAL_S:.0f}s"])


def _alert(labels: dict[str, str]) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {
        "labels": labels,
        "annotations": {"summary": f"{labels['alertname']} summary.", "description": "Posted by the test."},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=5)).isoformat(),
    }


def _query(prom_url: str, expr: str) -> list[dict[str, Any]]:
    response = requests.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=2)
    response.raise_for_status()
    return list(response.json()["data"]["result"])


def _firing(prom_url: str, name: str) -> list[dict[str, Any]]:
    alerts = requests.get(f"{prom_url}/api/v1/alerts", timeout=2).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"].get("alertname") == name and a["state"] == "firing"]


@pytest.fixture
def stand_ins() -> Iterator[tuple[FakeSlack, FakeSMTP, FakeHeartbeat, str]]:
    am_config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    password = "e2e-not-a-real-password"
    slack = FakeSlack().start()
    smtp = FakeSMTP(am_config["global"]["smtp_auth_username"], password).start()
    heartbeat = FakeHeartbeat().start()
    try:
        yield slack, smtp, heartbeat, password
    finally:
        heartbeat.stop()
        smtp.stop()
        slack.stop()


def test_missing_slack_secret_is_reported_by_email_and_the_watchdog_reaches_its_own_receiver(
        tmp_path: Path, stand_ins: tuple[FakeSlack, FakeSMTP, FakeHeartbeat, str]) -> None:
    slack, smtp, heartbeat, password = stand_ins
    am_config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    critical_to = next(r for r in am_config["receivers"] if r["name"] == "training-critical")["email_configs"][0]["to"]
    processes: list[Process] = []
    try:
        am_port, prom_port = free_port(), free_port()
        am_addr, prom_addr = f"127.0.0.1:{am_port}", f"127.0.0.1:{prom_port}"
        am_url, prom_url = f"http://{am_addr}", f"http://{prom_addr}"
        am_file = write_alertmanager_config(tmp_path, slack_url=slack.url, smtp_port=smtp.port,
                                            smtp_password=password, heartbeat_url=heartbeat.url,
                                            heartbeat_token=TOKEN)
        # The fault: the Slack secret file the configuration names is not there.
        slack_file = Path(next(r for r in yaml.safe_load(am_file.read_text())["receivers"]
                               if r["name"] == "training-slack")["slack_configs"][0]["api_url_file"])
        slack_file.unlink()
        processes.append(start_alertmanager(am_file, tmp_path, am_port))  # ready, with its secret missing
        prom_file = write_prometheus_config(
            tmp_path, targets=[], alertmanager=am_addr, rule_files=project_rule_files(),
            interval=f"{INTERVAL_S:.0f}s", jobs={"prometheus": [prom_addr], "alertmanager": [am_addr]})
        processes.append(_start_prometheus(prom_file, tmp_path, prom_port))

        # increase() needs the counter's 0 before the failure: wait for a scrape of Alertmanager.
        wait_until(lambda: _query(prom_url, 'alertmanager_notifications_failed_total{integration="slack"} == 0'),
                   DEADLINE_S, what="Prometheus to scrape Alertmanager's failure counter at 0")
        faulted_at = time.time()
        requests.post(f"{am_url}/api/v2/alerts", timeout=5, json=[_alert(
            {"alertname": "TrainingLossSpike", "severity": "warning", "component": "loss", "run_id": "meta-e2e"})],
        ).raise_for_status()
        mail = wait_until(lambda: smtp.find(alertname=FAILING, status="FIRING"), DEADLINE_S,
                          what=f"the {FAILING} email")[0]
        latency = mail.received_at - faulted_at
        firing = _firing(prom_url, FAILING)
        am_seen = {a["labels"]["alertname"]: a for a in alertmanager_alerts(am_url)}
        failed = {r["metric"]["integration"]: float(r["value"][1])
                  for r in _query(prom_url, f'alertmanager_notifications_failed_total{{instance="{am_addr}"}}')}

        # TrainingScrapesRejected inhibits TrainingExporterDown for the same target, not for another one.
        target = {"job": "training", "instance": "gpu-1:9945"}
        requests.post(f"{am_url}/api/v2/alerts", timeout=5, json=[
            _alert({"alertname": REJECTED, "severity": "critical", "component": "meta", **target}),
            _alert({"alertname": DOWN, "severity": "critical", "component": "exporter", **target}),
            _alert({"alertname": DOWN, "severity": "critical", "component": "exporter", "job": "training",
                    "instance": "gpu-2:9945"}),
        ]).raise_for_status()
        wait_until(lambda: smtp.find(alertname=REJECTED) and smtp.find(alertname=DOWN), DEADLINE_S,
                   what=f"the {REJECTED} and the other target's {DOWN} emails")
        downs = {a["labels"]["instance"]: a["status"] for a in alertmanager_alerts(am_url)
                 if a["labels"]["alertname"] == DOWN}
        # A notification that should not come has its chance: the critical group_wait, twice.
        time.sleep(2 * INTERVAL_S)
    finally:
        stop_all(sorted(processes, key=lambda proc: proc.name != "prometheus"))
    am_log = processes[0].log_path.read_text(errors="replace") if processes else ""
    context = f"\nlogs in {tmp_path}"
    print(f"\nfault -> {FAILING} email: {latency:.2f} s "
          f"(chain of intervals {CHAIN_S:.0f} s, deadline {DEADLINE_S:.0f} s)")

    # ------------------------------------------------------------ the failure, noticed and mailed
    assert str(slack_file) in am_log and "no such file" in am_log.lower(), f"not the missing file{context}"
    assert [a["labels"].get("integration") for a in firing] == ["slack"], firing
    assert firing[0]["labels"]["instance"] == am_addr and firing[0]["labels"]["job"] == "alertmanager"
    assert "run_id" not in firing[0]["labels"]
    # The spike and the failure alert's own Slack copy both failed; email, by which it arrived, never did.
    assert failed["slack"] >= 1 and failed["email"] == 0, failed
    assert mail.rcpt_tos == [critical_to], mail.rcpt_tos
    assert mail.subject == f"[FIRING] [critical] {FAILING} run (no run_id)", mail.subject
    plain = mail.body("plain")
    assert re.search(rf"Alertmanager {re.escape(am_addr)} failed to deliver [1-9]\d* notification\(s\) via slack in "
                     r"the last 5 minutes: the alerts in them reached nobody through slack\.", plain), plain
    assert "Alert: TrainingAlertNotificationsFailing (severity critical, component meta)" in plain, plain
    assert 0 < latency < DEADLINE_S
    # Nothing reached Slack (its URL file is gone), and the warning went nowhere else.
    assert slack.snapshot() == []
    assert not smtp.find(alertname="TrainingLossSpike")

    # ------------------------------------------------------------ the watchdog: its receiver only, never inhibited
    pings = heartbeat.snapshot()
    assert pings, f"the heartbeat stand-in got no ping{context}"
    assert all(p.alertnames == {WATCHDOG} for p in pings), [p.alertnames for p in pings]
    assert all(p.authorization == f"Bearer {TOKEN}" for p in pings), {p.authorization for p in pings}
    assert pings[0].payload["receiver"] == "deadmansswitch" and pings[0].payload["status"] == "firing"
    assert not [m for m in smtp.snapshot() if m.alertname == WATCHDOG]
    watchdog, failing = am_seen[WATCHDOG], am_seen[FAILING]
    # A critical alert without a run_id is active, and the watchdog is still not inhibited.
    assert failing["status"]["state"] == "active" and "run_id" not in failing["labels"]
    assert watchdog["status"] == {"state": "active", "silencedBy": [], "inhibitedBy": []}, watchdog["status"]
    assert [r["name"] for r in watchdog["receivers"]] == ["deadmansswitch"]

    # ------------------------------------------------------------ rejected scrapes inhibit the down page
    assert downs["gpu-1:9945"]["state"] == "suppressed" and downs["gpu-1:9945"]["inhibitedBy"], downs
    assert downs["gpu-2:9945"]["state"] == "active", downs
    assert {m.subject for m in smtp.find(alertname=DOWN)} == {f"[FIRING] [critical] {DOWN} run (no run_id)"}
    assert len(smtp.find(alertname=DOWN)) == 1, [m.subject for m in smtp.snapshot()]
