"""A simulated fine-tuning run, as a Prometheus scraping its training exporter would hold it.

A :class:`RunSpec` describes a run the way one would describe a real one: how
many optimizer steps at what pace (gradient accumulation makes them fewer and
slower), the loss curve and its per-step noise, a cosine learning rate with a
linear warmup from 0, evaluations and checkpoint saves that pause training,
NaN steps, spikes, a stall, an exporter that dies, a restart under the same
run_id (on the same target or another one) and a completed end. :func:`simulate`
runs it step by step, then samples what the exporter would serve at every scrape
of a Prometheus scraping every ``interval`` seconds, following docs/metrics.md:

- ``training_loss`` is the newest step's loss as it is (NaN included);
  ``training_loss_ema`` the EMA (alpha 0.1) of the finite step losses,
  ``training_loss_variance`` the sample variance of the last 50 finite ones,
  ``training_step_loss_sum`` / ``_count`` the histogram of every finite step
  loss, ``training_nonfinite_loss_total`` the count of the others;
- ``training_loss_recent_max`` / ``training_loss_recent_spike_ratio`` the largest
  finite loss, and the largest ratio of a loss to the EMA before it, among the
  steps of the last 60 s; with no step in that window they keep their values;
- a scrape sees every step that ended before it (the exporter reads the
  step's device values at each scrape); evaluations and saves happen between
  two steps and pause them; ``training_step_duration_seconds`` covers the
  steps only;
- the learning rate is the one the last step used; the grad norm comes from the
  Trainer's logs, every ``log_every`` steps;
- ``training_state`` has one series per state, 1 for the current one; a
  completed run keeps serving until one scrape has read ``completed``;
- a process that dies leaves ``up == 0`` while its target stays in service
  discovery (no series left), nothing at all once the target is removed;
  Prometheus writes a staleness marker in every series that a scrape no
  longer returns (:data:`STALE`);
- a restarted process (same run_id) resumes from the last checkpoint: its step
  counts on from there, its counters, histogram, EMA and best evaluation start
  again, and its series are absent until it sets them;
- at ``end_at`` a process still serving gets SIGTERM: ``terminated`` is scraped
  once, then its target leaves service discovery (the end of an observation).

Random draws (loss noise, step time jitter, tokens, grad norm, eval noise) come
from one generator per quantity seeded by the run's ``seed`` and are indexed by
step, so that a run is the same at every scrape interval.

Series carry ``run_id``, ``instance`` and ``job`` (``training``); ``up`` carries
``instance`` and ``job``. Times are seconds on the scenario's clock, which starts
at 0 (promtool's time 0; :meth:`Recording.openmetrics` shifts it to Unix time).

The recording renders as ``input_series`` of a promtool rule test
(:meth:`Recording.promtool_series`: ``_`` for a scrape without the series,
``stale`` for the marker) and as OpenMetrics text for
``promtool tsdb create-blocks-from openmetrics`` (:meth:`Recording.openmetrics`:
staleness markers cannot be written there, a series just ends).

Loss and eval-loss curves are functions of ``x = step * step_seconds``, the
time the run would have trained to reach that step without pauses (a step
clock: a resumed run repeats the values of the steps it repeats). Multiply by
:data:`MINUTE` / :data:`HOUR` to write them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from exporter.config import ExporterConfig

MINUTE = 60.0
HOUR = 3600.0

Array = npt.NDArray[np.float64]

# The exporter's defaults (loss.ema_alpha, loss.variance_window, loss.window_seconds), read from its config.
_DEFAULTS = ExporterConfig()
EMA_ALPHA = _DEFAULTS.ema_alpha
VARIANCE_WINDOW = _DEFAULTS.variance_window
RECENT_WINDOW_SECONDS = _DEFAULTS.loss_window_seconds
STATES = ("idle", "training", "paused", "completed", "crashed", "terminated")
JOB = "training"


class _Stale:
    """Prometheus' staleness marker: the scrape no longer returned the series."""

    def __repr__(self) -> str:
        return "STALE"


STALE = _Stale()
Value = float | _Stale | None  # None: no sample at that scrape


# --------------------------------------------------------------------------- curves


class Curve(Protocol):
    """A mean loss as a function of ``x`` (seconds of training at the nominal step time, see the module doc)."""

    def __call__(self, x: Array) -> Array: ...


@dataclass(frozen=True)
class Exponential:
    """``floor + (start - floor) * exp(-x / tau)``: the fast descent of a fine-tune towards its floor."""

    start: float
    floor: float
    tau: float

    def __call__(self, x: Array) -> Array:
        return self.floor + (self.start - self.floor) * np.exp(-np.asarray(x, dtype=np.float64) / self.tau)


@dataclass(frozen=True)
class Flat:
    level: float

    def __call__(self, x: Array) -> Array:
        return np.full(np.shape(x), self.level, dtype=np.float64)


@dataclass(frozen=True)
class Trend:
    """``level * (1 + per_30min) ** (x / 1800)``: a steady relative change (negative: improving)."""

    level: float
    per_30min: float

    def __call__(self, x: Array) -> Array:
        return self.level * (1 + self.per_30min) ** (np.asarray(x, dtype=np.float64) / 1800.0)


@dataclass(frozen=True)
class Then:
    """``base`` up to ``at``, then a steady relative change from ``base(at)``: a divergence, an eval loss that
    turns up (overfitting), or a plateau (``per_30min`` 0)."""

    base: Curve
    at: float
    per_30min: float

    def __call__(self, x: Array) -> Array:
        x = np.asarray(x, dtype=np.float64)
        after = float(self.base(np.array([self.at]))[0]) * (1 + self.per_30min) ** ((x - self.at) / 1800.0)
        return np.where(x < self.at, self.base(x), after)


@dataclass(frozen=True)
class Scaled:
    base: Curve
    factor: float

    def __call__(self, x: Array) -> Array:
        return self.factor * self.base(x)


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Restart:
    """The process dies at ``at`` (killed: no final state scraped) and a new one starts ``gap`` seconds later
    under the same run_id, resuming from the last checkpoint: on the same target (``instance`` None, which
    stays in service discovery and is down meanwhile) or on another."""

    at: float
    gap: float
    instance: str | None = None
    # The old target (another instance only): removed from service discovery ("gone"), or left in it and
    # down ("down", e.g. a static target list).
    old_target: Literal["gone", "down"] = "gone"


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    loss: Curve
    max_steps: int
    # Seconds of one micro-batch; an optimizer step takes `accumulation` of them.
    micro_step_seconds: float = 1.0
    accumulation: int = 1
    instance: str = "gpu-0:9945"
    start: float = 0.0
    # Relative standard deviation of each optimizer step's loss around the curve, and of its duration.
    noise: float = 0.07
    step_jitter: float = 0.05
    seed: int = 0
    lr_peak: float = 2e-4
    warmup_steps: int = 100
    eval_every: int | None = None
    eval_seconds: float = 30.0
    eval_loss: Curve | None = None
    eval_noise: float = 0.005
    save_every: int | None = None
    save_seconds: float = 20.0
    # Times (scenario seconds): the first step ending at or after each has a NaN loss.
    nan_at: tuple[float, ...] = ()
    # Every step ending at or after this time has a NaN loss.
    nan_from: float | None = None
    # (time, factor): the first step ending at or after `time` has its loss multiplied by `factor`.
    spikes: tuple[tuple[float, float], ...] = ()
    # (from, until): no step begins in between, the process stays up (until may be math.inf).
    stall: tuple[float, float] | None = None
    # The process is killed at this time; its target stays in service discovery (up == 0).
    down_at: float | None = None
    restart: Restart | None = None
    # After a completed run's final state was scraped the endpoint closes: its target is then down
    # ("down", still in service discovery) or removed from it ("gone").
    after_end: Literal["down", "gone"] = "down"
    # The end of the observation: a process still serving then gets SIGTERM (state terminated, scraped once
    # before its endpoint closes) and its target leaves service discovery; a target already down stays so.
    end_at: float | None = None
    grad_norm: Curve = Flat(1.0)
    grad_noise: float = 0.1
    log_every: int = 10
    tokens_per_micro_step: int = 4096
    samples_per_micro_step: int = 8

    @property
    def step_seconds(self) -> float:
        return self.micro_step_seconds * self.accumulation

    def x(self, step: Array) -> Array:
        """The curves' argument at ``step``."""
        return np.asarray(step, dtype=np.float64) * self.step_seconds

    def learning_rate(self, step: Array) -> Array:
        """The learning rate step k (1-based) uses: linear warmup from 0 at step 1, cosine decay to 0 at the
        last step."""
        s = np.asarray(step, dtype=np.float64) - 1
        w = float(self.warmup_steps)
        warm = self.lr_peak * s / max(w, 1.0)
        progress = np.clip((s - w) / max(self.max_steps - 1 - w, 1.0), 0.0, 1.0)
        cosine = self.lr_peak * 0.5 * (1 + np.cos(np.pi * progress))
        return np.where(s < w, warm, cosine)


# --------------------------------------------------------------------------- one process


@dataclass
class Process:
    """One process of a run: its steps (per-step arrays, in time order) and events."""

    spec: RunSpec
    instance: str
    start: float
    start_step: int
    # When the process is gone (killed), or math.inf; a completed process leaves after its final scrape.
    killed_at: float
    # Whether the target leaves service discovery when the process is killed.
    leaves_sd: bool
    completed_at: float | None = None
    # When it got SIGTERM (the run's end_at while it still served).
    terminated_at: float | None = None
    times: Array = field(default_factory=lambda: np.zeros(0))
    steps: Array = field(default_factory=lambda: np.zeros(0))
    losses: Array = field(default_factory=lambda: np.zeros(0))
    durations: Array = field(default_factory=lambda: np.zeros(0))
    tokens: Array = field(default_factory=lambda: np.zeros(0))
    samples: Array = field(default_factory=lambda: np.zeros(0))
    # (time, value) of each grad-norm log, (time, step, loss) of each evaluation, (time, step) of each save.
    grad_logs: list[tuple[float, float]] = field(default_factory=list)
    evals: list[tuple[float, int, float]] = field(default_factory=list)
    saves: list[tuple[float, int]] = field(default_factory=list)

    # After each step (index j): the exporter's loss statistics.
    ema: Array = field(default_factory=lambda: np.zeros(0))
    variance: Array = field(default_factory=lambda: np.zeros(0))
    hist_sum: Array = field(default_factory=lambda: np.zeros(0))
    hist_count: Array = field(default_factory=lambda: np.zeros(0))
    nonfinite: Array = field(default_factory=lambda: np.zeros(0))
    spike_ratio: Array = field(default_factory=lambda: np.zeros(0))
    duration_sum: Array = field(default_factory=lambda: np.zeros(0))
    grad_times: list[float] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        return int(self.steps[-1]) if len(self.steps) else self.start_step


@dataclass(frozen=True)
class _Draws:
    """The run's random numbers, indexed by step, so that a resumed process repeats a step's values."""

    loss: Array
    duration: Array
    tokens: Array
    grad: Array
    eval: Array

    @classmethod
    def of(cls, spec: RunSpec, horizon: float) -> _Draws:
        # One generator per quantity, so that a step's draws do not depend on how many steps are drawn.
        n = min(spec.max_steps, math.ceil(horizon / spec.step_seconds * 1.5) + 10) + 1
        return cls(*(np.random.default_rng([spec.seed, k]).standard_normal(n) for k in range(5)))


def _step_loop(spec: RunSpec, proc: Process, draws: _Draws, horizon: float) -> None:
    """Lay out the process's steps, evaluations and saves in time, until it completes, is killed or the
    simulation ends (``horizon``)."""
    times: list[float] = []
    steps: list[int] = []
    durations: list[float] = []
    t = proc.start
    step = proc.start_step
    stall_from, stall_until = spec.stall if spec.stall is not None else (math.inf, math.inf)
    stop = min(proc.killed_at, spec.end_at if spec.end_at is not None else math.inf)
    jitter = (spec.step_seconds * np.maximum(0.2, 1 + spec.step_jitter * draws.duration)).tolist()
    eval_every = spec.eval_every if spec.eval_loss is not None else None
    while step < spec.max_steps and step + 1 < len(jitter):
        if stall_from <= t < stall_until:
            t = stall_until
        duration = jitter[step + 1]
        end = t + duration
        if end > stop or end > horizon:
            break
        step += 1
        times.append(end)
        steps.append(step)
        durations.append(duration)
        t = end
        if eval_every and step % eval_every == 0:
            t += spec.eval_seconds
            if t > stop:
                break
            proc.evals.append((t, step, math.nan))
        if spec.save_every and (step % spec.save_every == 0 or step == spec.max_steps):
            t += spec.save_seconds
            if t > stop:
                break
            proc.saves.append((t, step))
    if proc.evals and spec.eval_loss is not None:
        at = np.array([e[1] for e in proc.evals], dtype=np.float64)
        mean = spec.eval_loss(spec.x(at)) * (1 + spec.eval_noise * draws.eval[at.astype(np.int64)])
        proc.evals = [(e[0], e[1], float(v)) for e, v in zip(proc.evals, mean, strict=True)]
    if step == spec.max_steps and t <= stop:
        proc.completed_at = t
    elif spec.end_at is not None and proc.start <= spec.end_at < proc.killed_at:
        proc.terminated_at = spec.end_at
    proc.times = np.array(times, dtype=np.float64)
    proc.steps = np.array(steps, dtype=np.float64)
    proc.durations = np.array(durations, dtype=np.float64)
    idx = proc.steps.astype(np.int64)
    mean = spec.loss(spec.x(proc.steps)) if len(idx) else np.zeros(0)
    losses = np.maximum(mean * (1 + spec.noise * draws.loss[idx]), 1e-6)
    for when, factor in spec.spikes:
        j = int(np.searchsorted(proc.times, when, side="left"))
        if j < len(losses):
            losses[j] *= factor
    for when in spec.nan_at:
        j = int(np.searchsorted(proc.times, when, side="left"))
        if j < len(losses):
            losses[j] = math.nan
    if spec.nan_from is not None:
        losses[proc.times >= spec.nan_from] = math.nan
    proc.losses = losses
    per_step = spec.accumulation * np.maximum(0.5, 1 + 0.1 * draws.tokens[idx])
    proc.tokens = np.cumsum(np.round(spec.tokens_per_micro_step * per_step))
    proc.samples = np.cumsum(np.full(len(idx), spec.samples_per_micro_step * spec.accumulation, dtype=np.float64))
    logged = [j for j, k in enumerate(steps) if k % spec.log_every == 0]
    if logged:
        at = proc.steps[logged]
        norms = spec.grad_norm(spec.x(at)) * np.maximum(0.05, 1 + spec.grad_noise * draws.grad[at.astype(np.int64)])
        proc.grad_logs = list(zip(proc.times[logged].tolist(), norms.tolist(), strict=True))


def _loss_statistics(proc: Process) -> None:
    """The exporter's loss statistics after each step (what exporter.stats.LossStats holds then)."""
    losses = proc.losses
    n = len(losses)
    finite = np.isfinite(losses)
    ema = np.full(n, math.nan)
    ratio = np.full(n, math.nan)
    current: float | None = None
    for j in np.flatnonzero(finite):
        v = float(losses[j])
        ratio[j] = v / current if current is not None and current > 0 else 1.0
        current = v if current is None else EMA_ALPHA * v + (1 - EMA_ALPHA) * current
        ema[j] = current
    # A non-finite step changes nothing: carry the values of the step before.
    seen = np.maximum.accumulate(np.where(finite, np.arange(n), -1)) if n else np.zeros(0, dtype=np.int64)
    ema = np.where(seen >= 0, ema[np.maximum(seen, 0)], math.nan)
    # Sample variance of the last VARIANCE_WINDOW finite losses, for the k-th finite loss.
    values = losses[finite]
    by_finite = np.full(len(values), math.nan)
    for k in range(1, min(len(values), VARIANCE_WINDOW - 1)):
        by_finite[k] = float(np.var(values[: k + 1], ddof=1))
    if len(values) >= VARIANCE_WINDOW:
        windows = np.lib.stride_tricks.sliding_window_view(values, VARIANCE_WINDOW)
        by_finite[VARIANCE_WINDOW - 1 :] = windows.var(axis=1, ddof=1)
    count = np.cumsum(finite)
    proc.variance = np.where(count >= 1, by_finite[np.maximum(count - 1, 0)], math.nan) if n else np.zeros(0)
    proc.ema, proc.spike_ratio = ema, ratio
    proc.hist_sum = np.cumsum(np.where(finite, losses, 0.0))
    proc.hist_count = count.astype(np.float64)
    proc.nonfinite = np.cumsum((~finite).astype(np.float64))
    proc.duration_sum = np.cumsum(proc.durations)
    proc.grad_times = [t for t, _ in proc.grad_logs]


@functools.cache
def processes(spec: RunSpec, horizon: float) -> list[Process]:
    """The run's processes up to ``horizon``, simulated step by step (the same for every scrape interval)."""
    draws = _Draws.of(spec, horizon)
    killed = spec.down_at if spec.down_at is not None else math.inf
    if spec.restart is not None:
        killed = min(killed, spec.restart.at)
    moves = spec.restart is not None and spec.restart.instance not in (None, spec.instance)
    first = Process(spec, spec.instance, spec.start, 0, killed,
                    leaves_sd=moves and spec.restart is not None and spec.restart.old_target == "gone")
    _step_loop(spec, first, draws, horizon)
    _loss_statistics(first)
    out = [first]
    ends = spec.end_at if spec.end_at is not None else math.inf
    if spec.restart is not None and first.completed_at is None and spec.restart.at + spec.restart.gap < ends:
        resume = first.saves[-1][1] if first.saves else 0
        second = Process(spec, spec.restart.instance or spec.instance, spec.restart.at + spec.restart.gap, resume,
                         spec.down_at if spec.down_at is not None and spec.down_at > spec.restart.at else math.inf,
                         leaves_sd=False)
        _step_loop(spec, second, draws, horizon)
        _loss_statistics(second)
        out.append(second)
    return out


# --------------------------------------------------------------------------- scraping


def _labels(run_id: str, instance: str, **extra: str) -> str:
    pairs = {"job": JOB, "instance": instance, "run_id": run_id, **extra}
    return "{" + ", ".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"


def series_key(name: str, run_id: str, instance: str, **extra: str) -> str:
    """The promtool series text of one series: ``name{job=..., instance=..., run_id=...}``."""
    return name + _labels(run_id, instance, **extra)


def up_key(instance: str) -> str:
    return f'up{{job="{JOB}", instance="{instance}"}}'


def _alive_until(proc: Process, scrape_times: Array) -> float:
    """The last time a scrape of the process succeeds: before it is killed, or its final scrape once completed."""
    final = proc.completed_at if proc.completed_at is not None else proc.terminated_at
    if final is None:
        return proc.killed_at
    after = scrape_times[scrape_times >= final]
    return float(after[0]) if len(after) else math.inf


def _columns(proc: Process, at: Array) -> dict[str, list[float | None]]:
    """What the process's /metrics shows at each scrape time of ``at`` (all while it serves), by series name
    (``name|state`` for a state); None where the series does not exist yet."""
    spec = proc.spec
    n = len(at)
    j = np.searchsorted(proc.times, at, side="right") - 1
    stepped = j >= 0
    jj = np.maximum(j, 0)

    def per_step(values: Array, default: float | None = None, nan: bool = False) -> list[float | None]:
        """The value after the last step before each scrape (NaN: not set yet, unless ``nan``)."""
        if not len(values):
            return [default] * n
        return [v if ok and (nan or not math.isnan(v)) else default
                for v, ok in zip(values[jj].tolist(), stepped.tolist(), strict=True)]

    out: dict[str, list[float | None]] = {
        "training_step": per_step(proc.steps, float(proc.start_step)),
        "training_max_steps": [float(spec.max_steps)] * n,
        "training_start_time_seconds": [proc.start] * n,
        "training_nonfinite_loss_total": per_step(proc.nonfinite, 0.0),
        "training_tokens_total": per_step(proc.tokens, 0.0),
        "training_samples_total": per_step(proc.samples, 0.0),
        "training_last_step_timestamp_seconds": per_step(proc.times),
        "training_learning_rate": per_step(spec.learning_rate(proc.steps) if len(proc.steps) else proc.steps),
        "training_step_duration_seconds_count": per_step(np.arange(1.0, len(proc.times) + 1)),
        "training_step_duration_seconds_sum": per_step(proc.duration_sum),
        "training_step_loss_count": per_step(proc.hist_count),
        "training_step_loss_sum": per_step(proc.hist_sum),
        "training_loss_ema": per_step(proc.ema),
        "training_loss_variance": per_step(proc.variance),
    }
    # The newest step's loss as it is, NaN included.
    out["training_loss"] = per_step(proc.losses, nan=True)
    state_now = np.full(n, "training", dtype=object)
    if proc.completed_at is not None:
        state_now[at >= proc.completed_at] = "completed"
    if proc.terminated_at is not None:
        state_now[at >= proc.terminated_at] = "terminated"
    for state in STATES:
        out[f"training_state|{state}"] = [1.0 if c == state else 0.0 for c in state_now.tolist()]
    # The largest finite loss (and spike ratio) of the steps of the last 60 s; kept when there is none.
    finite = np.isfinite(proc.losses)
    losses = np.where(finite, proc.losses, -math.inf)
    ratios = np.where(finite, proc.spike_ratio, -math.inf)
    lo = np.searchsorted(proc.times, at - RECENT_WINDOW_SECONDS, side="left")
    recent_max: list[float | None] = []
    recent_ratio: list[float | None] = []
    kept: tuple[float | None, float | None] = (None, None)
    for a_, b_ in zip(lo.tolist(), j.tolist(), strict=True):
        if b_ >= a_:
            top = float(losses[a_ : b_ + 1].max())
            if top > -math.inf:
                kept = (top, float(ratios[a_ : b_ + 1].max()))
        recent_max.append(kept[0])
        recent_ratio.append(kept[1])
    out["training_loss_recent_max"] = recent_max
    out["training_loss_recent_spike_ratio"] = recent_ratio
    g = np.searchsorted(np.array(proc.grad_times), at, side="right") - 1
    norms = [v for _, v in proc.grad_logs]
    out["training_grad_norm"] = [norms[k] if k >= 0 else None for k in g.tolist()]
    # Evaluations: the last one's loss and step, their count, the best finite loss so far and its step.
    e = np.searchsorted(np.array([ev[0] for ev in proc.evals]), at, side="right") - 1
    best: list[tuple[float, int] | None] = []
    current: tuple[float, int] | None = None
    for _, step, loss in proc.evals:
        if math.isfinite(loss) and (current is None or loss < current[0]):
            current = (loss, step)
        best.append(current)
    out["training_evaluations_total"] = [float(k + 1) for k in e.tolist()]
    out["training_eval_loss"] = [proc.evals[k][2] if k >= 0 else None for k in e.tolist()]
    out["training_eval_step"] = [float(proc.evals[k][1]) if k >= 0 else None for k in e.tolist()]
    best_at = [best[k] if k >= 0 else None for k in e.tolist()]
    out["training_eval_best_loss"] = [b[0] if b is not None else None for b in best_at]
    out["training_eval_best_step"] = [float(b[1]) if b is not None else None for b in best_at]
    c = np.searchsorted(np.array([sv[0] for sv in proc.saves]), at, side="right") - 1
    out["training_checkpoint_step"] = [float(proc.saves[k][1]) if k >= 0 else None for k in c.tolist()]
    return out


@dataclass
class Recording:
    """What Prometheus holds: per series (promtool series text), one value per scrape."""

    interval: float
    times: Array
    series: dict[str, list[Value]]
    runs: Mapping[str, list[Process]]

    def promtool_series(self) -> list[dict[str, str]]:
        """``input_series`` entries of a promtool rule test (values in expanding notation)."""
        return [{"series": key, "values": _expand(values)} for key, values in self.series.items()]

    def openmetrics(self, base: float) -> Iterator[str]:
        """OpenMetrics text lines (``# EOF`` last), the scenario's time 0 at Unix time ``base``."""
        families: dict[str, list[str]] = {}
        for key in self.series:
            families.setdefault(_family(key.split("{", 1)[0]), []).append(key)
        for family, keys in families.items():
            yield f"# TYPE {family} {_kind(family)}"
            for key in keys:
                name, labels = key.split("{", 1)
                labels = "{" + labels.replace(", ", ",")
                # Gauges holding a time are on the scenario's clock too.
                shift = base if name in _TIMES else 0.0
                for t, v in zip(self.times, self.series[key], strict=True):
                    if isinstance(v, float):
                        yield f"{name}{labels} {_number(v + shift)} {base + float(t):.3f}"
                if name.endswith("_count") and _kind(family) == "histogram":
                    # The +Inf bucket equals the count: the one bucket a histogram must have.
                    bucket = f'{family}_bucket{labels[:-1]},le="+Inf"}}'
                    for t, v in zip(self.times, self.series[key], strict=True):
                        if isinstance(v, float):
                            yield f"{bucket} {_number(v)} {base + float(t):.3f}"
        yield "# EOF"

    def time_of_step(self, run_id: str, step: int) -> float:
        """When the first process of the run that reached ``step`` ended it."""
        for proc in self.runs[run_id]:
            j = int(np.searchsorted(proc.steps, step, side="left"))
            if j < len(proc.steps) and proc.steps[j] == step:
                return float(proc.times[j])
        raise ValueError(f"run {run_id} never reached step {step}")

    def first_scrape_at_or_after(self, t: float) -> float:
        return float(self.times[np.searchsorted(self.times, t, side="left")])


_HISTOGRAMS = ("training_step_loss", "training_step_duration_seconds")
_TIMES = ("training_start_time_seconds", "training_last_step_timestamp_seconds")
_COUNTERS = ("training_nonfinite_loss_total", "training_tokens_total", "training_samples_total",
             "training_evaluations_total")


def _family(name: str) -> str:
    for h in _HISTOGRAMS:
        if name in (f"{h}_sum", f"{h}_count"):
            return h
    return name.removesuffix("_total") if name in _COUNTERS else name


def _kind(family: str) -> str:
    if family in _HISTOGRAMS:
        return "histogram"
    return "counter" if f"{family}_total" in _COUNTERS else "gauge"


def _number(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _expand(values: Sequence[Value]) -> str:
    """promtool's expanding notation: ``a`` repeated n+1 times is ``axn``, n missing samples ``_xn``."""
    tokens = ["_" if v is None else "stale" if isinstance(v, _Stale) else _number(v) for v in values]
    out: list[str] = []
    i = 0
    while i < len(tokens):
        k = i
        while k + 1 < len(tokens) and tokens[k + 1] == tokens[i] and tokens[i] != "stale":
            k += 1
        run = k - i + 1
        if tokens[i] == "_":
            out.append("_" if run == 1 else f"_x{run}")
        elif run == 1:
            out.append(tokens[i])
        else:
            out.append(f"{tokens[i]}x{run - 1}")
        i = k + 1
    return " ".join(out)


def simulate(specs: Sequence[RunSpec], interval: float, horizon: float) -> Recording:
    """Scrape every ``interval`` seconds from 0 to ``horizon`` (inclusive) the exporters of ``specs``."""
    times = np.arange(0.0, horizon + interval / 2, interval)
    n = len(times)
    series: dict[str, list[Value]] = {}
    runs: dict[str, list[Process]] = {}

    # Per target: at each scrape, up (1, 0) or not in service discovery (None).
    targets: dict[str, list[float | None]] = {}
    for spec in specs:
        procs = processes(spec, float(horizon))
        runs[spec.run_id] = procs
        for p_index, proc in enumerate(procs):
            until = _alive_until(proc, times)
            nxt = procs[p_index + 1] if p_index + 1 < len(procs) else None
            up = targets.setdefault(proc.instance, [None] * n)
            serving = (times >= proc.start) & (times <= until) & (times < proc.killed_at)
            index = np.flatnonzero(serving)
            for name, values in _columns(proc, times[index]).items():
                base, _, state = name.partition("|")
                column = series.setdefault(series_key(base, spec.run_id, proc.instance,
                                                      **({"state": state} if state else {})), [None] * n)
                for i, v in zip(index.tolist(), values, strict=True):
                    if v is not None:
                        column[i] = v
            for i in index.tolist():
                up[i] = 1.0
            # Gone: down while the target stays in service discovery.
            leaves = proc.terminated_at is not None or (
                proc.leaves_sd if proc.completed_at is None else spec.after_end == "gone")
            if leaves:
                continue
            gone_from = index[-1] + 1 if len(index) else int(np.searchsorted(times, proc.start))
            for i in range(gone_from, n):
                if nxt is not None and nxt.instance == proc.instance and times[i] >= nxt.start:
                    break
                if up[i] is None:
                    up[i] = 0.0
    for instance, ups in targets.items():
        series[up_key(instance)] = list(ups)
    # Staleness markers: a series a scrape no longer returns (scrape failed, target removed, series gone).
    for column in series.values():
        for i in range(1, n):
            if column[i] is None and isinstance(column[i - 1], float):
                column[i] = STALE
    return Recording(interval, times, series, runs)
