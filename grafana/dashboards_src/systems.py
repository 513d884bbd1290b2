"""Training systems: where the step time and the device go.

Model FLOPs utilisation, the step-phase breakdown, ranks against their median,
checkpoints, the hang watchdog, the fp16 loss scale, PyTorch's CUDA caching
allocator and the GPUs' health counters (NVML). Panels read the recording rules
of prometheus/rules/mfu.rules.yml, phases.rules.yml and hardware.rules.yml
where there is one, the raw families otherwise.
"""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.models import common as cm

from exporter.thresholds import (
    CHECKPOINT_OVERDUE,
    CHECKPOINT_SLOW,
    CUDA_ALLOC_RETRIES,
    CUDA_MEMORY_HEADROOM_LOW,
    DATA_LOADER_BOUND,
    STRAGGLER_RANK,
)

from .common import (
    GREEN,
    RED,
    UNIT_BYTES,
    UNIT_FLOPS,
    UNIT_HERTZ,
    UNIT_NONE,
    UNIT_RATIO,
    UNIT_SECONDS,
    UNIT_SHORT,
    YELLOW,
    in_words,
    new_dashboard,
    number,
    percent,
    q,
    row,
    sel,
    stat_panel,
    timeseries_panel,
)

UID = "training-systems"
GPU = "{{instance}} GPU {{gpu}}"
# With ranks: all every rank has its own endpoint (instance) and a rank label.
RANK = "rank {{rank}} {{instance}}"
HEADROOM_MAX = CUDA_MEMORY_HEADROOM_LOW.value("max_ratio")
RETRY_WINDOW = CUDA_ALLOC_RETRIES.duration("recent")
STRAGGLER_RATIO = STRAGGLER_RANK.value("ratio")
DATA_LOADER_FRACTION = DATA_LOADER_BOUND.value("fraction")
OVERDUE_MULTIPLE = CHECKPOINT_OVERDUE.value("multiple")
SLOW_SHARE = CHECKPOINT_SLOW.value("share")


def _increase(metric: str) -> str:
    """Events of a counter per panel interval (Grafana's $__rate_interval: at least four scrapes)."""
    return f"increase({sel(metric)}[$__rate_interval])"


def _bars(panel: Any) -> Any:
    """Counts of rare events (checkpoints, retries, skipped steps) as bars."""
    return panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60)


def build() -> Any:
    dash = new_dashboard(
        UID,
        "Training systems",
        "Where the step time and the device go: MFU and achieved FLOP/s, the step-phase breakdown, ranks "
        "against their median, checkpoints, the hang watchdog, the fp16 loss scale, PyTorch's CUDA allocator "
        "(headroom, fragmentation, retries) and GPU health (clocks, throttling, ECC, XID, row remapping, "
        "PCIe and NVLink).",
        anchor="training_step",
        extra_tags=["systems"],
    )

    dash = dash.with_row(row("Utilisation"))
    dash = dash.with_panel(timeseries_panel(
        "MFU and HFU",
        "Model FLOPs utilisation: model FLOP/s (5m rate) over the device's dense peak for the training dtype "
        "(run:training_mfu:ratio5m); HFU counts the forward passes recomputed under gradient checkpointing "
        "too (run:training_hfu:ratio5m). Per rank; empty where no peak is known (a device not in the "
        "exporter's table and no mfu.peak_flops_per_second).",
        UNIT_RATIO,
        [q(sel("run:training_mfu:ratio5m"), "MFU {{instance}}"),
         q(sel("run:training_hfu:ratio5m"), "HFU {{instance}}")],
        min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Achieved FLOP/s",
        "Model and hardware FLOP/s (5m rate of the FLOPs the training micro-batches needed, counted from the "
        "model's shapes) and the peak MFU divides by (training_peak_flops_per_second).",
        UNIT_FLOPS,
        [q(sel("run:training_model_flops:rate5m"), "model {{instance}}"),
         q(sel("run:training_hardware_flops:rate5m"), "hardware {{instance}}"),
         q(sel("training_peak_flops_per_second"), "peak {{instance}}")],
        min_value=0,
    ))

    dash = dash.with_row(row("Step phases and ranks"))
    dash = dash.with_panel(timeseries_panel(
        "Step phase breakdown",
        "Share of the training loop's time in each phase over 5 minutes (run_phase:training_phase_seconds:"
        "ratio5m), averaged over the run's ranks: data loading, forward, backward, optimizer, evaluation, "
        "checkpointing, other. TrainingDataLoaderBound fires when data_loading takes more than "
        f"{percent(DATA_LOADER_FRACTION)} of the training phases (evaluation and checkpointing left out); in DDP "
        "the backward of a fast rank includes its wait for the slowest.",
        UNIT_RATIO,
        [q(f"avg without (rank, instance) ({sel('run_phase:training_phase_seconds:ratio5m')})",
           "{{phase}} {{run_id}}")],
        min_value=0, max_value=1,
    ).stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(60))
    dash = dash.with_panel(timeseries_panel(
        "Step time per rank",
        "Mean seconds per optimizer step over 5 minutes (run:training_step_seconds:mean5m), and the part of "
        "it that does not wait for other ranks: data loading + forward + optimizer "
        "(run:training_rank_work_seconds:per_step5m). Ranks are told apart with ranks: all.",
        UNIT_SECONDS,
        [q(sel("run:training_step_seconds:mean5m"), f"step {RANK}"),
         q(sel("run:training_rank_work_seconds:per_step5m"), f"own work {RANK}")],
        min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Ranks against their median",
        "Each rank's own work per step (data loading + forward + optimizer) over the median of the run's ranks "
        "(run:training_rank_work_seconds:ratio_to_median5m); and each rank's token rate over the median "
        "(run:training_tokens:ratio_to_median5m): uneven batches show below 100%. 100% on a single rank. "
        f"Dashed: TrainingStragglerRank at {percent(STRAGGLER_RATIO)} (when the excess is also a sizeable share "
        "of the step).",
        UNIT_RATIO,
        [q(sel("run:training_rank_work_seconds:ratio_to_median5m"), f"work {RANK}"),
         q(sel("run:training_tokens:ratio_to_median5m"), f"tokens/s {RANK}")],
        w=24, h=7, limits=((None, GREEN), (STRAGGLER_RATIO, YELLOW)),
    ))

    dash = dash.with_row(row("Checkpoints"))
    dash = dash.with_panel(timeseries_panel(
        "Checkpoint duration",
        "Wall time the last checkpoint save held the training loop, and the level TrainingCheckpointSlow fires "
        f"above: {number(SLOW_SHARE)} x the usual interval between saves.",
        UNIT_SECONDS,
        [q(sel("training_checkpoint_duration_seconds"), "{{instance}}"),
         q(f"{number(SLOW_SHARE)} * {sel('training_checkpoint_interval_seconds')}", "slow level {{instance}}")],
        w=6, min_value=0, points=True,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Time since the last checkpoint",
        "Seconds since the last checkpoint save ended (time() - training_checkpoint_timestamp_seconds), and the "
        "run's usual interval between saves (median of the recent ones, from the second save on); "
        f"TrainingCheckpointOverdue fires past {number(OVERDUE_MULTIPLE)} x that interval while training.",
        UNIT_SECONDS,
        [q(f"time() - {sel('training_checkpoint_timestamp_seconds')}", "since last {{instance}}"),
         q(sel("training_checkpoint_interval_seconds"), "usual interval {{instance}}"),
         q(f"{number(OVERDUE_MULTIPLE)} * {sel('training_checkpoint_interval_seconds')}",
           "overdue level {{instance}}")],
        w=6, min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Checkpoint size",
        "Size on disk of the last checkpoint directory (measured off the training thread).",
        UNIT_BYTES,
        [q(sel("training_checkpoint_size_bytes"), "{{instance}}")],
        w=6, min_value=0, points=True,
    ))
    dash = dash.with_panel(_bars(timeseries_panel(
        "Checkpoints saved",
        "Checkpoint saves per interval (increase of training_checkpoints_total over $__rate_interval).",
        UNIT_SHORT,
        [q(_increase("training_checkpoints_total"), "{{instance}}")],
        w=6, min_value=0,
    )))

    dash = dash.with_row(row("Hang watchdog and mixed precision"))
    dash = dash.with_panel(stat_panel(
        "Hang suspected",
        "1 while the exporter's watchdog has seen no optimizer step for longer than its threshold, outside "
        "evaluation and checkpointing (TrainingHangSuspected fires after a minute; the stack dump is in the "
        "output dir). Empty with collectors.watchdog off.",
        UNIT_NONE,
        [q(sel("training_hang_suspected"), "{{instance}}", instant=True)],
        w=4, h=8, background=True, steps=((None, GREEN), (1, RED)), no_value="watchdog off",
    ))
    dash = dash.with_panel(timeseries_panel(
        "Time without a step",
        "Seconds since the last optimizer step ended, and the watchdog's threshold: watchdog.multiple x the "
        "recent median step time, at least watchdog.floor_seconds (training_hang_threshold_seconds). The first "
        "crossing the second outside evaluation and checkpointing is a suspected hang.",
        UNIT_SECONDS,
        [q(f"time() - {sel('training_last_step_timestamp_seconds')}", "since last step {{instance}}"),
         q(sel("training_hang_threshold_seconds"), "hang threshold {{instance}}")],
        w=8, min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Loss scale",
        "Loss scale of the fp16 GradScaler after the last step: it halves on each step whose scaled gradients "
        "overflowed and grows after a run of clean steps. Empty without fp16 (bf16 and fp32 need no scaler).",
        UNIT_NONE,
        [q(sel("training_amp_loss_scale"), "{{instance}}")],
        w=6, log=True,
    ))
    dash = dash.with_panel(_bars(timeseries_panel(
        "Skipped steps",
        "Optimizer steps the GradScaler skipped because the scaled gradients held Inf or NaN, per interval "
        "(increase over $__rate_interval). A few at the start of fp16 training are normal (the scale comes "
        "down from 65536); a steady stream means the gradients overflow at any scale.",
        UNIT_SHORT,
        [q(_increase("training_amp_skipped_steps_total"), "{{instance}}")],
        w=6, min_value=0,
    )))

    dash = dash.with_row(row("CUDA memory (PyTorch allocator)"))
    dash = dash.with_panel(timeseries_panel(
        "CUDA memory headroom",
        "Highest share of each GPU's memory the caching allocator has reserved since the process started "
        "(run_gpu:training_cuda_memory_peak_reserved:ratio). Dashed: TrainingCudaMemoryHeadroomLow at "
        f"{percent(HEADROOM_MAX)}.",
        UNIT_RATIO,
        [q(sel("run_gpu:training_cuda_memory_peak_reserved:ratio"), f"{GPU} peak reserved")],
        w=6, min_value=0, max_value=1, limits=((None, GREEN), (HEADROOM_MAX, RED)),
    ))
    dash = dash.with_panel(timeseries_panel(
        "CUDA memory fragmentation",
        "Share of the allocator's reserve that no live tensor uses: cached free blocks and fragmentation "
        "(run_gpu:training_cuda_memory_fragmentation:ratio). A large share with a high peak calls for "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.",
        UNIT_RATIO,
        [q(sel("run_gpu:training_cuda_memory_fragmentation:ratio"), GPU)],
        w=6, min_value=0, max_value=1,
    ))
    dash = dash.with_panel(timeseries_panel(
        "CUDA allocated vs reserved",
        "Memory held by live tensors (allocated) and by the caching allocator (reserved), their peaks since "
        "the process started, and the device's memory as CUDA reports it.",
        UNIT_BYTES,
        [q(sel("training_cuda_memory_allocated_bytes"), f"{GPU} allocated"),
         q(sel("training_cuda_memory_reserved_bytes"), f"{GPU} reserved"),
         q(sel("training_cuda_memory_peak_allocated_bytes"), f"{GPU} peak allocated"),
         q(sel("training_cuda_memory_peak_reserved_bytes"), f"{GPU} peak reserved"),
         q(sel("training_cuda_memory_total_bytes"), f"{GPU} total")],
        w=6, min_value=0,
    ))
    dash = dash.with_panel(_bars(timeseries_panel(
        "Allocator retries and OOMs",
        "Allocations the caching allocator retried after freeing its whole cache, and out-of-memory errors it "
        f"raised, per {in_words(CUDA_ALLOC_RETRIES.seconds('recent'))} (TrainingCudaAllocRetries fires on "
        "any retry in that window).",
        UNIT_SHORT,
        [q(f"increase({sel('training_cuda_alloc_retries_total')}[{RETRY_WINDOW}])", f"{GPU} retries"),
         q(f"increase({sel('training_cuda_ooms_total')}[{RETRY_WINDOW}])", f"{GPU} OOMs")],
        w=6, min_value=0,
    )))

    dash = dash.with_row(row("GPU health (NVML)"))
    dash = dash.with_panel(timeseries_panel(
        "GPU clocks",
        "Current SM (graphics) and memory clock per GPU; an SM clock that drops under load is throttling.",
        UNIT_HERTZ,
        [q(sel("training_gpu_sm_clock_hertz"), f"{GPU} SM"),
         q(sel("training_gpu_memory_clock_hertz"), f"{GPU} memory")],
        min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Throttle reasons",
        "1 while NVML reports the reason for holding the clocks below their maximum. TrainingGpuThrottled "
        "fires on the thermal, hardware slowdown and power brake reasons held for 10 minutes; idle, clock "
        "settings, sync boost and the software power cap (where a busy board runs) are not slowdowns.",
        UNIT_NONE,
        [q(sel("training_gpu_throttle_reason"), f"{GPU} {{{{reason}}}}")],
        min_value=0, max_value=1,
    ).line_interpolation(cm.LineInterpolation.STEP_AFTER))
    dash = dash.with_panel(timeseries_panel(
        "ECC errors",
        "ECC memory errors since the driver loaded (volatile count), corrected and uncorrected. "
        "TrainingGpuEccUncorrectable fires when the uncorrected count rises. Absent on boards without ECC.",
        UNIT_SHORT,
        [q(sel("training_gpu_ecc_errors_total"), f"{GPU} {{{{type}}}}")],
        w=6, min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "XID errors",
        "Critical XID errors NVML reported since the exporter started (TrainingGpuXidError), and the code of "
        "the last one (0: none); look the code up in NVIDIA's XID catalogue. Absent where NVML cannot "
        "register for XID events (the rule then reads the DCGM exporter).",
        UNIT_NONE,
        [q(sel("training_gpu_xid_errors_total"), f"{GPU} errors"),
         q(sel("training_gpu_last_xid"), f"{GPU} last XID")],
        w=6, min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Memory repairs",
        "1 while remapped rows (Ampere and later) or retired pages (older boards) wait for a GPU reset "
        "(TrainingGpuRowRemapPending), and 1 once a row remapping failed (TrainingGpuRowRemapFailed: the "
        "board needs servicing).",
        UNIT_NONE,
        [q(sel("training_gpu_remapped_rows_pending"), f"{GPU} remap pending"),
         q(sel("training_gpu_remapped_rows_failed"), f"{GPU} remap failed"),
         q(sel("training_gpu_retired_pages_pending"), f"{GPU} retired pages pending")],
        w=6, min_value=0, max_value=1,
    ))
    dash = dash.with_panel(timeseries_panel(
        "PCIe and NVLink errors",
        "PCIe replays (link-level retransmissions) since the driver loaded, and NVLink errors summed over the "
        "active links by type (absent without NVLink). A count that keeps rising points at a bad link or "
        "riser.",
        UNIT_SHORT,
        [q(sel("training_gpu_pcie_replays_total"), f"{GPU} PCIe replays"),
         q(sel("training_gpu_nvlink_errors_total"), f"{GPU} NVLink {{{{type}}}}")],
        w=6, min_value=0,
    ))
    return dash
