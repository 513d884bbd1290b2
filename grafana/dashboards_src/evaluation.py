"""Evaluation: what the model gets right (exact match, previews, loss and calibration, the pattern heatmap)."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from exporter.thresholds import (
    DATASET_DRIFT_CRITICAL,
    DATASET_DRIFT_WARNING,
    EXACT_MATCH_FAIR,
    EXACT_MATCH_GOOD,
    POOR_CALIBRATION,
)

from .common import (
    GREEN,
    RED,
    UNIT_NATS,
    UNIT_NONE,
    UNIT_RATIO,
    UNIT_SECONDS,
    YELLOW,
    bargauge_panel,
    new_dashboard,
    number,
    percent,
    q,
    row,
    sel,
    stat_panel,
    table_panel,
    thresholds,
    timeseries_panel,
)

UID = "training-evaluation"

# Exact-match colours (bars and the pattern heatmap): red, yellow, green.
ACCURACY_STEPS = ((None, RED), (EXACT_MATCH_FAIR.value, YELLOW), (EXACT_MATCH_GOOD.value, GREEN))
ACCURACY_TEXT = f"Red below {percent(EXACT_MATCH_FAIR.value)}, yellow below {percent(EXACT_MATCH_GOOD.value)}."
MAX_ECE = POOR_CALIBRATION.value("max_ece")
DRIFT_WARNING = DATASET_DRIFT_WARNING.value("max_divergence")
DRIFT_CRITICAL = DATASET_DRIFT_CRITICAL.value("max_divergence")


def build() -> Any:
    dash = new_dashboard(
        UID,
        "Training evaluation",
        "Fixed-evaluation quality of a run: exact match by regime and source, eval loss and answer "
        "cross-entropy, calibration, confidence and entropy, accuracy by pattern and answer length, the "
        "eval/train gap, the best step so far and dataset drift.",
        anchor="training_step",
        extra_tags=["evaluation"],
    )

    dash = dash.with_row(row("Answers"))
    dash = dash.with_panel(timeseries_panel(
        "Exact match by regime and source",
        "Exact-match rate of each fixed evaluation, and the normalized-match rate (case, whitespace and "
        "punctuation folded), per regime and source pool.",
        UNIT_RATIO,
        [q(sel("training_eval_exact_match_ratio"), "exact {{regime}} / {{source}}"),
         q(sel("training_eval_normalized_match_ratio"), "normalized {{regime}} / {{source}}")],
        min_value=0, max_value=1, points=True,
    ))
    dash = dash.with_panel(bargauge_panel(
        "Exact match now", f"Last exact-match rate per regime and source. {ACCURACY_TEXT}",
        UNIT_RATIO,
        [q(sel("training_eval_exact_match_ratio"), "{{regime}} / {{source}}", instant=True)],
        steps=ACCURACY_STEPS, w=6, vertical=False, min_value=0, max_value=1,
    ))
    dash = dash.with_panel(bargauge_panel(
        "Rolling exact match", "Exact-match rate over the last 20, 50 and 100 previews.", UNIT_RATIO,
        [q(sel("training_eval_rolling_exact_match_ratio"), "last {{window}}", instant=True)],
        steps=ACCURACY_STEPS, w=6, vertical=False, min_value=0, max_value=1,
    ))
    dash = dash.with_panel(
        table_panel(
            "Accuracy by pattern and answer length",
            "Exact-match rate of the last fixed evaluation by pattern (rows) and golden-answer length bucket "
            f"(columns). {ACCURACY_TEXT}",
            UNIT_RATIO,
            [q(sel("training_eval_pattern_accuracy_ratio"), instant=True, table_format=True)],
            hide=(),
        )
        .with_transformation(dm.DataTransformerConfig(
            id_val="groupingToMatrix",
            options={"columnField": "length_bucket", "rowField": "pattern", "valueField": "Value",
                     "emptyValue": "null"},
        ))
        .thresholds(thresholds(*ACCURACY_STEPS))
        .cell_options(cm.TableColoredBackgroundCellOptions(mode=cm.TableCellBackgroundDisplayMode.BASIC))
    )
    dash = dash.with_panel(bargauge_panel(
        "Answers by outcome",
        "Fixed-evaluation answers in the time range, by outcome (correct, empty, wrong_format, wrong_content, "
        "truncated).",
        UNIT_NONE,
        [q(f"sum by (outcome) (increase({sel('training_eval_outcomes_total')}[$__range]))", "{{outcome}}",
           instant=True)],
        steps=((None, "blue"),), vertical=False, min_value=0,
    ))

    dash = dash.with_row(row("Loss and calibration"))
    dash = dash.with_panel(timeseries_panel(
        "Eval loss vs train loss",
        "Loss of each evaluation, the training loss EMA, and the best eval loss so far.",
        UNIT_NONE,
        [q(sel("training_eval_loss"), "eval {{run_id}}"),
         q(sel("training_loss_ema"), "train EMA {{run_id}}"),
         q(sel("training_eval_best_loss"), "best eval {{run_id}}")],
        points=True,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Eval / train gap",
        "Last eval loss minus the training loss EMA (run:training_eval_loss:minus_train_loss_ema). A gap that "
        "grows while the training loss falls is overfitting (TrainingOverfitting).",
        UNIT_NONE,
        [q(sel("run:training_eval_loss:minus_train_loss_ema"), "{{run_id}}")],
    ))
    dash = dash.with_panel(timeseries_panel(
        "Answer cross-entropy", "Mean cross-entropy per golden answer token (teacher-forced), per regime and "
        "source.", UNIT_NATS,
        [q(sel("training_eval_answer_cross_entropy_nats"), "{{regime}} / {{source}}")],
        points=True,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Expected calibration error", "ECE of the last fixed evaluation (15 bins). Dashed: "
        f"TrainingPoorCalibration at {number(MAX_ECE)}.", UNIT_RATIO,
        [q(sel("training_eval_calibration_error_ratio"), "{{run_id}}")],
        min_value=0, limits=((None, GREEN), (MAX_ECE, RED)), points=True,
    ))

    dash = dash.with_row(row("Confidence"))
    dash = dash.with_panel(timeseries_panel(
        "Top-1 / top-5 confidence",
        "Mean probability of the most likely token (and mass of the five most likely) over labelled positions "
        "of a sampled training batch, and over golden answer tokens of the fixed evaluation.",
        UNIT_RATIO,
        [q(sel("training_top1_confidence_ratio"), "top-1 train {{run_id}}"),
         q(sel("training_top5_confidence_ratio"), "top-5 train {{run_id}}"),
         q(sel("training_eval_top1_confidence_ratio"), "top-1 eval {{run_id}}"),
         q(sel("training_eval_top5_confidence_ratio"), "top-5 eval {{run_id}}")],
        min_value=0, max_value=1,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Token entropy", "Mean entropy of the next-token distribution on a sampled training batch and on the "
        "fixed evaluation's golden answer tokens.", UNIT_NATS,
        [q(sel("training_token_entropy_nats"), "train {{run_id}}"),
         q(sel("training_eval_token_entropy_nats"), "eval {{run_id}}")],
        min_value=0,
    ))

    dash = dash.with_row(row("Best checkpoint and data"))
    dash = dash.with_panel(stat_panel(
        "Best eval step", "Optimizer step of the lowest eval loss so far: the checkpoint to keep.", UNIT_NONE,
        [q(sel("training_eval_best_step"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(stat_panel(
        "Best eval loss", "Lowest finite eval loss so far.", UNIT_NONE,
        [q(sel("training_eval_best_loss"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(stat_panel(
        "Evaluations", "Evaluations run (Trainer evaluations).", UNIT_NONE,
        [q(sel("training_evaluations_total"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(stat_panel(
        "Last fixed evaluation", "Optimizer step of the last fixed evaluation.", UNIT_NONE,
        [q(sel("training_eval_last_step"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(stat_panel(
        "Fixed evaluation time", "Wall time of the last fixed evaluation.", UNIT_SECONDS,
        [q(sel("training_eval_duration_seconds"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(stat_panel(
        "Examples scored", "Examples scored by the last fixed evaluation.", UNIT_NONE,
        [q(sel("training_eval_examples"), "{{run_id}}", instant=True)],
    ))
    dash = dash.with_panel(timeseries_panel(
        "Dataset drift (JS divergence)",
        "Jensen-Shannon divergence (base 2, 0..1) of the recent batches' profile from the reference data, by "
        f"feature. Dashed: TrainingDatasetDrift warning at {number(DRIFT_WARNING)}, critical at "
        f"{number(DRIFT_CRITICAL)}.",
        UNIT_NONE,
        [q(sel("training_dataset_drift_js_divergence"), "{{feature}}")],
        min_value=0, limits=((None, GREEN), (DRIFT_WARNING, YELLOW), (DRIFT_CRITICAL, RED)),
    ))
    dash = dash.with_panel(table_panel(
        "Other evaluation metrics", "Any other number the last Trainer evaluation reported (eval_ prefix "
        "stripped).", UNIT_NONE,
        [q(sel("training_eval_metric"), instant=True, table_format=True)],
        hide=("Time", "__name__"),
    ))
    return dash

