"""Every threshold and window the project judges a run by: the one place to read and tune them.

One entry per (alert, severity) of ``prometheus/rules/*.alerts.yml`` holds its
``for`` and ``keep_firing_for``, every number of its expr (other than the 0
and 1 of a comparison or a ratio) and every range, subquery step and offset,
each under a name with a one-line why. After them come the values that are no alert's: those the
advisor, the checkpoint report (``layer_drift.json`` /
``parameter_stability.json``, described in docs/analytics.md) and the
dashboards use beside the alerts' own.

Prometheus has no variables, so every value of an alert is also written as a
literal in its rule's expr. tests/test_rules.py checks that the two agree:
the rule's ``for`` and ``keep_firing_for`` equal the entry's, and the windows
and the numbers of its expr are exactly the entry's, one entry per rule and no
entry without one.
Change a value here and in the expr together, then regenerate what is built
from it (``make docs dashboards``).

Plain data only: this module imports no other project module and nothing
heavy, so that the docs generator, the dashboards' code and the tests can
read it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["critical", "warning", "info"]

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(duration: str) -> float:
    """Seconds of a Prometheus duration with one unit (``"90s"``, ``"15m"``, ``"7d"``)."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)", duration)
    if match is None:
        raise ValueError(f"not a single-unit Prometheus duration: {duration!r}")
    return float(int(match[1]) * _UNIT_SECONDS[match[2]])


@dataclass(frozen=True)
class Number:
    """A number as its expr writes it (an int stays an int, so that generated JSON keeps its form)."""

    value: float
    why: str


@dataclass(frozen=True)
class Window:
    """A range, subquery step or offset as its expr writes it (``"5m"``)."""

    duration: str
    why: str

    @property
    def seconds(self) -> float:
        return duration_seconds(self.duration)


@dataclass(frozen=True)
class AlertThresholds:
    """The values of one alerting rule (one alert at one severity)."""

    alert: str
    severity: Severity
    for_: str
    # What fires it, in one line (the docs' threshold table).
    when: str
    numbers: Mapping[str, Number] = field(default_factory=dict)
    windows: Mapping[str, Window] = field(default_factory=dict)
    # How long it keeps firing after its condition stops holding ("0s": resolves at once).
    keep_firing_for: str = "0s"

    def value(self, name: str) -> float:
        return self.numbers[name].value

    def seconds(self, name: str) -> float:
        return self.windows[name].seconds

    def duration(self, name: str) -> str:
        return self.windows[name].duration

    @property
    def for_seconds(self) -> float:
        return duration_seconds(self.for_)

    @property
    def keep_firing_for_seconds(self) -> float:
        return duration_seconds(self.keep_firing_for)


@dataclass(frozen=True)
class Setting:
    """A value that is no alert's, used by ``used_by`` beside the alerts' values."""

    value: float
    used_by: str
    why: str


# --------------------------------------------------------------------------- loss (loss.alerts.yml)

LOSS_NONFINITE = AlertThresholds(
    "TrainingLossNonFinite", "critical", "0s",
    "the last loss is NaN/Inf, or the non-finite step counter rose within `recent`",
    windows={
        "recent": Window("1m", "resolves this long after the last non-finite step; keep it >= 2 scrape intervals"),
    },
)
LOSS_SPIKE = AlertThresholds(
    "TrainingLossSpike", "warning", "0s",
    "a step's loss > `ratio` x the EMA before it or the mean of the finite samples over `baseline`, "
    "and > `margin` above it",
    numbers={
        "ratio": Number(2, "a step this many times its recent level is a spike, not noise"),
        "margin": Number(0.1, "absolute margin that keeps the noise of a nearly converged loss (0.03 -> 0.08) out"),
        "min_samples": Number(5, "finite samples the baseline needs, so that the first scrapes of a run are not "
                                 "judged"),
        "max_step_age_seconds": Number(60, "the exporter's window of recent steps is trusted only while steps "
                                           "are being taken (its gauges keep their values when they stop)"),
    },
    windows={
        "baseline": Window("5m", "the finite sampled losses the last one is compared with"),
    },
)
# The loss trend statistic of TrainingLossPlateau, TrainingLossDiverging and TrainingOverfitting (and the
# advisor's verdict): m = the mean step loss over `average` from the training_step_loss histogram, its
# least-squares slope b and mean L over the window (subquery step `resolution`), N = steps in the window,
# se_b = sqrt(training_loss_variance) * sqrt(`steps_factor` / N) / `window_seconds`, the relative change per
# `per_seconds` c = b * per_seconds / L and its standard error se_c = se_b * per_seconds / L.
LOSS_PLATEAU = AlertThresholds(
    "TrainingLossPlateau", "info", "15m",
    "the mean step loss (over `average`) improved by less than `min_improvement` per `per_seconds` s over "
    "`window`, at `z` standard errors (-c + z se_c), with >= `min_steps` steps in the window and the window "
    "covered (the histogram existed `window` ago)",
    numbers={
        "min_improvement": Number(0.01, "relative improvement per `per_seconds` below which the loss is flat"),
        "z": Number(2, "standard errors on the improvement's bound: flat with about 97.7% confidence"),
        "steps_factor": Number(12, "Var(b) = 12 sigma^2 / (N W^2) for a least-squares slope over N equally "
                                   "spaced independent steps"),
        "window_seconds": Number(3600, "`window` in seconds, the W of the slope's standard error"),
        "per_seconds": Number(1800, "the change is stated per 30 minutes"),
        "min_steps": Number(100, "steps the window must hold, so that a slow or paused run is not judged"),
    },
    windows={
        "window": Window("1h", "the span of the slope: long enough that 7% step noise bounds it within 0.2% "
                               "per 30 minutes at 1 step/s; also the offset that requires it covered (se_b "
                               "assumes the N steps spread over all of it)"),
        "average": Window("5m", "m is the mean of every finite step loss over this (the histogram's rate)"),
        "resolution": Window("1m", "step of the subqueries of m"),
    },
    keep_firing_for="15m",
)
LOSS_DIVERGING = AlertThresholds(
    "TrainingLossDiverging", "warning", "10m",
    "the mean step loss (over `average`) rose by more than `min_rise` per `per_seconds` s over `window`, "
    "at `z` standard errors (c - z se_c), with >= `min_steps` steps in the window and the window covered",
    numbers={
        "min_rise": Number(0.05, "a rise of 5% per 30 minutes is no noise and no plateau: the run diverges"),
        "z": Number(2, "standard errors on the rise's bound: rising with about 97.7% confidence"),
        "steps_factor": Number(12, "as for TrainingLossPlateau"),
        "window_seconds": Number(1800, "`window` in seconds, the W of the slope's standard error"),
        "per_seconds": Number(1800, "the change is stated per 30 minutes"),
        "min_steps": Number(50, "steps the window must hold, so that a slow or paused run is not judged"),
    },
    windows={
        "window": Window("30m", "the span of the slope: short enough to catch a divergence within the hour; "
                                "also the offset that requires it covered"),
        "average": Window("5m", "as for TrainingLossPlateau"),
        "resolution": Window("1m", "as for TrainingLossPlateau"),
    },
)
STALLED = AlertThresholds(
    "TrainingStalled", "critical", "1m",
    "no optimizer step for `max_step_age_seconds` s in state training",
    numbers={
        "max_step_age_seconds": Number(900, "longer than an evaluation or checkpoint save usually pauses steps; "
                                            "raise it if yours take longer"),
    },
)
HANG_SUSPECTED = AlertThresholds(
    "TrainingHangSuspected", "critical", "1m",
    "the exporter's watchdog saw no optimizer step for longer than its threshold (watchdog.multiple x the "
    "recent median step time, at least watchdog.floor_seconds) outside evaluation and checkpointing, in "
    "state training",
)

# --------------------------------------------------------------------------- gradients (gradients.alerts.yml)

GRADIENT_EXPLODING = AlertThresholds(
    "TrainingGradientExploding", "warning", "5m",
    "global grad norm > `max_norm` (lowest of `sustain`)",
    numbers={"max_norm": Number(100, "two orders of magnitude above the usual clipping norm of 1.0")},
    windows={"sustain": Window("2m", "the lowest value of this window is judged: a NaN sample neither fires "
                                     "nor resets the `for`")},
)
GRADIENT_VANISHING = AlertThresholds(
    "TrainingGradientVanishing", "warning", "10m",
    "global grad norm < `min_norm` (highest of `sustain`)",
    numbers={"min_norm": Number(1e-07, "a global norm this small moves no weight: the model no longer learns")},
    windows={"sustain": Window("2m", "the highest value of this window is judged: a NaN sample neither fires "
                                     "nor resets the `for`")},
)
LAYER_GRADIENT_EXPLODING = AlertThresholds(
    "TrainingLayerGradientExploding", "warning", "5m",
    "a group's grad norm > `max_norm` (lowest of `sustain`)",
    numbers={"max_norm": Number(100, "as the global norm's limit, for one (layer, module) group")},
    windows={"sustain": Window("2m", "the lowest value of this window is judged (NaN samples are skipped)")},
)
LAYER_GRADIENT_VANISHING = AlertThresholds(
    "TrainingLayerGradientVanishing", "warning", "15m",
    "a group's grad norm < `min_norm`, not 0 (highest of `sustain`)",
    numbers={"min_norm": Number(1e-05, "a group this far below the others barely learns; exactly 0 is "
                                       "TrainingDeadLayers")},
    windows={"sustain": Window("2m", "the highest value of this window is judged (NaN samples are skipped)")},
)
DEAD_LAYERS = AlertThresholds(
    "TrainingDeadLayers", "warning", "15m",
    "groups with an exactly zero gradient > 0",
    # The `for` alone: a skipped step zeroes every group once, a dead group stays at 0.
)
GRADIENT_IMBALANCE = AlertThresholds(
    "TrainingGradientImbalance", "warning", "15m",
    "largest / smallest non-zero group grad norm (each over `sustain`) > `max_ratio`",
    numbers={"max_ratio": Number(1000, "three orders of magnitude between groups: some barely learn or one "
                                       "starts to explode")},
    windows={"sustain": Window("2m", "each group over this window, so that a NaN or skipped step does not reset "
                                     "the `for`")},
)

# --------------------------------------------------------------------------- optimizer (optimizer.alerts.yml)

LEARNING_RATE_ZERO = AlertThresholds(
    "TrainingLearningRateZero", "warning", "5m",
    "learning rate == 0 while steps advance (over `stepping`)",
    windows={"stepping": Window("5m", "steps taken within this window count as a run still stepping")},
)
LEARNING_RATE_FROZEN = AlertThresholds(
    "TrainingLearningRateFrozen", "info", "5m",
    "learning rate unchanged for `unchanged` with >= `min_steps` steps",
    numbers={"min_steps": Number(100, "enough steps for any decaying schedule to have moved the rate")},
    windows={"unchanged": Window("30m", "how long the rate must stay the same (also the span of `min_steps`)")},
)

# --------------------------------------------------------------------------- evaluation (evaluation.alerts.yml)

POOR_CALIBRATION = AlertThresholds(
    "TrainingPoorCalibration", "warning", "1m",
    "expected calibration error > `max_ece`",
    numbers={"max_ece": Number(0.3, "confidence off from accuracy by 30 points on average")},
)
OVERFITTING = AlertThresholds(
    "TrainingOverfitting", "warning", "15m",
    "last finite eval loss (within `last_eval`) > `eval_ratio` x its best over `history`, while the mean step "
    "loss (over `average`) fell over `window` by more than `z` standard errors (b + z se_b < 0), the window "
    "covered, and did not rise significantly over `recent`",
    numbers={
        "eval_ratio": Number(1.05, "the eval loss is 5% above its best: more than evaluation noise"),
        "z": Number(2, "standard errors on the fall's bound: the training loss still falls with about 97.7% "
                       "confidence, so the model memorises (a rising training loss is never overfitting)"),
        "steps_factor": Number(12, "as for TrainingLossPlateau"),
        "window_seconds": Number(3600, "`window` in seconds, the W of the slope's standard error"),
        "recent_seconds": Number(1800, "`recent` in seconds, the W of the recent slope's standard error"),
    },
    windows={
        "last_eval": Window("1h", "the last finite eval loss within this window (a NaN evaluation neither fires "
                                  "nor resets the `for`)"),
        "window": Window("1h", "the span of the training loss's slope and the offset that requires it covered, "
                               "as TrainingLossPlateau's"),
        "recent": Window("30m", "the training loss must not rise significantly over this (TrainingLossDiverging's "
                                "window): a loss that turned upwards within the hour can still have a falling 1h "
                                "slope"),
        "history": Window("7d", "the best eval loss of the run, over any run length"),
        "average": Window("5m", "as for TrainingLossPlateau"),
        "resolution": Window("1m", "as for TrainingLossPlateau"),
    },
)
EXACT_MATCH_DROP = AlertThresholds(
    "TrainingExactMatchDrop", "warning", "1m",
    "exact match >= `min_drop` (absolute) below its best over `history`, per regime, fixed_eval source only",
    numbers={"min_drop": Number(0.05, "5 points below the best: more than a small pool's noise")},
    windows={"history": Window("7d", "the best rate of the run, over any run length")},
)

# --------------------------------------------------------------------------- throughput (throughput.alerts.yml)

THROUGHPUT_DEGRADED = AlertThresholds(
    "TrainingThroughputDegraded", "warning", "10m",
    "tokens/s (`rate` rate) < `ratio` x its `quantile` quantile over `baseline` (at `resolution`); "
    "run older than `min_age`",
    numbers={
        "ratio": Number(0.7, "a 30% drop is more than evaluations and checkpoint saves cost on average"),
        "quantile": Number(0.9, "the usual level, which dips do not lower and a lasting slowdown replaces only "
                                "after most of the baseline window (a median would after half)"),
    },
    windows={
        "rate": Window("5m", "tokens/s are a rate over this window"),
        "baseline": Window("6h", "the run's own usual level is taken over this window"),
        "resolution": Window("1m", "step of the baseline's subquery"),
        "min_age": Window("30m", "a younger run has no baseline yet"),
    },
)
STRAGGLER_RANK = AlertThresholds(
    "TrainingStragglerRank", "warning", "10m",
    "a rank's own work per step (data_loading + forward + optimizer) > `ratio` x the `median` quantile across "
    "the run's ranks, and the excess x steps per second (`rate`) > `time_share` of the time",
    numbers={
        "ratio": Number(1.2, "a rank 20% slower than the median holds every other rank back by as much; with two "
                             "ranks (median = mean) the slow one is then 1.5x the other"),
        "median": Number(0.5, "the median across ranks: one slow rank does not move it"),
        "time_share": Number(0.1, "below a tenth of the run's time the straggler costs little: a 1 ms data loader "
                                  "at 3x the others' is no straggler"),
    },
    windows={"rate": Window("5m", "steps per second, as the recorded per-step work, over this window")},
)

DATA_LOADER_BOUND = AlertThresholds(
    "TrainingDataLoaderBound", "warning", "10m",
    "data_loading seconds / the training phases' seconds (evaluation and checkpointing left out) over `rate` "
    "> `fraction`",
    numbers={"fraction": Number(0.2, "a fifth of the training time waiting for data: more workers or "
                                     "pre-tokenized data would win it back")},
    windows={"rate": Window("5m", "the phases' shares are rates over this window")},
)

# --------------------------------------------------------------------------- checkpoints (checkpoints.alerts.yml)

CHECKPOINT_OVERDUE = AlertThresholds(
    "TrainingCheckpointOverdue", "warning", "5m",
    "time since the last checkpoint > `multiple` x the median interval between the recent saves, while training",
    numbers={"multiple": Number(3, "one missed save can be a slow step or an evaluation; two in a row is a save "
                                   "that fails or was switched off")},
)
CHECKPOINT_SLOW = AlertThresholds(
    "TrainingCheckpointSlow", "warning", "5m",
    "the last save's duration > `share` of the median interval between saves, while training",
    numbers={"share": Number(0.1, "a tenth of the training time spent saving is worth saving less often or "
                                  "faster")},
)


# --------------------------------------------------------------------------- exporter (exporter.alerts.yml)

EXPORTER_DOWN = AlertThresholds(
    "TrainingExporterDown", "critical", "2m",
    "up == 0 for a target up within `memory`, unless its newest run was last seen completed or terminated, "
    "or < `near_end_seconds` s from max_steps, or (a training target) the run is live on, or was started later "
    "on, another target",
    numbers={"near_end_seconds": Number(60, "a run this close to max_steps when last seen counts as completed "
                                            "(its final state may not have been scraped)")},
    windows={"memory": Window("1d", "how long a target's last up, its newest run and that run's state and "
                                    "start time are remembered")},
)
EXPORTER_ABSENT = AlertThresholds(
    "TrainingExporterAbsent", "warning", "2m",
    "a run's series seen within `memory` are gone while its target is not down, unless it was last seen "
    "completed or terminated, or < `near_end_seconds` s from max_steps, or the run is live on, or was started "
    "later on, another target",
    numbers={"near_end_seconds": Number(60, "as for TrainingExporterDown")},
    windows={"memory": Window("1h", "how long a vanished run's series, state and start time are remembered")},
)

# --------------------------------------------------------------------------- hardware (hardware.alerts.yml)

GPU_HOT = AlertThresholds(
    "TrainingGpuHot", "warning", "5m",
    "GPU temperature > `max_celsius` C",
    numbers={"max_celsius": Number(85, "where data-centre GPUs start to throttle their clocks")},
)
GPU_MEMORY_NEARLY_FULL = AlertThresholds(
    "TrainingGpuMemoryNearlyFull", "warning", "10m",
    "GPU memory used / total > `max_ratio`",
    numbers={"max_ratio": Number(0.95, "a longer batch may not fit (NVML counts PyTorch's cached blocks too)")},
)
CUDA_MEMORY_HEADROOM_LOW = AlertThresholds(
    "TrainingCudaMemoryHeadroomLow", "warning", "10m",
    "CUDA allocator peak reserved / device total > `max_ratio`",
    numbers={"max_ratio": Number(0.95, "within 5% of the device: a longer batch or more fragmentation will not "
                                       "fit (the CUDA context and other processes need some too)")},
)
CUDA_ALLOC_RETRIES = AlertThresholds(
    "TrainingCudaAllocRetries", "warning", "0s",
    "the allocator retried an allocation after freeing its cache within `recent`",
    windows={"recent": Window("10m", "resolves this long after the last retry; long enough to see a pattern")},
)
GPU_THROTTLED = AlertThresholds(
    "TrainingGpuThrottled", "warning", "10m",
    "a clock slowdown reason other than idle, application or display clock settings, sync boost and the software "
    "power cap (where a busy board runs) is set",
)
GPU_ECC_UNCORRECTABLE = AlertThresholds(
    "TrainingGpuEccUncorrectable", "critical", "0s",
    "the volatile uncorrected ECC count rose within `recent`",
    windows={"recent": Window("10m", "resolves this long after the last error, so that it is seen and inhibits "
                                     "the warnings")},
)
GPU_XID_ERROR = AlertThresholds(
    "TrainingGpuXidError", "critical", "0s",
    "a critical XID (NVML event, or DCGM_FI_DEV_XID_ERRORS changing on the run's UUID) within `recent`",
    windows={"recent": Window("10m", "resolves this long after the last XID")},
)
GPU_ROW_REMAP_FAILED = AlertThresholds(
    "TrainingGpuRowRemapFailed", "critical", "0s",
    "NVML reports a failed row remapping",
)
GPU_ROW_REMAP_PENDING = AlertThresholds(
    "TrainingGpuRowRemapPending", "warning", "5m",
    "remapped rows or retired pages wait for a GPU reset",
)
DISK_NEARLY_FULL_WARNING = AlertThresholds(
    "TrainingDiskNearlyFull", "warning", "5m",
    "output-dir filesystem used / total > `max_ratio`",
    numbers={"max_ratio": Number(0.9, "time to clean up before the next checkpoints fill it")},
)
DISK_NEARLY_FULL_CRITICAL = AlertThresholds(
    "TrainingDiskNearlyFull", "critical", "1m",
    "output-dir filesystem used / total > `max_ratio`",
    numbers={"max_ratio": Number(0.97, "the next checkpoint save will likely fail and end the run")},
)

# --------------------------------------------------------------------------- data (data.alerts.yml)

DATASET_DRIFT_WARNING = AlertThresholds(
    "TrainingDatasetDrift", "warning", "1m",
    "JS divergence of a feature > `max_divergence`",
    numbers={"max_divergence": Number(0.1, "above the noise of a full window of thousands of sequences")},
)
DATASET_DRIFT_CRITICAL = AlertThresholds(
    "TrainingDatasetDrift", "critical", "1m",
    "JS divergence of a feature > `max_divergence`",
    numbers={"max_divergence": Number(0.2, "the run probably trains on other data than intended")},
)

# --------------------------------------------------------------------------- analytics (analytics.alerts.yml)

WEIGHTS_EXPLODING_WARNING = AlertThresholds(
    "TrainingWeightsExploding", "warning", "1m",
    "a layer's max |w| > `max_abs_weight`",
    numbers={"max_abs_weight": Number(100, "far above the weights of a healthy transformer layer (order 1)")},
)
WEIGHTS_EXPLODING_CRITICAL = AlertThresholds(
    "TrainingWeightsExploding", "critical", "1m",
    "a layer's max |w| > `max_abs_weight`",
    numbers={"max_abs_weight": Number(150, "training is diverging: a NaN loss is likely to follow")},
)
WEIGHTS_VANISHING_WARNING = AlertThresholds(
    "TrainingWeightsVanishing", "warning", "1m",
    "a layer's min non-zero |w| < `min_abs_weight`",
    numbers={"min_abs_weight": Number(1e-10, "weights collapsing towards zero (a large layer may hold a few by "
                                             "chance: compare with the base model)")},
)
WEIGHTS_VANISHING_CRITICAL = AlertThresholds(
    "TrainingWeightsVanishing", "critical", "1m",
    "a layer's min non-zero |w| < `min_abs_weight`",
    numbers={"min_abs_weight": Number(1e-12, "near the underflow of low-precision weights")},
)
LAYER_DRIFT_EXCESSIVE = AlertThresholds(
    "TrainingLayerDriftExcessive", "warning", "1m",
    "a layer's ||W - W0|| / ||W0|| > `max_drift`",
    numbers={"max_drift": Number(0.35, "a layer this far from the base model risks forgetting what it knew")},
)
ANALYTICS_STALE = AlertThresholds(
    "TrainingAnalyticsStale", "warning", "5m",
    "last complete analysis older than `max_age_seconds` s while the run is training",
    numbers={"max_age_seconds": Number(3600, "runs save checkpoints at least hourly; raise it if yours save "
                                             "less often")},
)

# --------------------------------------------------------------------------- meta (meta.alerts.yml)

ALERTING_WATCHDOG = AlertThresholds(
    "TrainingAlertingWatchdog", "info", "0s",
    "always (vector(1)): its notifications stopping is what the heartbeat service pages on",
)
ALERT_NOTIFICATIONS_FAILING = AlertThresholds(
    "TrainingAlertNotificationsFailing", "critical", "0s",
    "Alertmanager gave up on a notification of an integration within `recent`",
    windows={"recent": Window("5m", "resolves this long after the last lost notification; at least 2 scrape "
                                    "intervals, so that one failure between two scrapes is seen")},
)
ALERTMANAGER_UNREACHABLE = AlertThresholds(
    "TrainingAlertmanagerUnreachable", "warning", "5m",
    "Prometheus failed to send alerts to Alertmanager within `recent`, or discovers no Alertmanager",
    windows={"recent": Window("5m", "Prometheus resends every firing alert each minute, so failures in every "
                                    "5 minutes are an outage, not one lost request")},
)
RULE_EVALUATIONS_FAILING = AlertThresholds(
    "TrainingRuleEvaluationsFailing", "critical", "5m",
    "a rule group had failed evaluations within `recent`",
    windows={"recent": Window("5m", "with the `for` of 5m a single failure (a run moving to a new target) does "
                                    "not fire; failures at least every 5 minutes do")},
)
RULE_EVALUATIONS_MISSED = AlertThresholds(
    "TrainingRuleEvaluationsMissed", "warning", "15m",
    "a rule group skipped evaluations (slower than its interval) within `recent`",
    windows={"recent": Window("5m", "a burst of load can skip one; skipping in every 5 minutes for a quarter "
                                    "of an hour is an overloaded server or a costly rule")},
)
SCRAPES_FLAPPING = AlertThresholds(
    "TrainingScrapesFlapping", "warning", "5m",
    "a training or analytics target failed > `max_failed_ratio` of its scrapes over `window` with up "
    "changing >= `min_changes` times and a success within `recent`, unless a run (re)started on it within "
    "`window`",
    numbers={
        "max_failed_ratio": Number(0.1, "a tenth of the scrapes lost: events between them (a spike, a NaN) go "
                                        "unseen"),
        "min_changes": Number(4, "two separate outages: a start, a crash or a restart changes up once or "
                                 "twice"),
    },
    windows={
        "window": Window("10m", "long enough to hold two outages at a 60 s scrape interval"),
        "recent": Window("2m", "TrainingExporterDown's `for`: a target down for that long is that alert's, so "
                               "the two never fire together"),
    },
)
SCRAPES_REJECTED = AlertThresholds(
    "TrainingScrapesRejected", "critical", "1m",
    "up == 0 while scrape_samples_scraped > 0 (the target answered; Prometheus discarded the scrape); for 1m, "
    "less than TrainingExporterDown's 2m, so that it fires first and Alertmanager inhibits that one",
)
CONFIG_RELOAD_FAILED = AlertThresholds(
    "TrainingConfigReloadFailed", "warning", "5m",
    "prometheus_config_last_reload_successful or alertmanager_config_last_reload_successful is 0",
)

# Every entry, in the order of the rules.
ALERTS: tuple[AlertThresholds, ...] = tuple(v for v in list(globals().values()) if isinstance(v, AlertThresholds))


# --------------------------------------------------------------------------- the advisor's own

SHORT_RUN_WINDOW_FRACTION = Setting(
    0.5, "advisor",
    "a run shorter than two plateau windows is judged over its last half, so that short runs get a verdict too",
)
ETA_RATE_WINDOW_SECONDS = Setting(
    900.0, "advisor",
    "the ETA's step rate is that of the last 15 minutes of stepping, as run:training_eta_seconds:rate15m",
)

# --------------------------------------------------------------------------- the checkpoint report's own

DRIFT_PATTERN_RATIO = Setting(
    1.5, "checkpoint report, layers dashboard",
    "top_heavy / bottom_heavy when one end's mean drift is this many times the other's, else uniform",
)

# --------------------------------------------------------------------------- the dashboards' own

LAYER_DRIFT_NOTABLE = Setting(
    0.2, "layers dashboard",
    "drift bars turn yellow here, on the way to TrainingLayerDriftExcessive",
)
GPU_WARM_CELSIUS = Setting(
    75, "run dashboard",
    "the GPU temperature light turns yellow here, on the way to TrainingGpuHot",
)
THROUGHPUT_LOW_RATIO = Setting(
    0.9, "run dashboard",
    "the throughput light turns yellow below this share of the baseline, on the way to TrainingThroughputDegraded",
)
LOSS_TREND_FALLING = Setting(
    -0.01, "run dashboard",
    "the loss-trend light is green below this relative change over 15 minutes (falling by more than 1%)",
)
LOSS_TREND_RISING = Setting(
    0.02, "run dashboard",
    "the loss-trend light is red above this relative change over 15 minutes (rising by more than 2%)",
)
EXACT_MATCH_FAIR = Setting(
    0.6, "evaluation dashboard",
    "exact-match bars and cells are red below this rate",
)
EXACT_MATCH_GOOD = Setting(
    0.8, "evaluation dashboard",
    "exact-match bars and cells are green from this rate (yellow between the two)",
)

# Every non-alert value by its name here.
SETTINGS: dict[str, Setting] = {k: v for k, v in list(globals().items()) if isinstance(v, Setting)}
