"""End to end: an injected fault in the demo training becomes the right notification.

demo training (`--inject nan@STEP`, `--inject spike@STEP`) -> exporter ->
real ``prometheus`` (1 s scrape and evaluation, the project's
prometheus/rules/*.yml) -> real ``prometheus-alertmanager`` (the project's
alertmanager.yml with local secrets, relay and second-scale timings) -> a
local HTTP server standing in for Slack and a local SMTP server (aiosmtpd)
standing in for the mail relay.

Two demo runs train side by side, one Prometheus scraping both:

- ``e2e-nan``: a NaN loss at step NAN_STEP (critical TrainingLossNonFinite:
  Slack and email, then resolved about a minute later when the counter's 1m
  increase falls to 0), and a one-step loss spike in mid-run while the NaN
  alert is still active, so that TrainingLossSpike really fires in Prometheus
  and has to be inhibited by Alertmanager.
- ``e2e-spike``: a one-step loss spike in mid-run (warning TrainingLossSpike:
  Slack only).

The demo takes ~100 steps/s, so a spiked step is the last step on /metrics
for ~10 ms; it is caught through ``training_loss_recent_max`` (the largest
loss of the last minute of steps), as a real run's spike between two 15 s
scrapes would be.

The fault time is when the exporter first shows it, polled at 50 ms.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.e2e import (
    ALERTMANAGER_CONFIG,
    AlertWatch,
    FakeSlack,
    FakeSMTP,
    FaultWatch,
    Poller,
    Process,
    alert_names,
    alertmanager_alerts,
    free_port,
    project_rule_files,
    sample,
    start_alertmanager,
    start_demo,
    start_prometheus,
    stop_all,
    write_alertmanager_config,
    write_prometheus_config,
)
from support.runif import run_if

pytestmark = [
    run_if(prometheus=True, alertmanager=True),
    # The local SMTP server requires AUTH on loopback without TLS, on purpose.
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning"),
]

NAN_RUN = "e2e-nan"
SPIKE_RUN = "e2e-spike"
# Steps of each run: 15-30 s side by side. The spikes come after enough
# scrapes for the 5 finite samples TrainingLossSpike wants in its 5m window,
# and the NaN run's spike well inside the NaN alert's minute.
STEPS = 1500
SPIKE_STEP = 1000
# Prometheus must have scraped the counter at 0 before the NaN step for
# increase() to see it rise: the endpoint comes up just before the first step,
# and 400 steps take 4 s or more, several 1 s scrapes.
NAN_STEP = 400
NAN_RUN_FAULTS = [f"nan@{NAN_STEP}", f"spike@{SPIKE_STEP}"]
SPIKE_RUN_FAULTS = [f"spike@{SPIKE_STEP}"]

NONFINITE = "TrainingLossNonFinite"
SPIKE = "TrainingLossSpike"
PLATEAU = "TrainingLossPlateau"

# Waiting for everything: the NaN alert resolves ~60 s after the NaN step.
DEADLINE_S = 110
# The target is under 5 s (1 s scrape, 1 s evaluation, 1 s group_wait); the
# assertion leaves room for a loaded 2-core CI machine.
MAX_LATENCY_S = 15


def _am_config() -> dict[str, Any]:
    return dict(yaml.safe_load(ALERTMANAGER_CONFIG.read_text()))


def _receiver(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in config["receivers"] if r["name"] == name)


def _unslack(text: str) -> str:
    """Undo Slack mrkdwn escaping (the template escapes &, < and > in annotations)."""
    return html.unescape(text)


def test_nan_and_spike_reach_the_right_receivers(tmp_path: Path) -> None:
    rule_files = project_rule_files()
    assert rule_files, "no prometheus/rules/*.yml to load"
    names = alert_names(rule_files)
    missing = {NONFINITE, SPIKE} - names
    assert not missing, f"alerts missing from the project's rule files: {missing}"

    am_config = _am_config()
    smtp_user = am_config["global"]["smtp_auth_username"]
    smtp_password = "e2e-not-a-real-password"
    critical_to = _receiver(am_config, "training-critical")["email_configs"][0]["to"]

    slack = FakeSlack().start()
    smtp = FakeSMTP(smtp_user, smtp_password).start()
    processes: list[Process] = []
    pollers: list[Poller] = []
    try:
        am_port, prom_port, nan_port, spike_port = (free_port() for _ in range(4))
        am_url = f"http://127.0.0.1:{am_port}"
        prom_url = f"http://127.0.0.1:{prom_port}"
        am_file = write_alertmanager_config(tmp_path, slack_url=slack.url, smtp_port=smtp.port,
                                            smtp_password=smtp_password)
        prom_file = write_prometheus_config(
            tmp_path, targets=[f"127.0.0.1:{nan_port}", f"127.0.0.1:{spike_port}"],
            alertmanager=f"127.0.0.1:{am_port}", rule_files=rule_files)
        processes.append(start_alertmanager(am_file, tmp_path, am_port))
        processes.append(start_prometheus(prom_file, tmp_path, prom_port))

        linger = DEADLINE_S + 30  # outlives the test; stopped by PID below
        processes.append(start_demo(tmp_path, NAN_RUN, nan_port, STEPS, NAN_RUN_FAULTS, linger))
        processes.append(start_demo(tmp_path, SPIKE_RUN, spike_port, STEPS, SPIKE_RUN_FAULTS, linger))

        nan_fault = FaultWatch(
            f"http://127.0.0.1:{nan_port}/metrics",
            lambda s: (sample(s, "training_nonfinite_loss_total") or 0) >= 1)
        spike_fault = FaultWatch(
            f"http://127.0.0.1:{spike_port}/metrics",
            lambda s: (sample(s, "training_step") or 0) >= SPIKE_STEP)
        alerts = AlertWatch(prom_url)
        # Alertmanager's own view of each alert of the NaN run: inhibited or not.
        am_seen: dict[tuple[str, str], dict[str, Any]] = {}

        def watch_alertmanager() -> None:
            for alert in alertmanager_alerts(am_url):
                labels = alert["labels"]
                if labels.get("run_id") == NAN_RUN:
                    key = (labels.get("alertname", ""), labels.get("run_id", ""))
                    status = alert["status"]
                    seen = am_seen.setdefault(key, {"inhibited_by": set(), "active": False})
                    seen["inhibited_by"].update(status.get("inhibitedBy") or [])
                    seen["active"] = seen["active"] or status.get("state") == "active"

        pollers += [nan_fault.poller, spike_fault.poller, alerts.poller,
                    Poller("alertmanager-watch", watch_alertmanager, 0.2)]
        for poller in pollers:
            poller.start()

        def done() -> bool:
            for proc in processes:
                if not proc.running():
                    raise AssertionError(f"{proc.name} exited early ({proc.popen.returncode}):\n{proc.log_tail()}")
            return bool(
                slack.find(alertname=NONFINITE, run_id=NAN_RUN, status="RESOLVED")
                and smtp.find(alertname=NONFINITE, run_id=NAN_RUN, status="RESOLVED")
                and slack.find(alertname=SPIKE, run_id=SPIKE_RUN, status="FIRING")
                and (SPIKE, NAN_RUN) in alerts.firing_at
            )

        deadline = time.monotonic() + DEADLINE_S
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)
        # Let a notification that should not come have its chance to arrive.
        time.sleep(2)
    finally:
        for poller in pollers:
            poller.stop()
        try:
            # Prometheus first, so the demos' exit is not scraped as an outage.
            stop_all(sorted(processes, key=lambda proc: proc.name != "prometheus"))
        finally:
            slack.stop()
            smtp.stop()

    posts = slack.snapshot()
    mails = smtp.snapshot()
    t0 = nan_fault.seen_at or 0.0
    timeline = sorted(
        [(p.received_at - t0, f"slack {p.title}") for p in posts]
        + [(m.received_at - t0, f"email {m.subject} -> {', '.join(m.rcpt_tos)}") for m in mails]
        + [(t - t0, f"prometheus firing {name} {run}") for (name, run), t in alerts.firing_at.items()]
        + [(t - t0, f"prometheus resolved {name} {run}") for (name, run), t in alerts.gone_at.items()]
    )
    log = "\n".join(f"  {t:+7.2f} s  {what}" for t, what in timeline)
    print(f"\ntimeline (seconds after the NaN step showed on /metrics):\n{log}")
    context = f"\n{log}\nlogs in {tmp_path}"

    # ---------------------------------------------------------------- NaN run: critical -> Slack + email
    assert nan_fault.seen_at is not None, f"the NaN run never showed a non-finite loss{context}"
    nan_key = (NONFINITE, NAN_RUN)
    assert nan_key in alerts.firing_at, f"{NONFINITE} never fired in Prometheus{context}"
    annotations = alerts.annotations[nan_key]
    recommendation = annotations.get("recommendation", "")
    assert recommendation, f"{NONFINITE} has no recommendation annotation: {annotations}"

    fired = slack.find(alertname=NONFINITE, run_id=NAN_RUN, status="FIRING")
    assert fired, f"no Slack post for {NONFINITE} of {NAN_RUN}{context}"
    first = fired[0]
    assert first.severity == "critical"
    text = _unslack(first.text)
    assert NAN_RUN in text
    assert recommendation in text, f"recommendation missing from the Slack text:\n{text}"
    assert first.attachment.get("title_link", "").endswith(f"/d/training-run?var-run_id={NAN_RUN}")
    if annotations.get("runbook_url"):
        assert annotations["runbook_url"] in text
    assert first.attachment.get("color") == "danger"

    mailed = smtp.find(alertname=NONFINITE, run_id=NAN_RUN, status="FIRING")
    assert mailed, f"no email for {NONFINITE} of {NAN_RUN}{context}"
    mail = mailed[0]
    assert mail.rcpt_tos == [critical_to]
    assert mail.login == smtp_user, "the relay accepted the mail without the password from auth_password_file"
    assert not smtp.failed_logins, f"failed SMTP logins: {smtp.failed_logins}"
    plain = mail.body("plain")
    assert NAN_RUN in plain and recommendation in plain, plain
    assert f"/d/training-run?var-run_id={NAN_RUN}" in mail.body("html")

    # ---------------------------------------------------------------- inhibition
    # The spike on the NaN run's last step fired in Prometheus while the NaN
    # alert was active: Alertmanager must have held it back.
    nan_spike = (SPIKE, NAN_RUN)
    assert nan_spike in alerts.firing_at, f"the NaN run's spike never fired, nothing was inhibited{context}"
    assert alerts.firing_at[nan_spike] < alerts.gone_at.get(nan_key, math.inf), (
        f"the NaN run's spike fired only after the NaN alert had resolved{context}")
    assert am_seen.get(nan_spike, {}).get("inhibited_by"), (
        f"Alertmanager never reported {SPIKE} of {NAN_RUN} inhibited: {am_seen}")
    resolved = slack.find(alertname=NONFINITE, run_id=NAN_RUN, status="RESOLVED")
    assert resolved, f"no resolved Slack notification for {NONFINITE} of {NAN_RUN}{context}"
    inhibited_until = resolved[0].received_at - 1.0
    leaked = [p for p in posts if p.run_id == NAN_RUN and p.severity in ("warning", "info")
              and first.received_at <= p.received_at <= inhibited_until]
    assert not leaked, f"warning/info posts for {NAN_RUN} while {NONFINITE} was active: {[p.title for p in leaked]}"
    assert not [p for p in posts if p.run_id == NAN_RUN and p.alertname in (SPIKE, PLATEAU)
                and p.received_at <= inhibited_until], f"spike/plateau of {NAN_RUN} not inhibited{context}"

    # ---------------------------------------------------------------- resolution
    assert resolved[0].received_at > first.received_at
    assert resolved[0].attachment.get("color") == "good"
    assert smtp.find(alertname=NONFINITE, run_id=NAN_RUN, status="RESOLVED"), (
        f"no resolved email for {NONFINITE} (send_resolved){context}")

    # ---------------------------------------------------------------- spike run: warning -> Slack only
    assert spike_fault.seen_at is not None, f"the spike run never reached its spike step{context}"
    spiked = slack.find(alertname=SPIKE, run_id=SPIKE_RUN, status="FIRING")
    assert spiked, f"no Slack post for {SPIKE} of {SPIKE_RUN}{context}"
    spike_text = _unslack(spiked[0].text)
    spike_recommendation = alerts.annotations[(SPIKE, SPIKE_RUN)].get("recommendation", "")
    assert spike_recommendation and spike_recommendation in spike_text, spike_text
    assert SPIKE_RUN in spike_text
    assert spiked[0].severity == "warning"
    assert not smtp.find(alertname=SPIKE), f"a warning went to email{context}"
    assert not [p for p in posts if p.severity == "info"], f"an info alert reached Slack{context}"
    assert not [m for m in mails if m.field("severity") == "warning"], f"a warning went to email{context}"

    # ---------------------------------------------------------------- latencies
    nan_at = nan_fault.seen_at
    spike_at = spike_fault.seen_at
    latencies = {
        "NaN -> Prometheus firing": alerts.firing_at[nan_key] - nan_at,
        "NaN -> Slack (critical)": first.received_at - nan_at,
        "NaN -> email (critical)": mail.received_at - nan_at,
        "spike -> Prometheus firing": alerts.firing_at[(SPIKE, SPIKE_RUN)] - spike_at,
        "spike -> Slack (warning)": spiked[0].received_at - spike_at,
        "NaN -> resolved Slack": resolved[0].received_at - nan_at,
    }
    latencies["NaN -> resolved email"] = smtp.find(alertname=NONFINITE, run_id=NAN_RUN,
                                                   status="RESOLVED")[0].received_at - nan_at
    if nan_key in alerts.gone_at:
        latencies["Prometheus resolved -> resolved Slack"] = resolved[0].received_at - alerts.gone_at[nan_key]
    print("\nfault -> notification latency (1 s scrape, 1 s evaluation, group_wait 1 s):")
    for label, seconds in latencies.items():
        print(f"  {label:40s} {seconds:6.2f} s")
    for label in ("NaN -> Slack (critical)", "NaN -> email (critical)", "spike -> Slack (warning)"):
        assert latencies[label] < MAX_LATENCY_S, f"{label}: {latencies[label]:.1f} s{context}"
    # Nothing fired before its fault: the fast first descent of the runs is no spike.
    # (-0.1 s: the fault watch polls /metrics every 50 ms.)
    for label in ("NaN -> Prometheus firing", "spike -> Prometheus firing"):
        assert latencies[label] > -0.1, f"{label} fired before the fault: {latencies[label]:.2f} s{context}"
