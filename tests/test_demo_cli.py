"""``training-exporter demo --local-alerting``: the real chain on loopback, from the command line.

The demo starts the Slack and SMTP stand-ins, ``prometheus-alertmanager`` and
``prometheus`` itself (exporter/demo/localstack/), prints each notification as
one line, and stops every process it started before it exits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.runif import run_if

from exporter.demo.localstack import configs
from exporter.demo.localstack.errors import LocalStackError
from exporter.demo.localstack.processes import ALERTMANAGER, PROMETHEUS

needs_binaries = run_if(prometheus=True, alertmanager=True)

RUN_ID = "demo-run"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs a Prometheus or Alertmanager (a recycled PID running something else is not)."""
    if Path("/proc/self").exists():
        try:
            return b"prometheus" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_binaries
def test_local_alerting_prints_the_spike_notification_and_stops_its_children(tmp_path: Path) -> None:
    # ~1500 steps take 12-20 s on one core; the spike at step 1000 leaves Prometheus
    # 5 finite samples before it (TrainingLossSpike wants them) and the notification
    # a few seconds plus the 8 s linger to arrive.
    argv = [
        sys.executable, "-m", "exporter.cli", "demo", "--local-alerting",
        "--max-steps", "1500", "--inject", "spike@1000", "--linger", "8",
        "--save-steps", "2000",
        "--web.listen-address", "127.0.0.1:0",
        "--output-dir", str(tmp_path / RUN_ID),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=150, check=False)
    context = f"\nstdout:\n{proc.stdout}\nstderr (tail):\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, context
    lines = proc.stdout.splitlines()

    started = [line for line in lines if line.startswith("local alerting: Prometheus http://127.0.0.1:")]
    assert len(started) == 1, context
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", started[0])]
    assert len(pids) == 2, started[0]

    fired = [line for line in lines
             if re.match(rf"\[slack\] FIRING TrainingLossSpike run={RUN_ID} severity=warning: \S", line)]
    assert fired, f"no [slack] FIRING TrainingLossSpike line for {RUN_ID}{context}"
    # A warning goes to Slack only.
    assert not [line for line in lines if line.startswith("[email]")], context
    assert any(line.startswith("local alerting: ") and "notification(s)" in line and line.endswith("stopped")
               for line in lines), context

    left = [pid for pid in pids if _alive(pid)]
    assert not left, f"prometheus / alertmanager still running after the demo exited: {left}"


def test_local_alerting_without_the_binaries_exits_2_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    proc = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "demo", "--local-alerting", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("training-exporter: error: --local-alerting:")
    assert PROMETHEUS in lines[0] and ALERTMANAGER in lines[0]
    assert not (tmp_path / "out").exists()
    assert not proc.stdout


def test_missing_project_configuration_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As in an installed wheel: the package without the repository's prometheus/ and alertmanager/.
    monkeypatch.setattr(configs, "ROOT", tmp_path)
    monkeypatch.setattr(configs, "ALERTMANAGER_CONFIG", tmp_path / "alertmanager" / "alertmanager.yml")
    monkeypatch.setattr(configs, "ALERTMANAGER_TEMPLATES", tmp_path / "alertmanager" / "templates")
    monkeypatch.setattr(configs, "RULES_DIR", tmp_path / "prometheus" / "rules")
    with pytest.raises(LocalStackError) as excinfo:
        configs.require_project_files()
    message = str(excinfo.value)
    assert "\n" not in message
    assert "alertmanager/alertmanager.yml" in message and "prometheus/rules" in message
    assert "checkout of the repository" in message
