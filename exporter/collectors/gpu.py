"""Scrape-time GPU metrics read from NVML.

Values are read when Prometheus scrapes, not pushed from the training loop, so
a slow or broken driver can only cost a scrape, never a training step.

Every field is read on its own: one that fails is counted in
``training_exporter_collector_errors_total{collector="gpu"}`` and the others
are still exported. A field the board, the driver or the bindings do not have
(NVML's ``NotSupported`` / ``FunctionNotFound``, or a function missing from an
older nvidia-ml-py) is simply absent: e.g. ECC on a consumer board, NVLink on
a PCIe card, retired pages on Ampere (which remaps rows instead).

XID errors come from an NVML event set, registered once per device
(``nvmlEventTypeXidCriticalError``) and drained without waiting at each
scrape. Where registration is not supported nothing is exported for XID; the
rules then read the DCGM exporter's ``DCGM_FI_DEV_XID_ERRORS`` joined on
``UUID`` (docs/metrics.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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
    metrics.GPU_SM_CLOCK,
    metrics.GPU_MEMORY_CLOCK,
    metrics.GPU_THROTTLE_REASON,
    metrics.GPU_ECC_ERRORS,
    metrics.GPU_RETIRED_PAGES_PENDING,
    metrics.GPU_REMAPPED_ROWS_PENDING,
    metrics.GPU_REMAPPED_ROWS_FAILED,
    metrics.GPU_PCIE_REPLAYS,
    metrics.GPU_NVLINK_ERRORS,
    metrics.GPU_XID_ERRORS,
    metrics.GPU_LAST_XID,
)

# Label value of ``type`` and the pynvml constant of each ECC count and NVLink error counter.
ECC_TYPES = (("corrected", "NVML_MEMORY_ERROR_TYPE_CORRECTED"), ("uncorrected", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED"))
NVLINK_COUNTERS = (
    ("replay", "NVML_NVLINK_ERROR_DL_REPLAY"),
    ("recovery", "NVML_NVLINK_ERROR_DL_RECOVERY"),
    ("crc_flit", "NVML_NVLINK_ERROR_DL_CRC_FLIT"),
    ("crc_data", "NVML_NVLINK_ERROR_DL_CRC_DATA"),
)
# nvidia-ml-py 12.535 renamed the clock-throttle reasons "clocks event reasons"; older bindings (and drivers)
# have only the throttle names. The bits are the same.
THROTTLE_READERS = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
THROTTLE_PREFIXES = ("nvmlClocksEventReason", "nvmlClocksThrottleReason")
# A driver reporting XIDs in a loop must not turn one scrape into an endless drain; the rest wait for the next.
MAX_XID_EVENTS_PER_SCRAPE = 1000


def throttle_bit(nvml: Any, reason: str) -> int | None:
    """The pynvml bit of one of metrics.THROTTLE_REASONS (``sw_power_cap`` -> ``...ReasonSwPowerCap``)."""
    camel = "".join(word.capitalize() for word in reason.split("_"))
    for prefix in THROTTLE_PREFIXES:
        bit = getattr(nvml, prefix + camel, None)
        if isinstance(bit, int):
            return bit
    return None


class _Unsupported(Exception):
    """The bindings lack a function or constant (an older nvidia-ml-py): absent, like NVML's NotSupported."""


def _fn(nvml: Any, name: str) -> Callable[..., Any]:
    fn = getattr(nvml, name, None)
    if fn is None:
        raise _Unsupported(name)
    return fn


def _const(nvml: Any, name: str) -> Any:
    value = getattr(nvml, name, None)
    if value is None:
        raise _Unsupported(name)
    return value


def _nvml_error(nvml: Any, exc: BaseException, *kinds: str) -> bool:
    """Whether ``exc`` is one of pynvml's ``NVMLError_<kind>`` classes (any NVMLError without kinds)."""
    names = [f"NVMLError_{kind}" for kind in kinds] if kinds else ["NVMLError"]
    classes = tuple(c for c in (getattr(nvml, name, None) for name in names) if isinstance(c, type))
    return bool(classes) and isinstance(exc, classes)


def unsupported(nvml: Any, exc: BaseException) -> bool:
    """A field this board, driver or binding does not have: left out, not counted as an error."""
    return isinstance(exc, _Unsupported) or _nvml_error(nvml, exc, "NotSupported", "FunctionNotFound")


@dataclass
class _XidEvents:
    """One device's NVML event set for critical XID errors, and what it has delivered so far."""

    event_set: Any
    count: int = 0
    last: int = 0


class GpuCollector(Collector):
    """One family per GPU spec (gauge or counter), one sample per device (and ``reason`` / ``type``),
    labelled ``gpu`` and ``UUID``."""

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
        # By UUID: the XID event set of each device seen (None where NVML cannot register one). Two
        # concurrent scrapes must not both drain a set and count an event twice or lose one.
        self._xid: dict[str, _XidEvents | None] = {}
        self._xid_lock = threading.Lock()
        self._indices: dict[str, int] = {}

    def index_of(self, uuid: str) -> int | None:
        """NVML's index of the device with this UUID, as of the last scrape (the ``gpu`` label)."""
        return self._indices.get(uuid)

    def describe(self) -> list[GaugeMetricFamily]:
        # Empty so that registering does not run collect() (and NVML init)
        # in the constructor of whoever registers us.
        return []

    def collect(self) -> Iterator[Metric]:
        nvml = self._ensure_initialised()
        if nvml is None:
            return
        families: list[Metric] = []
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
            with self._xid_lock:
                event_sets = [state.event_set for state in self._xid.values() if state is not None]
                self._xid.clear()
            for event_set in event_sets:
                with self._errors.guard(COLLECTOR):
                    self._nvml.nvmlEventSetFree(event_set)
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

    def _read_all(self, nvml: Any) -> list[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for spec in GPU_SPECS:
            family = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            families[spec.name] = family(
                spec.name, spec.help, labels=[*self._const_names, *spec.labels], unit=spec.unit
            )
        indices: dict[str, int] = {}
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
            indices[str(uuid)] = index
            self._read_device(nvml, handle, str(uuid), [*self._const_values, str(index), str(uuid)], families)
        self._indices = indices
        # An empty family would only advertise a metric nobody can read.
        return [family for family in families.values() if family.samples]

    def _read_device(
        self,
        nvml: Any,
        handle: Any,
        uuid: str,
        labels: list[str],
        families: dict[str, GaugeMetricFamily | CounterMetricFamily],
    ) -> None:
        def add(spec: metrics.MetricSpec, read: Callable[[], float], *extra: str) -> None:
            # Each field on its own: e.g. power readings are unsupported on
            # some boards, which must not hide their temperature.
            try:
                value = float(read())
            except Exception as exc:
                if not unsupported(nvml, exc):
                    self._errors.record(COLLECTOR, exc)
                return
            families[spec.name].add_metric([*labels, *extra], value)

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
        self._read_health(nvml, handle, uuid, labels, families, add)

    def _read_health(
        self,
        nvml: Any,
        handle: Any,
        uuid: str,
        labels: list[str],
        families: dict[str, GaugeMetricFamily | CounterMetricFamily],
        add: Callable[..., None],
    ) -> None:
        # NVML reports clocks in MHz.
        add(metrics.GPU_SM_CLOCK,
            lambda: _fn(nvml, "nvmlDeviceGetClockInfo")(handle, _const(nvml, "NVML_CLOCK_SM")) * 1e6)
        add(metrics.GPU_MEMORY_CLOCK,
            lambda: _fn(nvml, "nvmlDeviceGetClockInfo")(handle, _const(nvml, "NVML_CLOCK_MEM")) * 1e6)
        self._read_throttle(nvml, handle, labels, families)
        for name, constant in ECC_TYPES:
            # Volatile: since the driver loaded, a counter that Prometheus's increase() follows across reloads.
            add(metrics.GPU_ECC_ERRORS, lambda constant=constant: _fn(nvml, "nvmlDeviceGetTotalEccErrors")(
                handle, _const(nvml, constant), _const(nvml, "NVML_VOLATILE_ECC")), name)
        add(metrics.GPU_RETIRED_PAGES_PENDING,
            lambda: 1.0 if _fn(nvml, "nvmlDeviceGetRetiredPagesPendingStatus")(handle) else 0.0)
        try:
            # (corrected rows, uncorrected rows, pending, failure occurred)
            remapped = _fn(nvml, "nvmlDeviceGetRemappedRows")(handle)
        except Exception as exc:
            if not unsupported(nvml, exc):
                self._errors.record(COLLECTOR, exc)
        else:
            add(metrics.GPU_REMAPPED_ROWS_PENDING, lambda: 1.0 if remapped[2] else 0.0)
            add(metrics.GPU_REMAPPED_ROWS_FAILED, lambda: 1.0 if remapped[3] else 0.0)
        add(metrics.GPU_PCIE_REPLAYS, lambda: _fn(nvml, "nvmlDeviceGetPcieReplayCounter")(handle))
        self._read_nvlink(nvml, handle, add)
        self._read_xid(nvml, handle, uuid, add)

    def _read_throttle(
        self, nvml: Any, handle: Any, labels: list[str], families: dict[str, GaugeMetricFamily | CounterMetricFamily]
    ) -> None:
        for reader in THROTTLE_READERS:
            if getattr(nvml, reader, None) is None:
                continue
            try:
                mask = int(getattr(nvml, reader)(handle))
            except Exception as exc:
                if _nvml_error(nvml, exc, "FunctionNotFound"):
                    continue  # a driver older than the bindings: it has the older name
                if not unsupported(nvml, exc):
                    self._errors.record(COLLECTOR, exc)
                return
            for reason in metrics.THROTTLE_REASONS:
                bit = throttle_bit(nvml, reason)
                if bit is not None:
                    families[metrics.GPU_THROTTLE_REASON.name].add_metric(
                        [*labels, reason], 1.0 if mask & bit else 0.0)
            return

    def _read_nvlink(self, nvml: Any, handle: Any, add: Callable[..., None]) -> None:
        try:
            link_state = _fn(nvml, "nvmlDeviceGetNvLinkState")
            error_counter = _fn(nvml, "nvmlDeviceGetNvLinkErrorCounter")
            max_links = int(_const(nvml, "NVML_NVLINK_MAX_LINKS"))
            counters = [(name, _const(nvml, constant)) for name, constant in NVLINK_COUNTERS]
        except _Unsupported:
            return
        enabled = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
        active = []
        for link in range(max_links):
            try:
                if link_state(handle, link) == enabled:
                    active.append(link)
            except Exception as exc:
                # Probing past the board's links (or a board without NVLink) answers with an NVML error.
                if not _nvml_error(nvml, exc):
                    self._errors.record(COLLECTOR, exc)
                    return
        # No active link: the board has no NVLink in use, and the family stays absent.
        for name, counter in counters if active else ():
            add(metrics.GPU_NVLINK_ERRORS,
                lambda counter=counter: sum(error_counter(handle, link, counter) for link in active), name)

    def _read_xid(self, nvml: Any, handle: Any, uuid: str, add: Callable[..., None]) -> None:
        with self._xid_lock:
            if uuid not in self._xid:
                self._xid[uuid] = self._register_xid(nvml, handle)
            state = self._xid[uuid]
            if state is None:
                return  # not supported here: see the DCGM fallback in docs/metrics.md
            try:
                self._drain_xid(nvml, state)
            except Exception as exc:
                # Counted; what was drained before the failure is kept and the counter stays exported.
                self._errors.record(COLLECTOR, exc)
            count, last = state.count, state.last
        add(metrics.GPU_XID_ERRORS, lambda: count)
        add(metrics.GPU_LAST_XID, lambda: last)

    def _register_xid(self, nvml: Any, handle: Any) -> _XidEvents | None:
        # One set per device: each event is then this device's without asking NVML whose handle it carries.
        event_set = None
        try:
            event_set = _fn(nvml, "nvmlEventSetCreate")()
            _fn(nvml, "nvmlDeviceRegisterEvents")(handle, _const(nvml, "nvmlEventTypeXidCriticalError"), event_set)
        except Exception as exc:
            if not unsupported(nvml, exc):
                self._errors.record(COLLECTOR, exc)
            if event_set is not None:
                with self._errors.guard(COLLECTOR):
                    nvml.nvmlEventSetFree(event_set)
            return None
        return _XidEvents(event_set)

    def _drain_xid(self, nvml: Any, state: _XidEvents) -> None:
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or _fn(nvml, "nvmlEventSetWait")
        xid = int(_const(nvml, "nvmlEventTypeXidCriticalError"))
        for _ in range(MAX_XID_EVENTS_PER_SCRAPE):
            try:
                # 0 ms: return at once; NVML answers Timeout when no event is waiting.
                data = wait(state.event_set, 0)
            except Exception as exc:
                if _nvml_error(nvml, exc, "Timeout"):
                    return
                raise
            if int(data.eventType) & xid:
                state.count += 1
                state.last = int(data.eventData)
