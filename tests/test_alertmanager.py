"""alertmanager/alertmanager.yml: valid, routes each severity right, inhibits, renders.

`amtool check-config` and `amtool config routes test` run on the committed
file. Inhibition and the templates run in a real ``prometheus-alertmanager``
fed with hand-made alerts over its API, notifying a local Slack stand-in and
a local SMTP server (tests/support/e2e.py); tests/test_alerting_e2e.py drives the same
configuration from real rule evaluations.
"""

from __future__ import annotations

import html
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.e2e import (
    ALERTMANAGER_CONFIG,
    AMTOOL,
    ROOT,
    FakeSlack,
    FakeSMTP,
    alertmanager_alerts,
    free_port,
    missing_binaries,
    start_alertmanager,
    wait_until,
    write_alertmanager_config,
)
from support.runif import run_if

needs_amtool = run_if(amtool=True)
needs_alertmanager = run_if(alertmanager=True)

CRITICAL = "training-critical"
SLACK = "training-slack"
DIGEST = "training-info-digest"
HEARTBEAT = "deadmansswitch"
WATCHDOG = "TrainingAlertingWatchdog"


def _config() -> dict[str, Any]:
    return dict(yaml.safe_load(ALERTMANAGER_CONFIG.read_text()))


def _receiver(name: str) -> dict[str, Any]:
    return next(r for r in _config()["receivers"] if r["name"] == name)


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=30, check=False)


# --------------------------------------------------------------------------- static checks


@needs_amtool
def test_check_config_is_clean() -> None:
    # The secret files do not exist here: Alertmanager reads them only when it notifies.
    result = _amtool("check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "4 inhibit rules" in result.stdout


def test_secrets_come_from_files_only() -> None:
    config = _config()
    text = ALERTMANAGER_CONFIG.read_text()
    for key in ("api_url:", "auth_password:", "slack_api_url:", "smtp_auth_password:", "hooks.slack.com",
                "credentials:", "password:"):
        assert key not in text, f"{key} in the committed configuration: secrets belong in files"
    files = set()
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            files.add(slack["api_url_file"])
        for mail in receiver.get("email_configs", []):
            files.add(mail["auth_password_file"])
        for hook in receiver.get("webhook_configs", []):
            files.add(hook["http_config"]["authorization"]["credentials_file"])
    assert files == {"/etc/alertmanager/secrets/slack_webhook_url", "/etc/alertmanager/secrets/smtp_password",
                     "/etc/alertmanager/secrets/heartbeat_token"}


def test_secret_files_are_ignored_by_git() -> None:
    if missing_binaries("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, check=False)
        return result.returncode == 0

    assert ignored("alertmanager/secrets/slack_webhook_url")
    assert ignored("alertmanager/secrets/smtp_password")
    assert ignored("alertmanager/secrets/heartbeat_token")
    assert not ignored("alertmanager/secrets/README.md")
    assert not ignored("alertmanager/secrets/.gitignore")


def test_receivers_and_grouping() -> None:
    config = _config()
    route = config["route"]
    assert route["group_by"] == ["alertname", "run_id"]
    critical, slack, digest = _receiver(CRITICAL), _receiver(SLACK), _receiver(DIGEST)
    assert {r["name"] for r in config["receivers"]} == {CRITICAL, SLACK, DIGEST, HEARTBEAT}
    assert set(critical) == {"name", "slack_configs", "email_configs"}
    assert set(slack) == {"name", "slack_configs"}
    assert set(digest) == {"name", "email_configs"}
    for receiver in (critical, slack):
        for integration in receiver.get("slack_configs", []) + receiver.get("email_configs", []):
            assert integration["send_resolved"] is True
    info = next(r for r in route["routes"] if r["matchers"] == ['severity="info"'])
    # A daily digest: one message per run, at most once a day.
    assert info["group_by"] == ["run_id"]
    assert info["group_interval"] == info["repeat_interval"] == "24h"
    # The dead man's switch: first, alone, to the heartbeat service only, pinging about every minute; a
    # resolved watchdog is no heartbeat.
    watchdog = route["routes"][0]
    assert watchdog["matchers"] == [f'alertname="{WATCHDOG}"'] and watchdog["receiver"] == HEARTBEAT
    assert watchdog["continue"] is False and "routes" not in watchdog
    assert (watchdog["group_wait"], watchdog["group_interval"], watchdog["repeat_interval"]) == ("0s", "1m", "1m")
    heartbeat = _receiver(HEARTBEAT)
    assert set(heartbeat) == {"name", "webhook_configs"} and len(heartbeat["webhook_configs"]) == 1
    assert heartbeat["webhook_configs"][0]["send_resolved"] is False


def test_nothing_inhibits_the_watchdog() -> None:
    """Every inhibition either needs a run_id on its source (equal: [run_id] would match two missing labels) or
    names its targets: the watchdog, with no run_id, is never a target."""
    for rule in _config()["inhibit_rules"]:
        targets = " ".join(rule["target_matchers"])
        if "alertname=" in targets:
            assert WATCHDOG not in targets, rule
        else:
            assert rule["equal"] == ["run_id"] and 'run_id!=""' in rule["source_matchers"], rule


# Label sets and the receivers they must reach.
ROUTES = [
    ({"alertname": "TrainingLossNonFinite", "severity": "critical", "component": "loss", "run_id": "r1"}, CRITICAL),
    ({"alertname": "TrainingExporterDown", "severity": "critical", "component": "exporter"}, CRITICAL),
    ({"alertname": "TrainingLossSpike", "severity": "warning", "component": "loss", "run_id": "r1"}, SLACK),
    ({"alertname": "TrainingStalled", "severity": "warning", "run_id": "r2"}, SLACK),
    ({"alertname": "TrainingLossPlateau", "severity": "info", "component": "loss", "run_id": "r1"}, DIGEST),
    ({"alertname": "TrainingLossDiverging", "severity": "warning", "component": "training", "run_id": "r1"}, SLACK),
    # The alerting chain's own alerts (no run_id): the watchdog to the heartbeat service alone, whatever its
    # severity; a failing integration to Slack and email (training-critical).
    ({"alertname": WATCHDOG, "severity": "info", "component": "meta"}, HEARTBEAT),
    ({"alertname": WATCHDOG, "severity": "critical", "component": "meta"}, HEARTBEAT),
    ({"alertname": "TrainingAlertNotificationsFailing", "severity": "critical", "component": "meta",
      "integration": "slack"}, CRITICAL),
    ({"alertname": "TrainingRuleEvaluationsFailing", "severity": "critical", "component": "meta"}, CRITICAL),
    ({"alertname": "TrainingScrapesRejected", "severity": "critical", "component": "meta"}, CRITICAL),
    ({"alertname": "TrainingScrapesFlapping", "severity": "warning", "component": "meta"}, SLACK),
    ({"alertname": "TrainingConfigReloadFailed", "severity": "warning", "component": "meta"}, SLACK),
    # Without a known severity an alert still reaches people.
    ({"alertname": "TrainingSomethingNew", "run_id": "r1"}, SLACK),
    ({"alertname": "TrainingSomethingNew", "severity": "page", "run_id": "r1"}, SLACK),
]


@needs_amtool
@pytest.mark.parametrize(("labels", "receiver"), ROUTES, ids=[f"{l_['alertname']}-{r}" for l_, r in ROUTES])
def test_route(labels: dict[str, str], receiver: str) -> None:
    args = [f"{k}={v}" for k, v in labels.items()]
    result = _amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
                     f"--verify.receivers={receiver}", *args)
    assert result.returncode == 0, f"{labels} -> {result.stdout.strip()}, expected {receiver}\n{result.stderr}"
    assert result.stdout.strip() == receiver


@needs_amtool
def test_route_mismatch_is_detected() -> None:
    # The check above can fail: a wrong expectation makes amtool exit non-zero.
    result = _amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
                     f"--verify.receivers={SLACK}", "alertname=TrainingLossNonFinite", "severity=critical")
    assert result.returncode != 0


# --------------------------------------------------------------------------- a real Alertmanager


def _alert(alertname: str, severity: str, run_id: str, **extra: str) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {
        "labels": {"alertname": alertname, "severity": severity, "run_id": run_id, "component": "loss", **extra},
        "annotations": {
            "summary": f"{alertname} summary.",
            "description": f"Run {run_id}: value 42.5 > 2 x 3.1 ({alertname}).",
            "recommendation": f"Do the {alertname} thing & check <the batch>.",
            "runbook_url": f"https://example.com/runbook#{alertname.lower()}",
        },
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=5)).isoformat(),
        "generatorURL": "http://prometheus.example/graph",
    }


@needs_alertmanager
# The local SMTP server requires AUTH on loopback without TLS, on purpose.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_inhibition_and_messages(tmp_path: Path) -> None:
    """Hand-made alerts into a real Alertmanager: what is inhibited, what arrives where, and how it reads."""
    password = "unit-not-a-real-password"
    slack = FakeSlack().start()
    smtp = FakeSMTP(_config()["global"]["smtp_auth_username"], password).start()
    am = None
    try:
        port = free_port()
        config = write_alertmanager_config(tmp_path, slack_url=slack.url, smtp_port=smtp.port, smtp_password=password)
        am = start_alertmanager(config, tmp_path, port)
        url = f"http://127.0.0.1:{port}"
        alerts = [
            _alert("TrainingLossNonFinite", "critical", "r1"),
            _alert("TrainingLossSpike", "warning", "r1"),        # inhibited: critical of r1, and NaN explains it
            _alert("TrainingLossPlateau", "info", "r1"),         # inhibited likewise
            _alert("TrainingGradientExploding", "warning", "r1", component="gradients"),  # critical of r1
            _alert("TrainingLossSpike", "warning", "r2"),        # another run: not inhibited
            _alert("TrainingLossPlateau", "info", "r2"),         # not inhibited, digest only
            _alert("TrainingCalibrationPoor", "info", "r2", component="predictions"),  # same digest
            # A NaN alert inhibits its run's spike whatever severity it is given.
            _alert("TrainingLossNonFinite", "warning", "r3"),
            _alert("TrainingLossSpike", "warning", "r3"),
            # A diverging run's plateau (a rising loss improves by less than 1%) is inhibited.
            _alert("TrainingLossDiverging", "warning", "r4"),
            _alert("TrainingLossPlateau", "info", "r4"),
        ]
        requests.post(f"{url}/api/v2/alerts", json=alerts, timeout=5).raise_for_status()

        def settled() -> bool:
            return bool(
                len(slack.find(status="FIRING")) >= 4 and len(smtp.snapshot()) >= 2
                and len(alertmanager_alerts(url)) == len(alerts)
            )

        wait_until(settled, 20, what="notifications for the uninhibited alerts")
        states = {
            (a["labels"]["alertname"], a["labels"]["run_id"]): (a["status"]["state"], a["status"]["inhibitedBy"])
            for a in alertmanager_alerts(url)
        }
        # Room for a wrong notification to arrive (group_wait and group_interval are 1 s here).
        time.sleep(2.5)
    finally:
        if am is not None:
            am.stop()
        slack.stop()
        smtp.stop()

    inhibited = {key for key, (state, by) in states.items() if by}
    assert inhibited == {
        ("TrainingLossSpike", "r1"), ("TrainingLossPlateau", "r1"), ("TrainingGradientExploding", "r1"),
        ("TrainingLossSpike", "r3"), ("TrainingLossPlateau", "r4"),
    }, states
    assert all(states[key][0] == "suppressed" for key in inhibited)

    posts = slack.snapshot()
    assert sorted((p.alertname, p.run_id) for p in posts) == [
        ("TrainingLossDiverging", "r4"), ("TrainingLossNonFinite", "r1"), ("TrainingLossNonFinite", "r3"),
        ("TrainingLossSpike", "r2"),
    ], [p.title for p in posts]
    mails = smtp.snapshot()
    assert sorted((m.run_id, m.rcpt_tos) for m in mails) == [
        ("r1", [_receiver(CRITICAL)["email_configs"][0]["to"]]),
        ("r2", [_receiver(DIGEST)["email_configs"][0]["to"]]),
    ], [m.subject for m in mails]

    # Slack: run, alert, severity, value, recommendation, runbook and dashboard; mrkdwn-escaped.
    critical = next(p for p in posts if p.run_id == "r1")
    assert critical.title == "[FIRING] TrainingLossNonFinite (critical) run r1"
    assert critical.attachment["color"] == "danger"
    assert critical.attachment["title_link"] == "http://localhost:3000/d/training-run?var-run_id=r1"
    assert "value 42.5 &gt; 2 x 3.1" in critical.text  # escaped for Slack
    text = html.unescape(critical.text)
    assert "Run: `r1`" in text
    assert "*Recommendation:* Do the TrainingLossNonFinite thing & check <the batch>." in text
    assert "<https://example.com/runbook#traininglossnonfinite|Runbook>" in text
    assert "<http://localhost:3000/d/training-run?var-run_id=r1|Dashboard>" in text
    warning = next(p for p in posts if p.run_id == "r2")
    assert warning.attachment["color"] == "warning"

    # Email: subject, plain text and HTML, logged in with the password from the file.
    page = next(m for m in mails if m.run_id == "r1")
    assert page.subject == "[FIRING] [critical] TrainingLossNonFinite run r1"
    assert page.login == _config()["global"]["smtp_auth_username"]
    plain = page.body("plain")
    assert "Run: r1" in plain
    assert "Recommendation: Do the TrainingLossNonFinite thing & check <the batch>." in plain
    assert "Dashboard: http://localhost:3000/d/training-run?var-run_id=r1" in plain
    assert "Runbook: https://example.com/runbook#traininglossnonfinite" in plain
    page_html = page.body("html")
    assert "check &lt;the batch&gt;" in page_html
    assert 'href="http://localhost:3000/d/training-run?var-run_id=r1"' in page_html

    # The info digest: both info alerts of r2 in one mail.
    digest = next(m for m in mails if m.run_id == "r2")
    assert digest.subject == "[FIRING:2] [info] 2 alerts run r2", digest.subject
    digest_text = digest.body("plain")
    assert "TrainingLossPlateau" in digest_text and "TrainingCalibrationPoor" in digest_text
