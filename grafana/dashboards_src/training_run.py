"""Training run: the control room's summary bar and training curves (seed 001 layout)."""

from __future__ import annotations

from typing import Any

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
    new_dashboard,
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
BASELINE = f"quantile_over_time(0.9, {sel('run:training_tokens:rate5m')}[6h])"


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
        "more than 1%, yellow: flat, red: rising by more than 2%.",
        UNIT_RATIO,
        [q(f"{sel('run:training_loss_ema:relative_change15m')} "
           f"or deriv({sel('training_loss_ema')}[5m]) * 900 / {sel('training_loss_ema')}",
           "{{run_id}}", instant=True)],
        w=3, background=True, steps=((None, GREEN), (-0.01, YELLOW), (0.02, RED)),
    ))
    dash = dash.with_panel(stat_panel(
        "Throughput",
        "Tokens/s (5m rate) against the run's own baseline, the 90th percentile of that rate over 6 hours. "
        "Red below 70% (TrainingThroughputDegraded), yellow below 90%.",
        UNIT_RATIO,
        [q(f"{sel('run:training_tokens:rate5m')} / {BASELINE}", "{{run_id}}", instant=True)],
        w=3, background=True, steps=((None, RED), (0.7, YELLOW), (0.9, GREEN)),
    ))
    dash = dash.with_panel(stat_panel(
        "GPU temperature", "Hottest GPU of the run. Yellow from 75 C, red from 85 C (TrainingGpuHot).",
        UNIT_CELSIUS,
        [q(f"max without (gpu, UUID) ({sel('training_gpu_temperature_celsius')})", "{{instance}}", instant=True)],
        w=3, background=True, steps=((None, GREEN), (75, YELLOW), (85, RED)), no_value="no GPU",
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
        "(sampled). Dashed: TrainingGradientExploding at 100.",
        UNIT_NONE,
        [q(sel("training_grad_norm"), "global {{run_id}}"),
         q(sel("run:training_layer_grad_norm:max"), "largest group {{run_id}}"),
         q(sel("run:training_layer_grad_norm:min"), "smallest group {{run_id}}")],
        log=True, limits=((None, GREEN), (100, RED)),
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
        "Non-padding tokens per second (1m rate), the run's baseline (90th percentile of its 5m rate over 6 "
        "hours) and the level below which TrainingThroughputDegraded fires (70% of the baseline).",
        UNIT_SHORT,
        [q(sel("run:training_tokens:rate1m"), "tokens/s {{run_id}}"),
         q(BASELINE, "baseline {{run_id}}"),
         q(f"0.7 * {BASELINE}", "alert level {{run_id}}")],
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

