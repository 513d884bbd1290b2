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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry
from support.runif import run_if

from exporter import metrics as m
from exporter import thresholds
from exporter.advisor import analysis as a
from exporter.advisor.client import (
    MAX_POINTS,
    AdvisorError,
    cumulative,
    duration_seconds,
    loss_mean_expr,
    pick_run,
    selector,
    trend_resolution,
)
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
             max_steps: int = 4000, state: str = "training", noise: float = 0.001, **kw: Any) -> a.RunData:
    """A run sampled every second for ``n`` s, ``steps_per_sample`` steps a second.

    ``ema`` is the loss curve: the EMA, the sampled loss and the 5-minute mean m
    at once; the per-step variance is that of ``noise`` x the loss (relative).
    """
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
        loss_mean=ser(ema),
        loss_variance=ser([(noise * v) ** 2 for v in ema]),
        loss_count=ser([i * steps_per_sample for i in range(n)]),
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
    # Its rates are per the same share of its window as 30 minutes of an hour, and their error grows as its
    # steps are fewer: se_c = sigma * sqrt(12 / N) / W * (1800 W / 3600) / L.
    w, n = r.loss.window_seconds, r.loss.window_steps
    assert w is not None and r.loss.rate_seconds is not None
    assert r.loss.rate_seconds == pytest.approx(a.TREND_PER_SECONDS * w / a.PLATEAU_WINDOW_SECONDS)
    assert n == 1990 - 990  # from the count at or before the window's start (t=99.5) to the last
    assert r.loss.level is not None and r.loss.rate_se == pytest.approx(
        0.001 * 1.0 * math.sqrt(12 / n) / w * r.loss.rate_seconds / r.loss.level, rel=1e-9)
    assert r.progress.step == 1990 and r.progress.max_steps == 4000
    assert r.progress.steps_per_second == pytest.approx(10.0)
    assert r.progress.eta_seconds == pytest.approx((4000 - 1990) / 10.0)
    assert r.progress.ratio == pytest.approx(1990 / 4000)


def test_trend_statistic_is_the_least_squares_line_with_the_step_noise_error() -> None:
    end = T0 + 3600
    # m falls 1e-4 per second from 2.0, one value a minute; one minute without a value (a pause), one
    # before the window; 3600 steps in it, sigma^2 = 0.01.
    mean = [(T0 - 60, 9.0), *[(T0 + 60 * i, 2.0 - 0.006 * i) for i in range(61) if i != 30], (T0 + 1800, math.nan)]
    mean.sort()
    data = a.RunData("r", end, loss_mean=mean, loss_variance=[(T0, 4.0), (end - 30, 0.01)],
                     loss_count=[(T0 - 60, 100.0), (T0, 100.0), (end, 3700.0)])
    st = a.trend_statistic(data, end, 3600, 1800)
    assert st is not None and st.rate_se is not None and st.slope_se is not None
    assert (st.samples, st.steps) == (60, 3600)
    assert st.slope == pytest.approx(-1e-4, rel=1e-9) and st.level == pytest.approx(2.0 - 0.006 * 30, rel=1e-9)
    assert st.slope_se == pytest.approx(0.1 * math.sqrt(12 / 3600) / 3600, rel=1e-12)
    assert st.rate == pytest.approx(-1e-4 * 1800 / st.level) and st.change == pytest.approx(2 * st.rate)
    assert st.rate_se == pytest.approx(st.slope_se * 1800 / st.level)
    # Too little to fit: one value, or no level.
    assert a.trend_statistic(data, T0 - 30, 3600, 1800) is None
    assert a.trend_statistic(replace(data, loss_mean=[(T0, 0.0), (T0 + 60, 0.0)]), end, 3600, 1800) is None
    # No variance yet: a slope without an error, which judges nothing.
    assert a.trend_statistic(replace(data, loss_variance=[]), end, 3600, 1800).slope_se is None  # type: ignore[union-attr]


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


def test_rising_loss_is_no_improvement_and_diverges() -> None:
    # +30% over 200 s: far more than 5% per (scaled) 30 minutes. It was a plateau verdict before the
    # divergence judgement: a rising loss is no plateau but a run that diverges.
    r = report(run_data(ema=linear(1.0, 1.3, 200)))
    assert r.loss.trend == "rising" and r.loss.plateau and r.loss.diverging
    assert r.recommendation.verdict == "diverging"
    # Rising from the first step: no checkpoint before the rise, none at the best evaluation.
    assert r.loss.rise_began_step == 0 and r.recommendation.action == "stop"


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


def test_overfitting_uses_the_saved_checkpoint_with_the_best_measured_eval_loss() -> None:
    n = 200
    pairs = [(400, 1.5), (800, 1.4), (1200, 1.45), (1600, 1.6)]
    r = report(run_data(n, checkpoint_step=saves(300, n), **evals(pairs, n)))
    ev = r.evaluation
    assert [(p.step, p.loss) for p in ev.points] == pairs and ev.steps_exact
    assert ev.best is not None and (ev.best.step, ev.best.loss) == (800, 1.4)
    assert ev.last is not None and ev.last.step == 1600
    assert ev.change_from_best == pytest.approx(1.6 / 1.4 - 1)
    assert ev.overfitting and ev.train_change_since_best is not None and ev.train_change_since_best < -0.01
    # Checkpoints every 300 steps, none at 800: 900's nearest evaluation (800, 1.4) is the lowest of the
    # saved ones' (300 and 600: 1.5 at 400; 1200: 1.45; 1500 and 1800: 1.6 at 1600).
    assert ev.best_checkpoint == 900
    assert ev.best_checkpoint_eval is not None and (ev.best_checkpoint_eval.step, ev.best_checkpoint_eval.loss) == (
        800, 1.4)
    rec = r.recommendation
    assert (rec.action, rec.verdict, rec.checkpoint) == ("use_checkpoint", "overfitting", "checkpoint-900")
    assert "stop the run" in rec.reason
    assert ("best eval at step 800 has no checkpoint; checkpoint-900 has the lowest measured eval loss of the "
            "saved ones (1.4 at step 800)") in rec.reason


def test_eval_loss_within_five_percent_of_its_best_is_not_overfitting() -> None:
    n = 200
    r = report(run_data(n, **evals([(400, 1.5), (800, 1.4), (1600, 1.4 * 1.049)], n)))
    assert not r.evaluation.overfitting and r.recommendation.verdict == "improving"


def test_a_best_evaluation_without_a_checkpoint_keeps_the_saved_one_measured_best() -> None:
    # Evaluations every 250 steps, saves every 500: the best (1250) has no checkpoint. The nearest
    # checkpoints are 1000 and 1500 (a tie the old rule broke for the earlier one, measured 2.40);
    # 1500 was measured 2.31.
    pts = [a.EvalPoint(s, v, T0 + s) for s, v in ((1000, 2.40), (1250, 2.29), (1500, 2.31), (1750, 2.5))]
    best = pts[1]
    assert a.best_checkpoint(best, pts, (500, 1000, 1500)) == (1500, pts[2])
    # A checkpoint at the best step is the one.
    assert a.best_checkpoint(best, pts, (1000, 1250, 1500)) == (1250, best)
    # Between evaluations: a checkpoint is measured by the evaluation nearest it (the earlier on a tie),
    # and on equal measured losses the checkpoint nearer its evaluation wins, then the earlier.
    assert a.measured_eval(1125, pts) == pts[0] and a.measured_eval(1130, pts) == pts[1]
    assert a.best_checkpoint(best, pts, (1200, 1300)) == (1200, pts[1])
    assert a.best_checkpoint(best, pts, (1150, 1300)) == (1300, pts[1])
    assert a.best_checkpoint(best, pts, ()) is None
    n = 200
    r = report(run_data(n, checkpoint_step=saves(500, n),
                        **evals([(1000, 2.40), (1250, 2.29), (1500, 2.31), (1750, 2.5)], n)))
    assert r.evaluation.best_checkpoint == 1500
    assert ("best eval at step 1250 has no checkpoint; checkpoint-1500 has the lowest measured eval loss of the "
            "saved ones (2.31 at step 1500)") in r.recommendation.reason


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


# --------------------------------------------------------------------------- runs shaped like real ones
#
# One optimizer step a second with 7% per-step noise, a warmup of 10 minutes,
# evaluations and checkpoint saves that pause training (one slow save of 7
# minutes leaves the 5-minute mean without a value for two minutes), scraped
# every 15 or 30 s at a random phase. Prometheus' side is emulated as the
# advisor's client reads it: instant values looked back up to 5 minutes, the
# run's series at its resolution, and m at the trend resolution as the rate
# ratio of the histogram's _sum and _count over 5 minutes (the extrapolation
# of rate cancels in the ratio: both series have the same sample times).

NOISE = 0.07
Values = Sequence[float] | npt.NDArray[np.float64]
SEEDS = range(10)
SCRAPE_INTERVALS = (15.0, 30.0)
MINUTE, HOUR = 60.0, 3600.0
LOOKBACK = 300.0  # Prometheus' lookback of an instant value
VARIANCE_WINDOW = 50  # the exporter's loss.variance_window
EMA_ALPHA = 0.1


def descent(t: float, *, top: float = 3.0, floor: float = 1.5, tau: float = 20 * MINUTE) -> float:
    """A fine-tuning loss: flat through a 10-minute warmup from a learning rate of 0, then falling to ``floor``."""
    return top if t < 10 * MINUTE else floor + (top - floor) * math.exp(-(t - 10 * MINUTE) / tau)


@dataclass
class Sim:
    """A simulated run and what Prometheus holds of it; :meth:`data` is what the advisor reads at a time."""

    train: Callable[[float], float]  # noiseless training loss by seconds since the start
    eval_curve: Callable[[int, float], float]  # noiseless eval loss by (step, seconds)
    seed: int
    scrape: float
    until: float
    eval_every: int = 600
    eval_pause: float = 90.0
    save_every: int = 600
    save_pause: float = 30.0
    eval_noise: float = 0.003
    slow_save_after: float | None = None  # one save after this time takes 7 minutes
    grad: Callable[[float], float] | None = None

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        noise = rng.standard_normal(int(self.until) + 1)
        times, losses, evals, saves = [], [], [], []
        t, step, slow = 0.0, 0, self.slow_save_after
        while t < self.until:
            t += 1.0
            step += 1
            times.append(t)
            losses.append(self.train(t) * (1 + NOISE * noise[step]))
            if step % self.eval_every == 0:
                evals.append((t, step, self.eval_curve(step, t) * (1 + self.eval_noise * rng.standard_normal())))
                t += self.eval_pause
            if step % self.save_every == 0:
                saves.append((t, step))
                t += self.save_pause
                if slow is not None and t >= slow:
                    t, slow = t + 7 * MINUTE - self.save_pause, None
        self.step_times = np.array(times)
        x = np.array(losses)
        self.losses = x
        self.evals = evals
        self.saves = saves
        csum, csq = np.concatenate([[0.0], np.cumsum(x)]), np.concatenate([[0.0], np.cumsum(x * x)])
        ema = np.empty_like(x)
        ema[0] = x[0]
        for i in range(1, len(x)):
            ema[i] = EMA_ALPHA * x[i] + (1 - EMA_ALPHA) * ema[i - 1]
        self.scrapes = np.arange(rng.uniform(0, self.scrape), t, self.scrape)
        k = np.searchsorted(self.step_times, self.scrapes, side="right")  # steps done at each scrape
        n = np.minimum(k, VARIANCE_WINDOW)
        with np.errstate(invalid="ignore", divide="ignore"):
            s1, s2 = csum[k] - csum[k - n], csq[k] - csq[k - n]
            self.variance = np.where(n >= 2, (s2 - s1 * s1 / np.maximum(n, 1)) / (n - 1), np.nan)
        self.count, self.sum, self.k = k.astype(float), csum[k], k
        self.ema = np.where(k > 0, ema[np.maximum(k - 1, 0)], np.nan)
        self.last_loss = np.where(k > 0, x[np.maximum(k - 1, 0)], np.nan)

    def step_at(self, t: float) -> int:
        return int(np.searchsorted(self.step_times, t, side="right"))

    def _series(self, values: Values, grid: npt.NDArray[np.float64]) -> list[tuple[float, float]]:
        """An instant query at each time of ``grid``: the last scrape at or before it, within the lookback."""
        v = np.asarray(values, dtype=float)
        i = np.searchsorted(self.scrapes, grid, side="right") - 1
        ok = i >= 0
        ok[ok] &= (self.scrapes[i[ok]] >= grid[ok] - LOOKBACK) & np.isfinite(v[i[ok]])
        return [(T0 + float(g), float(x)) for g, x in zip(grid[ok], v[i[ok]], strict=True)]

    def _at_scrapes(self, events: Sequence[tuple[float, ...]], pick: Callable[[int], float]) -> list[float]:
        """Per scrape: pick(index of the last event at or before it), NaN before the first."""
        when = np.array([e[0] for e in events]) if events else np.array([])
        idx = np.searchsorted(when, self.scrapes, side="right") - 1
        return [pick(int(i)) if i >= 0 else math.nan for i in idx]

    def data(self, now: float) -> a.RunData:
        """What the advisor's client reads at ``now`` seconds into the run."""
        resolution = max(1.0, math.ceil(now / MAX_POINTS))
        grid = np.arange(-resolution, now + 1e-9, resolution)
        step_s = trend_resolution(now)
        first = math.floor((T0 - resolution) / step_s) * step_s - T0
        trend_grid = np.arange(first, now + 1e-9, step_s)
        means = []
        for g in trend_grid:
            i0 = int(np.searchsorted(self.scrapes, g - LOOKBACK, side="left"))
            i1 = int(np.searchsorted(self.scrapes, g, side="right")) - 1
            if i1 > i0 and self.count[i1] > self.count[i0]:
                means.append((T0 + g, (self.sum[i1] - self.sum[i0]) / (self.count[i1] - self.count[i0])))
        best, low = [], None
        for e in self.evals:  # the exporter's best so far after each evaluation
            low = e if low is None or (e[2], e[1]) < (low[2], low[1]) else low
            best.append(low)
        grad = [self.grad(self.step_times[k - 1]) if k and self.grad else math.nan for k in self.k]
        return a.RunData(
            run_id="sim",
            now=T0 + now,
            state="training",
            start_time=T0,
            step=self._series(self.count, grid),
            max_steps=self._series([1e6] * len(self.scrapes), grid),
            loss=self._series(self.last_loss, grid),
            loss_ema=self._series(self.ema, grid),
            loss_mean=means,
            loss_variance=self._series(self.variance, trend_grid),
            loss_count=cumulative([({}, self._series(self.count, trend_grid))]),
            grad_norm=self._series(grad, trend_grid),
            eval_loss=self._series(self._at_scrapes(self.evals, lambda i: self.evals[i][2]), grid),
            eval_step=self._series(self._at_scrapes(self.evals, lambda i: self.evals[i][1]), grid),
            eval_best_loss=self._series(self._at_scrapes(self.evals, lambda i: best[i][2]), grid),
            eval_best_step=self._series(self._at_scrapes(self.evals, lambda i: best[i][1]), grid),
            checkpoint_step=self._series(self._at_scrapes(self.saves, lambda i: self.saves[i][1]), grid),
            nonfinite_losses=self._series([0.0] * len(self.scrapes), grid),
        )


def sims(**spec: Any) -> Iterator[Sim]:
    for scrape in SCRAPE_INTERVALS:
        for seed in SEEDS:
            yield Sim(seed=seed, scrape=scrape, **spec)


FLAT_FROM = 2 * HOUR


def test_the_slope_error_is_that_of_the_step_noise() -> None:
    """se_c from sqrt(12 / N) matches the spread of c on a flat loss: the bounds mean what they say.

    sigma = 7% of the loss, about 2,900 steps in the hour (evaluations and saves pause it):
    se_c = 0.07 * sqrt(12 / 2900) * 1800 / 3600 = 0.23% per 30 minutes. The spread of c over
    the seeds is estimated from 24 runs (each judged at two times an hour apart, independent
    windows), so its own relative error is about 1 / sqrt(2 * 48) = 10%: a ratio outside
    0.7..1.3 would be a wrong formula (or a wrong m), not chance.
    """
    rates, errors = [], []
    for seed in range(24):
        sim = Sim(train=lambda t: 1.5, eval_curve=lambda s, t: 1.6, seed=100 + seed, scrape=30.0, until=2.5 * HOUR)
        for now in (1.25 * HOUR, 2.25 * HOUR):
            data = sim.data(now)
            end = T0 + now
            stat = a.trend_statistic(data, end, a.PLATEAU_WINDOW_SECONDS, a.TREND_PER_SECONDS)
            assert stat is not None and stat.rate_se is not None
            assert 2500 < stat.steps < 3300, stat.steps
            rates.append(stat.rate)
            errors.append(stat.rate_se)
    se = float(np.mean(errors))
    assert se == pytest.approx(NOISE * math.sqrt(12 / 2900) / 2, rel=0.15)
    spread = float(np.sqrt(np.mean(np.square(rates))))  # the true c is 0
    assert 0.7 < spread / se < 1.3, (spread, se)


def test_an_hour_of_flat_loss_is_never_continue() -> None:
    """After a 2 h descent the loss is flat (eval loss too); asked 65 min to 2 h into the flat stretch,
    the advisor never says continue, for any seed or scrape interval."""
    held = 0
    def flat(t: float) -> float:
        return descent(min(t, FLAT_FROM))

    for sim in sims(train=flat, eval_curve=lambda s, t: 1.1 * flat(t), until=FLAT_FROM + 2 * HOUR + MINUTE,
                    slow_save_after=FLAT_FROM + 30 * MINUTE):
        for minutes in (65, 80, 95, 110, 120):
            r = report(sim.data(FLAT_FROM + minutes * MINUTE))
            what = (sim.seed, sim.scrape, minutes, r.loss, r.recommendation)
            assert r.recommendation.action != "continue", what
            assert r.loss.plateau and r.loss.trend == "flat" and not r.loss.diverging, what
            assert r.recommendation.verdict == "plateau" and r.loss.window_seconds == a.PLATEAU_WINDOW_SECONDS
            assert r.loss.window_steps is not None and r.loss.window_steps >= a.PLATEAU_MIN_STEPS
            held += 1
    assert held == len(SEEDS) * len(SCRAPE_INTERVALS) * 5


def slow(t: float) -> float:
    """Falling 1.5% per 30 minutes after FLAT_FROM."""
    return descent(min(t, FLAT_FROM)) * 0.985 ** (max(t - FLAT_FROM, 0.0) / (30 * MINUTE))


def test_a_slowly_improving_run_continues() -> None:
    """-1.5% per 30 min with 7% noise: the improvement's bound is about 1.5% + 2 x 0.23%, well above 1%."""
    for sim in sims(train=slow, eval_curve=lambda s, t: 1.1 * slow(t), until=FLAT_FROM + 2 * HOUR + MINUTE):
        for minutes in (65, 90, 120):
            r = report(sim.data(FLAT_FROM + minutes * MINUTE))
            what = (sim.seed, sim.scrape, minutes, r.loss, r.recommendation)
            assert (r.recommendation.action, r.recommendation.verdict) == ("continue", "improving"), what
            assert not r.loss.plateau and not r.loss.diverging and r.loss.falling, what
            # The estimate is the slope put in, within 4 standard errors.
            assert r.loss.rate is not None and r.loss.rate_se is not None
            assert abs(r.loss.rate - math.log(0.985)) < 4 * r.loss.rate_se, what


def overfit_eval(step: int, t: float) -> float:
    """Falls to its best around step 4000, then rises 10% per 3000 steps (the model memorises)."""
    return 1.8 * (1 + 0.6 * math.exp(-step / 1000)) + 0.18 * max(0, step - 4000) / 3000


def test_overfitting_uses_the_checkpoint_of_the_best_evaluation() -> None:
    """Training still falls (~1.4% per 30 min) while the eval loss is 10% above its best: overfitting, and the
    checkpoint is the one of the lowest measured eval loss (evaluations and saves every 500 steps)."""
    for sim in sims(train=lambda t: descent(t, tau=40 * MINUTE), eval_curve=overfit_eval, until=9300.0,
                    eval_every=500, save_every=500):
        r = report(sim.data(9300.0))
        _, best_step, best_loss = min(sim.evals, key=lambda e: (e[2], e[1]))
        what = (sim.seed, sim.scrape, r.loss, r.evaluation.best, r.recommendation)
        assert r.evaluation.best is not None and (r.evaluation.best.step, r.evaluation.best.loss) == (
            best_step, pytest.approx(best_loss, rel=1e-12)), what
        assert r.evaluation.overfitting and r.loss.falling and not r.loss.diverging, what
        rec = r.recommendation
        assert (rec.action, rec.verdict, rec.checkpoint_step) == ("use_checkpoint", "overfitting", best_step), what
        assert "saved at the best evaluation" in rec.reason


RISE_FROM = 3 * HOUR


def diverging_loss(t: float) -> float:
    """A 3 h descent (still falling ~1% per 30 min at its end), then rising 10% per 30 minutes."""
    base = descent(min(t, RISE_FROM), tau=40 * MINUTE)
    return base * (1 + 0.10 * max(t - RISE_FROM, 0.0) / (30 * MINUTE))


def test_a_divergence_is_not_overfitting_and_rolls_back_to_before_the_rise() -> None:
    """The loss rises 10% per 30 min for 30-45 min after a long descent, the gradient norm with it, the eval
    loss too: diverging (c - 2 se_c is about 10% - 2 x 0.6%), never overfitting (over the hour the training
    loss does not fall), and the checkpoint is one saved before the rise."""
    for sim in sims(train=diverging_loss, eval_curve=lambda s, t: 1.1 * diverging_loss(t),
                    until=RISE_FROM + 45 * MINUTE + 1, eval_every=600, save_every=500,
                    grad=lambda t: 1.0 + 2.0 * max(t - RISE_FROM, 0.0) / (30 * MINUTE)):
        rise_step = sim.step_at(RISE_FROM)
        # Earliest the rise's start can be put: where the noiseless 5-minute mean is within 2 standard
        # errors (the rule's threshold) plus 4 of noise of its lowest; sigma_m = 7% x L / sqrt(250 steps).
        sigma_m = NOISE * diverging_loss(RISE_FROM) / math.sqrt(250)
        early = next(t for t in range(int(RISE_FROM)) if descent(t - 150, tau=40 * MINUTE)
                     <= diverging_loss(RISE_FROM) + 6 * sigma_m)
        lowest = max(s for _, s in sim.saves if s <= sim.step_at(early - LOOKBACK - MINUTE))
        before = report(sim.data(RISE_FROM - 5 * MINUTE))
        assert not before.loss.diverging, (sim.seed, sim.scrape, before.loss)
        for minutes in (30, 45):
            r = report(sim.data(RISE_FROM + minutes * MINUTE))
            rec = r.recommendation
            what = (sim.seed, sim.scrape, minutes, r.loss, rec)
            assert r.loss.diverging and not r.evaluation.overfitting and rec.verdict == "diverging", what
            assert r.loss.rise_window_seconds == a.DIVERGE_WINDOW_SECONDS
            assert r.loss.grad_norm_ratio is not None and r.loss.grad_norm_ratio > 1.5, what
            assert rec.action == "use_checkpoint" and rec.checkpoint_step is not None, what
            assert lowest <= rec.checkpoint_step <= rise_step, (what, lowest, rise_step)
            assert "lower the learning rate" in rec.reason and "before the rise began" in rec.reason


def ushaped_eval(step: int, t: float) -> float:
    return 2.0 + 0.3 * ((step - 1500) / 1500) ** 2


def test_a_best_evaluation_between_two_scrapes_is_found() -> None:
    """Evaluations every 10 steps (11 s), faster than the scrapes: most never reach training_eval_loss, the
    exporter's training_eval_best_step / _loss still name the best."""
    hidden = 0
    for sim in sims(train=lambda t: descent(t), eval_curve=ushaped_eval, until=HOUR, eval_every=10,
                    eval_pause=1.0, save_every=100, save_pause=2.0, eval_noise=0.01):
        data = sim.data(HOUR)
        _, best_step, best_loss = min(sim.evals, key=lambda e: (e[2], e[1]))
        hidden += best_step not in {int(v) for _, v in data.eval_step}
        r = report(data)
        assert r.evaluation.best is not None, (sim.seed, sim.scrape)
        assert (r.evaluation.best.step, r.evaluation.best.loss) == (best_step, best_loss), (sim.seed, sim.scrape)
        assert r.evaluation.best_checkpoint is not None
    # One evaluation every 11 s: at a 15 s scrape about one in four is never scraped, at 30 s about two in
    # three, and so is the best in about that share of the runs (5 or so of the 12).
    assert hidden >= 2


def test_a_best_evaluation_without_a_checkpoint_keeps_the_measured_best_of_the_saved_ones() -> None:
    """Evaluations every 250 steps, saves every 500: the eval loss falls steeply to its best at an odd
    multiple of 250 (no checkpoint) and rises slowly after it, so the checkpoint after the best was measured
    lower than the one before (which the nearest-step rule, earlier on a tie, kept)."""
    def curve(step: int, t: float) -> float:
        return 2.0 * (1 + 0.2 * max(0, 3750 - step) / 1000 + 0.1 * max(0, step - 3750) / 1000)

    for sim in sims(train=lambda t: descent(t, tau=40 * MINUTE), eval_curve=curve, until=6000.0,
                    eval_every=250, save_every=500):
        r = report(sim.data(6000.0))
        measured = {s: v for _, s, v in sim.evals}
        _, best_step, _ = min(sim.evals, key=lambda e: (e[2], e[1]))
        saved = [s for _, s in sim.saves]
        assert best_step == 3750 and best_step not in saved, (sim.seed, sim.scrape, best_step)
        expected = min(saved, key=lambda s: (measured[s], s))
        assert expected == 4000
        ev = r.evaluation
        assert ev.best_checkpoint == expected and ev.best_checkpoint_eval is not None
        assert ev.best_checkpoint_eval.step == expected
        assert (f"best eval at step {best_step} has no checkpoint; checkpoint-{expected} has the lowest measured "
                f"eval loss of the saved ones ({measured[expected]:.4g} at step {expected})") in r.recommendation.reason



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
    """A duration as the rules write it (1h, 30m, 5m)."""
    return f"{round(seconds / 3600)}h" if seconds % 3600 == 0 else f"{round(seconds / 60)}m"


def _mean_expr() -> str:
    w = a.TREND_MEAN_WINDOW
    return f"(rate(training_step_loss_sum[{w}]) / (rate(training_step_loss_count[{w}]) > 0))"


def test_thresholds_mirror_the_alert_rules() -> None:
    m_expr, res = _mean_expr(), _prom_duration(a.TREND_RESOLUTION_SECONDS)
    # The one statistic: every rule that judges the trend uses the same m, subquery step and SE factor.
    for entry in (thresholds.LOSS_PLATEAU, thresholds.LOSS_DIVERGING, thresholds.OVERFITTING):
        assert entry.duration("average") == a.TREND_MEAN_WINDOW
        assert entry.seconds("resolution") == a.TREND_RESOLUTION_SECONDS
        assert entry.value("steps_factor") == a.TREND_STEPS_FACTOR
    assert thresholds.LOSS_DIVERGING.value("per_seconds") == a.TREND_PER_SECONDS
    assert a.DIVERGE_PER_SECONDS == a.TREND_PER_SECONDS
    cases = [
        (a.PLATEAU_ALERT, a.PLATEAU_WINDOW_SECONDS, a.PLATEAU_Z,
         [f"< {a.PLATEAU_MIN_IMPROVEMENT:g}", f"[{_prom_duration(a.PLATEAU_WINDOW_SECONDS)}]) >= {a.PLATEAU_MIN_STEPS}",
          f"* {a.TREND_PER_SECONDS:g}"]),
        (a.DIVERGE_ALERT, a.DIVERGE_WINDOW_SECONDS, a.DIVERGE_Z,
         [f"> {a.DIVERGE_MIN_RISE:g}", f"[{_prom_duration(a.DIVERGE_WINDOW_SECONDS)}]) >= {a.DIVERGE_MIN_STEPS}",
          f"* {a.DIVERGE_PER_SECONDS:g}"]),
        (a.OVERFIT_ALERT, a.OVERFIT_WINDOW_SECONDS, a.OVERFIT_Z,
         [f"> {a.OVERFIT_EVAL_RATIO:g} * min_over_time(training_eval_loss",
          f"(training_eval_loss < +Inf)[{_prom_duration(a.OVERFIT_LAST_EVAL_SECONDS)}:]", "< 0"]),
    ]
    for alert, window_s, z, pieces in cases:
        expr = " ".join(_alert_expr(alert).split())
        w = _prom_duration(window_s)
        se = (f"{z:g} * sqrt(training_loss_variance) * sqrt({a.TREND_STEPS_FACTOR:g} / "
              f"increase(training_step_loss_count[{w}])) / {window_s:g}")
        for piece in [f"deriv({m_expr}[{w}:{res}])", se, *pieces]:
            assert piece in expr, (alert, piece, expr)
        if alert != a.OVERFIT_ALERT:
            assert f"avg_over_time({m_expr}[{w}:{res}])" in expr, alert
    # The advisor's m is the rules' m, pooled over the run's series.
    assert f"[{a.TREND_MEAN_WINDOW}]))" in loss_mean_expr("") and "> 0)" in loss_mean_expr("")
    assert a.NONFINITE_ALERT and _alert_expr(a.NONFINITE_ALERT)
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


def test_the_trend_series_resolution_and_step_count() -> None:
    # The rules' 1m once a run has a full window; a shorter one keeps 60 values in its shorter window.
    assert trend_resolution(3 * 3600) == 60 and trend_resolution(2 * 3600) == 60
    assert trend_resolution(1.5 * 3600) == 45 and trend_resolution(200) == 1 and trend_resolution(5) == 1
    # One count from several counters: a restart from 0 (the drop) and a second target both add steps.
    first = [(0.0, 5.0), (60.0, 10.0), (120.0, 2.0), (180.0, 4.0)]
    second = [(120.0, 3.0), (180.0, 6.0), (240.0, math.nan)]
    assert cumulative([({}, first), ({}, second)]) == [(0.0, 5.0), (60.0, 10.0), (120.0, 15.0), (180.0, 20.0)]
    assert a.counter_increase([(0.0, 5.0), (60.0, 10.0), (120.0, 2.0), (180.0, 4.0)], 30.0, 180.0) == 9.0


def test_the_exporters_best_counts_only_from_the_first_trainer_evaluation() -> None:
    # Before any Trainer evaluation the best gauges hold the fixed evaluation's answer cross-entropy (0.3 at
    # step 5): not an eval loss. Then evaluations at 10 (1.2), 20 (1.0, overwritten before a scrape), 30 (1.1).
    data = a.RunData("r", T0 + 5, eval_step=ser([10, 10, 30]), eval_loss=ser([1.2, 1.2, 1.1]),
                     eval_best_step=ser([5, 10, 20], t0=T0 - 1), eval_best_loss=ser([0.3, 1.2, 1.0], t0=T0 - 1))
    points = a.best_gauge_points(data)
    assert [(p.step, p.loss) for p in points] == [(10, 1.2), (20, 1.0)]
    ev = a.evaluation(data, (10, 20, 30), a.LossTrend(None, None, "unknown", None, None, None, False), T0 + 5)
    assert [(p.step, p.loss) for p in ev.points] == [(10, 1.2), (20, 1.0), (30, 1.1)]
    assert ev.best == points[1] and ev.best_checkpoint == 20 and ev.last is not None and ev.last.step == 30


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
