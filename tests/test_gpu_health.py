"""GPU health (NVML) and CUDA caching-allocator memory, read through a real registry.

This machine has no GPU, so both libraries are faked AT THE LIBRARY BOUNDARY ONLY: NVML by a fake
``pynvml`` module object (tests/support/fake_nvml.py, with the real bindings' constants and error
classes), ``torch.cuda`` by monkeypatching its functions (``is_initialized``, ``is_available``,
``device_count``, ``memory_stats``, ``get_device_properties``). Everything above them (the
collectors, the error accounting, the registry, the exposition, TrainingMonitor's glue) is real.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, generate_latest
from support.fake_nvml import GIB, Board, FakePynvml
from support.runif import run_if

from exporter import metrics
from exporter.collectors.cuda import CudaCollector, nvml_uuid
from exporter.collectors.gpu import GpuCollector
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor
from exporter.errors import ErrorTracker

ERRORS = "training_exporter_collector_errors_total"
UUID_A = "GPU-aaaaaaaa-1111-2222-3333-aaaaaaaaaaaa"
UUID_B = "GPU-bbbbbbbb-1111-2222-3333-bbbbbbbbbbbb"
HEALTH = [s for s in metrics.ALL if s.source == "gpu" and s not in (
    metrics.GPU_TEMPERATURE, metrics.GPU_MEMORY_USED, metrics.GPU_MEMORY_TOTAL, metrics.GPU_UTILIZATION,
    metrics.GPU_POWER, metrics.GPU_POWER_LIMIT)]
HEALTH_FUNCTIONS = {
    "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlDeviceGetRemappedRows", "nvmlDeviceGetPcieReplayCounter",
    "nvmlDeviceGetNvLinkState", "nvmlDeviceRegisterEvents",
}
# Written out from the NVML header's names, not derived the way the collector derives them.
BITS = {
    "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
    "applications_clocks_setting": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
    "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
    "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
    "sw_thermal_slowdown": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
    "hw_thermal_slowdown": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    "hw_power_brake_slowdown": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    "display_clock_setting": pynvml.nvmlClocksEventReasonDisplayClockSetting,
}


def make_registry() -> tuple[CollectorRegistry, ErrorTracker]:
    registry = CollectorRegistry()
    counter = Counter(metrics.COLLECTOR_ERRORS.name, metrics.COLLECTOR_ERRORS.help,
                      labelnames=("run_id", "collector"), registry=registry)
    return registry, ErrorTracker(counter, {"run_id": "t"})


Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """Every sample of exactly one scrape (the error counter is collected first, so it shows the scrapes
    before this one)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in registry.collect() for s in f.samples}


def value(snap: Snapshot, name: str, **labels: str) -> float | None:
    return snap.get((name, tuple(sorted({"run_id": "t", **labels}.items()))))


def errors(registry: CollectorRegistry, collector: str) -> float:
    for family in registry.collect():  # the counter's family comes first: no other collector runs
        for s in family.samples:
            if s.name == ERRORS and s.labels["collector"] == collector:
                return s.value
        return 0.0
    raise AssertionError("no error counter")


def names(snap: Snapshot, uuid: str) -> set[str]:
    return {name for name, labels in snap if dict(labels).get("UUID") == uuid}


def nvlink_board(uuid: str) -> Board:
    return Board(
        uuid=uuid, sm_mhz=1980, mem_mhz=2619,
        reasons=pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        ecc={pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 7, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 2},
        remapped=(3, 1, 1, 0), pcie_replays=12,
        nvlink={
            0: (True, {pynvml.NVML_NVLINK_ERROR_DL_REPLAY: 5, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: 1}),
            1: (True, {pynvml.NVML_NVLINK_ERROR_DL_REPLAY: 2, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA: 4}),
            # Inactive: its counters are not this board's traffic and must not be summed.
            2: (False, {pynvml.NVML_NVLINK_ERROR_DL_REPLAY: 100, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY: 9}),
        },
        # Ampere and later remap rows; retired pages are not supported there.
        unsupported={"nvmlDeviceGetRetiredPagesPendingStatus"},
    )


def pcie_board(uuid: str) -> Board:
    """A board without NVLink or ECC, pre-Ampere page retirement."""
    return Board(uuid=uuid, sm_mhz=210, mem_mhz=405, reasons=pynvml.nvmlClocksEventReasonGpuIdle,
                 retired_pending=1,
                 unsupported={"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRemappedRows"})


# --- NVML health --------------------------------------------------------------------


def test_health_fields_carry_nvml_values_in_base_units() -> None:
    registry, errs = make_registry()
    nvml = FakePynvml([nvlink_board(UUID_A), pcie_board(UUID_B)])
    registry.register(GpuCollector({"run_id": "t"}, errs, nvml=nvml))
    snap = snapshot(registry)
    a, b = {"gpu": "0", "UUID": UUID_A}, {"gpu": "1", "UUID": UUID_B}

    assert value(snap, "training_gpu_sm_clock_hertz", **a) == 1980e6
    assert value(snap, "training_gpu_memory_clock_hertz", **a) == 2619e6
    assert value(snap, "training_gpu_sm_clock_hertz", **b) == 210e6
    assert value(snap, "training_gpu_memory_clock_hertz", **b) == 405e6
    for reason in metrics.THROTTLE_REASONS:
        expected_a = 1.0 if reason in ("sw_power_cap", "hw_thermal_slowdown") else 0.0
        assert value(snap, "training_gpu_throttle_reason", **a, reason=reason) == expected_a, reason
        assert value(snap, "training_gpu_throttle_reason", **b, reason=reason) == float(reason == "gpu_idle")
    assert value(snap, "training_gpu_ecc_errors_total", **a, type="corrected") == 7
    assert value(snap, "training_gpu_ecc_errors_total", **a, type="uncorrected") == 2
    assert value(snap, "training_gpu_remapped_rows_pending", **a) == 1
    assert value(snap, "training_gpu_remapped_rows_failed", **a) == 0
    assert value(snap, "training_gpu_retired_pages_pending", **b) == 1
    assert value(snap, "training_gpu_pcie_replays_total", **a) == 12
    assert value(snap, "training_gpu_pcie_replays_total", **b) == 0
    # Links 0 and 1 are active: replay 5 + 2, link 2's 100 left out; types without errors are 0.
    assert value(snap, "training_gpu_nvlink_errors_total", **a, type="replay") == 7
    assert value(snap, "training_gpu_nvlink_errors_total", **a, type="recovery") == 0
    assert value(snap, "training_gpu_nvlink_errors_total", **a, type="crc_flit") == 1
    assert value(snap, "training_gpu_nvlink_errors_total", **a, type="crc_data") == 4
    # The counters exist at 0 from the first scrape, so increase() sees the first XID.
    assert value(snap, "training_gpu_xid_errors_total", **a) == 0
    assert value(snap, "training_gpu_last_xid", **b) == 0

    # What a board does not support is absent, and not an error.
    assert "training_gpu_retired_pages_pending" not in names(snap, UUID_A)
    absent_b = {"training_gpu_ecc_errors_total", "training_gpu_remapped_rows_pending",
                "training_gpu_remapped_rows_failed", "training_gpu_nvlink_errors_total"}
    assert not absent_b & names(snap, UUID_B)
    snapshot(registry)
    assert errors(registry, "gpu") == 0


def test_each_throttle_bit_maps_to_its_reason() -> None:
    board = Board(uuid=UUID_A)
    registry, errs = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errs, nvml=FakePynvml([board])))
    assert set(BITS) == set(metrics.THROTTLE_REASONS)
    for reason, bit in BITS.items():
        board.reasons = bit
        snap = snapshot(registry)
        on = {r for r in metrics.THROTTLE_REASONS
              if value(snap, "training_gpu_throttle_reason", gpu="0", UUID=UUID_A, reason=r) == 1}
        off = {r for r in metrics.THROTTLE_REASONS
               if value(snap, "training_gpu_throttle_reason", gpu="0", UUID=UUID_A, reason=r) == 0}
        assert on == {reason} and off == set(metrics.THROTTLE_REASONS) - {reason}, reason
    # Bits NVML has beyond the exported reasons (board limit, reliability) set nothing.
    board.reasons = pynvml.nvmlClocksThrottleReasonBoardLimit | pynvml.nvmlClocksThrottleReasonReliability
    snap = snapshot(registry)
    assert all(value(snap, "training_gpu_throttle_reason", gpu="0", UUID=UUID_A, reason=r) == 0
               for r in metrics.THROTTLE_REASONS)


def test_throttle_reasons_from_older_bindings_and_drivers() -> None:
    board = Board(uuid=UUID_A, reasons=pynvml.nvmlClocksThrottleReasonHwSlowdown)
    # Bindings before the rename: no ClocksEvent function or constants.
    old = FakePynvml([board])
    del_names = [n for n in vars(old) if n.startswith("nvmlClocksEventReason")]
    for name in del_names:
        delattr(old, name)
    old.nvmlDeviceGetCurrentClocksEventReasons = None  # type: ignore[assignment,method-assign]
    # New bindings on a driver without the new symbol: NVML answers FunctionNotFound.
    driver = FakePynvml([Board(uuid=UUID_B, reasons=pynvml.nvmlClocksThrottleReasonHwSlowdown)])

    def not_found(handle: int) -> int:
        raise pynvml.NVMLError_FunctionNotFound()

    driver.nvmlDeviceGetCurrentClocksEventReasons = not_found  # type: ignore[method-assign]
    for nvml, uuid in ((old, UUID_A), (driver, UUID_B)):
        registry, errs = make_registry()
        registry.register(GpuCollector({"run_id": "t"}, errs, nvml=nvml))
        snap = snapshot(registry)
        for reason in metrics.THROTTLE_REASONS:
            got = value(snap, "training_gpu_throttle_reason", gpu="0", UUID=uuid, reason=reason)
            assert got == float(reason == "hw_slowdown"), (uuid, reason)
        assert errors(registry, "gpu") == 0


def test_xid_events_are_drained_counted_and_the_last_code_kept() -> None:
    a, b = nvlink_board(UUID_A), pcie_board(UUID_B)
    nvml = FakePynvml([a, b])
    registry, errs = make_registry()
    collector = GpuCollector({"run_id": "t"}, errs, nvml=nvml)
    registry.register(collector)

    snapshot(registry)  # registers one event set per device
    a.xid_queue += [79, 48]
    snap = snapshot(registry)
    assert value(snap, "training_gpu_xid_errors_total", gpu="0", UUID=UUID_A) == 2
    assert value(snap, "training_gpu_last_xid", gpu="0", UUID=UUID_A) == 48
    assert value(snap, "training_gpu_xid_errors_total", gpu="1", UUID=UUID_B) == 0
    assert a.xid_queue == []

    snap = snapshot(registry)  # nothing new: the count holds
    assert value(snap, "training_gpu_xid_errors_total", gpu="0", UUID=UUID_A) == 2
    b.xid_queue.append(31)
    snap = snapshot(registry)
    assert value(snap, "training_gpu_xid_errors_total", gpu="1", UUID=UUID_B) == 1
    assert value(snap, "training_gpu_last_xid", gpu="1", UUID=UUID_B) == 31
    assert value(snap, "training_gpu_xid_errors_total", gpu="0", UUID=UUID_A) == 2

    assert nvml.calls["nvmlDeviceRegisterEvents"] == 2  # once per device, not per scrape
    assert errors(registry, "gpu") == 0
    collector.close()
    assert len(nvml.event_sets) == 2 and all(s.freed for s in nvml.event_sets)
    assert nvml.shutdown_calls == 1


def test_xid_without_event_support_exports_nothing_and_does_not_retry() -> None:
    board = Board(uuid=UUID_A, unsupported={"nvmlDeviceRegisterEvents"})
    nvml = FakePynvml([board])
    registry, errs = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errs, nvml=nvml))
    for _ in range(3):
        snap = snapshot(registry)
    assert not {"training_gpu_xid_errors_total", "training_gpu_last_xid"} & names(snap, UUID_A)
    assert value(snap, "training_gpu_sm_clock_hertz", gpu="0", UUID=UUID_A) == 1980e6
    assert nvml.calls["nvmlDeviceRegisterEvents"] == 1
    assert all(s.freed for s in nvml.event_sets)  # the set created for it is given back
    assert errors(registry, "gpu") == 0


def test_unsupported_health_fields_are_absent_without_errors() -> None:
    board = Board(uuid=UUID_A, unsupported=set(HEALTH_FUNCTIONS))
    registry, errs = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errs, nvml=FakePynvml([board])))
    snap = snapshot(registry)
    snapshot(registry)
    assert names(snap, UUID_A) == {metrics.GPU_TEMPERATURE.name, metrics.GPU_MEMORY_USED.name,
                                   metrics.GPU_MEMORY_TOTAL.name, metrics.GPU_UTILIZATION.name,
                                   metrics.GPU_POWER.name, metrics.GPU_POWER_LIMIT.name}
    assert errors(registry, "gpu") == 0


def test_a_raising_field_is_counted_once_per_scrape_and_the_others_stay() -> None:
    board = nvlink_board(UUID_A)
    board.broken = {"nvmlDeviceGetPcieReplayCounter"}
    registry, errs = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errs, nvml=FakePynvml([board])))
    snap = snapshot(registry)
    assert "training_gpu_pcie_replays_total" not in names(snap, UUID_A)
    assert value(snap, "training_gpu_ecc_errors_total", gpu="0", UUID=UUID_A, type="uncorrected") == 2
    assert value(snap, "training_gpu_nvlink_errors_total", gpu="0", UUID=UUID_A, type="replay") == 7
    assert value(snap, "training_gpu_temperature_celsius", gpu="0", UUID=UUID_A) == 60
    assert errors(registry, "gpu") == 1
    snapshot(registry)
    assert errors(registry, "gpu") == 2


def test_a_failing_xid_drain_is_counted_and_keeps_the_count() -> None:
    board = Board(uuid=UUID_A)
    nvml = FakePynvml([board])
    registry, errs = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errs, nvml=nvml))
    board.xid_queue.append(94)
    snapshot(registry)
    board.broken = {"nvmlEventSetWait_v2"}
    snap = snapshot(registry)
    assert value(snap, "training_gpu_xid_errors_total", gpu="0", UUID=UUID_A) == 1
    assert value(snap, "training_gpu_last_xid", gpu="0", UUID=UUID_A) == 94
    assert errors(registry, "gpu") == 1


def test_index_of_maps_uuids_to_nvml_indices() -> None:
    registry, errs = make_registry()
    collector = GpuCollector({"run_id": "t"}, errs, nvml=FakePynvml([Board(uuid=UUID_B), Board(uuid=UUID_A.encode())]))
    registry.register(collector)
    assert collector.index_of(UUID_A) is None  # nothing read yet
    snapshot(registry)
    assert collector.index_of(UUID_A) == 1 and collector.index_of(UUID_B) == 0


# --- CUDA caching allocator -----------------------------------------------------------


def allocator_stats(allocated: int, reserved: int, peak_allocated: int, peak_reserved: int,
                    retries: int = 0, ooms: int = 0) -> dict[str, Any]:
    """The keys torch.cuda.memory_stats returns (a subset of its ~90), with other keys around them."""
    return {
        "active_bytes.all.current": allocated, "allocated_bytes.all.current": allocated,
        "allocated_bytes.all.peak": peak_allocated, "allocated_bytes.small_pool.current": 0,
        "reserved_bytes.all.current": reserved, "reserved_bytes.all.peak": peak_reserved,
        "num_alloc_retries": retries, "num_ooms": ooms, "num_sync_all_streams": 0,
    }


class FakeCuda:
    """torch.cuda's functions for two devices whose UUIDs torch prints without NVML's "GPU-" prefix."""

    def __init__(self, stats: list[dict[str, Any]], initialised: bool = True) -> None:
        self.stats = stats
        self.initialised = initialised
        self.reads: list[int] = []
        self.uuids = [UUID_A.removeprefix("GPU-"), UUID_B.removeprefix("GPU-")]
        self.totals = [80 * GIB, 141 * GIB]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialised)
        monkeypatch.setattr(torch.cuda, "is_available", self.is_available)
        monkeypatch.setattr(torch.cuda, "device_count", self.device_count)
        monkeypatch.setattr(torch.cuda, "memory_stats", self.memory_stats)
        monkeypatch.setattr(torch.cuda, "get_device_properties", self.get_device_properties)

    def is_available(self) -> bool:
        assert self.initialised, "is_available() loads the driver: only after is_initialized()"
        return True

    def device_count(self) -> int:
        assert self.initialised
        return len(self.stats)

    def memory_stats(self, device: int) -> dict[str, Any]:
        assert self.initialised and isinstance(device, int)
        self.reads.append(device)
        return dict(self.stats[device])

    def get_device_properties(self, device: int) -> SimpleNamespace:
        assert self.initialised
        return SimpleNamespace(uuid=_Uuid(self.uuids[device]),
                               total_memory=self.totals[device], name="NVIDIA H100 80GB HBM3")


class _Uuid:
    """Like torch's _CUuuid: str() is the 8-4-4-4-12 hex."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def cuda_collector(registry: CollectorRegistry, errs: ErrorTracker, devices: set[int],
                   nvml_index: Any = lambda uuid: None) -> CudaCollector:
    collector = CudaCollector({"run_id": "t"}, errs, devices=lambda: devices, nvml_index=nvml_index)
    registry.register(collector)
    return collector


def test_allocator_values_and_reserved_unallocated(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda([allocator_stats(6 * GIB, 10 * GIB, 9 * GIB, 12 * GIB, retries=3, ooms=1),
                     allocator_stats(0, 0, 0, 0)])
    cuda.install(monkeypatch)
    registry, errs = make_registry()
    cuda_collector(registry, errs, {0})
    snap = snapshot(registry)
    a = {"gpu": "0", "UUID": UUID_A}
    assert value(snap, "training_cuda_memory_allocated_bytes", **a) == 6 * GIB
    assert value(snap, "training_cuda_memory_reserved_bytes", **a) == 10 * GIB
    assert value(snap, "training_cuda_memory_peak_allocated_bytes", **a) == 9 * GIB
    assert value(snap, "training_cuda_memory_peak_reserved_bytes", **a) == 12 * GIB
    assert value(snap, "training_cuda_memory_reserved_unallocated_bytes", **a) == 4 * GIB
    assert value(snap, "training_cuda_memory_total_bytes", **a) == 80 * GIB
    assert value(snap, "training_cuda_alloc_retries_total", **a) == 3
    assert value(snap, "training_cuda_ooms_total", **a) == 1
    # Device 1: neither the model's nor holding memory of this process.
    assert not names(snap, UUID_B)
    assert errors(registry, "cuda") == 0


def test_devices_are_the_models_and_those_holding_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda([allocator_stats(0, 0, 0, 0), allocator_stats(GIB, 2 * GIB, GIB, 2 * GIB)])
    cuda.install(monkeypatch)
    registry, errs = make_registry()
    devices: set[int] = set()
    cuda_collector(registry, errs, devices)
    snap = snapshot(registry)
    assert not names(snap, UUID_A)
    assert value(snap, "training_cuda_memory_reserved_bytes", gpu="1", UUID=UUID_B) == 2 * GIB
    devices.add(0)  # the model is on device 0, which has reserved nothing yet
    snap = snapshot(registry)
    assert value(snap, "training_cuda_memory_reserved_bytes", gpu="0", UUID=UUID_A) == 0
    assert value(snap, "training_cuda_memory_total_bytes", gpu="0", UUID=UUID_A) == 80 * GIB


def test_labels_equal_the_nvml_collectors_for_the_same_board(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA_VISIBLE_DEVICES=1: CUDA's device 0 is NVML's device 1 (UUID_A).
    cuda = FakeCuda([allocator_stats(GIB, 2 * GIB, GIB, 2 * GIB)])
    cuda.install(monkeypatch)
    registry, errs = make_registry()
    gpu = GpuCollector({"run_id": "t"}, errs, nvml=FakePynvml([Board(uuid=UUID_B), Board(uuid=UUID_A)]))
    registry.register(gpu)  # before the CUDA collector, as in TrainingMonitor's scrape
    cuda_collector(registry, errs, {0}, nvml_index=gpu.index_of)
    snap = snapshot(registry)
    nvml_labels = {labels for name, labels in snap if name == metrics.GPU_MEMORY_TOTAL.name
                   and dict(labels)["UUID"] == UUID_A}
    cuda_labels = {labels for name, labels in snap if name == metrics.CUDA_MEMORY_TOTAL.name}
    assert cuda_labels == nvml_labels == {(("UUID", UUID_A), ("gpu", "1"), ("run_id", "t"))}

    # Without NVML the CUDA index is the label.
    registry, errs = make_registry()
    cuda_collector(registry, errs, {0})
    snap = snapshot(registry)
    assert value(snap, "training_cuda_memory_total_bytes", gpu="0", UUID=UUID_A) == 80 * GIB


def test_nvml_uuid() -> None:
    assert nvml_uuid("aaaaaaaa-1111-2222-3333-aaaaaaaaaaaa") == UUID_A
    assert nvml_uuid(_Uuid("AAAAAAAA-1111-2222-3333-AAAAAAAAAAAA")) == UUID_A
    assert nvml_uuid(UUID_A) == UUID_A
    assert nvml_uuid("MIG-0d5f3c1e-aaaa-bbbb-cccc-000000000000") == "MIG-0d5f3c1e-aaaa-bbbb-cccc-000000000000"


def test_nothing_is_read_before_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda([allocator_stats(GIB, GIB, GIB, GIB)], initialised=False)
    cuda.install(monkeypatch)  # every function but is_initialized asserts it is not called
    registry, errs = make_registry()
    cuda_collector(registry, errs, {0})
    snap = snapshot(registry)
    assert not [name for name, _ in snap if name.startswith("training_cuda_")]
    assert cuda.reads == []
    assert errors(registry, "cuda") == 0
    cuda.initialised = True  # the training process initialises CUDA later: from then on it is read
    assert value(snapshot(registry), "training_cuda_memory_allocated_bytes", gpu="0", UUID=UUID_A) == GIB


def test_a_failing_device_or_missing_key_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = allocator_stats(GIB, 3 * GIB, 2 * GIB, 3 * GIB)
    del stats["num_alloc_retries"]  # a key an allocator backend does not keep: absent, not an error
    cuda = FakeCuda([allocator_stats(GIB, GIB, GIB, GIB), stats])
    cuda.install(monkeypatch)
    real = cuda.memory_stats

    def memory_stats(device: int) -> dict[str, Any]:
        if device == 0:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return real(device)

    monkeypatch.setattr(torch.cuda, "memory_stats", memory_stats)
    registry, errs = make_registry()
    cuda_collector(registry, errs, {0, 1})
    snap = snapshot(registry)
    assert not names(snap, UUID_A)
    b = {"gpu": "1", "UUID": UUID_B}
    assert value(snap, "training_cuda_memory_reserved_unallocated_bytes", **b) == 2 * GIB
    assert value(snap, "training_cuda_alloc_retries_total", **b) is None
    assert value(snap, "training_cuda_ooms_total", **b) == 0
    assert errors(registry, "cuda") == 1  # one scrape, one failing device


def test_monitor_without_cuda_runs_the_part_and_exports_nothing() -> None:
    # The real torch of this machine, which has no CUDA.
    registry = CollectorRegistry()
    mon = TrainingMonitor(ExporterConfig(gpu=False, host=False), run_id="t", registry=registry)
    mon.start_collectors()
    mon.watch(torch.nn.Linear(2, 2))
    assert mon.cuda_devices == frozenset()  # parameters on the CPU
    assert "training_cuda_" not in generate_latest(registry).decode()
    assert registry.get_sample_value(ERRORS, {"run_id": "t", "collector": "cuda"}) == 0
    assert registry.get_sample_value("training_exporter_scrape_collector_duration_seconds",
                                     {"run_id": "t", "collector": "cuda"}) is not None
    mon.stop()


def test_monitor_labels_cuda_memory_with_its_nvml_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda([allocator_stats(GIB, 2 * GIB, GIB, 2 * GIB)]).install(monkeypatch)
    registry = CollectorRegistry()
    mon = TrainingMonitor(ExporterConfig(gpu=True, host=False), run_id="t", registry=registry)
    # The monitor's own GPU collector, given the fake NVML module (start_collectors keeps one it has).
    mon._gpu = GpuCollector(mon.const_labels, mon.errors, nvml=FakePynvml([Board(uuid=UUID_B), Board(uuid=UUID_A)]))
    mon.start_collectors()
    mon.cuda_devices = frozenset({0})  # what watch() records for a model on cuda:0
    assert registry.get_sample_value("training_cuda_memory_reserved_bytes",
                                     {"run_id": "t", "gpu": "1", "UUID": UUID_A}) == 2 * GIB
    assert registry.get_sample_value(ERRORS, {"run_id": "t", "collector": "cuda"}) == 0
    assert registry.get_sample_value(ERRORS, {"run_id": "t", "collector": "gpu"}) is None
    mon.stop()


# --- exposition -----------------------------------------------------------------------------


@run_if(promtool=True)
def test_promtool_accepts_the_health_and_allocator_exposition(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    FakeCuda([allocator_stats(GIB, 2 * GIB, GIB, 2 * GIB, retries=1)]).install(monkeypatch)
    registry, errs = make_registry()
    a = nvlink_board(UUID_A)
    a.xid_queue.append(79)
    gpu = GpuCollector({"run_id": "t"}, errs, nvml=FakePynvml([a, pcie_board(UUID_B)]))
    registry.register(gpu)
    cuda_collector(registry, errs, {0}, nvml_index=gpu.index_of)
    exposition = generate_latest(registry)
    for family in (*HEALTH, *(s for s in metrics.ALL if s.source == "cuda")):
        assert f"\n{family.name}{{".encode() in exposition, family.name
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
