"""A fake pynvml module at the hardware boundary: this machine has no GPU.

Only NVML's device functions are faked. Constants (``NVML_CLOCK_SM``, the
throttle-reason bits, ``nvmlEventTypeXidCriticalError``...) and the error
classes (``NVMLError_NotSupported``, ``NVMLError_Timeout``...) are those of
the real nvidia-ml-py installed here, so the collector is checked against the
bindings' own values. Units are NVML's: MHz, milliwatts, percent, bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3


@dataclass
class Board:
    """One GPU as NVML would report it. ``unsupported`` / ``broken`` name functions that raise
    NVMLError_NotSupported / NVMLError_Unknown on this board."""

    uuid: str | bytes
    temp: int = 60
    used: int = 1 * GIB
    total: int = 80 * GIB
    util: int = 50
    power: int = 300_000
    limit: int = 700_000
    sm_mhz: int = 1980
    mem_mhz: int = 2619
    reasons: int = 0
    ecc: dict[int, int] = field(default_factory=dict)  # by NVML_MEMORY_ERROR_TYPE_*
    retired_pending: int = 0
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)  # corrected rows, uncorrected rows, pending, failure
    pcie_replays: int = 0
    # By link: (active, {NVML_NVLINK_ERROR_*: count}); None: no NVLink on this board.
    nvlink: dict[int, tuple[bool, dict[int, int]]] | None = None
    xid_queue: list[int] = field(default_factory=list)  # XID codes waiting to be delivered
    unsupported: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)


class FakeEventSet:
    def __init__(self) -> None:
        self.handles: list[int] = []
        self.freed = False


class FakePynvml:
    """Stands in for the ``pynvml`` module: pass it as ``GpuCollector(..., nvml=FakePynvml([...]))``."""

    def __init__(self, boards: list[Board]) -> None:
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError", "nvmlClocks", "nvmlEventType")):
                setattr(self, name, getattr(pynvml, name))
        self.boards = boards
        self.init_calls = 0
        self.shutdown_calls = 0
        self.calls: dict[str, int] = {}
        self.event_sets: list[FakeEventSet] = []

    def _board(self, function: str, handle: int) -> Board:
        self.calls[function] = self.calls.get(function, 0) + 1
        board = self.boards[handle]
        if function in board.unsupported:
            raise pynvml.NVMLError_NotSupported()
        if function in board.broken:
            raise pynvml.NVMLError_Unknown()
        return board

    def nvmlInit(self) -> None:
        self.init_calls += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.boards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._board("nvmlDeviceGetHandleByIndex", index)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str | bytes:
        return self._board("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._board("nvmlDeviceGetTemperature", handle).temp

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        board = self._board("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(used=board.used, total=board.total, free=board.total - board.used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._board("nvmlDeviceGetUtilizationRates", handle).util, memory=0)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._board("nvmlDeviceGetPowerUsage", handle).power

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._board("nvmlDeviceGetEnforcedPowerLimit", handle).limit

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        board = self._board("nvmlDeviceGetClockInfo", handle)
        return {pynvml.NVML_CLOCK_SM: board.sm_mhz, pynvml.NVML_CLOCK_MEM: board.mem_mhz}[clock]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self._board("nvmlDeviceGetCurrentClocksEventReasons", handle).reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: int) -> int:
        return self._board("nvmlDeviceGetCurrentClocksThrottleReasons", handle).reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter_type: int) -> int:
        board = self._board("nvmlDeviceGetTotalEccErrors", handle)
        assert counter_type == pynvml.NVML_VOLATILE_ECC
        return board.ecc.get(error_type, 0)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        return self._board("nvmlDeviceGetRetiredPagesPendingStatus", handle).retired_pending

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        return self._board("nvmlDeviceGetRemappedRows", handle).remapped

    def nvmlDeviceGetPcieReplayCounter(self, handle: int) -> int:
        return self._board("nvmlDeviceGetPcieReplayCounter", handle).pcie_replays

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        board = self._board("nvmlDeviceGetNvLinkState", handle)
        if board.nvlink is None:
            raise pynvml.NVMLError_NotSupported()
        if link not in board.nvlink:
            raise pynvml.NVMLError_InvalidArgument()
        return pynvml.NVML_FEATURE_ENABLED if board.nvlink[link][0] else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: int, link: int, counter: int) -> int:
        board = self._board("nvmlDeviceGetNvLinkErrorCounter", handle)
        assert board.nvlink is not None and link in board.nvlink
        return board.nvlink[link][1].get(counter, 0)

    def nvmlEventSetCreate(self) -> FakeEventSet:
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: int, event_types: int, event_set: FakeEventSet) -> None:
        self._board("nvmlDeviceRegisterEvents", handle)
        assert event_types == pynvml.nvmlEventTypeXidCriticalError
        event_set.handles.append(handle)

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        assert timeout_ms == 0 and not event_set.freed
        for handle in event_set.handles:
            board = self._board("nvmlEventSetWait_v2", handle)
            if board.xid_queue:
                return SimpleNamespace(device=handle, eventType=pynvml.nvmlEventTypeXidCriticalError,
                                       eventData=board.xid_queue.pop(0), gpuInstanceId=0, computeInstanceId=0)
        raise pynvml.NVMLError_Timeout()

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        event_set.freed = True
