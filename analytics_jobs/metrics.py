"""Every metric the checkpoint analytics exporter publishes (the contract the rules and dashboards use).

Series describe the newest analysed checkpoint only (its step is a gauge, never
a label) and carry ``run_id``; per-layer families add ``layer`` with the same
meaning as the training exporter's (``-1`` embeddings, ``0``..``N-1`` blocks,
``final`` for what follows the blocks).
"""

from __future__ import annotations

from exporter import thresholds as t
from exporter.metrics import MetricSpec

_LAYER = ("layer",)


def _g(name: str, help: str, unit: str = "", labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name=name, kind="gauge", help=help, unit=unit, labels=labels, source="analytics")


LAYER_RELATIVE_DRIFT = _g(
    "training_analytics_layer_relative_drift_ratio",
    "||W - W0|| / ||W0|| of one layer against the base model.", unit="ratio", labels=_LAYER,
)
LAYER_DELTA_NORM = _g("training_analytics_layer_delta_norm", "||W - W0|| of one layer.", labels=_LAYER)
LAYER_REFERENCE_NORM = _g("training_analytics_layer_reference_norm", "||W0|| of one layer (base model).", labels=_LAYER)
LAYER_CURRENT_NORM = _g("training_analytics_layer_current_norm", "||W|| of one layer (checkpoint).", labels=_LAYER)
LAYER_MAX_ABS_WEIGHT = _g(
    "training_analytics_layer_max_abs_weight",
    f"Largest |w| of one layer (exploding above {t.WEIGHTS_EXPLODING_WARNING.value('max_abs_weight'):g} / "
    f"{t.WEIGHTS_EXPLODING_CRITICAL.value('max_abs_weight'):g}).",
    labels=_LAYER,
)
LAYER_MIN_ABS_WEIGHT = _g(
    "training_analytics_layer_min_abs_weight",
    f"Smallest non-zero |w| of one layer (vanishing below {t.WEIGHTS_VANISHING_WARNING.value('min_abs_weight'):g} / "
    f"{t.WEIGHTS_VANISHING_CRITICAL.value('min_abs_weight'):g}).",
    labels=_LAYER,
)
TOTAL_RELATIVE_DRIFT = _g(
    "training_analytics_total_relative_drift_ratio",
    "||W - W0|| / ||W0|| over all compared parameters.", unit="ratio",
)
DRIFT_PATTERN = _g(
    "training_analytics_drift_pattern",
    "1 for the drift pattern of the checkpoint, 0 otherwise: top_heavy (bottom_heavy) when the mean relative "
    f"drift of the last (first) quarter of the blocks is over {t.DRIFT_PATTERN_RATIO.value:g}x that of the "
    "other quarter, else uniform.",
    labels=("pattern",),
)
CHECKPOINT_STEP = _g("training_analytics_checkpoint_step", "Training step of the analysed checkpoint.")
LAST_SUCCESS = _g(
    "training_analytics_last_success_timestamp_seconds", "Unix time of the last complete analysis.", unit="seconds"
)
DURATION = _g("training_analytics_duration_seconds", "Wall time of the last analysis.", unit="seconds")
ERRORS = MetricSpec(
    name="training_analytics_errors_total",
    kind="counter",
    help="Analyses or inputs that failed, by reason; the daemon went on.",
    labels=("reason",),
    source="analytics",
)

ALL: tuple[MetricSpec, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricSpec))
