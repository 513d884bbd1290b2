"""Judgements that hold on realistic runs: the alerting rules over simulated runs at 15 s, 30 s and 60 s.

Each case is a run shaped like a real fine-tune (hours long, 7% per-step loss
noise, cosine learning rate with warmup from 0, evaluation and checkpoint
pauses), simulated by :mod:`support.simulator` for five noise seeds, and states
exactly which alert fires for which run and when. promtool evaluates every rule
of ``prometheus/rules/`` over it, with the scrape interval as the evaluation
interval, and is asked at every evaluation which alerts fire, for every alert
name whose series the simulation produces (every 10 minutes for the others):
promtool fails an ``alert_rule_test`` on an unexpected alert only for the name
it tests, so each name gets its own, with an empty ``exp_alerts`` where nothing
may fire. Between "must fire" and "must not fire" an expectation may leave a
margin where that name is not asked: for an event (a spike, a NaN, a stall, a
dead exporter) one evaluation or a rule's window, derived from the rule and the
scrape interval; for the loss-trend rules (plateau, divergence, overfitting)
the times where the noise-free statistic is within MARGIN standard errors of its
threshold (:func:`trend_stream`), so that only what 7% noise cannot change is
asserted. A rule that a case does not list must not fire at any time.

All seeds of a case share a promtool test group (each seed its own run_id and
target), and cases share groups as far as promtool's per-query sample limit
allows: a group costs mostly one evaluation of every rule per evaluation time,
whatever its series. A case's runs end at its horizon (SIGTERM: state
terminated, then the target leaves service discovery), so that a shorter case
fires nothing in a longer group's remaining time. One file per interval (two
for 15 s, the costliest), run side by side. The rules are copied without their
annotations (promtool compares annotations exactly, and theirs quote values;
prometheus/tests/ tests them), every expr, ``for``, ``keep_firing_for`` and
label as it is.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from support.runif import run_if
from support.simulator import (
    HOUR,
    MINUTE,
    Exponential,
    Flat,
    Recording,
    Restart,
    RunSpec,
    Scaled,
    Then,
    simulate,
)

from exporter import thresholds as th

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "prometheus" / "rules"
INTERVALS = (15, 30, 60)
SEEDS = (1, 2, 3, 4, 5)
# Names whose series no case produces are asked this often (they can only fire on series that exist).
COARSE_CHECK_SECONDS = 600.0


# --------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Rule:
    alert: str
    severity: str
    component: str
    metrics: frozenset[str]
    keep: float


def alert_rules() -> list[Rule]:
    rules = []
    for path in sorted(RULES_DIR.glob("*.alerts.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    names = frozenset(re.findall(r"\b(?:training_[a-z0-9_]+|up|run:[a-z0-9_:]+)\b", rule["expr"]))
                    keep = th.duration_seconds(rule.get("keep_firing_for", "0s"))
                    rules.append(Rule(rule["alert"], rule["labels"]["severity"], rule["labels"]["component"], names,
                                      keep))
    return rules


def rules_without_annotations(target: Path) -> list[Path]:
    """Copies of every rule file with the alerts' annotations left out, nothing else changed."""
    out = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        copy = target / path.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(copy)
    return out


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Fires:
    """``alert`` at ``severity`` fires for the run at every evaluation in [start, end], and not outside
    [start - lead, end + lag] (in the margins the name is not asked)."""

    alert: str
    severity: str
    run_id: str
    instance: str
    start: float
    end: float
    lead: float = 0.0
    lag: float = 0.0


@dataclass(frozen=True)
class Stream:
    """One alert (name, severity, labels) over the check times: it must fire at the times of ``must`` and may
    fire at those of ``may`` (a superset); at any other time it must not fire."""

    alert: str
    severity: str
    run_id: str
    instance: str
    must: frozenset[float]
    may: frozenset[float]


def stream(fire: Fires, times: np.ndarray) -> Stream:
    t = times.tolist()
    return Stream(fire.alert, fire.severity, fire.run_id, fire.instance,
                  frozenset(x for x in t if fire.start <= x <= fire.end),
                  frozenset(x for x in t if fire.start - fire.lead <= x <= fire.end + fire.lag))


# The shared loss-trend statistic of TrainingLossPlateau, TrainingLossDiverging and TrainingOverfitting, on the
# noise-free loss of a simulated run: what the rules must conclude where the noise cannot change it. A
# condition counts as certain where the noise-free bound is MARGIN standard errors (se_c) from its threshold:
# the rule's estimate of c is off by more than that at one evaluation with probability 0.13% (one-sided
# normal tail at 3), and its estimate of se_c (from the variance of 50 steps) by about 10%.
MARGIN = 3.0
# The must side's margin for TrainingLossPlateau, which keeps firing through dips (see Trend.plateau).
KEPT_MARGIN = 2.0


@dataclass(frozen=True)
class TrendRule:
    alert: str
    severity: str
    kind: str  # plateau | diverging | overfitting
    window: float
    for_: float
    keep: float
    z: float
    threshold: float
    min_steps: float
    # TrainingOverfitting: the window over which the loss must not rise significantly.
    recent: float = 0.0

    @classmethod
    def of(cls, entry: th.AlertThresholds, kind: str) -> TrendRule:
        threshold = {"plateau": "min_improvement", "diverging": "min_rise"}.get(kind)
        return cls(entry.alert, entry.severity, kind, entry.seconds("window"), th.duration_seconds(entry.for_),
                   entry.keep_firing_for_seconds, entry.value("z"),
                   entry.value(threshold) if threshold else 0.0,
                   entry.value("min_steps") if "min_steps" in entry.numbers else 0.0,
                   entry.seconds("recent") if "recent" in entry.windows else 0.0)


PLATEAU = TrendRule.of(th.LOSS_PLATEAU, "plateau")
DIVERGING = TrendRule.of(th.LOSS_DIVERGING, "diverging")
OVERFITTING = TrendRule.of(th.OVERFITTING, "overfitting")
TREND_AVERAGE = th.LOSS_PLATEAU.seconds("average")
TREND_RESOLUTION = th.LOSS_PLATEAU.seconds("resolution")
PER_SECONDS = th.LOSS_PLATEAU.value("per_seconds")
STEPS_FACTOR = th.LOSS_PLATEAU.value("steps_factor")
EVAL_RATIO = th.OVERFITTING.value("eval_ratio")
LAST_EVAL = th.OVERFITTING.seconds("last_eval")


def _and(*parts: bool | None) -> bool | None:
    if any(p is False for p in parts):
        return False
    return None if any(p is None for p in parts) else True


def _over(value: float, threshold: float, scale: float, margin: float) -> bool | None:
    """value > threshold: certainly (by ``margin`` scales), certainly not, or uncertain (None)."""
    if value > threshold + margin * scale:
        return True
    if value < threshold - margin * scale:
        return False
    return None


def trend_conditions(rec: Recording, run_id: str, rule: TrendRule, times: np.ndarray,
                     margin: float = MARGIN) -> list[bool | None]:
    """The rule's expr at each evaluation time, for the run's first process (its only one in these cases):
    True where the noise-free bound is ``margin`` standard errors on the firing side of its threshold, False
    where it is MARGIN on the other, None in between."""
    proc = rec.runs[run_id][0]
    spec = proc.spec
    scrapes = rec.times
    finite = np.isfinite(proc.losses)
    clean = np.where(finite, spec.loss(spec.x(proc.steps)), 0.0)
    k_sum = np.concatenate([[0.0], np.cumsum(clean)])
    k_count = np.concatenate([[0.0], np.cumsum(finite)])

    def done(s: np.ndarray) -> np.ndarray:
        return np.searchsorted(proc.times, s, side="right")

    served_from = float(scrapes[np.searchsorted(scrapes, proc.times[0])]) if len(proc.times) else math.inf
    # m(u) on the minute grid: the rate ratio between the first and the last scrape of [u - 5m, u].
    grid = np.arange(0.0, float(scrapes[-1]) + 1, TREND_RESOLUTION)
    first = scrapes[np.minimum(np.searchsorted(scrapes, grid - TREND_AVERAGE, side="left"), len(scrapes) - 1)]
    last = scrapes[np.maximum(np.searchsorted(scrapes, grid, side="right") - 1, 0)]
    first = np.maximum(first, served_from)
    d_count = k_count[done(last)] - k_count[done(first)]
    d_sum = k_sum[done(last)] - k_sum[done(first)]
    m = np.where((d_count > 0) & (last > first), d_sum / np.maximum(d_count, 1), math.nan)
    eval_values = rec.series.get(f'training_eval_loss{{job="training", instance="{proc.instance}", run_id="{run_id}"}}',
                                 [None] * len(scrapes))
    # Per scrape: the eval loss (NaN where none), its lowest so far (min_over_time skips NaN), the last finite one.
    eval_array = np.array([v if isinstance(v, float) else math.nan for v in eval_values])
    eval_min = np.fmin.accumulate(eval_array)
    last_finite = np.maximum.accumulate(np.where(np.isfinite(eval_array), np.arange(len(scrapes)), -1))

    def over(value: float, threshold: float, scale: float) -> bool | None:
        """Certain on the firing side at ``margin``, certainly not at MARGIN."""
        sure = _over(value, threshold, scale, margin)
        return sure if sure is not None else (False if _over(value, threshold, scale, MARGIN) is False else None)

    def slope(t: float, window: float) -> tuple[float, float, float] | None:
        """(c, se_c, N) over the window ending at t: b = deriv(m[W:1m]), L = avg_over_time(m[W:1m])."""
        lo = math.ceil((t - window) / TREND_RESOLUTION - 1e-9)
        hi = math.floor(t / TREND_RESOLUTION + 1e-9)
        u, v = grid[lo : hi + 1], m[lo : hi + 1]
        ok = ~np.isnan(v)
        steps = float(k_count[done(np.array([t]))[0]] - k_count[done(np.array([t - window]))[0]])
        if ok.sum() < 2 or steps <= 0:
            return None
        x, y = u[ok], v[ok]
        level = float(y.mean())
        b = float(((x - x.mean()) * (y - level)).sum() / ((x - x.mean()) ** 2).sum())
        j = int(done(np.array([t]))[0]) - 1
        sigma = spec.noise * float(spec.loss(spec.x(proc.steps[j : j + 1]))[0])
        se_b = sigma * math.sqrt(STEPS_FACTOR / steps) / window
        return b * PER_SECONDS / level, se_b * PER_SECONDS / level, steps

    out: list[bool | None] = []
    for t in times.tolist():
        main = slope(t, rule.window)
        ended = min(x for x in (proc.completed_at, proc.terminated_at, math.inf) if x is not None)
        if t < served_from + rule.window or t >= ended or not main:
            out.append(False)  # the window is not covered (offset), the run no longer trains, or no m
            continue
        c, se_c, steps = main
        # Step counts vary by the steps' 5% jitter at most.
        enough = over(steps, rule.min_steps - 0.5, 0.05 * rule.min_steps / MARGIN) if rule.min_steps else True
        if rule.kind == "plateau":
            out.append(_and(over(rule.threshold, -c + rule.z * se_c, se_c), enough))
        elif rule.kind == "diverging":
            out.append(_and(over(c - rule.z * se_c, rule.threshold, se_c), enough))
        else:
            i = int(np.searchsorted(scrapes, t, side="right")) - 1
            evals: bool | None = False
            k = int(last_finite[i])
            if isinstance(eval_values[i], float) and k >= 0 and scrapes[k] >= t - LAST_EVAL:
                # The eval losses are the recorded ones: exact, up to the digits they are written with.
                evals = _over(float(eval_array[k]), EVAL_RATIO * float(eval_min[i]), 1e-9 * float(eval_array[k]), 1.0)
            # ... unless the loss rose significantly over the recent window (b - z se_b > 0).
            late = slope(t, rule.recent)
            rising = over(late[0] - rule.z * late[1], 0.0, late[1]) if late else False
            out.append(_and(evals, over(-c - rule.z * se_c, 0.0, se_c), None if rising is None else not rising))
    return out


def alert_states(conditions: list[bool], times: np.ndarray, for_: float, keep: float) -> list[bool]:
    """Whether the alert fires at each evaluation, as Prometheus' alerting rule does with `for` and
    `keep_firing_for`."""
    firing, pending_since, keep_since = False, None, None
    out = []
    for t, cond in zip(times.tolist(), conditions, strict=True):
        if cond:
            keep_since = None
            if not firing:
                pending_since = t if pending_since is None else pending_since
                firing = t - pending_since >= for_
        elif firing and keep > 0:
            keep_since = t if keep_since is None else keep_since
            if t - keep_since >= keep:
                firing, pending_since, keep_since = False, None, None
        else:
            firing, pending_since, keep_since = False, None, None
        out.append(firing)
    return out


def trend_stream(rec: Recording, trend: Trend, times: np.ndarray) -> Stream:
    """Must fire where it fires with every uncertain evaluation false (but ``onset_slack`` after it starts to);
    may where it fires with them true."""
    rule = trend.rule
    sure = alert_states([c is True for c in trend_conditions(rec, trend.run_id, rule, times, trend.margin)],
                        times, rule.for_, rule.keep)
    maybe = alert_states([c is not False for c in trend_conditions(rec, trend.run_id, rule, times)],
                         times, rule.for_, rule.keep)
    must, since = set(), None
    for x, f in zip(times.tolist(), sure, strict=True):
        since = (x if since is None else since) if f else None
        if f and since is not None and x - since >= trend.onset_slack:
            must.add(x)
    return Stream(rule.alert, rule.severity, trend.run_id, trend.instance, frozenset(must),
                  frozenset(x for x, f in zip(times.tolist(), maybe, strict=True) if f))


@dataclass(frozen=True)
class Trend:
    """A trend rule (plateau, divergence, overfitting) judged on a run: it must and may fire where the
    noise-free statistic says so (:func:`trend_stream`)."""

    rule: TrendRule
    run_id: str
    instance: str
    # The margin of the must side, and how much later than its noise-free onset it must fire.
    margin: float = MARGIN
    onset_slack: float = 0.0

    @classmethod
    def plateau(cls, run_id: str, instance: str) -> Trend:
        """TrainingLossPlateau on a flat loss: the noise-free bound is 2 se_c, the threshold 1%. At 1 step/s
        and 7% noise se_c is ~0.21%, so a flat loss is only ~2.7 se_c inside it: certain at 2 se_c. A false
        evaluation ends the alert only after `keep_firing_for` (15m) of them, a quarter of the slope's hour,
        over which its error is more than half-correlated: far less likely than the 2.3% of one evaluation.
        One at the onset can restart the `for`: it must fire one `for` later than the noise-free onset."""
        return cls(PLATEAU, run_id, instance, margin=KEPT_MARGIN, onset_slack=PLATEAU.for_)


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    horizon: float
    # seed -> the runs of that seed
    runs: Callable[[int], list[RunSpec]]
    # (recording of every seed, interval, seed) -> what fires for that seed's runs
    expect: Callable[[Recording, int, int], list[Fires | Trend]] = lambda rec, interval, seed: []
    # Checks start here.
    check_from: float = 0.0


def rid(case: str, run: str, seed: int) -> str:
    return f"{case}-{run}-s{seed}"


def host(case: str, run: str, seed: int, port: int = 9945) -> str:
    return "-".join(part for part in (case, run, f"s{seed}") if part) + f":{port}"


def healthy(case: str, seed: int, run: str = "a", **overrides: object) -> RunSpec:
    """A healthy multi-hour fine-tune at 1 step/s: a fast descent that still improves by more than 10% per
    30 minutes after 3 hours, evaluations every 600 steps (45 s), checkpoints every 1200 steps (30 s)."""
    curve = Exponential(2.6, 0.45, 100 * MINUTE)
    spec = RunSpec(
        run_id=rid(case, run, seed), instance=host(case, run, seed), loss=curve, max_steps=100_000,
        seed=seed * 1000 + sum(map(ord, case + run)), warmup_steps=200,
        eval_every=600, eval_seconds=45.0, eval_loss=Scaled(curve, 1.08), save_every=1200, save_seconds=30.0,
    )
    return replace(spec, **overrides)  # type: ignore[arg-type]


def first_eval_at_or_after(t: float, interval: int) -> float:
    return math.ceil(t / interval - 1e-9) * interval


def last_eval_at_or_before(t: float, interval: int) -> float:
    return math.floor(t / interval + 1e-9) * interval


def _step_time_after(rec: Recording, run_id: str, t: float) -> float:
    """When the first step of the run ending at or after ``t`` ended."""
    for proc in rec.runs[run_id]:
        j = int(np.searchsorted(proc.times, t, side="left"))
        if j < len(proc.times):
            return float(proc.times[j])
    raise ValueError(f"no step of {run_id} after {t}")


def _last_step_before(rec: Recording, run_id: str, t: float) -> float:
    times = np.concatenate([p.times for p in rec.runs[run_id]])
    return float(times[times <= t].max())


def spike_fires(rec: Recording, interval: int, run_id: str, instance: str, at: float) -> Fires:
    """TrainingLossSpike from the first scrape that sees the spike while it is among the exporter's
    last 60 s of steps (training_loss_recent_max): the scrapes in [t, t + 60]."""
    t = _step_time_after(rec, run_id, at)
    start = first_eval_at_or_after(t, interval)
    return Fires("TrainingLossSpike", "warning", run_id, instance, start, last_eval_at_or_before(t + 60, interval))


def nonfinite_fires(rec: Recording, interval: int, run_id: str, instance: str, at: float) -> Fires:
    """TrainingLossNonFinite from the first scrape showing the counter's increase, for as long as
    increase(...[1m]) holds both samples: up to 60 s after it (exactly one evaluation at a 60 s scrape)."""
    t = _step_time_after(rec, run_id, at)
    start = first_eval_at_or_after(t, interval)
    return Fires("TrainingLossNonFinite", "critical", run_id, instance, start, start, lag=60.0)


def _healthy_case(seed: int) -> list[RunSpec]:
    return [healthy("healthy", seed)]


def _spike_runs(seed: int) -> list[RunSpec]:
    return [healthy("spike", seed, spikes=((60 * MINUTE, 8.0),))]


def _spike_expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
    return [spike_fires(rec, interval, rid("spike", "a", seed), host("spike", "a", seed), 60 * MINUTE)]


def _nan_runs(seed: int) -> list[RunSpec]:
    # Three NaN steps in a row (AMP skips their updates): the curve goes on.
    at = 60 * MINUTE
    return [healthy("nan", seed, nan_at=(at, at + 1.5, at + 3.0))]


def _nan_expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
    return [nonfinite_fires(rec, interval, rid("nan", "a", seed), host("nan", "a", seed), 60 * MINUTE)]


STALL_AT = 60 * MINUTE
STALL_HORIZON = 85 * MINUTE


def _stall_runs(seed: int) -> list[RunSpec]:
    return [healthy("stall", seed, stall=(STALL_AT, math.inf))]


def _stall_expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
    # time() - last step > 900 s from the first evaluation after last step + 900 s, then `for: 1m`.
    run_id = rid("stall", "a", seed)
    pending = first_eval_at_or_after(_last_step_before(rec, run_id, STALL_AT + 60) + 900 + 1e-6, interval)
    return [Fires("TrainingStalled", "critical", run_id, host("stall", "a", seed), pending + 60, STALL_HORIZON,
                  lead=interval)]


DOWN_AT = 60 * MINUTE


def _down_runs(seed: int) -> list[RunSpec]:
    return [healthy("down", seed, down_at=DOWN_AT)]


def _down_expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
    # up == 0 from the first scrape after the kill, then `for: 2m`; the dead target stays in service discovery
    # after the case's end too.
    failed = rec.first_scrape_at_or_after(DOWN_AT)
    return [Fires("TrainingExporterDown", "critical", rid("down", "a", seed), host("down", "a", seed),
                  failed + 120, rec.times[-1], lead=interval)]


def _two_runs(seed: int) -> list[RunSpec]:
    # Two runs on one machine (ports 9945 and 9946): a NaN in one, a spike in the other.
    return [
        healthy("two", seed, "a", instance=host("two", "", seed, 9945), nan_at=(40 * MINUTE,)),
        healthy("two", seed, "b", instance=host("two", "", seed, 9946), spikes=((60 * MINUTE, 6.0),),
                loss=Exponential(3.1, 0.6, 80 * MINUTE)),
    ]


def _two_expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
    return [
        nonfinite_fires(rec, interval, rid("two", "a", seed), host("two", "", seed, 9945), 40 * MINUTE),
        spike_fires(rec, interval, rid("two", "b", seed), host("two", "", seed, 9946), 60 * MINUTE),
    ]


RESTART_AT = 60 * MINUTE


def _restart_same_runs(seed: int) -> list[RunSpec]:
    # Killed (no final state), back 90 s later on the same target from its last checkpoint: shorter than the
    # 2 minutes TrainingExporterDown waits.
    return [healthy("rsame", seed, restart=Restart(RESTART_AT, 90.0))]


def _restart_other_runs(seed: int) -> list[RunSpec]:
    # The node is lost; the scheduler starts the run again on another node 60 s later and the old target
    # leaves service discovery.
    return [healthy("rother", seed, restart=Restart(RESTART_AT, 60.0, instance=host("rother", "b", seed)))]


def _restart_other_down_runs(seed: int) -> list[RunSpec]:
    # The same, but the old target stays listed (a static target list) and is down.
    restart = Restart(RESTART_AT, 60.0, instance=host("rotherdown", "b", seed), old_target="down")
    return [healthy("rotherdown", seed, restart=restart)]


def _accumulated_runs(seed: int) -> list[RunSpec]:
    # 16 micro-batches of 1.5 s per optimizer step: one step every 24 s, fewer steps than scrapes.
    curve = Exponential(2.4, 0.5, 120 * MINUTE)
    return [healthy("accum", seed, micro_step_seconds=1.5, accumulation=16, loss=curve, eval_loss=Scaled(curve, 1.1),
                    warmup_steps=20, eval_every=50, eval_seconds=60.0, save_every=100, save_seconds=40.0,
                    log_every=1, max_steps=10_000)]


def _completed_runs(seed: int) -> list[RunSpec]:
    # 4800 steps (~1h28 with the pauses), the learning rate reaching 0 at the last step, still improving;
    # after the final state is scraped the endpoint closes and the target stays down.
    curve = Exponential(2.6, 0.5, 60 * MINUTE)
    return [healthy("done", seed, loss=curve, eval_loss=Scaled(curve, 1.08), max_steps=4800)]


PLATEAU_DESCENT = Exponential(2.6, 0.8, 10 * MINUTE)


def _plateau_runs(seed: int) -> list[RunSpec]:
    # A fast descent, flat after about 80 minutes (a relative slope under 0.3% per 30 minutes), for two hours.
    return [healthy("plateau", seed, loss=PLATEAU_DESCENT, eval_loss=Scaled(PLATEAU_DESCENT, 1.08))]


def _plateau_expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
    return [Trend.plateau(rid("plateau", "a", seed), host("plateau", "a", seed))]


def _diverging(case: str, seed: int, descent: Exponential, at: float) -> RunSpec:
    """A descent, then the loss (eval loss with it) rises by 25% per 30 minutes from ``at`` while the
    gradient norm grows by 60% per 30 minutes."""
    curve = Then(descent, at, 0.25)
    return healthy(case, seed, loss=curve, eval_loss=Scaled(curve, 1.08), grad_norm=Then(Flat(1.0), at, 0.6))


DIVERGE_LATE_AT = 100 * MINUTE
DIVERGE_EARLY_AT = 40 * MINUTE


def _diverge_late_runs(seed: int) -> list[RunSpec]:
    # After an hour and a half of slow improvement.
    return [_diverging("diverge", seed, Exponential(2.6, 0.8, 20 * MINUTE), DIVERGE_LATE_AT)]


def _diverge_early_runs(seed: int) -> list[RunSpec]:
    # The shape: 40 minutes after a fast start, so that an hour back still holds the fast descent.
    return [_diverging("divearly", seed, Exponential(2.6, 0.8, 10 * MINUTE), DIVERGE_EARLY_AT)]


def _diverge_expect(case: str) -> Callable[[Recording, int, int], list[Fires | Trend]]:
    def expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
        # TrainingOverfitting is not listed: it must not fire at any time. TrainingLossPlateau is: its bound
        # (improves by less than 1%) holds for a rising loss too, once the rise fills its hour.
        run_id, instance = rid(case, "a", seed), host(case, "a", seed)
        return [Trend(DIVERGING, run_id, instance), Trend.plateau(run_id, instance)]

    return expect


OVERFIT_DESCENT = Exponential(2.6, 0.5, 60 * MINUTE)


def _overfit_runs(seed: int) -> list[RunSpec]:
    # The training loss keeps falling (~20% per 30 minutes), the eval loss turns up at 50 min by 8% per 30 minutes.
    eval_curve = Then(Scaled(OVERFIT_DESCENT, 1.1), 50 * MINUTE, 0.08)
    return [healthy("overfit", seed, loss=OVERFIT_DESCENT, eval_loss=eval_curve)]


def _overfit_expect(rec: Recording, interval: int, seed: int) -> list[Fires | Trend]:
    return [Trend(OVERFITTING, rid("overfit", "a", seed), host("overfit", "a", seed))]


CASES = (
    Case("healthy", "a healthy 3-hour run", 3 * HOUR, _healthy_case),
    Case("spike", "one step at 8x the loss at 60 min", 70 * MINUTE, _spike_runs, _spike_expect),
    Case("nan", "three NaN steps at 60 min, then normal steps", 70 * MINUTE, _nan_runs, _nan_expect),
    Case("stall", "steps stop at 60 min, the process stays up", STALL_HORIZON, _stall_runs, _stall_expect),
    Case("down", "the process is killed at 60 min, its target stays", 70 * MINUTE, _down_runs, _down_expect),
    Case("two", "two runs on one machine, a NaN in one, a spike in the other", 70 * MINUTE, _two_runs,
         _two_expect),
    Case("rsame", "killed at 60 min, back on the same target 90 s later", 90 * MINUTE, _restart_same_runs),
    Case("rother", "killed at 60 min, back on another target 60 s later", 90 * MINUTE, _restart_other_runs),
    Case("rotherdown", "killed at 60 min, back on another target 60 s later, the old target listed and down",
         90 * MINUTE, _restart_other_down_runs),
    Case("accum", "16x gradient accumulation: a step every 24 s", 2 * HOUR, _accumulated_runs),
    Case("done", "completed at ~1h28 with the learning rate at 0, then the endpoint closes", 110 * MINUTE,
         _completed_runs),
    Case("plateau", "a fast descent, then flat for two hours", 3 * HOUR + 15 * MINUTE, _plateau_runs,
         _plateau_expect),
    Case("diverge", "rising 25% per 30 min from 100 min, the grad norm growing", 2 * HOUR + 30 * MINUTE,
         _diverge_late_runs, _diverge_expect("diverge")),
    Case("divearly", "rising 25% per 30 min from 40 min, its hour still holding the fast descent", 95 * MINUTE,
         _diverge_early_runs, _diverge_expect("divearly")),
    Case("overfit", "the eval loss rising from 50 min while the training loss falls", 2 * HOUR,
         _overfit_runs, _overfit_expect),
)


# --------------------------------------------------------------------------- promtool files


@dataclass
class Built:
    """One promtool file and what each run_id in it stands for."""

    path: Path
    interval: int
    runs: dict[str, tuple[str, int]] = field(default_factory=dict)  # run_id -> (case, seed)


def _alert_labels(fire: Stream, components: dict[tuple[str, str], str]) -> dict[str, str]:
    return {"severity": fire.severity, "component": components.get((fire.alert, fire.severity), ""), "job": "training",
            "instance": fire.instance, "run_id": fire.run_id}


# promtool's query engine holds at most 10000 samples per query. Range selectors are read one series at a
# time, but a subquery's result is held whole: TrainingOverfitting's expression holds, per run, its
# last_over_time(...[1h:]) at the evaluation interval and three slopes' subqueries of m at 1m (1h, 1h, 30m).
GROUP_SAMPLES = 8000


def _subquery_points(case: Case, interval: int) -> float:
    per_run = (2 * (OVERFITTING.window / TREND_RESOLUTION + 1) + OVERFITTING.recent / TREND_RESOLUTION + 1
               + LAST_EVAL / interval + 1)
    return per_run * sum(len(case.runs(seed)) for seed in SEEDS)


def groups(interval: int, cases: tuple[Case, ...] = CASES) -> list[list[Case]]:
    """The cases packed into test groups (shorter cases together), each within GROUP_SAMPLES: a group's runs
    share its evaluations, whose cost is mostly one per rule and evaluation time whatever the series."""
    out: list[list[Case]] = []
    load = 0.0
    for case in sorted(cases, key=lambda c: c.horizon):
        need = _subquery_points(case, interval)
        if out and load + need <= GROUP_SAMPLES:
            out[-1].append(case)
            load += need
        else:
            out.append([case])
            load = need
    return out


def _group(cases: list[Case], interval: int, rules: list[Rule], built: Built) -> dict[str, object]:
    """One promtool test group: every seed of ``cases``. A case's runs end at its horizon (SIGTERM, the
    targets leave service discovery), after which they must fire nothing but what was firing keeps (its
    rule's keep_firing_for, one evaluation and one minute of windows)."""
    horizon = max(c.horizon for c in cases)
    specs = []
    for case in cases:
        for seed in SEEDS:
            for spec in case.runs(seed):
                built.runs[spec.run_id] = (case.name, seed)
                specs.append(replace(spec, end_at=case.horizon + 0.5))
    rec = simulate(specs, interval, horizon)
    all_times = np.arange(float(interval), horizon + 1e-6, interval)
    keep = {r.alert: r.keep for r in rules}
    streams = []
    for case in cases:
        times = all_times[(all_times >= case.check_from) & (all_times <= case.horizon + 1e-6)]
        for seed in SEEDS:
            for item in case.expect(rec, interval, seed):
                # An explicit expectation states its own end, which may be after the case's (a dead target).
                st = trend_stream(rec, item, times) if isinstance(item, Trend) else stream(item, all_times)
                if any(t >= case.horizon - interval for t in st.may):
                    tail = all_times[(all_times > case.horizon) &
                                     (all_times <= case.horizon + interval + 60 + keep.get(st.alert, 0.0))]
                    st = replace(st, may=st.may | frozenset(tail.tolist()))
                streams.append(st)
    produced = {key.split("{", 1)[0] for key in rec.series}
    components = {(r.alert, r.severity): r.component for r in rules}
    # An expected alert that no rule defines is asked too (and found missing).
    names = sorted({r.alert for r in rules} | {st.alert for st in streams})
    dense = {r.alert for r in rules if r.metrics & produced or any(m.startswith("run:") for m in r.metrics)}
    dense |= {st.alert for st in streams}
    start = min(c.check_from for c in cases)
    tests = []
    for t in all_times.tolist():
        if t < start:
            continue
        for name in names:
            if name not in dense and t % COARSE_CHECK_SECONDS:
                continue
            mine = [st for st in streams if st.alert == name]
            if any(t in st.may and t not in st.must for st in mine):
                continue
            expected = [{"exp_labels": _alert_labels(st, components)} for st in mine if t in st.must]
            tests.append({"eval_time": f"{int(t)}s", "alertname": name, "exp_alerts": expected})
    return {"interval": f"{interval}s", "input_series": rec.promtool_series(), "alert_rule_test": tests}


def _cost(group: list[Case], interval: int) -> float:
    """promtool's work for a group, roughly: every rule at every evaluation, plus about a third as much per
    run (its long ranges)."""
    runs = sum(len(case.runs(seed)) for case in group for seed in SEEDS)
    return max(c.horizon for c in group) / interval * (1 + 0.3 * runs)


def plan(cases: tuple[Case, ...] = CASES) -> list[tuple[int, list[list[Case]]]]:
    """promtool files as (interval, groups), the costliest first: an interval's groups in one file, or in two
    of about equal cost where that one file would be more than half of all the work (promtool runs on one
    core, the files run side by side)."""
    by_interval = {interval: groups(interval, cases) for interval in INTERVALS}
    total = sum(_cost(g, i) for i, gs in by_interval.items() for g in gs)
    files: list[tuple[int, list[list[Case]]]] = []
    for interval, gs in by_interval.items():
        if sum(_cost(g, interval) for g in gs) <= total / 2 or len(gs) < 2:
            files.append((interval, gs))
            continue
        bins: list[list[list[Case]]] = [[], []]
        for g in sorted(gs, key=lambda g: -_cost(g, interval)):
            min(bins, key=lambda b: sum(_cost(x, interval) for x in b)).append(g)
        files += [(interval, b) for b in bins]
    return sorted(files, key=lambda f: -sum(_cost(g, f[0]) for g in f[1]))


def build(interval: int, gs: list[list[Case]], path: Path, rule_files: list[Path]) -> Built:
    """Write one promtool file of the groups ``gs`` at ``interval``."""
    rules = alert_rules()
    built = Built(path, interval)
    doc = {
        "rule_files": [str(p) for p in rule_files],
        "evaluation_interval": f"{interval}s",
        "tests": [_group(group, interval, rules, built) for group in gs],
    }
    # JSON is YAML: written and read much faster than YAML for files this size.
    path.write_text(json.dumps(doc))
    return built


# --------------------------------------------------------------------------- promtool's verdict

_FAILURE = re.compile(r"alertname: (?P<name>\S+), time: (?P<time>\S+),\s*exp:\[(?P<exp>.*?)\],\s*got:\[(?P<got>.*?)\]",
                      re.DOTALL)
_LABELS = re.compile(r"Labels:\{(.*?)\}")
_RUN_ID = re.compile(r'run_id="([^"]*)"')
_INSTANCE = re.compile(r'instance="([^"]*)"')


def _seconds(text: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s|d)", text):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    return total


@dataclass(frozen=True)
class Mismatch:
    run_id: str
    alert: str
    time: float
    kind: str  # missing | unexpected
    instance: str


def mismatches(output: str) -> list[Mismatch]:
    """Every (run, alert, time) where promtool got another alert set than expected."""
    out = []
    for found in _FAILURE.finditer(output):
        def alerts(text: str) -> set[tuple[str, str]]:
            result = set()
            for labels in _LABELS.findall(text):
                run = _RUN_ID.search(labels)
                inst = _INSTANCE.search(labels)
                result.add((run[1] if run else "", inst[1] if inst else ""))
            return result

        exp, got = alerts(found["exp"]), alerts(found["got"])
        t = _seconds(found["time"])
        out += [Mismatch(r, found["name"], t, "missing", i) for r, i in sorted(exp - got)]
        out += [Mismatch(r, found["name"], t, "unexpected", i) for r, i in sorted(got - exp)]
    return out


@dataclass
class Verdict:
    built: Built
    returncode: int
    output: str
    found: list[Mismatch]

    @property
    def cases(self) -> set[str]:
        return {case for case, _ in self.built.runs.values()}

    @property
    def errors(self) -> list[str]:
        """What promtool could not evaluate (a query over its sample limit, a bad expr, a bad file)."""
        return re.findall(r"^\s*(?:rule: .*err: .*|.*error.*)$", self.output, re.IGNORECASE | re.MULTILINE)

    def for_case(self, case: str) -> dict[int, list[Mismatch]]:
        by_seed: dict[int, list[Mismatch]] = {seed: [] for seed in SEEDS}
        for m in self.found:
            owner = self.built.runs.get(m.run_id)
            if owner is not None and owner[0] == case:
                by_seed[owner[1]].append(m)
        return by_seed


def run_promtool(built: Built) -> Verdict:
    proc = subprocess.run(["promtool", "test", "rules", str(built.path)], capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    return Verdict(built, proc.returncode, output, mismatches(output))


def describe(found: list[Mismatch], limit: int = 6) -> str:
    """The first and last of each (run, alert, kind)'s mismatches as time spans, in minutes."""
    spans: dict[tuple[str, str, str, str], list[float]] = {}
    for m in found:
        spans.setdefault((m.run_id, m.alert, m.kind, m.instance), []).append(m.time)
    lines = [f"{run} {alert} {kind} ({inst}) at {min(ts) / 60:.2f}-{max(ts) / 60:.2f} min ({len(ts)} evaluations)"
             for (run, alert, kind, inst), ts in sorted(spans.items())]
    return "\n".join(lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else []))


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Verdict]]:
    """Every promtool file, each run as soon as it is written, side by side."""
    work = tmp_path_factory.mktemp("judgements")
    rule_files = rules_without_annotations(work)
    files = plan()
    with ThreadPoolExecutor(len(files)) as pool:
        running = [pool.submit(run_promtool, build(interval, gs, work / f"judgements_{k}_{interval}s.test.json",
                                                   rule_files))
                   for k, (interval, gs) in enumerate(files)]
        yield [future.result() for future in running]


@run_if(promtool=True)
@pytest.mark.parametrize("interval", INTERVALS, ids=[f"{i}s" for i in INTERVALS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_case(case: Case, interval: int, verdicts: list[Verdict]) -> None:
    verdict = next(v for v in verdicts if v.built.interval == interval and case.name in v.cases)
    if verdict.errors or (verdict.returncode != 0 and not verdict.found):
        pytest.fail(f"promtool could not run every test:\n{verdict.output[-3000:]}")
    by_seed = verdict.for_case(case.name)
    failed = {seed: found for seed, found in by_seed.items() if found}
    held = len(SEEDS) - len(failed)
    assert not failed, (
        f"{case.name} ({case.what}) at {interval}s held for {held} of {len(SEEDS)} seeds:\n"
        + "\n".join(f"seed {seed}:\n{describe(found)}" for seed, found in sorted(failed.items())))


def test_promtool_failures_are_read(tmp_path: Path) -> None:
    """The parser of promtool's report finds the run, the alert, the time and the direction of a mismatch."""
    output = """  FAILED:
    alertname: TrainingLossSpike, time: 1h1m15s,
        exp:[],
        got:[
            0:
              Labels:{alertname="TrainingLossSpike", instance="spike-a-s1:9945", job="training", run_id="spike-a-s1"}
              Annotations:{}
            ]
    alertname: TrainingStalled, time: 16m,
        exp:[
            0:
              Labels:{alertname="TrainingStalled", instance="st:9945", job="training", run_id="stall-a-s2"}
              Annotations:{}
            ],
        got:[]
"""
    assert mismatches(output) == [
        Mismatch("spike-a-s1", "TrainingLossSpike", 3675.0, "unexpected", "spike-a-s1:9945"),
        Mismatch("stall-a-s2", "TrainingStalled", 960.0, "missing", "st:9945"),
    ]


def test_rule_copies_keep_every_expr(tmp_path: Path) -> None:
    """The copies promtool reads differ from the project's rules by the annotations only."""
    for copy in rules_without_annotations(tmp_path):
        original = yaml.safe_load((RULES_DIR / copy.name).read_text())
        for group in original["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        assert yaml.safe_load(copy.read_text()) == original


def _single_process(case: Case) -> bool:
    return all(spec.restart is None for seed in SEEDS for spec in case.runs(seed))


@pytest.mark.parametrize("case", [c for c in CASES if _single_process(c)], ids=lambda c: c.name)
def test_expectations_agree_with_the_arithmetic(case: Case) -> None:
    """What each case states about the trend rules is what their noise-free arithmetic allows (at 60 s): a
    rule it does not list cannot fire by it at all, one it lists must fire, and a plateau fires to the end."""
    interval = 60
    specs = [replace(spec, end_at=case.horizon + 0.5) for seed in SEEDS for spec in case.runs(seed)]
    rec = simulate(specs, interval, case.horizon)
    times = np.arange(max(float(interval), case.check_from), case.horizon + 1e-6, interval)
    for seed in SEEDS:
        listed = {(item.rule.alert, item.run_id): item for item in case.expect(rec, interval, seed)
                  if isinstance(item, Trend)}
        for spec in case.runs(seed):
            for rule in (PLATEAU, DIVERGING, OVERFITTING):
                item = listed.get((rule.alert, spec.run_id))
                if item is None:
                    derived = trend_stream(rec, Trend(rule, spec.run_id, spec.instance), times)
                    assert not derived.may, (spec.run_id, rule.alert, min(derived.may) / 60)
                    continue
                derived = trend_stream(rec, item, times)
                if rule is PLATEAU and case.name == "plateau":
                    assert derived.must >= {t for t in times.tolist() if t >= case.horizon - 30 * MINUTE}
                elif rule is not PLATEAU:  # (a diverging loss only may read as a plateau at its end)
                    assert derived.must, (spec.run_id, rule.alert)


def test_the_completed_case_ends_at_a_learning_rate_of_0() -> None:
    """The case "done" is what it says: scraped completed, its last learning rate 0, its target then down."""
    case = next(c for c in CASES if c.name == "done")
    (spec,) = case.runs(1)
    rec = simulate([spec], 60, case.horizon)
    (proc,) = rec.runs[spec.run_id]
    assert proc.completed_at is not None and 85 * MINUTE < proc.completed_at < 92 * MINUTE
    key = f'{{job="training", instance="{spec.instance}", run_id="{spec.run_id}"'
    lr = rec.series[f"training_learning_rate{key}}}"]
    zero = [t for t, v in zip(rec.times.tolist(), lr, strict=True) if v == 0.0]
    # 0 from the last step on (warmup's first step of 0 ends before the first scrape), positive before.
    assert zero and min(zero) >= proc.times[-1] and rec.times[lr.index(0.0) - 1] < proc.times[-1]
    assert all(v > 0 for t, v in zip(rec.times.tolist(), lr, strict=True) if isinstance(v, float) and t < zero[0])
    completed = rec.series[f'training_state{key}, state="completed"}}']
    assert completed.count(1.0) == 1
    assert set(rec.series[f'up{{job="training", instance="{spec.instance}"}}'][completed.index(1.0) + 1 :]) == {0.0}
