"""Every metric the training exporter publishes: name, type, help, unit, labels, buckets.

This module is the single source of truth. The tables of ``docs/metrics.md``
are generated from it (``docs/generate.py``), and the Prometheus rules and the
dashboards are checked against it by tests, so a rename here must be carried to
every consumer in the same change.

Every family additionally carries the constant labels of the run (``run_id``,
any extra labels from the configuration and, when each rank exports, ``rank``);
those are prepended by :class:`exporter.core.TrainingMonitor` and are not
listed per family below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    unit: str = ""
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # Who produces it: the core (pushed on training events) or a scrape-time collector.
    source: str = "core"


# Step durations of fine-tuning runs range from ~10 ms (tiny models, CPU tests)
# to a couple of minutes (8B models with long sequences and accumulation).
# Roughly x2.5 apart so that histogram_quantile() stays within ~25% anywhere
# in that range, and no more than 14 buckets to keep the series count small.
STEP_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Token-level cross-entropy of language models: ln(vocab) ~ 10-12 nats at
# initialisation, 0.01-0.5 for a converged fine-tune of a narrow task. Buckets
# are log-spaced over that span so both early and late training resolve.
LOSS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)


def _g(name: str, help: str, unit: str = "", labels: tuple[str, ...] = (), source: str = "core") -> MetricSpec:
    return MetricSpec(name=name, kind="gauge", help=help, unit=unit, labels=labels, source=source)


def _c(name: str, help: str, labels: tuple[str, ...] = (), source: str = "core") -> MetricSpec:
    return MetricSpec(name=name, kind="counter", help=help, labels=labels, source=source)


INFO = _g(
    "training_info",
    "Constant 1; labels describe the run (model, adapter, library versions).",
    labels=("model", "model_type", "adapter", "exporter_version", "torch_version", "transformers_version"),
)
STATE = _g(
    "training_state",
    "1 for the current state of the run, 0 for the others.",
    labels=("state",),
)
# Final states: completed (a normal end), crashed (an unhandled exception), terminated (SIGTERM, see
# exporter.lifecycle); the alerts on a vanished target spare completed and terminated runs.
STATES = ("idle", "training", "paused", "completed", "crashed", "terminated")
STEP = _g("training_step", "Optimizer steps completed (Trainer global_step).")
MAX_STEPS = _g("training_max_steps", "Optimizer steps the run is scheduled to take.")
EPOCH = _g("training_epoch", "Fractional epoch reached.")
START_TIME = _g("training_start_time_seconds", "Unix time the run started.", unit="seconds")
LAST_STEP_TIME = _g(
    "training_last_step_timestamp_seconds", "Unix time the last optimizer step ended.", unit="seconds"
)
CHECKPOINT_STEP = _g("training_checkpoint_step", "Optimizer step of the last checkpoint saved (checkpoint-N).")

LOSS = _g("training_loss", "Training loss of the last optimizer step as computed (NaN/Inf exported as is).")
LOSS_EMA = _g("training_loss_ema", "Exponential moving average of the finite step losses.")
LOSS_RECENT_MAX = _g(
    "training_loss_recent_max",
    "Largest finite step loss among the steps that ended in the last loss.window_seconds (default 60 s).",
)
LOSS_SPIKE_RATIO = _g(
    "training_loss_recent_spike_ratio",
    "Largest ratio of a step's loss to the loss EMA before that step, among the steps of the last "
    "loss.window_seconds.",
    unit="ratio",
)
LOSS_VARIANCE = _g("training_loss_variance", "Variance of the finite step losses over the rolling window.")
STEP_LOSS = MetricSpec(
    name="training_step_loss",
    kind="histogram",
    help="Distribution of finite step losses (non-finite ones are counted in training_nonfinite_loss_total).",
    buckets=LOSS_BUCKETS,
)
NONFINITE_LOSS = _c("training_nonfinite_loss_total", "Optimizer steps whose loss was NaN or Inf.")

LEARNING_RATE = _g("training_learning_rate", "Learning rate of the first parameter group used by the last step.")
GRAD_NORM = _g("training_grad_norm", "Global L2 norm of the gradients before clipping.")
LAYER_GRAD_NORM = _g(
    "training_layer_grad_norm",
    "L2 norm of the gradients of one module of one layer (layer -1: embeddings), sampled.",
    labels=("layer", "module"),
)
DEAD_LAYERS = _g(
    "training_dead_layers",
    "Trainable (layer, module) groups whose gradient norm was exactly zero at the last sample.",
)
TRAINABLE_GROUPS = _g("training_trainable_groups", "Trainable (layer, module) groups being watched.")
NONFINITE_GRADIENTS = _c(
    "training_nonfinite_gradients_total", "Sampled steps whose gradients held a NaN or Inf."
)
UPDATE_RATIO = _g(
    "training_layer_update_ratio",
    "||W_after - W_before|| / ||W_after|| of one optimizer step for one trainable module, sampled.",
    unit="ratio",
    labels=("layer", "module"),
)

TOKENS = _c("training_tokens_total", "Non-padding input tokens consumed by training (attention mask sum).")
SAMPLES = _c("training_samples_total", "Training sequences consumed.")
STEP_DURATION = MetricSpec(
    name="training_step_duration_seconds",
    kind="histogram",
    help="Wall time of one optimizer step, from on_step_begin to on_step_end.",
    unit="seconds",
    buckets=STEP_DURATION_BUCKETS,
)

MODEL_FLOPS = _c(
    "training_model_flops_total",
    "Floating-point operations the training micro-batches needed (docs/metrics.md, FLOPs and MFU): matmuls of "
    "forward and backward, with no weight gradients for frozen weights (LoRA), attention and padding included.",
)
HARDWARE_FLOPS = _c(
    "training_hardware_flops_total",
    "training_model_flops_total plus the forward passes recomputed under gradient checkpointing.",
)
PEAK_FLOPS = _g(
    "training_peak_flops_per_second",
    "Peak dense FLOP/s of this process's device for the training dtype (the built-in table or "
    "mfu.peak_flops_per_second); absent when unknown, and MFU with it.",
)
# What the time between two hooks of a step was spent on; see exporter/phases.py.
PHASES = ("data_loading", "forward", "backward", "optimizer", "evaluation", "checkpointing", "other")
PHASE_SECONDS = MetricSpec(
    name="training_phase_seconds_total",
    kind="counter",
    help="Time the training loop spent in each phase (data_loading, forward, backward, optimizer, evaluation, "
         "checkpointing, other); on CUDA measured with CUDA events on the device timeline.",
    unit="seconds",
    labels=("phase",),
)
HANG_SUSPECTED = _g(
    "training_hang_suspected",
    "1 while no optimizer step has ended for longer than the watchdog's threshold outside evaluation and "
    "checkpointing, else 0.",
)
HANG_THRESHOLD = _g(
    "training_hang_threshold_seconds",
    "The watchdog's current threshold: watchdog.multiple x the recent median step time, at least "
    "watchdog.floor_seconds.",
    unit="seconds",
)
HANG_DUMPS = _c(
    "training_hang_dumps_total",
    "Stack dumps of every Python thread the watchdog wrote to the output dir (one per suspected hang).",
)
CHECKPOINTS = _c("training_checkpoints_total", "Checkpoints saved.")
CHECKPOINT_DURATION = _g(
    "training_checkpoint_duration_seconds",
    "Wall time the last checkpoint save held the training loop.",
    unit="seconds",
)
CHECKPOINT_SIZE = _g(
    "training_checkpoint_size_bytes",
    "Total size of the files in the last checkpoint directory (apparent size; measured off the training thread).",

    unit="bytes",
)
CHECKPOINT_TIME = _g(
    "training_checkpoint_timestamp_seconds", "Unix time the last checkpoint save ended.", unit="seconds"
)
CHECKPOINT_INTERVAL = _g(
    "training_checkpoint_interval_seconds",
    "Median time between the ends of the recent checkpoint saves (from the second save on).",
    unit="seconds",
)
AMP_LOSS_SCALE = _g(
    "training_amp_loss_scale",
    "Loss scale of the mixed-precision GradScaler (fp16) after the last step.",
)
AMP_SKIPPED_STEPS = _c(
    "training_amp_skipped_steps_total",
    "Optimizer steps the GradScaler skipped because the scaled gradients held Inf or NaN.",
)

TOKEN_ENTROPY = _g(
    "training_token_entropy_nats",
    "Mean entropy of the next-token distribution over labelled positions of a sampled batch.",
    unit="nats",
)
TOP1_CONFIDENCE = _g(
    "training_top1_confidence_ratio",
    "Mean probability of the most likely token over labelled positions of a sampled batch.",
    unit="ratio",
)
TOP5_CONFIDENCE = _g(
    "training_top5_confidence_ratio",
    "Mean probability mass of the five most likely tokens over labelled positions of a sampled batch.",
    unit="ratio",
)
STATISTIC_UNAVAILABLE = _g(
    "training_statistic_unavailable",
    "1 for a statistic this model's outputs do not allow (reason no_logits: neither logits nor a hidden "
    "state to project); the statistic's own series is then absent.",
    labels=("statistic", "reason"),
)

EVAL_LOSS = _g("training_eval_loss", "Loss of the last evaluation.")
EVAL_METRIC = _g(
    "training_eval_metric",
    "Any other number the last evaluation reported (eval_ prefix stripped into the name label).",
    labels=("name",),
)
EVALUATIONS = _c("training_evaluations_total", "Evaluations run.")
EVAL_STEP = _g("training_eval_step", "Optimizer step at which the last evaluation ran.")
# Produced by the fixed evaluation and the dataset profile (source "eval"); the
# names are fixed here so the rules and dashboards can be written against them.
EVAL_EXACT_MATCH = _g(
    "training_eval_exact_match_ratio",
    "Exact-match rate of the last fixed evaluation, by regime and source pool.",
    unit="ratio",
    labels=("regime", "source"),
    source="eval",
)
EVAL_NORMALIZED_MATCH = _g(
    "training_eval_normalized_match_ratio",
    "Normalized-match rate (case, whitespace and punctuation folded) of the last fixed evaluation.",
    unit="ratio",
    labels=("regime", "source"),
    source="eval",
)
EVAL_ANSWER_CROSS_ENTROPY = _g(
    "training_eval_answer_cross_entropy_nats",
    "Mean cross-entropy per golden answer token of the last fixed evaluation (teacher-forced).",
    unit="nats",
    labels=("regime", "source"),
    source="eval",
)
EVAL_CALIBRATION_ERROR = _g(
    "training_eval_calibration_error_ratio",
    "Expected calibration error (15 equal-width bins) of the golden answer tokens' top-1 predictions in the last "
    "fixed evaluation.",
    unit="ratio",
    source="eval",
)
EVAL_TOP1_CONFIDENCE = _g(
    "training_eval_top1_confidence_ratio",
    "Mean top-1 probability over golden answer tokens of the last fixed evaluation.",
    unit="ratio",
    source="eval",
)
EVAL_TOP5_CONFIDENCE = _g(
    "training_eval_top5_confidence_ratio",
    "Mean top-5 probability mass over golden answer tokens of the last fixed evaluation.",
    unit="ratio",
    source="eval",
)
EVAL_TOKEN_ENTROPY = _g(
    "training_eval_token_entropy_nats",
    "Mean next-token entropy over golden answer tokens of the last fixed evaluation.",
    unit="nats",
    source="eval",
)
EVAL_OUTCOMES = _c(
    "training_eval_outcomes_total",
    "Fixed-evaluation answers by outcome (correct, empty, wrong_format, wrong_content, truncated).",
    labels=("regime", "source", "domain", "outcome"),
    source="eval",
)
EVAL_PATTERN_ACCURACY = _g(
    "training_eval_pattern_accuracy_ratio",
    "Exact-match rate of the last fixed evaluation by pattern and golden-answer length bucket.",
    unit="ratio",
    labels=("pattern", "length_bucket"),
    source="eval",
)
EVAL_ROLLING_EXACT_MATCH = _g(
    "training_eval_rolling_exact_match_ratio",
    "Exact-match rate over the last N fixed-evaluation answers, all sources (window 20, 50 or 100).",
    unit="ratio",
    labels=("window",),
    source="eval",
)
EVAL_BEST_LOSS = _g(
    "training_eval_best_loss",
    "Lowest finite eval_loss of the Trainer's evaluations so far (without any: lowest fixed-evaluation answer "
    "cross-entropy of the fixed_eval examples).",
    source="eval",
)
EVAL_BEST_STEP = _g("training_eval_best_step", "Optimizer step of training_eval_best_loss.", source="eval")
EVAL_LAST_STEP = _g("training_eval_last_step", "Optimizer step of the last fixed evaluation.", source="eval")
EVAL_DURATION = _g(
    "training_eval_duration_seconds",
    "Time the last fixed evaluation held the training loop (generation and the teacher-forced pass).",
    unit="seconds",
    source="eval",
)
EVAL_EXAMPLES = _g("training_eval_examples", "Examples scored by the last fixed evaluation.", source="eval")
DATASET_DRIFT = _g(
    "training_dataset_drift_js_divergence",
    "Jensen-Shannon divergence (base 2, 0..1) of the recent batches' profile from the reference data, by feature.",
    labels=("feature",),
    source="eval",
)

GPU_TEMPERATURE = _g(
    "training_gpu_temperature_celsius", "GPU core temperature.", unit="celsius", labels=("gpu", "UUID"), source="gpu"
)
GPU_MEMORY_USED = _g(
    "training_gpu_memory_used_bytes", "GPU memory in use.", unit="bytes", labels=("gpu", "UUID"), source="gpu"
)
GPU_MEMORY_TOTAL = _g(
    "training_gpu_memory_total_bytes", "GPU memory installed.", unit="bytes", labels=("gpu", "UUID"), source="gpu"
)
GPU_UTILIZATION = _g(
    "training_gpu_utilization_ratio",
    "Fraction of the last sample period during which a kernel ran on the GPU.",
    unit="ratio",
    labels=("gpu", "UUID"),
    source="gpu",
)
GPU_POWER = _g("training_gpu_power_watts", "GPU power draw.", unit="watts", labels=("gpu", "UUID"), source="gpu")
GPU_POWER_LIMIT = _g(
    "training_gpu_power_limit_watts", "GPU enforced power limit.", unit="watts", labels=("gpu", "UUID"), source="gpu"
)

GPU_SM_CLOCK = _g(
    "training_gpu_sm_clock_hertz", "Current SM (graphics) clock.", unit="hertz", labels=("gpu", "UUID"), source="gpu"
)
GPU_MEMORY_CLOCK = _g(
    "training_gpu_memory_clock_hertz", "Current memory clock.", unit="hertz", labels=("gpu", "UUID"), source="gpu"
)
# The reasons of NVML's clock-throttle (clocks event) bitmask that are exported, in a fixed order.
THROTTLE_REASONS = (
    "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
    "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "display_clock_setting",
)
GPU_THROTTLE_REASON = _g(
    "training_gpu_throttle_reason",
    "1 while NVML reports this reason for holding the clocks below their maximum, else 0.",
    labels=("gpu", "UUID", "reason"),
    source="gpu",
)
GPU_ECC_ERRORS = _c(
    "training_gpu_ecc_errors_total",
    "ECC memory errors since the driver loaded (volatile count), by type (corrected, uncorrected).",
    labels=("gpu", "UUID", "type"),
    source="gpu",
)
GPU_RETIRED_PAGES_PENDING = _g(
    "training_gpu_retired_pages_pending",
    "1 when retired memory pages wait for a reboot or GPU reset to take effect (pre-Ampere boards).",
    labels=("gpu", "UUID"),
    source="gpu",
)
GPU_REMAPPED_ROWS_PENDING = _g(
    "training_gpu_remapped_rows_pending",
    "1 when remapped memory rows wait for a GPU reset to take effect (Ampere and later).",
    labels=("gpu", "UUID"),
    source="gpu",
)
GPU_REMAPPED_ROWS_FAILED = _g(
    "training_gpu_remapped_rows_failed",
    "1 when a row remapping failed: the board needs servicing.",
    labels=("gpu", "UUID"),
    source="gpu",
)
GPU_PCIE_REPLAYS = _c(
    "training_gpu_pcie_replays_total",
    "PCIe replay events (link-level retransmissions) since the driver loaded.",
    labels=("gpu", "UUID"),
    source="gpu",
)
GPU_NVLINK_ERRORS = _c(
    "training_gpu_nvlink_errors_total",
    "NVLink errors summed over the active links, by type (replay, recovery, crc_flit, crc_data); absent "
    "without NVLink.",
    labels=("gpu", "UUID", "type"),
    source="gpu",
)
GPU_XID_ERRORS = _c(
    "training_gpu_xid_errors_total",
    "Critical XID errors the driver reported through NVML events since the exporter started.",
    labels=("gpu", "UUID"),
    source="gpu",
)
GPU_LAST_XID = _g(
    "training_gpu_last_xid",
    "Code of the last critical XID error seen (0: none since the exporter started).",
    labels=("gpu", "UUID"),
    source="gpu",
)

# PyTorch's CUDA caching allocator (torch.cuda.memory_stats), read at scrape time from a
# process that has initialised CUDA; NVML's "used" counts the whole reserve.
CUDA_MEMORY_ALLOCATED = _g(
    "training_cuda_memory_allocated_bytes",
    "Memory held by live tensors (allocator allocated_bytes.all.current).",
    unit="bytes", labels=("gpu", "UUID"), source="cuda",
)
CUDA_MEMORY_RESERVED = _g(
    "training_cuda_memory_reserved_bytes",
    "Memory the caching allocator holds from the driver (reserved_bytes.all.current).",
    unit="bytes", labels=("gpu", "UUID"), source="cuda",
)
CUDA_MEMORY_PEAK_ALLOCATED = _g(
    "training_cuda_memory_peak_allocated_bytes",
    "Highest allocated memory since the process started or torch.cuda.reset_peak_memory_stats.",
    unit="bytes", labels=("gpu", "UUID"), source="cuda",
)
CUDA_MEMORY_PEAK_RESERVED = _g(
    "training_cuda_memory_peak_reserved_bytes",
    "Highest reserved memory since the process started or torch.cuda.reset_peak_memory_stats.",
    unit="bytes", labels=("gpu", "UUID"), source="cuda",
)
CUDA_MEMORY_RESERVED_UNALLOCATED = _g(
    "training_cuda_memory_reserved_unallocated_bytes",
    "Reserved memory no live tensor uses (reserved - allocated): cached blocks and fragmentation.",
    unit="bytes", labels=("gpu", "UUID"), source="cuda",
)
CUDA_MEMORY_TOTAL = _g(
    "training_cuda_memory_total_bytes",
    "Memory of the device as CUDA reports it (torch.cuda.get_device_properties total_memory).",
    unit="bytes", labels=("gpu", "UUID"), source="cuda",
)
CUDA_ALLOC_RETRIES = _c(
    "training_cuda_alloc_retries_total",
    "Allocations that failed at first and succeeded after the allocator freed its cache (num_alloc_retries).",
    labels=("gpu", "UUID"), source="cuda",
)
CUDA_OOMS = _c(
    "training_cuda_ooms_total",
    "Out-of-memory errors the caching allocator raised (num_ooms).",
    labels=("gpu", "UUID"), source="cuda",
)

HOST_CPU = _g(
    "training_host_cpu_utilization_ratio",
    "Host CPU utilisation since the previous scrape, all cores.",
    unit="ratio",
    source="host",
)
HOST_MEMORY_USED = _g(
    "training_host_memory_used_bytes", "Host memory in use (total - available).", unit="bytes", source="host"
)
HOST_MEMORY_TOTAL = _g("training_host_memory_total_bytes", "Host memory installed.", unit="bytes", source="host")
HOST_SWAP_USED = _g("training_host_swap_used_bytes", "Host swap in use.", unit="bytes", source="host")
HOST_SWAP_TOTAL = _g("training_host_swap_total_bytes", "Host swap configured.", unit="bytes", source="host")
HOST_DISK_USED = _g(
    "training_host_disk_used_bytes", "Used space of the filesystem holding the output dir.", unit="bytes", source="host"
)
HOST_DISK_TOTAL = _g(
    "training_host_disk_total_bytes", "Size of the filesystem holding the output dir.", unit="bytes", source="host"
)
PROCESS_RSS = _g(
    "training_process_resident_memory_bytes", "Resident memory of the training process.", unit="bytes", source="host"
)

COLLECTOR_ERRORS = _c(
    "training_exporter_collector_errors_total",
    "Failures inside the exporter, by collector; training went on.",
    labels=("collector",),
    source="self",
)
HTTP_REQUESTS = _c(
    "training_exporter_http_requests_total",
    "Requests answered by the /metrics endpoint, by HTTP status code.",
    labels=("code",),
    source="self",
)
HTTP_REFUSED = _c(
    "training_exporter_http_connections_refused_total",
    "Connections closed unanswered: over web.max_connections (limit), a failed TLS handshake or client "
    "certificate (tls), a request too slow to arrive or be read (timeout).",
    labels=("reason",),
    source="self",
)
EXPOSITION_RENDERS = _c(
    "training_exporter_exposition_renders_total",
    "Renders of the exposition; scrapes within web.scrape_window_seconds of one share it.",
    source="self",
)
COLLECTOR_DURATION = _g(
    "training_exporter_scrape_collector_duration_seconds",
    "Time the collector took during the last scrape.",
    unit="seconds",
    labels=("collector",),
    source="self",
)

ALL: tuple[MetricSpec, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricSpec))


def exposed_names(spec: MetricSpec) -> tuple[str, ...]:
    """Sample names a scrape shows for a family (histograms expand to three)."""
    if spec.kind == "histogram":
        return (f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count")
    return (spec.name,)


def markdown_table(specs: tuple[MetricSpec, ...] = ALL) -> str:
    """A reference table of ``specs``, as docs/generate.py writes it into docs/metrics.md."""
    rows = ["| name | type | unit | labels | help |", "|---|---|---|---|---|"]
    for spec in specs:
        labels = ", ".join(f"`{x}`" for x in spec.labels) or "-"
        rows.append(f"| `{spec.name}` | {spec.kind} | {spec.unit or '-'} | {labels} | {spec.help} |")
    return "\n".join(rows) + "\n"

