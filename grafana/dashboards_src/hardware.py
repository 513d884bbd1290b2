"""Hardware: GPUs and hosts of the training and the analytics side, and throughput against GPU memory.

Both sides publish the same families: the training exporter's GPU (NVML) and
host (psutil) collectors, which the checkpoint analytics exporter registers
too, under its own job. The ``instance`` variable tells the hosts apart;
every legend names the instance.
"""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import xychart
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import xychart as xm

from exporter.thresholds import DISK_NEARLY_FULL_CRITICAL, DISK_NEARLY_FULL_WARNING, GPU_HOT, GPU_MEMORY_NEARLY_FULL

from .common import (
    DATASOURCE,
    GREEN,
    RED,
    UNIT_BYTES,
    UNIT_CELSIUS,
    UNIT_RATIO,
    UNIT_SHORT,
    UNIT_WATTS,
    YELLOW,
    legend_list,
    new_dashboard,
    number,
    percent,
    q,
    row,
    sel,
    timeseries_panel,
    tooltip_all,
)

UID = "training-hardware"
GPU = "{{instance}} GPU {{gpu}}"
GPU_HOT_CELSIUS = GPU_HOT.value("max_celsius")
GPU_MEMORY_FULL = GPU_MEMORY_NEARLY_FULL.value("max_ratio")
DISK_WARNING = DISK_NEARLY_FULL_WARNING.value("max_ratio")
DISK_CRITICAL = DISK_NEARLY_FULL_CRITICAL.value("max_ratio")


def build() -> Any:
    dash = new_dashboard(
        UID,
        "Training hardware",
        "GPUs (temperature, memory, utilisation, power) and hosts (CPU, memory, swap, disk) of the training "
        "and the checkpoint analytics side, told apart by instance; and throughput against GPU memory, for "
        "tuning batch size and sequence length.",
        anchor='{__name__=~"training_host_cpu_utilization_ratio|training_gpu_temperature_celsius"}',
        extra_tags=["hardware"],
    )

    dash = dash.with_row(row("GPUs"))
    dash = dash.with_panel(timeseries_panel(
        "GPU temperature", f"Core temperature per GPU. Dashed: TrainingGpuHot at {number(GPU_HOT_CELSIUS)} C.",
        UNIT_CELSIUS,
        [q(sel("training_gpu_temperature_celsius"), GPU)],
        limits=((None, GREEN), (GPU_HOT_CELSIUS, RED)),
    ))
    dash = dash.with_panel(timeseries_panel(
        "GPU memory", "Memory in use per GPU, and installed.", UNIT_BYTES,
        [q(sel("training_gpu_memory_used_bytes"), f"{GPU} used"),
         q(sel("training_gpu_memory_total_bytes"), f"{GPU} installed")],
        min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "GPU memory used",
        f"Share of each GPU's memory in use. Dashed: TrainingGpuMemoryNearlyFull at {percent(GPU_MEMORY_FULL)}.",
        UNIT_RATIO,
        [q(sel("run_gpu:training_gpu_memory_used:ratio"), GPU)],
        min_value=0, max_value=1, limits=((None, GREEN), (GPU_MEMORY_FULL, RED)),
    ))
    dash = dash.with_panel(timeseries_panel(
        "GPU utilisation", "Share of the last sample period during which a kernel ran, per GPU.", UNIT_RATIO,
        [q(sel("training_gpu_utilization_ratio"), GPU)],
        min_value=0, max_value=1,
    ))
    dash = dash.with_panel(timeseries_panel(
        "GPU power", "Power draw per GPU and its enforced limit.", UNIT_WATTS,
        [q(sel("training_gpu_power_watts"), f"{GPU} draw"),
         q(sel("training_gpu_power_limit_watts"), f"{GPU} limit")],
        w=24, min_value=0,
    ))

    dash = dash.with_row(row("Hosts"))
    dash = dash.with_panel(timeseries_panel(
        "Host CPU", "CPU utilisation of the whole host (all cores) between scrapes.", UNIT_RATIO,
        [q(sel("training_host_cpu_utilization_ratio"), "{{instance}}")],
        min_value=0, max_value=1,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Host memory", "Host memory in use (total - available), installed, and the exporting process's "
        "resident memory.", UNIT_BYTES,
        [q(sel("training_host_memory_used_bytes"), "{{instance}} used"),
         q(sel("training_host_memory_total_bytes"), "{{instance}} installed"),
         q(sel("training_process_resident_memory_bytes"), "{{instance}} process RSS")],
        min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Swap", "Swap in use and configured; swapping on a training host starves the data loader.",
        UNIT_BYTES,
        [q(sel("training_host_swap_used_bytes"), "{{instance}} used"),
         q(sel("training_host_swap_total_bytes"), "{{instance}} configured")],
        min_value=0,
    ))
    dash = dash.with_panel(timeseries_panel(
        "Disk used", "Share of the filesystem holding the output (checkpoint) directory in use. Dashed: "
        f"TrainingDiskNearlyFull at {percent(DISK_WARNING)} (warning) and {percent(DISK_CRITICAL)} (critical).",
        UNIT_RATIO,
        [q(sel("run:training_host_disk_used:ratio"), "{{instance}}")],
        min_value=0, max_value=1, limits=((None, GREEN), (DISK_WARNING, YELLOW), (DISK_CRITICAL, RED)),
    ))

    dash = dash.with_row(row("Throughput vs GPU memory"))
    dash = dash.with_panel(
        xychart.Panel().title("Tokens / s vs GPU memory")
        .description("Each point: one time, its tokens/s (1m rate) against the GPU memory in use (largest "
                     "GPU of the run). Points to the right at the same height mean memory to spare for a "
                     "larger batch or longer sequences.")
        .datasource(DATASOURCE).unit(UNIT_SHORT).span(24).height(10)
        .with_target(q(f"max without (gpu, UUID) ({sel('training_gpu_memory_used_bytes')})",
                       "GPU memory {{instance}}").ref_id("A"))
        .with_target(q(sel("run:training_tokens:rate1m"), "tokens/s {{instance}}").ref_id("B"))
        .with_transformation(dm.DataTransformerConfig(id_val="joinByField",
                                                      options={"byField": "Time", "mode": "outer"}))
        # After the join there is one frame: the memory fields are found by name.
        .override_by_regexp("GPU memory .*", [dm.DynamicConfigValue(id_val="unit", value=UNIT_BYTES)])
        # Grafana 11.6's series model: the joined frame, memory on x, tokens/s on y.
        .mapping(xm.SeriesMapping.MANUAL)
        .series([
            xychart.XYSeriesConfig()
            .name(xychart.XychartXYSeriesConfigName().fixed("tokens/s vs GPU memory"))
            .frame(xychart.XychartXYSeriesConfigFrame().matcher(_matcher("byIndex", 0)))
            .x(xychart.XychartXYSeriesConfigX().matcher(_matcher("byRegexp", "GPU memory .*")))
            .y(xychart.XychartXYSeriesConfigY().matcher(_matcher("byRegexp", "tokens/s .*")))
        ])
        .show(xm.XYShowMode.POINTS)
        .point_size(xychart.XychartFieldConfigPointSize().fixed(5))
        .legend(legend_list())
        .tooltip(tooltip_all())
    )
    return dash


def _matcher(matcher_id: str, options: object) -> xychart.MatcherConfig:
    return xychart.MatcherConfig().id(matcher_id).options(options)
