"""Judgements and the status documents ``layer_drift.json`` and ``parameter_stability.json``.

The documents follow the data contract of docs/analytics.md (its Figures) key
for key. Where the contract's integer ``layer_idx`` cannot say "final" (final
norm, LM head, and whatever else follows the blocks), that layer is listed
with the index after the last block (28 for a 28-block model); summaries
over blocks (drift pattern, max / min drift layer, top / bottom averages) use
blocks 0..N-1 only. JSON has no NaN or Infinity: a non-finite figure is written as null.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from analytics_jobs.analysis import Analysis, LayerResult
from exporter import thresholds

# Max |w| above which a layer is exploding and min non-zero |w| below which it
# is vanishing (the thresholds of TrainingWeightsExploding and
# TrainingWeightsVanishing), and the drift pattern ratio. Floats, as the
# documents have always written them (100.0, not 100).
EXPLODING_WARNING = float(thresholds.WEIGHTS_EXPLODING_WARNING.value("max_abs_weight"))
EXPLODING_CRITICAL = float(thresholds.WEIGHTS_EXPLODING_CRITICAL.value("max_abs_weight"))
VANISHING_WARNING = float(thresholds.WEIGHTS_VANISHING_WARNING.value("min_abs_weight"))
VANISHING_CRITICAL = float(thresholds.WEIGHTS_VANISHING_CRITICAL.value("min_abs_weight"))
PATTERN_RATIO = thresholds.DRIFT_PATTERN_RATIO.value
PATTERNS = ("uniform", "top_heavy", "bottom_heavy")


@dataclass(frozen=True)
class DriftSummary:
    num_blocks: int
    avg: float
    max_layer: int | None
    max_value: float
    min_layer: int | None
    min_value: float
    top_avg: float
    bottom_avg: float
    pattern: str


@dataclass(frozen=True)
class Alert:
    layer: int
    type: str  # exploding | vanishing
    severity: str  # warning | critical
    value: float
    threshold: float
    message: str


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def pattern(top_avg: float, bottom_avg: float) -> str:
    """top_heavy if top > PATTERN_RATIO x bottom, bottom_heavy if bottom > PATTERN_RATIO x top, else uniform."""
    if top_avg > bottom_avg * PATTERN_RATIO:
        return "top_heavy"
    if bottom_avg > top_avg * PATTERN_RATIO:
        return "bottom_heavy"
    return "uniform"


def blocks(analysis: Analysis) -> list[LayerResult]:
    return [x for x in analysis.layers if x.layer not in ("-1", "final")]


def drift_summary(analysis: Analysis) -> DriftSummary:
    """Over the transformer blocks: the top and bottom quarters are the last and first ``max(1, N // 4)``
    blocks (7 of 28)."""
    rows = blocks(analysis)
    values = [x.relative_change for x in rows]
    quarter = max(1, len(rows) // 4)
    top = _mean(values[-quarter:]) if rows else 0.0
    bottom = _mean(values[:quarter]) if rows else 0.0
    finite = [x for x in rows if math.isfinite(x.relative_change)] or rows
    hi = max(finite, key=lambda x: x.relative_change, default=None)
    lo = min(finite, key=lambda x: x.relative_change, default=None)
    return DriftSummary(
        num_blocks=analysis.num_blocks,
        avg=_mean(values),
        max_layer=int(hi.layer) if hi else None,
        max_value=hi.relative_change if hi else 0.0,
        min_layer=int(lo.layer) if lo else None,
        min_value=lo.relative_change if lo else 0.0,
        top_avg=top,
        bottom_avg=bottom,
        pattern=pattern(top, bottom),
    )


def layer_index(label: str, num_blocks: int) -> int:
    return num_blocks if label == "final" else int(label)


def alerts(analysis: Analysis) -> list[Alert]:
    """One alert per layer and kind at its highest severity (the thresholds above); a NaN max |w| is exploding."""
    out: list[Alert] = []
    for row in analysis.layers:
        idx = layer_index(row.layer, analysis.num_blocks)
        name = f"Layer {idx}" + {"-1": " (embeddings)", "final": " (after the blocks)"}.get(row.layer, "")
        big = row.max_abs_weight
        if math.isnan(big) or big > EXPLODING_WARNING:
            critical = math.isnan(big) or big > EXPLODING_CRITICAL
            out.append(Alert(idx, "exploding", "critical" if critical else "warning", big,
                             EXPLODING_CRITICAL if critical else EXPLODING_WARNING,
                             f"{name} has extreme weight values"))
        small = row.min_abs_weight
        if 0 < small < VANISHING_WARNING:
            critical = small < VANISHING_CRITICAL
            out.append(Alert(idx, "vanishing", "critical" if critical else "warning", small,
                             VANISHING_CRITICAL if critical else VANISHING_WARNING,
                             f"{name} has vanishing weight values"))
    return out


def health(found: list[Alert]) -> str:
    if any(a.severity == "critical" for a in found):
        return "critical"
    return "warning" if found else "healthy"


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def layer_drift_document(analysis: Analysis, now: datetime | None = None) -> dict[str, Any]:
    summary = drift_summary(analysis)
    return {
        "timestamp": (now or datetime.now()).isoformat(),
        "reference_checkpoint": analysis.reference,
        "current_checkpoint": analysis.checkpoint,
        "current_step": analysis.step,
        "total_params": analysis.total_params,
        "total_relative_change": _num(analysis.total_relative_change),
        "summary": {
            "num_transformer_layers": summary.num_blocks,
            "avg_relative_change": _num(summary.avg),
            "max_drift_layer": summary.max_layer,
            "max_drift_value": _num(summary.max_value),
            "min_drift_layer": summary.min_layer,
            "min_drift_value": _num(summary.min_value),
            "top_layers_avg": _num(summary.top_avg),
            "bottom_layers_avg": _num(summary.bottom_avg),
            "pattern": summary.pattern,
        },
        "layers": [
            {
                "layer_idx": layer_index(row.layer, analysis.num_blocks),
                "relative_change": _num(row.relative_change),
                "delta_norm": _num(row.delta_norm),
                "reference_norm": _num(row.reference_norm),
                "current_norm": _num(row.current_norm),
            }
            for row in analysis.layers
        ],
    }


def parameter_stability_document(analysis: Analysis, now: datetime | None = None) -> dict[str, Any]:
    found = alerts(analysis)
    norms = [row.weight_norm for row in analysis.layers]
    finite = [x for x in norms if math.isfinite(x)]
    return {
        "timestamp": (now or datetime.now()).isoformat(),
        "checkpoint": analysis.checkpoint,
        "step": analysis.step,
        "summary": {
            "num_layers": analysis.num_blocks,
            "avg_weight_norm": _num(_mean(norms)),
            "std_weight_norm": statistics.pstdev(finite) if finite else None,
            "max_weight_norm": max(finite) if finite else None,
            "min_weight_norm": min(finite) if finite else None,
            "health_status": health(found),
            "total_alerts": len(found),
            "warning_alerts": sum(a.severity == "warning" for a in found),
            "critical_alerts": sum(a.severity == "critical" for a in found),
        },
        "alerts": [
            {
                "layer": a.layer,
                "type": a.type,
                "severity": a.severity,
                "value": _num(a.value),
                "threshold": a.threshold,
                "message": a.message,
            }
            for a in found
        ],
        "layers": [
            {
                "layer_idx": layer_index(row.layer, analysis.num_blocks),
                "weight_norm": _num(row.weight_norm),
                "max_abs_weight": _num(row.max_abs_weight),
                "min_abs_weight": _num(row.min_abs_weight),
            }
            for row in analysis.layers
        ],
    }
