"""Layers: per-layer / per-LoRA-module gradients from the training exporter, drift and stability from the
checkpoint analytics exporter (the figures of its layer_drift.json and parameter_stability.json documents,
docs/analytics.md)."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import heatmap
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm

from exporter.thresholds import (
    ANALYTICS_STALE,
    DEAD_LAYERS,
    DRIFT_PATTERN_RATIO,
    GRADIENT_IMBALANCE,
    LAYER_DRIFT_EXCESSIVE,
    LAYER_DRIFT_NOTABLE,
    WEIGHTS_EXPLODING_CRITICAL,
    WEIGHTS_EXPLODING_WARNING,
    WEIGHTS_VANISHING_CRITICAL,
    WEIGHTS_VANISHING_WARNING,
)

from .common import (
    BLUE,
    DATASOURCE,
    GREEN,
    RED,
    UNIT_NONE,
    UNIT_RATIO,
    UNIT_SCI,
    UNIT_SECONDS,
    YELLOW,
    bargauge_panel,
    in_words,
    new_dashboard,
    number,
    percent,
    q,
    row,
    sel,
    stat_panel,
    thresholds,
    timeseries_panel,
)

UID = "training-layers"

# Per-layer drift bars: green, yellow from a notable drift, red above
# TrainingLayerDriftExcessive's threshold.
DRIFT_NOTABLE = LAYER_DRIFT_NOTABLE.value
DRIFT_EXCESSIVE = LAYER_DRIFT_EXCESSIVE.value("max_drift")
DRIFT_STEPS = ((None, GREEN), (DRIFT_NOTABLE, YELLOW), (DRIFT_EXCESSIVE, RED))
# The thresholds of TrainingWeightsExploding and TrainingWeightsVanishing
# (warning, critical): a bar in colour is a layer that alert fires for.
MAX_ABS_WARNING = WEIGHTS_EXPLODING_WARNING.value("max_abs_weight")
MAX_ABS_CRITICAL = WEIGHTS_EXPLODING_CRITICAL.value("max_abs_weight")
MIN_ABS_WARNING = WEIGHTS_VANISHING_WARNING.value("min_abs_weight")
MIN_ABS_CRITICAL = WEIGHTS_VANISHING_CRITICAL.value("min_abs_weight")
MAX_ABS_STEPS = ((None, GREEN), (MAX_ABS_WARNING, YELLOW), (MAX_ABS_CRITICAL, RED))
MIN_ABS_STEPS = ((None, RED), (MIN_ABS_CRITICAL, YELLOW), (MIN_ABS_WARNING, GREEN))
IMBALANCE = GRADIENT_IMBALANCE.value("max_ratio")
STALE_SECONDS = ANALYTICS_STALE.value("max_age_seconds")


def build() -> Any:
    dash = new_dashboard(
        UID,
        "Training layers",
        "Where learning happens: per-layer and per-module gradient norms, dead layers and update ratios from "
        "the training exporter; drift from the base model, weight norms and extreme weights per layer from "
        "the checkpoint analytics exporter (newest analysed checkpoint). Layer -1 is the embeddings.",
        anchor='{__name__=~"training_step|training_analytics_checkpoint_step"}',
        extra_tags=["layers"],
    )

    dash = dash.with_row(row("Gradients (training exporter)"))
    dash = dash.with_panel(
        heatmap.Panel().title("Gradient norm by layer and module")
        .description("L2 norm of each trainable (layer, module) group's gradient, sampled every "
                     "layers.interval_steps steps; one row per group. The colour scale is "
                     "compressed (exponent 0.5) so that small norms stay visible next to large ones.")
        .datasource(DATASOURCE).unit(UNIT_NONE).span(24).height(10)
        .with_target(q(sel("training_layer_grad_norm"), "{{layer}} {{module}}").ref_id("A"))
        .calculate(False)
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Spectral")
               .scale(hm.HeatmapColorScale.EXPONENTIAL)
               .exponent(0.5).steps(64).reverse(True))
        .cell_gap(1)
        .y_axis(heatmap.YAxisConfig().unit(UNIT_NONE))
        .show_legend()
    )
    dash = dash.with_panel(stat_panel(
        "Dead layers", "Trainable groups whose gradient was exactly zero at the last sample "
        f"(TrainingDeadLayers fires on any, sustained {in_words(DEAD_LAYERS.for_seconds)}).", UNIT_NONE,
        [q(sel("training_dead_layers"), "{{run_id}}", instant=True)],
        w=4, h=8, background=True, steps=((None, GREEN), (1, RED)),
    ))
    dash = dash.with_panel(timeseries_panel(
        "Dead share of trainable groups", "training_dead_layers / training_trainable_groups.", UNIT_RATIO,
        [q(sel("run:training_dead_layers:ratio"), "{{run_id}}")],
        w=8, min_value=0, max_value=1,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Gradient imbalance", "Largest / smallest non-zero group gradient norm. Dashed: "
        f"TrainingGradientImbalance at {number(IMBALANCE)}.", UNIT_NONE,
        [q(sel("run:training_layer_grad_norm:imbalance_ratio"), "{{run_id}}")],
        log=True, limits=((None, GREEN), (IMBALANCE, RED)),
    ))
    dash = dash.with_panel(timeseries_panel(
        "Update ratio by layer and module",
        "||W_after - W_before|| / ||W_before|| of one optimizer step per trainable module, sampled every "
        "update_ratio.interval_steps steps; around 1e-3 is typical, far above means too high a learning rate.",
        UNIT_RATIO,
        [q(sel("training_layer_update_ratio"), "{{layer}} {{module}}")],
        w=24, log=True, points=True,
    ))

    dash = dash.with_row(row("Drift and stability (checkpoint analytics)"))
    dash = dash.with_panel(stat_panel(
        "Total drift", "||W - W0|| / ||W0|| over all compared parameters of the newest analysed checkpoint. "
        "Under 10%: little effect; 10-30%: usual adaptation; over 30%: a large change.", UNIT_RATIO,
        [q(sel("training_analytics_total_relative_drift_ratio"), "{{run_id}}", instant=True)],
        steps=DRIFT_STEPS, background=True,
    ))
    dash = dash.with_panel(stat_panel(
        "Drift pattern", "Where drift concentrates: top_heavy / bottom_heavy when the top or bottom layers "
        f"drifted {number(DRIFT_PATTERN_RATIO.value)}x the other end on average, else uniform.", UNIT_NONE,
        [q(f"{sel('training_analytics_drift_pattern')} == 1", "{{pattern}}", instant=True)],
        show_name=True,
    ))
    dash = dash.with_panel(stat_panel(
        "Analysed checkpoint", "Training step of the newest analysed checkpoint.", UNIT_NONE,
        [q(sel("training_analytics_checkpoint_step"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(stat_panel(
        "Mean layer norm", "Mean ||W|| over the layers of the newest analysed checkpoint.", UNIT_NONE,
        [q(f"avg without (layer) ({sel('training_analytics_layer_current_norm')})", "{{run_id}}",
           instant=True)],
    ))
    dash = dash.with_panel(stat_panel(
        "Analysis age", f"Time since the last complete analysis. Red after {in_words(STALE_SECONDS)} "
        "(TrainingAnalyticsStale, while the run trains).", UNIT_SECONDS,
        [q(f"time() - {sel('training_analytics_last_success_timestamp_seconds')}", "{{run_id}}", instant=True)],
        steps=((None, GREEN), (STALE_SECONDS, RED)),
    ))
    dash = dash.with_panel(stat_panel(
        "Analysis duration", "Wall time of the last analysis.", UNIT_SECONDS,
        [q(sel("training_analytics_duration_seconds"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(bargauge_panel(
        "Drift per layer",
        f"||W - W0|| / ||W0|| of each layer against the base model. Green < {percent(DRIFT_NOTABLE)}, yellow "
        f"{DRIFT_NOTABLE * 100:.0f}-{percent(DRIFT_EXCESSIVE)}, red > {percent(DRIFT_EXCESSIVE)} "
        "(TrainingLayerDriftExcessive).",
        UNIT_RATIO,
        [q(sel("training_analytics_layer_relative_drift_ratio"), "{{layer}}", instant=True)],
        steps=DRIFT_STEPS, w=24, min_value=0,
    ))
    dash = dash.with_panel(bargauge_panel(
        "Largest |w| per layer",
        f"Parameter stability: the largest absolute weight of each layer. Yellow above {number(MAX_ABS_WARNING)}, "
        f"red above {number(MAX_ABS_CRITICAL)} (TrainingWeightsExploding warning / critical).",
        UNIT_NONE,
        [q(sel("training_analytics_layer_max_abs_weight"), "{{layer}}", instant=True)],
        steps=MAX_ABS_STEPS, min_value=0,
    ))
    dash = dash.with_panel(bargauge_panel(
        "Smallest non-zero |w| per layer",
        "Parameter stability: the smallest non-zero absolute weight of each layer. Yellow below "
        f"{number(MIN_ABS_WARNING)}, red below {number(MIN_ABS_CRITICAL)} (TrainingWeightsVanishing warning / "
        "critical).",
        UNIT_SCI,
        [q(f"{sel('training_analytics_layer_min_abs_weight')} > 0", "{{layer}}", instant=True)],
        steps=MIN_ABS_STEPS,
    ))
    dash = dash.with_panel(
        bargauge_panel(
            "Weight norm per layer", "||W|| of each layer in the newest analysed checkpoint and ||W0|| in the "
            "base model.", UNIT_NONE,
            [q(sel("training_analytics_layer_current_norm"), "{{layer}}", instant=True),
             q(sel("training_analytics_layer_reference_norm"), "{{layer}} base", instant=True)],
            steps=((None, BLUE),), w=24, min_value=0,
        ).override_by_query("B", [dm.DynamicConfigValue(id_val="thresholds", value=thresholds((None, "purple"))
                                                        .build())])
    )
    return dash
