"""End to end: runs that end on purpose page nobody, a run that vanishes does.

A real ``prometheus`` (1 s scrape and evaluation) with the project's prometheus/rules/*.yml as they are
(TrainingExporterDown and TrainingExporterAbsent wait 2 minutes) scrapes four runs at once, each with the
exporter's default end-of-run settings (no linger):

- ``e2e-early-stop``: a Trainer stopped by ``EarlyStoppingCallback`` at step 100 of 100000, so that
  nothing but its final state tells an early stop from a crash (its ETA is far above the minute the rules
  forgive);
- ``e2e-completed``: ``training-exporter demo`` running to its max_steps;
- ``e2e-sigterm``: ``training-exporter demo`` stopped by SIGTERM mid-run, as a scheduler stops a job;
- ``e2e-killed``: a plain training loop SIGKILLed mid-run, the control: it must page.

For two minutes after the last end, no critical or warning alert may fire for the first three, and
TrainingExporterDown / TrainingExporterAbsent may not even be pending for them, while the control's
TrainingExporterDown goes pending at once and fires after its 2 minutes. About 2.5 minutes in all.
"""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import requests
from support.e2e import (
    Poller,
    Process,
    free_port,
    project_rule_files,
    start_prometheus,
    stop_all,
    wait_until,
    write_prometheus_config,
)
from support.runif import run_if

pytestmark = run_if(prometheus=True)

EARLY, COMPLETED, TERMINATED, KILLED = "e2e-early-stop", "e2e-completed", "e2e-sigterm", "e2e-killed"
QUIET_FLAGS = ["--no-collector.gpu", "--no-collector.eval", "--no-collector.previews", "--no-collector.drift"]
# The rules' `for: 2m` of TrainingExporterDown, plus an evaluation, a scrape and a loaded machine's slack.
WATCH_S = 128
START_DEADLINE_S = 150

EARLY_STOP = textwrap.dedent("""
    import sys
    from transformers import EarlyStoppingCallback
    from exporter import PrometheusCallback
    from exporter.demo.run import build_trainer

    port, out = sys.argv[1], sys.argv[2]
    cb = PrometheusCallback(listen_address=f"127.0.0.1:{port}", run_id="e2e-early-stop", gpu=False,
                            evaluation=False, previews=False, drift=False)
    # No evaluation beats the first by 100: the second one stops training, at step 100.
    early = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=100.0)
    trainer = build_trainer([cb, early], output_dir=out, max_steps=100_000, eval_steps=50, save_steps=50,
                            load_best_model_at_end=True, metric_for_best_model="eval_loss", disable_tqdm=True)
    trainer.train()
    print("stopped at step", trainer.state.global_step, flush=True)
    sys.exit(0 if trainer.state.global_step == 100 else 1)
""")

PLAIN_LOOP = textwrap.dedent("""
    import sys, time
    from exporter.config import ExporterConfig
    from exporter.core import TrainingMonitor

    mon = TrainingMonitor(ExporterConfig(listen_address=f"127.0.0.1:{sys.argv[1]}", gpu=False, host=False,
                                         drift=False), run_id="e2e-killed")
    mon.start()
    mon.begin(max_steps=1_000_000)
    while True:
        mon.step_begin()
        mon.observe_loss(1.0)
        mon.step_end()
        time.sleep(0.01)
""")


def demo(workdir: Path, run_id: str, port: int, max_steps: int) -> Process:
    return Process(run_id, [
        sys.executable, "-m", "exporter.cli", "demo", "--max-steps", str(max_steps),
        "--web.listen-address", f"127.0.0.1:{port}", "--output-dir", str(workdir / run_id), "--run-id", run_id,
        "--save-steps", str(max_steps + 1), *QUIET_FLAGS,
    ], workdir)


def script(workdir: Path, run_id: str, text: str, *args: str) -> Process:
    path = workdir / f"{run_id}.py"
    path.write_text(text)
    return Process(run_id, [sys.executable, str(path), *args], workdir)


class Alerts:
    """Every (alertname, run_id, severity) Prometheus reported, with when it was first pending and firing."""

    def __init__(self, url: str) -> None:
        self.url = url + "/api/v1/alerts"
        self.first: dict[tuple[str, str, str, str], float] = {}

    def check(self) -> None:
        now = time.time()
        for alert in requests.get(self.url, timeout=2).json()["data"]["alerts"]:
            labels = alert["labels"]
            key = (labels.get("alertname", ""), labels.get("run_id", ""), labels.get("severity", ""), alert["state"])
            self.first.setdefault(key, now)

    def seen(self, run_id: str, state: str | None = None) -> dict[tuple[str, str, str, str], float]:
        return {k: t for k, t in self.first.items() if k[1] == run_id and (state is None or k[3] == state)}


def query(url: str, expr: str) -> dict[str, float]:
    result = requests.get(url + "/api/v1/query", params={"query": expr}, timeout=5).json()["data"]["result"]
    return {r["metric"].get("run_id", ""): float(r["value"][1]) for r in result}


def test_runs_that_end_on_purpose_page_nobody(tmp_path: Path) -> None:
    ports = {run: free_port() for run in (EARLY, COMPLETED, TERMINATED, KILLED)}
    prom_port = free_port()
    url = f"http://127.0.0.1:{prom_port}"
    config = write_prometheus_config(tmp_path, targets=[f"127.0.0.1:{p}" for p in ports.values()],
                                     alertmanager=f"127.0.0.1:{free_port()}", rule_files=project_rule_files())
    procs: dict[str, Process] = {}
    alerts = Alerts(url)
    poller = Poller("alerts", alerts.check, 0.5)
    started = time.monotonic()
    try:
        procs["prometheus"] = start_prometheus(config, tmp_path, prom_port)
        poller.start()
        procs[EARLY] = script(tmp_path, EARLY, EARLY_STOP, str(ports[EARLY]), str(tmp_path / EARLY))
        procs[COMPLETED] = demo(tmp_path, COMPLETED, ports[COMPLETED], 100)
        procs[TERMINATED] = demo(tmp_path, TERMINATED, ports[TERMINATED], 100_000)
        procs[KILLED] = script(tmp_path, KILLED, PLAIN_LOOP, str(ports[KILLED]))

        def context() -> str:
            logs = "\n".join(f"--- {name}:\n{proc.log_tail(15)}" for name, proc in procs.items())
            return f"\nalerts seen: {alerts.first}\n{logs}\nlogs in {tmp_path}"

        def ended_on_their_own() -> bool:
            for run in (TERMINATED, KILLED):
                assert procs[run].running(), f"{run} exited early{context()}"
            return not procs[EARLY].running() and not procs[COMPLETED].running()

        wait_until(ended_on_their_own, START_DEADLINE_S, interval=0.2, what="the early-stopped and completed runs")
        for run in (EARLY, COMPLETED):
            assert procs[run].popen.returncode == 0, f"{run} failed{context()}"
        assert query(url, 'max by (run_id) (training_step{run_id="e2e-sigterm"})').get(TERMINATED, 0) > 0, context()
        procs[TERMINATED].popen.send_signal(signal.SIGTERM)
        procs[KILLED].popen.kill()
        procs[TERMINATED].popen.wait(30)
        assert procs[TERMINATED].popen.returncode == -signal.SIGTERM, f"{TERMINATED} exit status{context()}"
        ended = time.monotonic()
        print(f"\nruns ended {ended - started:.0f} s after the start; watching the alerts for {WATCH_S} s")
        # Every final state was scraped before its endpoint closed.
        finals = {state: query(url, f'max by (run_id) (last_over_time(training_state{{state="{state}"}}[10m]))')
                  for state in ("completed", "terminated", "training")}
        for run, state in ((EARLY, "completed"), (COMPLETED, "completed"), (TERMINATED, "terminated"),
                           (KILLED, "training")):
            assert finals[state].get(run) == 1.0, (run, state, finals, context())

        def control_fired() -> bool:
            return bool(alerts.seen(KILLED, "firing")) and time.monotonic() - ended > WATCH_S

        wait_until(control_fired, WATCH_S + 30, interval=0.5, what="TrainingExporterDown of the SIGKILLed run")
    finally:
        poller.stop()
        stop_all(procs.values())
    print(f"total {time.monotonic() - started:.0f} s; alerts seen: {alerts.first}")

    for run in (EARLY, COMPLETED, TERMINATED):
        paging = {k for k in alerts.seen(run, "firing") if k[2] in ("critical", "warning")}
        assert not paging, f"{run} paged: {paging}"
        vanished = {k for k in alerts.seen(run) if k[0] in ("TrainingExporterDown", "TrainingExporterAbsent")}
        assert not vanished, f"{run} was taken for a vanished run: {vanished}"
    control: dict[tuple[str, str, str, str], Any] = alerts.seen(KILLED)
    assert ("TrainingExporterDown", KILLED, "critical", "pending") in control, control
    assert ("TrainingExporterDown", KILLED, "critical", "firing") in control, control
