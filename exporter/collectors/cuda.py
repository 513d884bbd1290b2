"""Scrape-time memory of PyTorch's CUDA caching allocator (``torch.cuda.memory_stats``).

NVML's "used" counts everything the allocator has reserved from the driver,
so it cannot tell real headroom from cached or fragmented blocks; the
allocator's own statistics can. They are read when Prometheus scrapes, on the
scrape thread: ``memory_stats`` copies the allocator's counters under its
lock (microseconds), with no kernel launch and no device synchronisation.

Devices: the CUDA current device is per thread, so the scrape thread cannot
ask for it. The devices read are those of the watched model's parameters
(recorded by ``TrainingMonitor.watch``) plus any device on which this process
has reserved memory. Nothing is read, and CUDA is never initialised from
here, until the training process has initialised CUDA itself.

Labels ``gpu`` and ``UUID`` are those of the NVML collector for the same
board: the UUID as NVML prints it (``GPU-`` and the 8-4-4-4-12 hex that
torch prints without the prefix) and NVML's index when the NVML collector has
seen that UUID, else the CUDA index (which differs from NVML's under
``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import metrics
from exporter.errors import ErrorTracker

COLLECTOR = "cuda"

ALLOCATED = "allocated_bytes.all.current"
RESERVED = "reserved_bytes.all.current"
# Each spec read straight from one key of torch.cuda.memory_stats.
STAT_KEYS: tuple[tuple[metrics.MetricSpec, str], ...] = (
    (metrics.CUDA_MEMORY_ALLOCATED, ALLOCATED),
    (metrics.CUDA_MEMORY_RESERVED, RESERVED),
    (metrics.CUDA_MEMORY_PEAK_ALLOCATED, "allocated_bytes.all.peak"),
    (metrics.CUDA_MEMORY_PEAK_RESERVED, "reserved_bytes.all.peak"),
    (metrics.CUDA_ALLOC_RETRIES, "num_alloc_retries"),
    (metrics.CUDA_OOMS, "num_ooms"),
)
CUDA_SPECS: tuple[metrics.MetricSpec, ...] = (
    *(spec for spec, _ in STAT_KEYS),
    metrics.CUDA_MEMORY_RESERVED_UNALLOCATED,
    metrics.CUDA_MEMORY_TOTAL,
)


def nvml_uuid(cuda_uuid: object) -> str:
    """A device UUID as NVML prints it: torch's ``str(props.uuid)`` has no ``GPU-`` prefix."""
    text = str(cuda_uuid).strip().lower()
    if text.startswith(("gpu-", "mig-")):
        return text[:3].upper() + text[3:]
    return "GPU-" + text


class CudaCollector(Collector):
    """One family per allocator spec, one sample per device this process trains on, labelled ``gpu``, ``UUID``.

    Args:
        const_labels: the run's constant labels, first on every sample.
        errors: where failures are counted (``collector="cuda"``).
        devices: the CUDA indices of the watched model, read at each scrape.
        nvml_index: NVML's index of a UUID, or None when NVML has not seen it.
    """

    def __init__(
        self,
        const_labels: dict[str, str],
        errors: ErrorTracker,
        devices: Callable[[], Iterable[int]] = frozenset,
        nvml_index: Callable[[str], int | None] = lambda uuid: None,
    ) -> None:
        self._const_names = list(const_labels)
        self._const_values = list(const_labels.values())
        self._errors = errors
        self._devices = devices
        self._nvml_index = nvml_index
        # Per CUDA index: (UUID, total bytes); fixed for the life of the process.
        self._identity: dict[int, tuple[str, float]] = {}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families: list[Metric] = []
        with self._errors.guard(COLLECTOR):
            families = self._read_all()
        yield from families

    def _read_all(self) -> list[Metric]:
        cuda = torch.cuda
        # is_initialized() first: in a process that never used CUDA, is_available() would load the driver
        # to count devices, and anything past it would create a context (hundreds of MiB per device).
        if not (cuda.is_initialized() and cuda.is_available()):
            return []
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for spec in CUDA_SPECS:
            family = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            families[spec.name] = family(
                spec.name, spec.help, labels=[*self._const_names, *spec.labels], unit=spec.unit
            )
        wanted = set(self._devices())
        for index in range(cuda.device_count()):
            try:
                stats = cuda.memory_stats(index)
                if index not in wanted and not stats.get(RESERVED):
                    continue  # a device this process does not use
                uuid, total = self._device_identity(index)
            except Exception as exc:
                self._errors.record(COLLECTOR, exc)
                continue
            nvml_index = self._nvml_index(uuid)
            gpu = str(index if nvml_index is None else nvml_index)
            self._read_device(stats, total, [*self._const_values, gpu, uuid], families)
        return [family for family in families.values() if family.samples]

    def _device_identity(self, index: int) -> tuple[str, float]:
        identity = self._identity.get(index)
        if identity is None:
            props = torch.cuda.get_device_properties(index)
            identity = (nvml_uuid(props.uuid), float(props.total_memory))
            self._identity[index] = identity
        return identity

    def _read_device(
        self,
        stats: dict[str, Any],
        total: float,
        labels: list[str],
        families: dict[str, GaugeMetricFamily | CounterMetricFamily],
    ) -> None:
        def add(spec: metrics.MetricSpec, read: Callable[[], float | None]) -> None:
            try:
                value = read()
                if value is None:
                    return  # a key this allocator backend does not keep (cudaMallocAsync keeps fewer)
                families[spec.name].add_metric(labels, float(value))
            except Exception as exc:
                self._errors.record(COLLECTOR, exc)

        def stat(key: str) -> Callable[[], float | None]:
            return lambda: stats.get(key)

        for spec, key in STAT_KEYS:
            add(spec, stat(key))

        def reserved_unallocated() -> float | None:
            reserved, allocated = stats.get(RESERVED), stats.get(ALLOCATED)
            return None if reserved is None or allocated is None else reserved - allocated

        add(metrics.CUDA_MEMORY_RESERVED_UNALLOCATED, reserved_unallocated)
        add(metrics.CUDA_MEMORY_TOTAL, lambda: total)
