"""Training run: the control room's summary bar (state, progress, ETA, health lights) and training curves."""

from __future__ import annotations

from typing import Any

from exporter.thresholds import (
    GPU_HOT,
    GPU_WARM_CELSIUS,
    GRADIENT_EXPLODING,
    LOSS_TREND_FALLING,
    LOSS_TREND_RISING,
    THROUGHPUT_DEGRADED,
    THROUGHPUT_LOW_RATIO,
)

from .common import (
    BLUE,
    GREEN,
    GREY,
    ORANGE,
    RED,
    UNIT_CELSIUS,
    UNIT_NONE,
    UNIT_RATIO,
    UNIT_SCI,
    UNIT_SECONDS,
    UNIT_SHORT,
    YELLOW,
    alerts_selector,
    bargauge_panel,
    fixed_color,
    in_words,
    new_dashboard,
    number,
    percent,
    q,
    row,
    sel,
    stat_panel,
    table_panel,
    timeseries_panel,
)

UID = "training-run"

# The tokens/s baseline, as TrainingThroughputDegraded judges it: the 90th
# percentile of the run's own 5m rate over 6 hours (recorded, so cheap here).
BASELINE_QUANTILE = THROUGHPUT_DEGRADED.value("quantile")
BASELINE_WINDOW = THROUGHPUT_DEGRADED.duration("baseline")
BASELINE = f"quantile_over_time({number(BASELINE_QUANTILE)}, {sel('run:training_tokens:rate5m')}[{BASELINE_WINDOW}])"
# Its description: "90th percentile", "over 6 hours".
BASELINE_TEXT = (f"{BASELINE_QUANTILE * 100:.0f}th percentile",
                 f"over {in_words(THROUGHPUT_DEGRADED.seconds('baseline'))}")
DEGRADED = THROUGHPUT_DEGRADED.value("ratio")
GPU_HOT_CELSIUS = GPU_HOT.value("max_celsius")
GRAD_NORM_MAX = GRADIENT_EXPLODING.value("max_norm")


def build() -> Any:
    dash = new_dashboard(
        UID,
        "Training run",
        "One fine-tuning run at a glance: state, progress, ETA, health lights, loss, learning rate, gradients, "
        "throughput against its own baseline, and the alerts firing for it.",
        anchor="training_step",
        extra_tags=["training"],
    )

    dash = dash.with_row(row("Summary"))
    state = stat_panel(
        "State", "The run's state (training_state == 1).", UNIT_NONE,
        [q(f"{sel('training_state')} == 1", "{{state}}", instant=True)],
        w=3, show_name=True, background=True, steps=((None, GREY),),
    )
    for name, color in (("training", GREEN), ("completed", BLUE), ("paused", YELLOW), ("crashed", RED),
                        ("terminated", ORANGE), ("idle", GREY)):
        state = state.override_by_name(name, [fixed_color(color)])
    dash = dash.with_panel(state)
    dash = dash.with_panel(stat_panel(
        "Step", "Optimizer steps taken and scheduled.", UNIT_NONE,
        [q(sel("training_step"), "step", instant=True), q(sel("training_max_steps"), "of", instant=True)],
        w=4,
    ))
    dash = dash.with_panel(bargauge_panel(
        "Progress", "training_step / training_max_steps.", UNIT_RATIO,
        [q(f"{sel('training_step')} / ({sel('training_max_steps')} > 0)", "{{run_id}}", instant=True)],
        steps=((None, BLUE),), w=5, h=4, vertical=False, min_value=0, max_value=1,
    ))
    dash = dash.with_panel(stat_panel(
        "ETA", "Time to max_steps at the step rate of the last 15 minutes (run:training_eta_seconds:rate15m); "
        "empty while no step is taken.", UNIT_SECONDS,
        [q(sel("run:training_eta_seconds:rate15m"), "{{run_id}}", instant=True)],
        w=3,
    ))
    dash = dash.with_panel(stat_panel(
        "Loss trend",
        "Relative change of the loss EMA over 15 minutes (run:training_loss_ema:relative_change15m); a run "
        "younger than 20 minutes shows the slope of the last 5 minutes projected over 15. Green: falling by "
        f"more than {percent(-LOSS_TREND_FALLING.value)}, yellow: flat, red: rising by more than "
        f"{percent(LOSS_TREND_RISING.value)}.",
        UNIT_RATIO,
        [q(f"{sel('run:training_loss_ema:relative_change15m')} "
           f"or deriv({sel('training_loss_ema')}[5m]) * 900 / {sel('training_loss_ema')}",
           "{{run_id}}", instant=True)],
        w=3, background=True, steps=((None, GREEN), (LOSS_TREND_FALLING.value, YELLOW), (LOSS_TREND_RISING.value, RED)),
    ))
    dash = dash.with_panel(stat_panel(
        "Throughput",
        f"Tokens/s (5m rate) against the run's own baseline, the {BASELINE_TEXT[0]} of that rate "
        f"{BASELINE_TEXT[1]}. Red below {percent(DEGRADED)} (TrainingThroughputDegraded), yellow below "
        f"{percent(THROUGHPUT_LOW_RATIO.value)}.",
        UNIT_RATIO,
        [q(f"{sel('run:training_tokens:rate5m')} / {BASELINE}", "{{run_id}}", instant=True)],
        w=3, background=True, steps=((None, RED), (DEGRADED, YELLOW), (THROUGHPUT_LOW_RATIO.value, GREEN)),
    ))
    dash = dash.with_panel(stat_panel(
        "GPU temperature", f"Hottest GPU of the run. Yellow from {number(GPU_WARM_CELSIUS.value)} C, red from "
        f"{number(GPU_HOT_CELSIUS)} C (TrainingGpuHot).",
        UNIT_CELSIUS,
        [q(f"max without (gpu, UUID) ({sel('training_gpu_temperature_celsius')})", "{{instance}}", instant=True)],
        w=3, background=True, steps=((None, GREEN), (GPU_WARM_CELSIUS.value, YELLOW), (GPU_HOT_CELSIUS, RED)),
        no_value="no GPU",
    ))

    dash = dash.with_row(row("Loss and optimisation"))
    dash = dash.with_panel(timeseries_panel(
        "Loss: raw vs EMA",
        "The last step's loss as computed (NaN / Inf show as gaps) and its exponential moving average over "
        "finite losses.",
        UNIT_NONE,
        [q(sel("training_loss"), "loss {{run_id}}"), q(sel("training_loss_ema"), "EMA {{run_id}}")],
    ))
    dash = dash.with_panel(stat_panel(
        "Non-finite loss steps", "Steps whose loss was NaN or Inf since the run started "
        "(TrainingLossNonFinite fires on any).", UNIT_NONE,
        [q(sel("training_nonfinite_loss_total"), "{{run_id}}", instant=True)],
        w=4, h=8, background=True, steps=((None, GREEN), (1, RED)),
    ))
    dash = dash.with_panel(timeseries_panel(
        "Learning rate", "Learning rate of the first parameter group at the last step.", UNIT_SCI,
        [q(sel("training_learning_rate"), "{{run_id}}")],
        w=8,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Gradient norm",
        "Global L2 norm before clipping, and the largest and smallest non-zero per-layer / per-module norm "
        f"(sampled). Dashed: TrainingGradientExploding at {number(GRAD_NORM_MAX)}.",
        UNIT_NONE,
        [q(sel("training_grad_norm"), "global {{run_id}}"),
         q(sel("run:training_layer_grad_norm:max"), "largest group {{run_id}}"),
         q(sel("run:training_layer_grad_norm:min"), "smallest group {{run_id}}")],
        log=True, limits=((None, GREEN), (GRAD_NORM_MAX, RED)),
    ))
    dash = dash.with_panel(timeseries_panel(
        "Step duration",
        "Median and 90th percentile of the optimizer step's wall time over 5 minutes, and the mean.",
        UNIT_SECONDS,
        [q(sel("run_quantile:training_step_duration_seconds:histogram_quantile5m"), "p{{quantile}} {{run_id}}"),
         q(sel("run:training_step_duration_seconds:mean5m"), "mean {{run_id}}")],
    ))

    dash = dash.with_row(row("Throughput and alerts"))
    dash = dash.with_panel(timeseries_panel(
        "Tokens / s vs baseline",
        f"Non-padding tokens per second (1m rate), the run's baseline ({BASELINE_TEXT[0]} of its 5m rate "
        f"{BASELINE_TEXT[1]}) and the level below which TrainingThroughputDegraded fires ({percent(DEGRADED)} of "
        "the baseline).",
        UNIT_SHORT,
        [q(sel("run:training_tokens:rate1m"), "tokens/s {{run_id}}"),
         q(BASELINE, "baseline {{run_id}}"),
         q(f"{number(DEGRADED)} * {BASELINE}", "alert level {{run_id}}")],
    ))
    dash = dash.with_panel(table_panel(
        "Active alerts",
        "Alerts firing now for the selected runs; each alert's description and recommendation are in "
        "Alertmanager and docs/runbook.md.",
        UNIT_NONE,
        [q(alerts_selector(), instant=True, table_format=True)],
        hide=("Time", "Value", "__name__", "alertstate"),
    ))
    dash = dash.with_panel(table_panel(
        "Run", "What the run trains (training_info).", UNIT_NONE,
        [q(sel("training_info"), instant=True, table_format=True)],
        w=24, h=4, hide=("Time", "Value", "__name__"),
    ))
    return dash

