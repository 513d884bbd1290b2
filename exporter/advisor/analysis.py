"""The advisor's judgements: pure functions over series already fetched from Prometheus.

Nothing here does I/O, so every verdict can be tested with hand-made series.
A series is a list of ``(unix time, value)`` pairs in time order, as a
Prometheus range query returns them (one per resolution step).

Where the alerting rules make the same judgement, the thresholds are theirs, read
from their entries in ``exporter/thresholds.py`` (which tests/test_rules.py holds to
the rules in ``prometheus/rules/*.alerts.yml``):

- plateau (``TrainingLossPlateau``): the loss EMA, averaged over a third of the
  window at each end, improved by less than ``PLATEAU_MIN_IMPROVEMENT`` over
  the window, with at least ``PLATEAU_MIN_STEPS`` steps taken in it. The rule's
  window is 30 minutes; a run shorter than two windows is judged over its last
  half instead, so that short runs get a verdict too.
- overfitting (``TrainingOverfitting``): the last finite eval loss is more than
  ``OVERFIT_EVAL_RATIO`` times its best while the training loss EMA is below
  ``OVERFIT_TRAIN_RATIO`` times its value at the best evaluation (the rule
  looks one hour back; the advisor looks back to the best evaluation).
- ETA (``run:training_eta_seconds:rate15m``): remaining steps at the step rate
  of the last 15 minutes of stepping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from exporter import thresholds

Sample = tuple[float, float]
Series = Sequence[Sample]

PLATEAU_MIN_IMPROVEMENT = thresholds.LOSS_PLATEAU.value("min_improvement")
PLATEAU_MIN_STEPS = thresholds.LOSS_PLATEAU.value("min_steps")
PLATEAU_WINDOW_SECONDS = thresholds.LOSS_PLATEAU.seconds("window")
# Each end of the window is averaged over a third of it (the rule: 10m of 30m).
PLATEAU_AVERAGE_FRACTION = thresholds.LOSS_PLATEAU.seconds("average") / PLATEAU_WINDOW_SECONDS
# Runs shorter than 2 windows are judged over their last half.
SHORT_RUN_WINDOW_FRACTION = thresholds.SHORT_RUN_WINDOW_FRACTION.value
OVERFIT_EVAL_RATIO = thresholds.OVERFITTING.value("eval_ratio")
OVERFIT_TRAIN_RATIO = thresholds.OVERFITTING.value("train_ratio")
ETA_RATE_WINDOW_SECONDS = thresholds.ETA_RATE_WINDOW_SECONDS.value

NONFINITE_ALERT = thresholds.LOSS_NONFINITE.alert
OVERFIT_ALERT = thresholds.OVERFITTING.alert
PLATEAU_ALERT = thresholds.LOSS_PLATEAU.alert
# Alerts whose judgement the advisor makes itself; other critical alerts stop a run.
JUDGED_ALERTS = frozenset({NONFINITE_ALERT, OVERFIT_ALERT, PLATEAU_ALERT})
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}

ACTIONS = ("continue", "stop", "use_checkpoint")
VERDICTS = ("improving", "plateau", "overfitting", "nonfinite", "crashed", "alert", "too_early")


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
    eval_loss: Series = ()
    eval_step: Series = ()
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
class LossTrend:
    last: float | None
    ema: float | None
    trend: str  # falling | flat | rising | unknown
    relative_change: float | None
    window_seconds: float | None
    window_steps: int | None
    plateau: bool
    nonfinite_steps: int = 0
    # The first non-finite loss came after step `nonfinite_after_step` and at or before `nonfinite_by_step`.
    nonfinite_after_step: int | None = None
    nonfinite_by_step: int | None = None


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


def mean_ending(series: Series, t: float, span: float) -> float | None:
    """Mean of the finite values in ``(t - span, t]``, else the last finite value at or before ``t``."""
    values = [v for ts, v in series if t - span < ts <= t and math.isfinite(v)]
    if values:
        return sum(values) / len(values)
    before = [v for ts, v in series if ts <= t and math.isfinite(v)]
    return before[-1] if before else None


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


def trend_window(first: float, end: float) -> float:
    """The plateau rule's window, or the last half of a run shorter than two of them."""
    return min(PLATEAU_WINDOW_SECONDS, max(end - first, 0.0) * SHORT_RUN_WINDOW_FRACTION)


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
    if len(ema_series) < 2:
        return base
    window = trend_window(ema_series[0][0], end)
    average = window * PLATEAU_AVERAGE_FRACTION
    now_value = mean_ending(ema_series, end, average)
    then_value = mean_ending(ema_series, end - window, average)
    step_now = value_at(data.step, end)
    step_then = value_at(data.step, end - window)
    steps = int(step_now[1] - step_then[1]) if step_now and step_then else 0
    if window <= 0 or now_value is None or then_value is None or then_value == 0:
        return base
    change = now_value / then_value - 1
    enough = steps >= PLATEAU_MIN_STEPS
    if not enough:
        trend = "unknown"
    elif change <= -PLATEAU_MIN_IMPROVEMENT:
        trend = "falling"
    elif change >= PLATEAU_MIN_IMPROVEMENT:
        trend = "rising"
    else:
        trend = "flat"
    return LossTrend(
        last=base.last,
        ema=base.ema,
        trend=trend,
        relative_change=change,
        window_seconds=window,
        window_steps=steps,
        # Improved by less than the threshold: flat or rising (as TrainingLossPlateau).
        plateau=enough and change > -PLATEAU_MIN_IMPROVEMENT,
        nonfinite_steps=count,
        nonfinite_after_step=after,
        nonfinite_by_step=by,
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


def checkpoint_steps(data: RunData, current_step: int) -> tuple[int, ...]:
    """Steps of the checkpoints saved: the values of training_checkpoint_step, else every save_steps."""
    seen = {int(v) for _, v in data.checkpoint_step if math.isfinite(v)}
    if not seen and data.save_steps:
        seen = set(range(data.save_steps, current_step + 1, data.save_steps))
    return tuple(sorted(seen))


def nearest_checkpoint(step: int, checkpoints: Sequence[int]) -> int | None:
    """The checkpoint closest to ``step``; on a tie the earlier one."""
    if not checkpoints:
        return None
    return min(checkpoints, key=lambda c: (abs(c - step), c))


def evaluation(data: RunData, checkpoints: Sequence[int]) -> Evaluation:
    points, exact = eval_points(data)
    good = [p for p in points if math.isfinite(p.loss)]
    if not good:
        return Evaluation(points=tuple(points), steps_exact=exact)
    best = min(good, key=lambda p: (p.loss, p.step))
    latest = good[-1]
    change = latest.loss / best.loss - 1 if best.loss > 0 else None
    train_change = None
    overfitting = False
    if latest.step > best.step:
        ema = [(t, v) for t, v in data.loss_ema if math.isfinite(v)]
        span = trend_window(ema[0][0], latest.time) * PLATEAU_AVERAGE_FRACTION if ema else 0.0
        at_best = mean_ending(ema, best.time, span)
        at_last = mean_ending(ema, latest.time, span)
        if at_best is not None and at_last is not None and at_best != 0:
            train_change = at_last / at_best - 1
            overfitting = latest.loss > OVERFIT_EVAL_RATIO * best.loss and at_last < OVERFIT_TRAIN_RATIO * at_best
    return Evaluation(
        points=tuple(points),
        best=best,
        last=latest,
        best_checkpoint=nearest_checkpoint(best.step, checkpoints),
        change_from_best=change,
        train_change_since_best=train_change,
        overfitting=overfitting,
        steps_exact=exact,
    )


def _eval_still_improving(ev: Evaluation) -> bool:
    """The last evaluation is the best, by at least the plateau threshold over the earlier ones."""
    good = [p for p in ev.points if math.isfinite(p.loss)]
    if len(good) < 2 or ev.last is None or ev.best is None or ev.last != ev.best:
        return False
    earlier = min(p.loss for p in good[:-1])
    return ev.last.loss <= (1 - PLATEAU_MIN_IMPROVEMENT) * earlier


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

    if ev.overfitting or OVERFIT_ALERT in firing:
        if ev.overfitting and ev.best and ev.last:
            what = (f"the eval loss ({ev.last.loss:.4g} at step {ev.last.step}) is {ev.change_from_best or 0:.1%} "
                    f"above its best ({ev.best.loss:.4g} at step {ev.best.step}) while the training loss EMA "
                    f"moved {_pct(ev.train_change_since_best)}: the model is memorising its training data")
        else:
            what = f"Prometheus reports {OVERFIT_ALERT} firing"
        ckpt = ev.best_checkpoint
        if ckpt is not None and ev.best is not None:
            near = "" if ckpt == ev.best.step else f" (the nearest to step {ev.best.step})"
            return Recommendation("use_checkpoint", "overfitting",
                                  f"{what}: {stop_and}use checkpoint-{ckpt}{near}, saved at the best evaluation",
                                  ckpt)
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
    keep_text = "" if keep is None else f"; keep checkpoint-{keep}"
    if loss.trend == "unknown" and PLATEAU_ALERT not in firing:
        return Recommendation("continue", "too_early",
                              f"too early to judge: the loss trend needs {PLATEAU_MIN_STEPS} steps in its window "
                              f"(step {prog.step} after {human_duration(prog.elapsed_seconds)})", keep)

    window = human_duration(loss.window_seconds)
    if loss.plateau or PLATEAU_ALERT in firing:
        what = (f"the loss EMA changed {_pct(loss.relative_change)} over the last {window} "
                f"({loss.window_steps} steps), less than the {PLATEAU_MIN_IMPROVEMENT:.0%} improvement "
                "TrainingLossPlateau asks for") if loss.plateau else f"Prometheus reports {PLATEAU_ALERT} firing"
        if _eval_still_improving(ev) and ev.last is not None:
            return Recommendation("continue", "improving",
                                  f"{what}, but the eval loss still improves ({ev.last.loss:.4g} at step "
                                  f"{ev.last.step}, its best): continue", keep)
        if (ev.change_from_best is not None and ev.change_from_best > OVERFIT_EVAL_RATIO - 1
                and ev.best_checkpoint is not None):
            return Recommendation("use_checkpoint", "plateau",
                                  f"{what}, and the eval loss is {ev.change_from_best:.1%} above its best: "
                                  f"{stop_and}use checkpoint-{ev.best_checkpoint}", ev.best_checkpoint)
        tail = "stop" if running else "do not train it further"
        return Recommendation("stop", "plateau", f"{what}: more steps are unlikely to help, {tail}{keep_text}", keep)

    what = f"the loss EMA fell {-(loss.relative_change or 0.0):.1%} over the last {window} ({loss.window_steps} steps)"
    if running:
        return Recommendation("continue", "improving", f"{what}: continue", keep)
    resume = "" if latest_ckpt is None else f", resuming from checkpoint-{latest_ckpt}"
    return Recommendation("continue", "improving",
                          f"{what} and was still falling when the run ended at step {prog.step}: "
                          f"train longer{resume}", latest_ckpt)


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
    steps = list(data.step)

    def keep(series: Series) -> list[Sample]:
        out = []
        for t, v in series:
            at = value_at(steps, t)
            if at is None or at[0] not in dropped:
                out.append((t, v))
        return out

    return replace(
        data,
        step=keep(data.step),
        max_steps=keep(data.max_steps),
        loss=keep(data.loss),
        loss_ema=keep(data.loss_ema),
        eval_loss=keep(data.eval_loss),
        eval_step=keep(data.eval_step),
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
    ev = evaluation(data, checkpoints)
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
