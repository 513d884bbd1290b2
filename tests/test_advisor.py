"""The advisor: its verdicts on hand-made series, its thresholds against the alert rules, its CLI
against a real ``prometheus`` (unreachable, unknown run, waiting for data).

Real demo runs shaped to show each verdict are in test_advisor_e2e.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry
from support.runif import run_if

from exporter import metrics as m
from exporter.advisor import analysis as a
from exporter.advisor.client import AdvisorError, duration_seconds, pick_run, selector
from exporter.advisor.render import to_dict, to_json, to_text
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor
from exporter.demo.localstack import (
    ROOT,
    Process,
    free_port,
    project_rule_files,
    start_prometheus,
    stop_all,
    wait_until,
    write_prometheus_config,
)

T0 = 1_700_000_000.0


def ser(values: Sequence[float], t0: float = T0, dt: float = 1.0) -> list[tuple[float, float]]:
    return [(t0 + i * dt, float(v)) for i, v in enumerate(values)]


def linear(start: float, stop: float, n: int) -> list[float]:
    return [start + (stop - start) * i / (n - 1) for i in range(n)]


def run_data(n: int = 200, *, ema: Sequence[float] | None = None, steps_per_sample: int = 10,
             max_steps: int = 4000, state: str = "training", **kw: Any) -> a.RunData:
    """A run sampled every second for ``n`` s, ``steps_per_sample`` steps a second."""
    ema = ema if ema is not None else linear(2.0, 1.0, n)
    base = a.RunData(
        run_id="r",
        now=T0 + n,
        state=state,
        start_time=T0,
        step=ser([i * steps_per_sample for i in range(n)]),
        max_steps=ser([max_steps] * n),
        loss=ser(ema),
        loss_ema=ser(ema),
        nonfinite_losses=ser([0] * n),
    )
    return replace(base, **kw)


def evals(pairs: Sequence[tuple[int, float]], n: int, steps_per_sample: int = 10) -> dict[str, Any]:
    """training_eval_step / training_eval_loss series for evaluations (step, loss) of a run_data()."""
    step_s, loss_s = [], []
    for i in range(n):
        done = [(s, v) for s, v in pairs if s <= i * steps_per_sample]
        if done:
            step_s.append((T0 + i, float(done[-1][0])))
            loss_s.append((T0 + i, done[-1][1]))
    return {"eval_step": step_s, "eval_loss": loss_s}


def saves(every: int, n: int, steps_per_sample: int = 10) -> list[tuple[float, float]]:
    """training_checkpoint_step of a run_data() saving every ``every`` steps (absent before the first save)."""
    return [(T0 + i, float(i * steps_per_sample // every * every)) for i in range(n) if i * steps_per_sample >= every]


def report(data: a.RunData) -> a.Report:
    result = a.analyse(data)
    assert isinstance(result, a.Report)
    return result


# --------------------------------------------------------------------------- verdicts


def test_improving_run_continues_with_eta() -> None:
    r = report(run_data())
    assert r.loss.trend == "falling" and not r.loss.plateau
    assert r.loss.relative_change is not None and r.loss.relative_change < -0.01
    # A 200 s run is judged over its last half.
    assert r.loss.window_seconds == pytest.approx(199 * a.SHORT_RUN_WINDOW_FRACTION)
    assert (r.recommendation.action, r.recommendation.verdict) == ("continue", "improving")
    assert r.progress.step == 1990 and r.progress.max_steps == 4000
    assert r.progress.steps_per_second == pytest.approx(10.0)
    assert r.progress.eta_seconds == pytest.approx((4000 - 1990) / 10.0)
    assert r.progress.ratio == pytest.approx(1990 / 4000)


def test_flat_loss_is_a_plateau_and_stops_keeping_the_best_checkpoint() -> None:
    n = 200
    # Falls, then stays flat for the last 75% of the run (0.5% noise).
    ema = [*linear(2.0, 1.0, 50), *[1.0 + 0.005 * math.sin(i) for i in range(n - 50)]]
    r = report(run_data(n, ema=ema, checkpoint_step=saves(500, n),
                        **evals([(500, 1.3), (1000, 1.1), (1500, 1.12)], n)))
    assert r.loss.plateau and r.loss.trend == "flat"
    assert r.checkpoints == (500, 1000, 1500)
    assert r.recommendation.verdict == "plateau" and r.recommendation.action == "stop"
    assert r.recommendation.checkpoint == "checkpoint-1000"
    assert "TrainingLossPlateau" in r.recommendation.reason


def test_rising_loss_is_no_improvement_either() -> None:
    r = report(run_data(ema=linear(1.0, 1.3, 200)))
    assert r.loss.trend == "rising" and r.loss.plateau
    assert r.recommendation.verdict == "plateau"


def test_plateau_with_the_eval_loss_still_improving_continues() -> None:
    n = 200
    r = report(run_data(n, ema=[1.0] * n, **evals([(500, 1.3), (1000, 1.2), (1500, 1.1)], n)))
    assert r.loss.plateau
    assert (r.recommendation.action, r.recommendation.verdict) == ("continue", "improving")


def test_plateau_with_the_eval_loss_well_above_its_best_uses_the_best_checkpoint() -> None:
    n = 200
    r = report(run_data(n, ema=[1.0] * n, checkpoint_step=saves(500, n), **evals([(500, 1.0), (1000, 1.2)], n)))
    assert not r.evaluation.overfitting  # the training loss did not fall
    assert r.recommendation.action == "use_checkpoint" and r.recommendation.checkpoint_step == 500


def test_overfitting_uses_the_checkpoint_nearest_the_best_evaluation() -> None:
    n = 200
    pairs = [(400, 1.5), (800, 1.4), (1200, 1.45), (1600, 1.6)]
    r = report(run_data(n, checkpoint_step=saves(300, n), **evals(pairs, n)))
    ev = r.evaluation
    assert [(p.step, p.loss) for p in ev.points] == pairs and ev.steps_exact
    assert ev.best is not None and (ev.best.step, ev.best.loss) == (800, 1.4)
    assert ev.last is not None and ev.last.step == 1600
    assert ev.change_from_best == pytest.approx(1.6 / 1.4 - 1)
    assert ev.overfitting and ev.train_change_since_best is not None and ev.train_change_since_best < -0.01
    # Checkpoints every 300 steps: 900 is nearest to 800.
    assert ev.best_checkpoint == 900
    rec = r.recommendation
    assert (rec.action, rec.verdict, rec.checkpoint) == ("use_checkpoint", "overfitting", "checkpoint-900")
    assert "stop the run" in rec.reason and "nearest to step 800" in rec.reason


def test_eval_loss_within_five_percent_of_its_best_is_not_overfitting() -> None:
    n = 200
    r = report(run_data(n, **evals([(400, 1.5), (800, 1.4), (1600, 1.4 * 1.049)], n)))
    assert not r.evaluation.overfitting and r.recommendation.verdict == "improving"


def test_nearest_checkpoint_prefers_the_earlier_on_a_tie() -> None:
    assert a.nearest_checkpoint(200, [100, 300]) == 100
    assert a.nearest_checkpoint(260, [100, 300]) == 300
    assert a.nearest_checkpoint(5, []) is None


def test_nonfinite_loss_rolls_back_to_the_last_checkpoint_before_it() -> None:
    n = 100
    # The counter shows the NaN at t=50 (step 500): it happened after step 490.
    counter = ser([0] * 50 + [1] * 50)
    r = report(run_data(n, nonfinite_losses=counter, checkpoint_step=saves(200, n)))
    assert r.loss.nonfinite_steps == 1
    assert (r.loss.nonfinite_after_step, r.loss.nonfinite_by_step) == (490, 500)
    rec = r.recommendation
    assert (rec.action, rec.verdict, rec.checkpoint_step) == ("use_checkpoint", "nonfinite", 400)
    assert "between steps 491 and 500" in rec.reason


def test_nonfinite_loss_without_an_earlier_checkpoint_stops() -> None:
    counter = ser([0] * 5 + [2] * 95)
    r = report(run_data(100, nonfinite_losses=counter, checkpoint_step=saves(600, 100)))
    assert r.loss.nonfinite_steps == 2
    assert (r.recommendation.action, r.recommendation.verdict) == ("stop", "nonfinite")


def test_counter_restart_counts_the_new_increase() -> None:
    assert a.increases(ser([0, 1, 1, 3, 0, 2])) == [(T0 + 1, 1), (T0 + 3, 2), (T0 + 5, 2)]


def test_crashed_run_resumes_from_its_last_checkpoint() -> None:
    r = report(run_data(state="crashed", checkpoint_step=saves(500, 200)))
    assert (r.recommendation.action, r.recommendation.checkpoint_step) == ("use_checkpoint", 1500)
    assert r.recommendation.verdict == "crashed"


def test_alerts_steer_the_verdict() -> None:
    stalled = a.Alert("TrainingStalled", "critical", "firing", "Training has taken no optimizer step.",
                      recommendation="Look for a hung collective.")
    r = report(run_data(alerts=[stalled]))
    assert (r.recommendation.action, r.recommendation.verdict) == ("stop", "alert")
    assert "TrainingStalled" in r.recommendation.reason and "hung collective" in r.recommendation.reason
    # Pending, or not critical: only listed.
    r = report(run_data(alerts=[replace(stalled, state="pending"), replace(stalled, name="X", severity="warning")]))
    assert r.recommendation.verdict == "improving"
    assert [x.name for x in r.alerts] == ["X", "TrainingStalled"]  # firing first
    # The rules' own judgement counts even where the advisor's window does not see it.
    r = report(run_data(alerts=[a.Alert(a.OVERFIT_ALERT, "warning")]))
    assert r.recommendation.verdict == "overfitting" and r.recommendation.action == "stop"


def test_too_few_steps_is_too_early_to_judge() -> None:
    r = report(run_data(20, steps_per_sample=2))
    assert r.loss.trend == "unknown" and not r.loss.plateau
    assert (r.recommendation.action, r.recommendation.verdict) == ("continue", "too_early")


def test_no_step_yet_is_waiting() -> None:
    result = a.analyse(a.RunData("r", T0, state="idle", step=ser([0, 0])))
    assert isinstance(result, a.Waiting) and "not taken an optimizer step" in result.reason
    assert to_text(result).startswith("waiting for data: ")
    assert json.loads(to_json(result, "http://p"))["status"] == "waiting"


def test_completed_run_has_no_eta_and_its_rate_ignores_the_linger() -> None:
    steps = [min(i * 10, 1000) for i in range(150)]  # done at t=100, then 50 s of lingering
    r = report(run_data(150, state="completed", step=ser(steps), max_steps=1000))
    assert r.progress.eta_seconds == 0 and r.progress.steps_per_second == pytest.approx(10.0)
    assert r.progress.last_step_time == T0 + 100 and r.progress.elapsed_seconds == pytest.approx(100)
    assert "train longer" in r.recommendation.reason


def test_a_reused_run_id_is_judged_on_its_newest_branch() -> None:
    # Steps 0..90, then the process restarts from a checkpoint at step 50 and goes on to 120.
    steps = [*range(0, 100, 10), *range(50, 130, 10)]
    n = len(steps)
    data = a.RunData("r", T0 + n, state="training", start_time=T0, step=ser(steps), max_steps=ser([200] * n),
                     loss_ema=ser([1.0] * n), eval_step=ser([0] * 3 + [30] * 5 + [80] * 2 + [30] * 8),
                     eval_loss=ser([2.0] * 3 + [1.5] * 5 + [0.5] * 2 + [1.5] * 8))
    branch = a.current_branch(data)
    # Steps 60..90 of the first process were redone: gone, with the evaluation at step 80.
    assert [v for _, v in branch.step] == [0, 10, 20, 30, 40, 50, *range(50, 130, 10)]
    points, _ = a.eval_points(branch)
    assert [(p.step, p.loss) for p in points] == [(0, 2.0), (30, 1.5)]
    assert a.current_branch(run_data()) == run_data()


def test_eval_step_set_a_scrape_before_its_loss_pairs_with_the_loss() -> None:
    # A scrape landed between setting training_eval_step and training_eval_loss.
    data = a.RunData("r", T0, eval_step=ser([100, 200, 200, 200]), eval_loss=ser([1.0, 1.0, 0.8, 0.8]))
    points, exact = a.eval_points(data)
    assert exact and [(p.step, p.loss) for p in points] == [(100, 1.0), (200, 0.8)]


def test_without_eval_step_each_change_of_the_eval_loss_is_one_evaluation() -> None:
    data = a.RunData("r", T0, step=ser([90, 105, 190, 215]), eval_loss=ser([math.nan, 1.0, 1.0, 0.8]))
    points, exact = a.eval_points(data)
    assert not exact and [(p.step, p.loss) for p in points[1:]] == [(105, 1.0), (215, 0.8)]


def test_checkpoints_from_the_save_interval_when_none_are_published() -> None:
    data = a.RunData("r", T0, save_steps=300)
    assert a.checkpoint_steps(data, 1000) == (300, 600, 900)
    assert a.checkpoint_steps(replace(data, checkpoint_step=ser([500, 500, 1000])), 1000) == (500, 1000)


def test_human_duration() -> None:
    assert [a.human_duration(s) for s in (None, 2.25, 42, 61, 3 * 3600 + 120, 3 * 86400)] == [
        "-", "2.2s", "42s", "1m1s", "3h2m", "3d0h"]


# --------------------------------------------------------------------------- output


def test_json_is_strict_and_carries_the_documented_fields() -> None:
    r = report(run_data(loss=ser([1.0] * 199 + [math.nan])))
    text = to_json(r, "http://prom:9090")

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads(text, parse_constant=reject)
    assert doc["schema_version"] == 1 and doc["status"] == "ok" and doc["run_id"] == "r"
    assert doc["loss"]["last"] == "NaN"
    assert set(doc) == {"schema_version", "status", "generated_at", "prometheus", "run_id", "progress", "loss",
                        "evaluation", "checkpoints", "alerts", "recommendation"}
    assert set(doc["recommendation"]) == {"action", "checkpoint", "checkpoint_step", "verdict", "reason"}
    assert doc["recommendation"]["action"] in a.ACTIONS and doc["recommendation"]["verdict"] in a.VERDICTS
    # Every documented key is in docs/advisor.md.
    documented = (ROOT / "docs" / "advisor.md").read_text()
    flat = {f"{section}.{key}" for section, value in to_dict(r, "p").items() if isinstance(value, dict)
            for key in value}
    missing = sorted(k for k in flat | set(doc) if f"`{k}`" not in documented)
    assert not missing, f"not documented in docs/advisor.md: {missing}"


def test_text_report_names_the_verdict_and_the_alert_recommendation() -> None:
    alert = a.Alert(a.NONFINITE_ALERT, "critical", "firing", "Training loss is NaN or Inf.",
                    recommendation="Roll back to the last good checkpoint.")
    r = report(run_data(alerts=[alert], nonfinite_losses=ser([0] * 100 + [1] * 100),
                        checkpoint_step=saves(500, 200)))
    text = to_text(r)
    assert "recommendation: USE checkpoint-500 (nonfinite)" in text
    assert "[critical] TrainingLossNonFinite: Training loss is NaN or Inf." in text
    assert "Roll back to the last good checkpoint." in text
    assert all(len(line) <= 100 for line in text.splitlines())


# --------------------------------------------------------------------------- thresholds = the rules'


def _alert_expr(name: str) -> str:
    for path in project_rule_files():
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            for rule in group.get("rules", []):
                if rule.get("alert") == name:
                    return str(rule["expr"])
    raise AssertionError(f"alert {name} not found")


def _prom_duration(seconds: float) -> str:
    return f"{round(seconds / 60)}m"


def test_thresholds_mirror_the_alert_rules() -> None:
    plateau = _alert_expr(a.PLATEAU_ALERT)
    assert f"< {a.PLATEAU_MIN_IMPROVEMENT:g}" in plateau
    assert f">= {a.PLATEAU_MIN_STEPS}" in plateau
    assert f"offset {_prom_duration(a.PLATEAU_WINDOW_SECONDS)}" in plateau
    assert f"[{_prom_duration(a.PLATEAU_WINDOW_SECONDS * a.PLATEAU_AVERAGE_FRACTION)}]" in plateau
    overfit = _alert_expr(a.OVERFIT_ALERT)
    assert f"> {a.OVERFIT_EVAL_RATIO:g} * min_over_time(training_eval_loss" in overfit
    assert f"< {a.OVERFIT_TRAIN_RATIO:g} * avg_over_time(training_loss_ema" in overfit
    assert _alert_expr(a.NONFINITE_ALERT)
    rules = (ROOT / "prometheus" / "rules" / "training.rules.yml").read_text()
    eta = rules.split("record: run:training_eta_seconds:rate15m", 1)[1].split("record:", 1)[0]
    assert f"[{_prom_duration(a.ETA_RATE_WINDOW_SECONDS)}]" in eta


def test_the_series_read_are_in_the_catalogue() -> None:
    source = (ROOT / "exporter" / "advisor" / "client.py").read_text()
    read = set(re.findall(r"\b(training_[a-z_]+)\{", source))
    names = {n for spec in m.ALL for n in m.exposed_names(spec)}
    assert read and read <= names, read - names


# --------------------------------------------------------------------------- exporter side


def test_monitor_publishes_the_eval_and_checkpoint_steps() -> None:
    registry = CollectorRegistry()
    mon = TrainingMonitor(ExporterConfig(gpu=False, host=False), run_id="r", registry=registry)
    mon.begin(max_steps=10)
    for _ in range(3):
        mon.step_begin()
        mon.step_end()
    mon.observe_evaluation({"eval_loss": 0.5})
    mon.observe_checkpoint()
    assert registry.get_sample_value("training_eval_step", {"run_id": "r"}) == 3
    assert registry.get_sample_value("training_checkpoint_step", {"run_id": "r"}) == 3
    mon.observe_evaluation({"eval_loss": 0.4}, step=7)
    mon.observe_checkpoint(8)
    assert registry.get_sample_value("training_eval_step", {"run_id": "r"}) == 7
    assert registry.get_sample_value("training_checkpoint_step", {"run_id": "r"}) == 8
    assert registry.get_sample_value("training_eval_loss", {"run_id": "r"}) == 0.4


# --------------------------------------------------------------------------- client helpers


def test_newest_run_and_unknown_run() -> None:
    runs = {"old": 100.0, "new": 200.0, "idle": None}
    assert pick_run(runs, None) == "new"
    assert pick_run(runs, "idle") == "idle"
    assert pick_run({"idle": None}, None) == "idle"
    assert pick_run({}, None) is None
    with pytest.raises(AdvisorError, match=r"unknown run 'x'.*runs seen: idle, new, old"):
        pick_run(runs, "x")


def test_selector_escapes_the_run_id() -> None:
    assert selector('a"b\\c') == '{run_id="a\\"b\\\\c"}'
    assert duration_seconds("7d") == 7 * 86400 and duration_seconds("90s") == 90
    with pytest.raises(ValueError):
        duration_seconds("1h30m")


# --------------------------------------------------------------------------- CLI against a real prometheus


def advise(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter.cli", "advise", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


needs_prometheus = run_if(prometheus=True)


@pytest.fixture()
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A real prometheus on loopback scraping one port where nothing listens yet; (URL, that port)."""
    target = free_port()
    config = write_prometheus_config(tmp_path, targets=[f"127.0.0.1:{target}"],
                                     alertmanager=f"127.0.0.1:{free_port()}", rule_files=[])
    procs: list[Process] = []
    try:
        port = free_port()
        procs.append(start_prometheus(config, tmp_path, port))
        yield f"http://127.0.0.1:{port}", target
    finally:
        stop_all(procs)


def test_unreachable_prometheus_is_one_line_and_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = advise("--prometheus", url)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"training-exporter: error: cannot reach Prometheus at {url}: connection refused\n"


def test_bad_flags_are_one_line_and_exit_2() -> None:
    for args in (["--prometheus", "localhost:9090"], ["--watch", "0"], ["--lookback", "1h30m"]):
        out = advise(*args)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, (args, out.stderr)


@needs_prometheus
def test_waiting_for_data_then_unknown_run(prometheus: tuple[str, int]) -> None:
    url, target = prometheus
    # Nothing scraped yet: no run at all.
    out = advise("--prometheus", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("waiting for data: no training run in Prometheus") and out.stderr == ""

    # An exporter that has not begun training: the run exists, with no step.
    mon = TrainingMonitor(ExporterConfig(listen_address=f"127.0.0.1:{target}", gpu=False, host=False),
                          run_id="idle-run", registry=CollectorRegistry())
    mon.start()
    try:
        def scraped() -> bool:
            body = requests.get(f"{url}/api/v1/query", params={"query": 'training_state{run_id="idle-run"}'},
                                timeout=2).json()
            return bool(body["data"]["result"])

        wait_until(scraped, timeout=20, what="the idle exporter scraped")
        for args in ([], ["--run-id", "idle-run"]):
            out = advise("--prometheus", url, *args)
            assert out.returncode == 0, out.stderr
            assert out.stdout == "waiting for data: run 'idle-run' has not taken an optimizer step yet\n"
        doc = json.loads(advise("--prometheus", url, "--json").stdout)
        assert (doc["status"], doc["run_id"]) == ("waiting", "idle-run")

        started = time.monotonic()
        out = advise("--prometheus", url, "--run-id", "no-such-run")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == ("training-exporter: error: unknown run 'no-such-run': no series with that run_id "
                              "(runs seen: idle-run)\n")
        assert time.monotonic() - started < 10
    finally:
        mon.stop()
