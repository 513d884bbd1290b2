"""The advisor's judgements: pure functions over series already fetched from Prometheus.

Nothing here does I/O, so every verdict can be tested with hand-made series.
A series is a list of ``(unix time, value)`` pairs in time order, as a
Prometheus range query returns them (one per resolution step).

Where the alerting rules make the same judgement, the thresholds are theirs, read
from their entries in ``exporter/thresholds.py`` (which tests/test_rules.py holds to
the rules in ``prometheus/rules/*.alerts.yml``), and so is the statistic they
judge, the loss trend of :func:`trend_statistic`:

- m(t), the mean of every finite step loss of the last 5 minutes (the
  exporter's ``training_step_loss`` histogram, ``RunData.loss_mean``), sampled
  every minute; over a window W its least-squares slope b and its mean L; N the
  steps in the window; se_b = sqrt(training_loss_variance) * sqrt(12 / N) / W;
  the relative change per 30 minutes c = b * 1800 / L and se_c = se_b * 1800 / L.
- plateau (``TrainingLossPlateau``): -c + 2 se_c < 1% over W = 1h, with at least
  100 steps in it, at the last step or at any minute of the rule's
  ``keep_firing_for`` (15m) before it, so that a noise dip does not end it;
- divergence (``TrainingLossDiverging``): c - 2 se_c > 5% over W = 30m, with at
  least 50 steps in it;
- overfitting (``TrainingOverfitting``): the last finite eval loss (within an
  hour) is more than 1.05 x its best while the training loss falls
  significantly over W = 1h (b + 2 se_b < 0): a rising training loss is
  divergence, never overfitting.

A run shorter than two windows is judged over its last half (``trend_window``),
and its rates are per the same share of that window (per 15 minutes over a
30-minute window, where a full one states them per 30 minutes), so that the
thresholds keep their meaning. The ETA (``run:training_eta_seconds:rate15m``)
is the remaining steps at the step rate of the last 15 minutes of stepping.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from exporter import thresholds

Sample = tuple[float, float]
Series = Sequence[Sample]

_PLATEAU = thresholds.LOSS_PLATEAU
_DIVERGING = thresholds.LOSS_DIVERGING
_OVERFITTING = thresholds.OVERFITTING

# The statistic (shared by the three rules: tests/test_advisor.py holds them to one value each).
TREND_MEAN_WINDOW = _PLATEAU.duration("average")  # m is a rate over this ("5m")
TREND_MEAN_SECONDS = _PLATEAU.seconds("average")
TREND_RESOLUTION_SECONDS = _PLATEAU.seconds("resolution")  # m is sampled this often over a window
TREND_STEPS_FACTOR = _PLATEAU.value("steps_factor")  # Var(b) = 12 sigma^2 / (N W^2)
TREND_PER_SECONDS = _PLATEAU.value("per_seconds")  # c is stated per 30 minutes

PLATEAU_MIN_IMPROVEMENT = _PLATEAU.value("min_improvement")
PLATEAU_Z = _PLATEAU.value("z")
PLATEAU_MIN_STEPS = int(_PLATEAU.value("min_steps"))
PLATEAU_WINDOW_SECONDS = _PLATEAU.seconds("window")
# The rule keeps firing this long after its condition last held (noise dips do not end a plateau).
PLATEAU_KEEP_SECONDS = _PLATEAU.keep_firing_for_seconds
DIVERGE_MIN_RISE = _DIVERGING.value("min_rise")
DIVERGE_Z = _DIVERGING.value("z")
DIVERGE_MIN_STEPS = int(_DIVERGING.value("min_steps"))
DIVERGE_WINDOW_SECONDS = _DIVERGING.seconds("window")
DIVERGE_PER_SECONDS = _DIVERGING.value("per_seconds")
OVERFIT_EVAL_RATIO = _OVERFITTING.value("eval_ratio")
OVERFIT_Z = _OVERFITTING.value("z")
OVERFIT_WINDOW_SECONDS = _OVERFITTING.seconds("window")
OVERFIT_LAST_EVAL_SECONDS = _OVERFITTING.seconds("last_eval")
# Runs shorter than 2 windows are judged over their last half.
SHORT_RUN_WINDOW_FRACTION = thresholds.SHORT_RUN_WINDOW_FRACTION.value
ETA_RATE_WINDOW_SECONDS = thresholds.ETA_RATE_WINDOW_SECONDS.value

NONFINITE_ALERT = thresholds.LOSS_NONFINITE.alert
OVERFIT_ALERT = _OVERFITTING.alert
PLATEAU_ALERT = _PLATEAU.alert
DIVERGE_ALERT = _DIVERGING.alert
# Alerts whose judgement the advisor makes itself; other critical alerts stop a run.
JUDGED_ALERTS = frozenset({NONFINITE_ALERT, OVERFIT_ALERT, PLATEAU_ALERT, DIVERGE_ALERT})
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}

ACTIONS = ("continue", "stop", "use_checkpoint")
VERDICTS = ("improving", "plateau", "diverging", "overfitting", "nonfinite", "crashed", "alert", "too_early")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Alert:
    """One alert of the run as Prometheus reports it (``/api/v1/alerts``)."""

    name: str
    severity: str = ""
    state: str = "firing"  # firing | pending
    summary: str = ""
    description: str = ""
    recommendation: str = ""
    active_at: str | None = None
    value: str | None = None

    @property
    def firing(self) -> bool:
        return self.state == "firing"


@dataclass(frozen=True)
class RunData:
    """What the advisor knows about one run: range-query series over its lifetime, its state, its alerts."""

    run_id: str
    now: float
    state: str | None = None
    start_time: float | None = None
    step: Series = ()
    max_steps: Series = ()
    loss: Series = ()
    loss_ema: Series = ()
    # The trend statistic's inputs, sampled every TREND_RESOLUTION_SECONDS (finer in a short run):
    # m, the mean finite step loss over TREND_MEAN_WINDOW (absent where no step was taken in it);
    loss_mean: Series = ()
    # training_loss_variance (of the last 50 finite step losses);
    loss_variance: Series = ()
    # the finite step losses counted so far (training_step_loss_count, never decreasing).
    loss_count: Series = ()
    grad_norm: Series = ()
    eval_loss: Series = ()
    eval_step: Series = ()
    # The exporter's record of the best evaluation: a best that Prometheus never scraped in eval_loss shows here.
    eval_best_loss: Series = ()
    eval_best_step: Series = ()
    checkpoint_step: Series = ()
    nonfinite_losses: Series = ()
    alerts: Sequence[Alert] = ()
    # Fallback when the exporter publishes no training_checkpoint_step: checkpoints every N steps.
    save_steps: int | None = None


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Progress:
    state: str
    step: int
    max_steps: int | None
    ratio: float | None
    start_time: float | None
    last_step_time: float
    elapsed_seconds: float | None
    steps_per_second: float | None
    eta_seconds: float | None


@dataclass(frozen=True)
class TrendStat:
    """The loss trend over one window: the least-squares line through m and its standard error."""

    window_seconds: float  # W
    per_seconds: float  # the rates are per this long
    samples: int  # values of m in the window
    steps: int  # N
    level: float  # L, the mean of m
    slope: float  # b, per second
    slope_se: float | None  # se_b; None without a variance or a step

    @property
    def rate(self) -> float:
        """c: the relative change per ``per_seconds`` (negative: improving)."""
        return self.slope * self.per_seconds / self.level

    @property
    def rate_se(self) -> float | None:
        return None if self.slope_se is None else self.slope_se * self.per_seconds / self.level

    @property
    def change(self) -> float:
        """The fitted relative change over the whole window."""
        return self.slope * self.window_seconds / self.level


@dataclass(frozen=True)
class LossTrend:
    last: float | None
    ema: float | None
    trend: str  # falling | flat | rising | unknown
    relative_change: float | None  # fitted change over the window
    window_seconds: float | None
    window_steps: int | None
    plateau: bool
    nonfinite_steps: int = 0
    # The first non-finite loss came after step `nonfinite_after_step` and at or before `nonfinite_by_step`.
    nonfinite_after_step: int | None = None
    nonfinite_by_step: int | None = None
    # The plateau window's statistic: c, se_c, what c is per, L.
    rate: float | None = None
    rate_se: float | None = None
    rate_seconds: float | None = None
    level: float | None = None
    # -c + z se_c: at the latest time the plateau held (within the rule's keep_firing_for), else now.
    plateau_bound: float | None = None
    plateau_at: float | None = None
    # The training loss falls significantly over the overfitting window (b + z se_b < 0).
    falling: bool = False
    # Divergence: the statistic over its own (shorter) window.
    diverging: bool = False
    rise_rate: float | None = None
    rise_rate_se: float | None = None
    rise_rate_seconds: float | None = None
    rise_window_seconds: float | None = None
    rise_window_steps: int | None = None
    # Diverging: the step at the lowest m before the rise, and the gradient norm now / a rise window earlier.
    rise_began_step: int | None = None
    grad_norm_ratio: float | None = None


@dataclass(frozen=True)
class EvalPoint:
    step: int
    loss: float
    time: float


@dataclass(frozen=True)
class Evaluation:
    points: tuple[EvalPoint, ...] = ()
    best: EvalPoint | None = None
    last: EvalPoint | None = None
    best_checkpoint: int | None = None
    # The evaluation that measured best_checkpoint: best itself when it has a checkpoint, else the one at or
    # nearest the chosen checkpoint's step.
    best_checkpoint_eval: EvalPoint | None = None
    change_from_best: float | None = None
    train_change_since_best: float | None = None
    overfitting: bool = False
    # False when eval steps are read off training_step (no training_eval_step series): approximate.
    steps_exact: bool = True


@dataclass(frozen=True)
class Recommendation:
    action: str  # one of ACTIONS
    verdict: str  # one of VERDICTS
    reason: str
    # The checkpoint to use (use_checkpoint) or to keep (stop, continue), when one is known.
    checkpoint_step: int | None = None

    @property
    def checkpoint(self) -> str | None:
        return None if self.checkpoint_step is None else f"checkpoint-{self.checkpoint_step}"


@dataclass(frozen=True)
class Report:
    run_id: str
    generated_at: float
    progress: Progress
    loss: LossTrend
    evaluation: Evaluation
    checkpoints: tuple[int, ...]
    alerts: tuple[Alert, ...]
    recommendation: Recommendation


@dataclass(frozen=True)
class Waiting:
    """Nothing to judge yet: no run in Prometheus, or a run that has not taken a step."""

    run_id: str | None
    reason: str
    generated_at: float = field(default=0.0)


# --------------------------------------------------------------------------- series helpers


def last(series: Series) -> Sample | None:
    return series[-1] if series else None


def value_at(series: Series, t: float) -> Sample | None:
    """The last sample at or before ``t`` (None before the first)."""
    found = None
    for sample in series:
        if sample[0] > t:
            break
        found = sample
    return found


def active_end(series: Series) -> float | None:
    """When the series took its last value: for the step series, when the last step ended
    (a completed run lingering, or a stalled one, adds samples but no steps)."""
    if not series:
        return None
    t, v = series[-1]
    for ts, value in reversed(series):
        if value != v:
            break
        t = ts
    return t


def increases(series: Series) -> list[tuple[float, float]]:
    """(time, amount) of each increase of a counter; a drop is a restart from 0."""
    out: list[tuple[float, float]] = []
    previous = 0.0
    for t, v in series:
        if not math.isfinite(v):
            continue
        grew = v - previous if v >= previous else v
        if grew > 0:
            out.append((t, grew))
        previous = v
    return out


def human_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def _int(value: float | None) -> int | None:
    return int(value) if value is not None and math.isfinite(value) else None


def finite_at(series: Series, t: float) -> Sample | None:
    """The last finite sample at or before ``t``."""
    found = None
    for sample in series:
        if sample[0] > t:
            break
        if math.isfinite(sample[1]):
            found = sample
    return found


def counter_increase(series: Series, start: float, stop: float) -> float:
    """How much a counter rose in ``(start, stop]``: from its last sample at or before ``start`` (else its first
    sample after it) to its last at or before ``stop``; a drop is a restart from 0."""
    total, previous = 0.0, None
    for t, v in series:
        if t > stop:
            break
        if not math.isfinite(v):
            continue
        if t > start and previous is not None:
            total += v - previous if v >= previous else v
        previous = v
    return total


# --------------------------------------------------------------------------- judgements


def progress(data: RunData) -> Progress:
    steps = [(t, v) for t, v in data.step if math.isfinite(v)]
    t_last, step = steps[-1]
    end = active_end(steps) or t_last
    max_steps = _int((last(data.max_steps) or (0.0, math.nan))[1])
    ratio = min(step / max_steps, 1.0) if max_steps else None
    rate = None
    back = value_at(steps, end - ETA_RATE_WINDOW_SECONDS) or steps[0]
    if end > back[0] and step > back[1]:
        rate = (step - back[1]) / (end - back[0])
    state = data.state or "unknown"
    eta = None
    if state == "completed" or (max_steps is not None and step >= max_steps):
        eta = 0.0
    elif max_steps is not None and rate:
        eta = (max_steps - step) / rate
    elapsed = end - data.start_time if data.start_time is not None else None
    return Progress(state, int(step), max_steps, ratio, data.start_time, end, elapsed, rate, eta)


def trend_window(first: float, end: float, window: float = PLATEAU_WINDOW_SECONDS) -> float:
    """A rule's window, or the last half of a run shorter than two of them."""
    return min(window, max(end - first, 0.0) * SHORT_RUN_WINDOW_FRACTION)


def trend_statistic(data: RunData, end: float, window: float, per_seconds: float) -> TrendStat | None:
    """The least-squares slope b of m over ``[end - window, end]``, its level L and standard error se_b.

    m is ``data.loss_mean`` (skipping the minutes without a step: evaluations,
    checkpoint saves), N the increase of ``data.loss_count`` over the window,
    sigma^2 the last ``data.loss_variance`` at or before ``end``, and
    se_b = sigma * sqrt(12 / N) / window: the slope's error when the per-step
    noise is independent. None with fewer than two values of m or a level <= 0.
    """
    if window <= 0:
        return None
    points = [(t, v) for t, v in data.loss_mean if end - window <= t <= end and math.isfinite(v)]
    if len(points) < 2:
        return None
    n = len(points)
    t_mean = sum(t for t, _ in points) / n
    level = sum(v for _, v in points) / n
    sxx = sum((t - t_mean) ** 2 for t, _ in points)
    if sxx <= 0 or level <= 0:
        return None
    slope = sum((t - t_mean) * (v - level) for t, v in points) / sxx
    steps = round(counter_increase(data.loss_count, end - window, end))
    variance = finite_at(data.loss_variance, end)
    slope_se = None
    if variance is not None and variance[1] >= 0 and steps > 0:
        slope_se = math.sqrt(variance[1]) * math.sqrt(TREND_STEPS_FACTOR / steps) / window
    return TrendStat(window, per_seconds, n, steps, level, slope, slope_se)


def _rise_began_step(data: RunData, end: float) -> int | None:
    """Where the rise began: the first step of the 5 minutes whose mean loss m is the lowest of the run before
    ``end`` (the earliest such). m averages the 5 minutes before its time, so a checkpoint saved at or
    before that step holds weights from before the lowest stretch, not from the rise after it."""
    values = [(v, t) for t, v in data.loss_mean if t <= end and math.isfinite(v)]
    steps = [(t, v) for t, v in data.step if math.isfinite(v)]
    if not values or not steps:
        return None
    at = value_at(steps, min(values)[1] - TREND_MEAN_SECONDS) or steps[0]
    return _int(at[1])


def _plateau_bound(stat: TrendStat | None) -> float | None:
    """The upper bound of the improvement, -c + z se_c (None without a standard error)."""
    if stat is None or stat.rate_se is None:
        return None
    return -stat.rate + PLATEAU_Z * stat.rate_se


def _plateau_held(data: RunData, first: float, end: float) -> tuple[float, float] | None:
    """(when, bound) of the latest time within the rule's keep_firing_for before ``end`` at which the plateau
    condition held: -c + z se_c < min_improvement with >= min_steps steps in the window.

    As TrainingLossPlateau, a noise dip of the bound above the threshold does not
    end a plateau: the condition is judged at ``end`` and at every trend step
    (1m) of the keep_firing_for before it (a short run: the same share of its
    shortened window).
    """
    window = trend_window(first, end)
    share = window / PLATEAU_WINDOW_SECONDS
    keep, step = PLATEAU_KEEP_SECONDS * share, TREND_RESOLUTION_SECONDS * share
    k = 0
    while k * step <= keep:
        at = end - k * step
        span = trend_window(first, at)
        stat = trend_statistic(data, at, span, TREND_PER_SECONDS * span / PLATEAU_WINDOW_SECONDS)
        bound = _plateau_bound(stat)
        enough = stat is not None and stat.steps >= PLATEAU_MIN_STEPS
        if enough and bound is not None and bound < PLATEAU_MIN_IMPROVEMENT:
            return at, bound
        k += 1
    return None


def loss_trend(data: RunData, end: float) -> LossTrend:
    ema_series = [(t, v) for t, v in data.loss_ema if math.isfinite(v) and t <= end]
    last_loss = last(data.loss)
    last_ema = last(ema_series)
    nonfinite = increases(data.nonfinite_losses)
    count = int(sum(amount for _, amount in nonfinite))
    after = by = None
    if nonfinite:
        t_first = nonfinite[0][0]
        at = value_at(data.step, t_first)
        by = _int(at[1]) if at else None
        earlier = [s for s in data.step if s[0] < t_first]
        after = _int(earlier[-1][1]) if earlier else None
    base = LossTrend(
        last=last_loss[1] if last_loss else None,
        ema=last_ema[1] if last_ema else None,
        trend="unknown",
        relative_change=None,
        window_seconds=None,
        window_steps=None,
        plateau=False,
        nonfinite_steps=count,
        nonfinite_after_step=after,
        nonfinite_by_step=by,
    )
    first = next((t for t, v in data.loss_mean if math.isfinite(v)), None)
    if first is None or first > end:
        return base

    def stat(full: float, per: float) -> TrendStat | None:
        window = trend_window(first, end, full)
        # A shortened window states its rates per the same share of it.
        return trend_statistic(data, end, window, per * window / full)

    flat = stat(PLATEAU_WINDOW_SECONDS, TREND_PER_SECONDS)
    held = _plateau_held(data, first, end)
    fall = stat(OVERFIT_WINDOW_SECONDS, TREND_PER_SECONDS)
    rise = stat(DIVERGE_WINDOW_SECONDS, DIVERGE_PER_SECONDS)

    falling = fall is not None and fall.slope_se is not None and fall.slope + OVERFIT_Z * fall.slope_se < 0
    diverging = (rise is not None and rise.rate_se is not None and rise.steps >= DIVERGE_MIN_STEPS
                 and rise.rate - DIVERGE_Z * rise.rate_se > DIVERGE_MIN_RISE)
    grad_ratio = None
    if rise is not None:
        g_now, g_then = finite_at(data.grad_norm, end), finite_at(data.grad_norm, end - rise.window_seconds)
        if g_now is not None and g_then is not None and g_then[1] > 0 and g_then[0] < g_now[0]:
            grad_ratio = g_now[1] / g_then[1]
    base = replace(
        base,
        falling=falling,
        diverging=diverging,
        rise_rate=None if rise is None else rise.rate,
        rise_rate_se=None if rise is None else rise.rate_se,
        rise_rate_seconds=None if rise is None else rise.per_seconds,
        rise_window_seconds=None if rise is None else rise.window_seconds,
        rise_window_steps=None if rise is None else rise.steps,
        rise_began_step=_rise_began_step(data, end) if diverging else None,
        grad_norm_ratio=grad_ratio,
    )
    if flat is None:
        return base
    enough = flat.steps >= PLATEAU_MIN_STEPS and flat.rate_se is not None
    if not enough:
        trend = "unknown"
    elif flat.rate <= -PLATEAU_MIN_IMPROVEMENT:
        trend = "falling"
    elif flat.rate >= PLATEAU_MIN_IMPROVEMENT:
        trend = "rising"
    else:
        trend = "flat"
    plateau = enough and held is not None
    return replace(
        base,
        trend=trend,
        relative_change=flat.change,
        window_seconds=flat.window_seconds,
        window_steps=flat.steps,
        plateau=plateau,
        rate=flat.rate,
        rate_se=flat.rate_se,
        rate_seconds=flat.per_seconds,
        level=flat.level,
        plateau_bound=held[1] if plateau and held is not None else _plateau_bound(flat),
        plateau_at=held[0] if plateau and held is not None else None,
    )


def eval_points(data: RunData) -> tuple[list[EvalPoint], bool]:
    """One point per evaluation, and whether its steps are exact.

    With ``training_eval_step`` each distinct value is one evaluation, paired
    with the eval loss of the last sample showing it (the exporter sets the step
    first, so the last sample holds both). Without it, each change of the eval
    loss is one evaluation at the training step of that sample, which can be up
    to one scrape interval of steps late.
    """
    points: list[EvalPoint] = []
    if data.eval_step:
        groups: list[tuple[float, float]] = []  # (time of the last sample, eval step)
        for t, s in data.eval_step:
            if not math.isfinite(s):
                continue
            if groups and groups[-1][1] == s:
                groups[-1] = (t, s)
            else:
                groups.append((t, s))
        for t, s in groups:
            loss = value_at(data.eval_loss, t)
            if loss is not None:
                points.append(EvalPoint(int(s), loss[1], t))
        return points, True
    previous: float | None = None
    for t, v in data.eval_loss:
        same = previous is not None and (v == previous or (math.isnan(v) and math.isnan(previous)))
        previous = v
        if same:
            continue
        at = value_at(data.step, t)
        if at is not None:
            points.append(EvalPoint(int(at[1]), v, t))
    return points, False


def best_gauge_points(data: RunData) -> list[EvalPoint]:
    """The bests the exporter recorded (``training_eval_best_step`` / ``_loss``), one per step, each at the
    first sample that shows it.

    They catch a best evaluation that a later one overwrote in ``training_eval_loss``
    before Prometheus scraped it. Only samples from the first finite eval loss on
    count: before any Trainer evaluation the gauges hold the fixed evaluation's
    answer cross-entropy, another quantity.
    """
    first_eval = next((t for t, v in data.eval_loss if math.isfinite(v)), None)
    if first_eval is None:
        return []
    out: list[EvalPoint] = []
    for t, s in data.eval_best_step:
        if t < first_eval or not math.isfinite(s) or (out and out[-1].step == int(s)):
            continue
        loss = value_at(data.eval_best_loss, t)
        if loss is not None and math.isfinite(loss[1]):
            out.append(EvalPoint(int(s), loss[1], t))
    return out


def checkpoint_steps(data: RunData, current_step: int) -> tuple[int, ...]:
    """Steps of the checkpoints saved: the values of training_checkpoint_step, else every save_steps."""
    seen = {int(v) for _, v in data.checkpoint_step if math.isfinite(v)}
    if not seen and data.save_steps:
        seen = set(range(data.save_steps, current_step + 1, data.save_steps))
    return tuple(sorted(seen))


def measured_eval(checkpoint: int, points: Sequence[EvalPoint]) -> EvalPoint | None:
    """The finite evaluation at or nearest a checkpoint's step (on a tie the earlier one)."""
    good = [p for p in points if math.isfinite(p.loss)]
    return min(good, key=lambda p: (abs(p.step - checkpoint), p.step)) if good else None


def best_checkpoint(best: EvalPoint, points: Sequence[EvalPoint],
                    checkpoints: Sequence[int]) -> tuple[int, EvalPoint] | None:
    """The checkpoint to keep and the evaluation that measured it.

    The best evaluation's own when it was saved; else, among the saved
    checkpoints, the one whose evaluation (at or nearest its step) has the lowest
    loss, the one nearer that evaluation on a tie, then the earlier.
    """
    if best.step in checkpoints:
        return best.step, best
    measured = [(p.loss, abs(p.step - c), c, p) for c in checkpoints if (p := measured_eval(c, points)) is not None]
    if not measured:
        return None
    _, _, chosen, point = min(measured, key=lambda m: m[:3])
    return chosen, point


def evaluation(data: RunData, checkpoints: Sequence[int], loss: LossTrend, end: float) -> Evaluation:
    points, exact = eval_points(data)
    known = {p.step for p in points}
    extra = [p for p in best_gauge_points(data) if p.step not in known]
    if extra:
        points = sorted([*points, *extra], key=lambda p: p.step)
    good = [p for p in points if math.isfinite(p.loss)]
    if not good:
        return Evaluation(points=tuple(points), steps_exact=exact)
    best = min(good, key=lambda p: (p.loss, p.step))
    latest = good[-1]
    change = latest.loss / best.loss - 1 if best.loss > 0 else None
    train_change = None
    if latest.step > best.step:
        train = data.loss_mean if any(math.isfinite(v) for _, v in data.loss_mean) else data.loss_ema
        at_best, at_last = finite_at(train, best.time), finite_at(train, latest.time)
        if at_best is not None and at_last is not None and at_best[1] != 0:
            train_change = at_last[1] / at_best[1] - 1
    # As TrainingOverfitting: the last eval loss (within its window) well above its best while the training
    # loss still falls significantly.
    overfitting = (latest.step > best.step and latest.loss > OVERFIT_EVAL_RATIO * best.loss
                   and latest.time >= end - OVERFIT_LAST_EVAL_SECONDS and loss.falling)
    kept = best_checkpoint(best, good, checkpoints)
    return Evaluation(
        points=tuple(points),
        best=best,
        last=latest,
        best_checkpoint=kept[0] if kept else None,
        best_checkpoint_eval=kept[1] if kept else None,
        change_from_best=change,
        train_change_since_best=train_change,
        overfitting=overfitting,
        steps_exact=exact,
    )


def _eval_still_improving(ev: Evaluation) -> bool:
    """The eval loss improved twice in a row: the last evaluation is the best, by at least the plateau
    threshold over those before the previous one, and the previous one was below those too.

    One evaluation below the earlier best is not enough: on a flat eval loss the last of many noisy
    evaluations lands a 1% margin below their minimum now and then (a 3-sigma draw at 0.5% eval noise), and
    the verdict would say continue on a plateau. Two in a row that far down are that unlikely squared.
    """
    good = [p for p in ev.points if math.isfinite(p.loss)]
    if len(good) < 3 or ev.last is None or ev.best is None or ev.last != ev.best:
        return False
    before = min(p.loss for p in good[:-2])
    return good[-2].loss < before and ev.last.loss <= (1 - PLATEAU_MIN_IMPROVEMENT) * before


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _where(loss: LossTrend) -> str:
    after, by = loss.nonfinite_after_step, loss.nonfinite_by_step
    if by is None:
        return ""
    if after is None:
        return f", the first by step {by}"
    if by <= after + 1:
        return f", the first at step {by}"
    return f", the first between steps {after + 1} and {by}"


def _kept_why(ev: Evaluation) -> str:
    """Why best_checkpoint is the one: saved at the best evaluation, or measured best of the saved ones."""
    ckpt, point, best = ev.best_checkpoint, ev.best_checkpoint_eval, ev.best
    if ckpt is None or point is None or best is None:
        return ""
    if ckpt == best.step:
        return ", saved at the best evaluation"
    return (f" (best eval at step {best.step} has no checkpoint; checkpoint-{ckpt} has the lowest measured eval "
            f"loss of the saved ones ({point.loss:.4g} at step {point.step}))")


def per_text(seconds: float | None) -> str:
    """What a rate is per: "30m" for 1800 s, else the duration."""
    if seconds is not None and seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"
    return human_duration(seconds)


def recommend(
    prog: Progress, loss: LossTrend, ev: Evaluation, checkpoints: Sequence[int], alerts: Sequence[Alert]
) -> Recommendation:
    """One recommendation, from the most to the least urgent finding."""
    firing = {a.name for a in alerts if a.firing}
    running = prog.state in ("training", "paused")
    latest_ckpt = checkpoints[-1] if checkpoints else None
    stop_and = "stop the run and " if running else ""

    if loss.nonfinite_steps or NONFINITE_ALERT in firing:
        safe = None
        if loss.nonfinite_after_step is not None:
            # A checkpoint at or before the last step known to be finite holds no update from a bad step.
            safe = max((c for c in checkpoints if c <= loss.nonfinite_after_step), default=None)
        what = (f"the training loss was NaN/Inf on {loss.nonfinite_steps} step(s){_where(loss)}"
                if loss.nonfinite_steps else f"Prometheus reports {NONFINITE_ALERT} firing")
        advice = "lower the learning rate, tighten gradient clipping and check that step's batch before resuming"
        if safe is not None:
            return Recommendation("use_checkpoint", "nonfinite",
                                  f"{what}: {stop_and}roll back to checkpoint-{safe}, the last one saved before it; "
                                  f"{advice}", safe)
        return Recommendation("stop", "nonfinite",
                              f"{what} and no checkpoint saved before it is known: stop; {advice}")

    if prog.state == "crashed":
        if latest_ckpt is not None:
            return Recommendation("use_checkpoint", "crashed",
                                  f"the run crashed at step {prog.step}: resume from checkpoint-{latest_ckpt}, "
                                  "the last one saved", latest_ckpt)
        return Recommendation("stop", "crashed", f"the run crashed at step {prog.step} and no checkpoint is known")

    if loss.diverging or DIVERGE_ALERT in firing:
        if loss.diverging:
            per = per_text(loss.rise_rate_seconds)
            bound = (loss.rise_rate or 0.0) - DIVERGE_Z * (loss.rise_rate_se or 0.0)
            what = (f"the training loss is rising: {_pct(loss.rise_rate)} per {per} over the last "
                    f"{human_duration(loss.rise_window_seconds)} ({loss.rise_window_steps} steps), at least "
                    f"{bound:+.1%} per {per} at {DIVERGE_Z:g} standard errors, above the "
                    f"{DIVERGE_MIN_RISE:.0%} of {DIVERGE_ALERT}")
            if loss.grad_norm_ratio is not None:
                what += (f", and the gradient norm grew {loss.grad_norm_ratio:.2g}x" if loss.grad_norm_ratio > 1
                         else ", while the gradient norm did not grow")
        else:
            what = f"Prometheus reports {DIVERGE_ALERT} firing"
        advice = "lower the learning rate (or lengthen warmup, tighten gradient clipping)"
        began = loss.rise_began_step
        before = max((c for c in checkpoints if c <= began), default=None) if began is not None else None
        if before is not None:
            return Recommendation("use_checkpoint", "diverging",
                                  f"{what}: the run diverges; {stop_and}{advice} and roll back to "
                                  f"checkpoint-{before}, the last one saved before the rise began (the lowest "
                                  f"5-minute mean loss from step {began})", before)
        if ev.best_checkpoint is not None and ev.best is not None:
            return Recommendation("use_checkpoint", "diverging",
                                  f"{what}: the run diverges; {stop_and}{advice} and roll back to "
                                  f"checkpoint-{ev.best_checkpoint}, the best evaluation's checkpoint"
                                  f"{_kept_why(ev)}", ev.best_checkpoint)
        return Recommendation("stop", "diverging",
                              f"{what}: the run diverges and no checkpoint saved before the rise is known: stop; "
                              f"{advice} before training it again")

    if ev.overfitting or OVERFIT_ALERT in firing:
        if ev.overfitting and ev.best and ev.last:
            what = (f"the eval loss ({ev.last.loss:.4g} at step {ev.last.step}) is {ev.change_from_best or 0:.1%} "
                    f"above its best ({ev.best.loss:.4g} at step {ev.best.step}) while the training loss still "
                    f"falls ({_pct(loss.rate)} per {per_text(loss.rate_seconds)}, significantly): the model is "
                    "memorising its training data")
        else:
            what = f"Prometheus reports {OVERFIT_ALERT} firing"
        ckpt = ev.best_checkpoint
        if ckpt is not None and ev.best is not None:
            return Recommendation("use_checkpoint", "overfitting",
                                  f"{what}: {stop_and}use checkpoint-{ckpt}{_kept_why(ev)}", ckpt)
        return Recommendation("stop", "overfitting",
                              f"{what}; no checkpoint near the best evaluation is known: stop, and save a "
                              "checkpoint at every evaluation next time")

    critical = sorted(a.name for a in alerts if a.firing and a.severity == "critical" and a.name not in JUDGED_ALERTS)
    if critical:
        first = next(a for a in alerts if a.name == critical[0])
        return Recommendation("stop", "alert",
                              f"critical alert {first.name} is firing: {first.summary} {first.recommendation}".strip(),
                              latest_ckpt)

    keep = ev.best_checkpoint if ev.best_checkpoint is not None else latest_ckpt
    keep_text = "" if keep is None else f"; keep checkpoint-{keep}{_kept_why(ev) if keep == ev.best_checkpoint else ''}"
    if loss.trend == "unknown" and PLATEAU_ALERT not in firing:
        return Recommendation("continue", "too_early",
                              f"too early to judge: the loss trend needs {PLATEAU_MIN_STEPS} steps in its window "
                              f"(step {prog.step} after {human_duration(prog.elapsed_seconds)})", keep)

    window = human_duration(loss.window_seconds)
    per = per_text(loss.rate_seconds)
    measured = f"the loss changed {_pct(loss.rate)} per {per} over the last {window} ({loss.window_steps} steps)"
    if loss.plateau or PLATEAU_ALERT in firing:
        if loss.plateau:
            ago = (prog.last_step_time - loss.plateau_at) if loss.plateau_at is not None else 0.0
            when = "" if ago <= 0 else f" {human_duration(ago)} ago (a plateau holds through such noise dips)"
            what = (f"{measured}: at {PLATEAU_Z:g} standard errors it improves by at most "
                    f"{loss.plateau_bound or 0.0:.1%} per {per}{when}, less than the {PLATEAU_MIN_IMPROVEMENT:.0%} "
                    f"{PLATEAU_ALERT} asks for")
        else:
            what = f"Prometheus reports {PLATEAU_ALERT} firing"
        if _eval_still_improving(ev) and ev.last is not None:
            return Recommendation("continue", "improving",
                                  f"{what}, but the eval loss still improves ({ev.last.loss:.4g} at step "
                                  f"{ev.last.step}, its best): continue", keep)
        if (ev.change_from_best is not None and ev.change_from_best > OVERFIT_EVAL_RATIO - 1
                and ev.best_checkpoint is not None):
            return Recommendation("use_checkpoint", "plateau",
                                  f"{what}, and the eval loss is {ev.change_from_best:.1%} above its best: "
                                  f"{stop_and}use checkpoint-{ev.best_checkpoint}{_kept_why(ev)}", ev.best_checkpoint)
        tail = "stop" if running else "do not train it further"
        return Recommendation("stop", "plateau", f"{what}: more steps are unlikely to help, {tail}{keep_text}", keep)

    if loss.trend == "falling":
        what = f"the loss fell {-(loss.rate or 0.0):.1%} per {per} over the last {window} ({loss.window_steps} steps)"
    else:
        what = (f"{measured}, within its noise (± {PLATEAU_Z * (loss.rate_se or 0.0):.1%}) of an improvement of "
                f"{PLATEAU_MIN_IMPROVEMENT:.0%} per {per}: no plateau yet")
    if running:
        return Recommendation("continue", "improving", f"{what}: continue{keep_text}", keep)
    resume = "" if latest_ckpt is None else f", resuming from checkpoint-{latest_ckpt}"
    return Recommendation("continue", "improving",
                          f"{what} when the run ended at step {prog.step}: train longer{resume}", latest_ckpt)


def sort_alerts(alerts: Sequence[Alert]) -> tuple[Alert, ...]:
    return tuple(sorted(alerts, key=lambda a: (not a.firing, SEVERITY_ORDER.get(a.severity, 3), a.name)))


def current_branch(data: RunData) -> RunData:
    """Drop the samples of steps that a later part of the series went back on.

    The same run_id can come back: a run resumed from an earlier checkpoint
    repeats steps, a new run under a reused run_id starts again from 0. What
    counts is the history of the newest process: walking back from the end, a
    sample whose step is above a step seen later belongs to an abandoned
    branch, and every series is cut at the same times.
    """
    limit = math.inf
    dropped: set[float] = set()
    for t, v in reversed(data.step):
        if not math.isfinite(v):
            continue
        if v > limit:
            dropped.add(t)
        else:
            limit = v
    if not dropped:
        return data
    times = [t for t, _ in data.step]

    def keep(series: Series) -> list[Sample]:
        out = []
        for t, v in series:
            # The step sample at or before t (as value_at, in log time: the series are long).
            i = bisect.bisect_right(times, t) - 1
            if i < 0 or times[i] not in dropped:
                out.append((t, v))
        return out

    return replace(
        data,
        step=keep(data.step),
        max_steps=keep(data.max_steps),
        loss=keep(data.loss),
        loss_ema=keep(data.loss_ema),
        loss_mean=keep(data.loss_mean),
        loss_variance=keep(data.loss_variance),
        loss_count=keep(data.loss_count),
        grad_norm=keep(data.grad_norm),
        eval_loss=keep(data.eval_loss),
        eval_step=keep(data.eval_step),
        eval_best_loss=keep(data.eval_best_loss),
        eval_best_step=keep(data.eval_best_step),
        checkpoint_step=keep(data.checkpoint_step),
        nonfinite_losses=keep(data.nonfinite_losses),
    )


def analyse(data: RunData) -> Report | Waiting:
    """The whole report for one run, or Waiting when it has not taken a step yet."""
    data = current_branch(data)
    if not any(math.isfinite(v) and v > 0 for _, v in data.step):
        return Waiting(data.run_id, f"run {data.run_id!r} has not taken an optimizer step yet", data.now)
    prog = progress(data)
    loss = loss_trend(data, prog.last_step_time)
    checkpoints = checkpoint_steps(data, prog.step)
    ev = evaluation(data, checkpoints, loss, prog.last_step_time)
    alerts = sort_alerts(data.alerts)
    return Report(
        run_id=data.run_id,
        generated_at=data.now,
        progress=prog,
        loss=loss,
        evaluation=ev,
        checkpoints=checkpoints,
        alerts=alerts,
        recommendation=recommend(prog, loss, ev, checkpoints, alerts),
    )
