"""The project's alerting chain on loopback, for ``demo --local-alerting`` and the end-to-end tests.

exporter /metrics -> ``prometheus`` (the project's prometheus/rules/*.yml, 1 s
scrape and evaluation) -> ``prometheus-alertmanager`` (the project's
alertmanager/alertmanager.yml, with local secrets, relay and second-scale
timings) -> a local HTTP server standing in for Slack and a local SMTP server
(aiosmtpd) standing in for the mail relay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import requests
import yaml

from exporter.demo.localstack.configs import (
    require_project_files,
    write_alertmanager_config,
    write_prometheus_config,
)
from exporter.demo.localstack.processes import (
    ALERTMANAGER,
    PROMETHEUS,
    Process,
    free_port,
    require_binaries,
    start_alertmanager,
    start_prometheus,
    stop_all,
)
from exporter.demo.localstack.receivers import FakeSlack, FakeSMTP, Notification, require_aiosmtpd

__all__ = ["LocalAlerting", "check_prerequisites"]


def check_prerequisites() -> None:
    """Everything :class:`LocalAlerting` needs, checked before anything starts (:class:`LocalStackError`)."""
    require_binaries(PROMETHEUS, ALERTMANAGER)
    require_project_files()
    require_aiosmtpd()


class LocalAlerting:
    """Stand-ins for Slack and SMTP, ``prometheus-alertmanager`` and ``prometheus`` scraping ``targets``.

    Everything lives in ``workdir`` (configuration copies, secrets, TSDB, logs)
    and binds 127.0.0.1 on free ports. ``on_event`` is called, from the
    receivers' threads, for each notification and each alert Alertmanager
    reports inhibited (once per alert and run). Use as a context manager, or
    call :meth:`start` and then :meth:`stop` in a ``finally``.
    """

    def __init__(
        self,
        targets: Sequence[str],
        workdir: Path,
        *,
        on_event: Callable[[Notification], None] | None = None,
        interval: str = "1s",
        smtp_password: str = "local-stand-in-not-a-secret",
    ) -> None:
        self.targets = list(targets)
        self.workdir = workdir
        self.interval = interval
        self._on_event = on_event
        self._smtp_password = smtp_password
        self._events: list[Notification] = []
        self._lock = threading.Lock()
        self._slack: FakeSlack | None = None
        self._smtp: FakeSMTP | None = None
        self.alertmanager: Process | None = None
        self.prometheus: Process | None = None
        self.alertmanager_url = ""
        self.prometheus_url = ""
        self._stop_watch = threading.Event()
        self._watch: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> LocalAlerting:
        """Check the prerequisites, then start everything; on any failure stop what was started and re-raise."""
        files = require_project_files()
        require_binaries(PROMETHEUS, ALERTMANAGER)
        source = yaml.safe_load(files.alertmanager_config.read_text())
        smtp_user = str(source["global"]["smtp_auth_username"])
        try:
            self._slack = FakeSlack(on_post=lambda post: self._record(Notification.from_slack(post))).start()
            self._smtp = FakeSMTP(smtp_user, self._smtp_password,
                                  on_message=lambda mail: self._record(Notification.from_mail(mail))).start()
            am_port, prom_port = free_port(), free_port()
            self.alertmanager_url = f"http://127.0.0.1:{am_port}"
            self.prometheus_url = f"http://127.0.0.1:{prom_port}"
            am_file = write_alertmanager_config(self.workdir, slack_url=self._slack.url, smtp_port=self._smtp.port,
                                                smtp_password=self._smtp_password, source=files.alertmanager_config)
            prom_file = write_prometheus_config(self.workdir, targets=self.targets,
                                                alertmanager=f"127.0.0.1:{am_port}",
                                                rule_files=files.rule_files, interval=self.interval)
            self.alertmanager = start_alertmanager(am_file, self.workdir, am_port)
            self.prometheus = start_prometheus(prom_file, self.workdir, prom_port)
            self._watch = threading.Thread(target=self._watch_inhibited, name="inhibition-watch", daemon=True)
            self._watch.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything started, Prometheus first (so the exporter's exit is not scraped as an outage)."""
        self._stop_watch.set()
        if self._watch is not None:
            self._watch.join(5)
        try:
            stop_all(proc for proc in (self.prometheus, self.alertmanager) if proc is not None)
        finally:
            for fake in (self._slack, self._smtp):
                if fake is not None:
                    fake.stop()

    def __enter__(self) -> LocalAlerting:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def processes(self) -> list[Process]:
        return [proc for proc in (self.prometheus, self.alertmanager) if proc is not None]

    # ------------------------------------------------------------- what arrived

    def events(self) -> list[Notification]:
        """Everything reported so far, in arrival order."""
        with self._lock:
            return list(self._events)

    def summary(self) -> str:
        """One line: how many notifications reached each stand-in, and how many alerts were inhibited."""
        events = self.events()
        parts = []
        for channel in ("slack", "email"):
            mine = [e for e in events if e.channel == channel]
            by_status = ", ".join(f"{status.lower()} {sum(e.status == status for e in mine)}"
                                  for status in ("FIRING", "RESOLVED") if any(e.status == status for e in mine))
            parts.append(f"{channel} {len(mine)}" + (f" ({by_status})" if by_status else ""))
        inhibited = sum(e.channel == "alertmanager" for e in events)
        sent = sum(e.channel != "alertmanager" for e in events)
        return f"{sent} notification(s): {'; '.join(parts)}; {inhibited} alert(s) inhibited"

    def _record(self, event: Notification) -> None:
        with self._lock:
            self._events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _watch_inhibited(self) -> None:
        """Report each (alertname, run_id) Alertmanager holds back by an inhibition rule, once."""
        seen: set[tuple[str, str]] = set()
        while not self._stop_watch.wait(1.0):
            try:
                response = requests.get(self.alertmanager_url + "/api/v2/alerts", timeout=2)
                alerts = response.json() if response.status_code == 200 else []
            except (requests.RequestException, ValueError):
                continue
            names = {a.get("fingerprint"): a.get("labels", {}).get("alertname", "?") for a in alerts}
            for alert in alerts:
                labels = alert.get("labels", {})
                by = alert.get("status", {}).get("inhibitedBy") or []
                key = (labels.get("alertname", "?"), labels.get("run_id", "?"))
                if not by or key in seen:
                    continue
                seen.add(key)
                sources = ", ".join(sorted({names.get(fp, "another alert") for fp in by}))
                self._record(Notification("alertmanager", "INHIBITED", key[0], key[1], labels.get("severity", "?"),
                                          f"held back while {sources} fires for this run", time.time()))
