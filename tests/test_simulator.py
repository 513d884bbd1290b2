"""The run simulator (tests/support/simulator.py) holds to docs/metrics.md: the exporter's own loss maths, what a
scrape sees, the learning-rate schedule, how runs end, die, restart and move, and the two output formats."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support.runif import run_if
from support.simulator import (
    HOUR,
    MINUTE,
    STALE,
    Exponential,
    Flat,
    Recording,
    Restart,
    RunSpec,
    Scaled,
    Then,
    Trend,
    Value,
    processes,
    series_key,
    simulate,
    up_key,
)

from exporter.stats import LossStats

CURVE = Exponential(2.5, 0.8, 20 * MINUTE)


def spec(**overrides: object) -> RunSpec:
    base = RunSpec(run_id="r", instance="h:9945", loss=CURVE, max_steps=100_000, eval_every=300,
                   eval_loss=Scaled(CURVE, 1.1), save_every=600, seed=3)
    return RunSpec(**{**base.__dict__, **overrides})


def values(rec: Recording, name: str, run: RunSpec, instance: str | None = None, **extra: str) -> list[Value]:
    return rec.series[series_key(name, run.run_id, instance or run.instance, **extra)]


def floats(column: list[Value]) -> list[float]:
    return [v for v in column if isinstance(v, float)]


def test_loss_statistics_are_the_exporters() -> None:
    """EMA, variance, recent maximum and spike ratio as exporter.stats.LossStats computes them, NaN steps
    left out, at every scrape."""
    run = spec(nan_at=(300.0, 301.0), spikes=((600.0, 8.0),))
    rec = simulate([run], 15, 20 * MINUTE)
    (proc,) = rec.runs["r"]
    stats = LossStats(ema_alpha=0.1, variance_window=50, window_seconds=60)
    recent: tuple[float, float] | None = None
    j = 0
    ema, variance = values(rec, "training_loss_ema", run), values(rec, "training_loss_variance", run)
    recent_max = values(rec, "training_loss_recent_max", run)
    ratio = values(rec, "training_loss_recent_spike_ratio", run)
    for i, s in enumerate(rec.times.tolist()):
        while j < len(proc.times) and proc.times[j] <= s:
            stats.observe(float(proc.losses[j]), float(proc.times[j]))
            j += 1
        recent = stats.recent_max(s) or recent
        assert ema[i] == (stats.ema if stats.ema is not None else None)
        var = stats.variance()
        assert (var is None and variance[i] is None) or var == pytest.approx(variance[i], rel=1e-9)
        assert (recent_max[i], ratio[i]) == (recent if recent is not None else (None, None))
    nan_steps = int(np.isnan(proc.losses).sum())
    assert nan_steps == 2
    assert floats(values(rec, "training_nonfinite_loss_total", run))[-1] == nan_steps
    assert floats(values(rec, "training_step_loss_count", run))[-1] == len(proc.losses) - nan_steps
    assert floats(values(rec, "training_step_loss_sum", run))[-1] == pytest.approx(np.nansum(proc.losses))
    assert max(floats(ratio)) > 7  # the 8x spike against the EMA before it


def test_a_scrape_sees_the_steps_that_ended_before_it() -> None:
    run = spec(noise=0.0)
    rec = simulate([run], 30, 30 * MINUTE)
    (proc,) = rec.runs["r"]
    steps = values(rec, "training_step", run)
    for i, s in enumerate(rec.times.tolist()):
        done = int((proc.times <= s).sum())
        assert steps[i] == float(done)
        if done:
            assert values(rec, "training_last_step_timestamp_seconds", run)[i] == proc.times[done - 1]
            assert values(rec, "training_loss", run)[i] == proc.losses[done - 1]
    # Noise-free: the loss is the curve at the step's x.
    assert proc.losses[99] == pytest.approx(float(CURVE(np.array([100.0]))[0]))
    # Evaluations and saves pause the steps: the step after one starts eval_seconds / save_seconds later.
    gap = proc.times[300] - proc.times[299]
    assert gap == pytest.approx(run.eval_seconds + proc.durations[300])
    assert [step for _, step in proc.saves][:2] == [600, 1200]
    assert values(rec, "training_eval_step", run)[-1] == float(proc.evals[-1][1])


def test_learning_rate_warms_up_from_zero_and_decays_to_zero() -> None:
    run = spec(max_steps=1000, warmup_steps=100, lr_peak=1e-4)
    lr = run.learning_rate(np.arange(1.0, 1001.0))
    assert lr[0] == 0.0 and lr[100] == pytest.approx(1e-4) and lr[-1] == pytest.approx(0.0, abs=1e-20)
    assert np.all(np.diff(lr[:101]) > 0) and np.all(np.diff(lr[100:]) <= 0)


def test_a_completed_run_is_scraped_completed_then_its_target_is_down() -> None:
    run = spec(max_steps=600, save_every=600, eval_every=None)
    rec = simulate([run], 15, 20 * MINUTE)
    (proc,) = rec.runs["r"]
    assert proc.completed_at is not None
    completed = values(rec, "training_state", run, state="completed")
    training = values(rec, "training_state", run, state="training")
    final = next(i for i, v in enumerate(completed) if v == 1.0)
    assert rec.times[final] >= proc.completed_at > rec.times[final - 1]
    assert completed[final + 1] is STALE and training[final + 1] is STALE and training[final - 1] == 1.0
    assert set(completed[final + 2 :]) == {None}
    assert values(rec, "training_learning_rate", run)[final] == 0.0  # the last step's, at the end of the cosine
    up = rec.series[up_key(run.instance)]
    assert up[final] == 1.0 and set(up[final + 1 :]) == {0.0}


def test_a_killed_process_leaves_its_target_down_and_its_series_stale() -> None:
    run = spec(down_at=10 * MINUTE)
    rec = simulate([run], 30, 20 * MINUTE)
    i = int(np.searchsorted(rec.times, 10 * MINUTE))
    up = rec.series[up_key(run.instance)]
    assert up[i - 1] == 1.0 and set(up[i:]) == {0.0}
    for key, column in rec.series.items():
        if key.startswith("training_") and isinstance(column[i - 1], float):
            assert column[i] is STALE and set(column[i + 1 :]) == {None}, key


def test_a_restart_on_the_same_target_resumes_from_its_checkpoint() -> None:
    run = spec(restart=Restart(at=20 * MINUTE, gap=90.0))
    rec = simulate([run], 15, 40 * MINUTE)
    first, second = rec.runs["r"]
    resume = first.saves[-1][1]
    assert second.start_step == resume and second.steps[0] == resume + 1 and second.start == 20 * MINUTE + 90
    assert second.nonfinite[-1] == 0 and second.hist_count[0] == 1  # counters and histogram start again
    up = rec.series[up_key(run.instance)]
    gap = (rec.times >= 20 * MINUTE) & (rec.times < 20 * MINUTE + 90)
    assert {up[k] for k in np.flatnonzero(gap)} == {0.0}
    steps = values(rec, "training_step", run)
    back = int(np.searchsorted(rec.times, second.start))
    assert steps[back] is not None and float(steps[back]) <= resume + 1 + 15  # type: ignore[arg-type]
    assert values(rec, "training_start_time_seconds", run)[back] == second.start
    # The series of the new process that it has not set yet (no evaluation since the restart) are absent.
    assert values(rec, "training_eval_loss", run)[back] is None


@pytest.mark.parametrize("old_target", ["gone", "down"])
def test_a_restart_on_another_target(old_target: str) -> None:
    run = spec(restart=Restart(at=20 * MINUTE, gap=60.0, instance="other:9945", old_target=old_target))  # type: ignore[arg-type]
    rec = simulate([run], 15, 40 * MINUTE)
    i = int(np.searchsorted(rec.times, 20 * MINUTE))
    old_up, new_up = rec.series[up_key("h:9945")], rec.series[up_key("other:9945")]
    assert old_up[i - 1] == 1.0
    if old_target == "gone":
        assert old_up[i] is STALE and set(old_up[i + 1 :]) == {None}
    else:
        assert set(old_up[i:]) == {0.0}
    j = int(np.searchsorted(rec.times, 20 * MINUTE + 60))
    assert set(new_up[:j]) == {None} and set(new_up[j:]) == {1.0}
    assert values(rec, "training_step", run, "other:9945")[j] is not None


def test_a_stall_stops_steps_while_the_process_serves() -> None:
    run = spec(stall=(10 * MINUTE, math.inf))
    rec = simulate([run], 30, 30 * MINUTE)
    (proc,) = rec.runs["r"]
    assert proc.times[-1] < 10 * MINUTE + 2 * run.step_seconds
    late = rec.times > 12 * MINUTE
    for name in ("training_step", "training_last_step_timestamp_seconds", "training_loss_recent_max"):
        column = values(rec, name, run)
        assert len({column[k] for k in np.flatnonzero(late)}) == 1, name
    assert set(rec.series[up_key(run.instance)]) == {1.0}


def test_end_at_terminates_a_serving_run() -> None:
    run = spec(end_at=10 * MINUTE)
    rec = simulate([run], 60, 20 * MINUTE)
    terminated = values(rec, "training_state", run, state="terminated")
    assert terminated[10] == 1.0 and terminated[11] is STALE and terminated[9] == 0.0
    up = rec.series[up_key(run.instance)]
    assert up[10] == 1.0 and up[11] is STALE and set(up[12:]) == {None}


def test_gradient_accumulation_takes_fewer_longer_steps() -> None:
    run = spec(micro_step_seconds=1.5, accumulation=16, step_jitter=0.0, eval_every=None, save_every=None)
    (proc,) = processes(run, HOUR)
    assert np.allclose(np.diff(proc.times), 24.0)
    assert np.mean(np.diff(proc.tokens)) == pytest.approx(16 * run.tokens_per_micro_step, rel=0.05)


def test_the_grad_norm_follows_its_curve_every_log_step() -> None:
    run = spec(grad_norm=Flat(2.0), grad_noise=0.0, log_every=10)
    (proc,) = processes(run, 10 * MINUTE)
    assert {v for _, v in proc.grad_logs} == {2.0}
    assert len(proc.grad_logs) == int(proc.steps[-1]) // 10


def test_curves() -> None:
    x = np.array([0.0, 1800.0, 3600.0])
    assert Trend(1.0, -0.02)(x) == pytest.approx([1.0, 0.98, 0.98**2])
    assert Then(Flat(2.0), 1800.0, 0.25)(x) == pytest.approx([2.0, 2.0, 2.5])
    assert Exponential(3.0, 1.0, 1800.0)(x) == pytest.approx([3.0, 1 + 2 / math.e, 1 + 2 / math.e**2])
    assert Scaled(Flat(2.0), 1.5)(x) == pytest.approx([3.0, 3.0, 3.0])


def test_promtool_notation() -> None:
    rec = Recording(15, np.arange(7.0), {"x": [1.0, 1.0, 1.0, None, None, STALE, 2.5]}, {})
    assert rec.promtool_series() == [{"series": "x", "values": "1.0x2 _x2 stale 2.5"}]
    rec = Recording(15, np.arange(3.0), {"x": [math.nan, None, 0.25]}, {})
    assert rec.promtool_series()[0]["values"] == "NaN _ 0.25"


@run_if(promtool=True)
def test_openmetrics_backfills(tmp_path: Path) -> None:
    """The OpenMetrics text is accepted by promtool's backfill; times held as values are shifted too."""
    run = spec(nan_at=(100.0,))
    rec = simulate([run], 30, 10 * MINUTE)
    lines = list(rec.openmetrics(1_700_000_000.0))
    assert lines[-1] == "# EOF"
    start = next(line for line in lines if line.startswith("training_start_time_seconds{"))
    assert start.split()[1] == "1700000000.0"
    source = tmp_path / "run.om"
    source.write_text("\n".join(lines) + "\n")
    done = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(source), str(tmp_path / "db")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
