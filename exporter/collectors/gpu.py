"""Scrape-time GPU metrics read from NVML.

Values are read when Prometheus scrapes, not pushed from the training loop, so
a slow or broken driver can only cost a scrape, never a training step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import metrics
from exporter.errors import ErrorTracker

COLLECTOR = "gpu"

# A machine without a driver stays without one; a driver that is being
# reloaded comes back within a minute or so. Retrying init on every scrape
# would only re-run the (slow) library lookup and spam the error counter.
INIT_RETRY_SECONDS = 60.0

GPU_SPECS: tuple[metrics.MetricSpec, ...] = (
    metrics.GPU_TEMPERATURE,
    metrics.GPU_MEMORY_USED,
    metrics.GPU_MEMORY_TOTAL,
    metrics.GPU_UTILIZATION,
    metrics.GPU_POWER,
    metrics.GPU_POWER_LIMIT,
)


class GpuCollector(Collector):
    """One gauge family per GPU spec, one sample per device, labelled ``gpu`` and ``UUID``."""

    def __init__(
        self,
        const_labels: dict[str, str],
        errors: ErrorTracker,
        nvml: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_seconds: float = INIT_RETRY_SECONDS,
    ) -> None:
        self._const_names = list(const_labels)
        self._const_values = list(const_labels.values())
        self._errors = errors
        # Any: the real module and the test fakes share no declared type.
        self._nvml: Any = nvml
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._initialised = False
        self._closed = False
        self._next_attempt: float | None = None
        # The HTTP server scrapes from several threads; nvmlInit/nvmlShutdown
        # must not race each other.
        self._lock = threading.Lock()

    def describe(self) -> list[GaugeMetricFamily]:
        # Empty so that registering does not run collect() (and NVML init)
        # in the constructor of whoever registers us.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._ensure_initialised()
        if nvml is None:
            return
        families: list[GaugeMetricFamily] = []
        with self._errors.guard(COLLECTOR):
            families = self._read_all(nvml)
        yield from families

    def close(self) -> None:
        """Shut NVML down; later scrapes yield nothing rather than re-open it."""
        with self._lock:
            self._closed = True
            if not self._initialised:
                return
            self._initialised = False
            with self._errors.guard(COLLECTOR):
                self._nvml.nvmlShutdown()

    def _ensure_initialised(self) -> Any | None:
        with self._lock:
            if self._closed:
                return None
            if self._initialised:
                return self._nvml
            now = self._clock()
            if self._next_attempt is not None and now < self._next_attempt:
                return None
            try:
                if self._nvml is None:
                    # Imported here so that importing the exporter never loads
                    # the NVML bindings on a machine that has no GPU.
                    import pynvml

                    self._nvml = pynvml
                self._nvml.nvmlInit()
            except Exception as exc:
                self._next_attempt = now + self._retry_seconds
                # No driver / no GPU is an expected state, not a bug: one line, no traceback.
                self._errors.record(COLLECTOR, exc, traceback=False)
                return None
            self._initialised = True
            return self._nvml

    def _read_all(self, nvml: Any) -> list[GaugeMetricFamily]:
        families = {
            spec.name: GaugeMetricFamily(
                spec.name, spec.help, labels=[*self._const_names, *spec.labels], unit=spec.unit
            )
            for spec in GPU_SPECS
        }
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                if isinstance(uuid, bytes):
                    uuid = uuid.decode("utf-8", "replace")
            except Exception as exc:
                # Without a handle or UUID nothing about this device can be
                # labelled; the other devices are still worth exporting.
                self._errors.record(COLLECTOR, exc)
                continue
            self._read_device(nvml, handle, [*self._const_values, str(index), str(uuid)], families)
        # An empty family would only advertise a metric nobody can read.
        return [family for family in families.values() if family.samples]

    def _read_device(self, nvml: Any, handle: Any, labels: list[str], families: dict[str, GaugeMetricFamily]) -> None:
        def add(spec: metrics.MetricSpec, read: Callable[[], float]) -> None:
            # Each field on its own: e.g. power readings are unsupported on
            # some boards, which must not hide their temperature.
            try:
                value = float(read())
            except Exception as exc:
                self._errors.record(COLLECTOR, exc)
                return
            families[spec.name].add_metric(labels, value)

        add(metrics.GPU_TEMPERATURE, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:
            self._errors.record(COLLECTOR, exc)
        else:
            add(metrics.GPU_MEMORY_USED, lambda: memory.used)
            add(metrics.GPU_MEMORY_TOTAL, lambda: memory.total)
        add(metrics.GPU_UTILIZATION, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
        # NVML reports power in milliwatts.
        add(metrics.GPU_POWER, lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000)
        add(metrics.GPU_POWER_LIMIT, lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000)
