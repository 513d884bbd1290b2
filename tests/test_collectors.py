"""Scrape-time collectors: GPU (NVML) and host (psutil), read through a real registry."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from support.fake_nvml import Board, FakePynvml

from exporter import metrics
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.host import HostCollector, existing_ancestor
from exporter.errors import ErrorTracker

GIB = 1024**3
ERRORS = "training_exporter_collector_errors_total"
UUID_A = "GPU-aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"
UUID_B = "GPU-bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb"


def make_registry() -> tuple[CollectorRegistry, ErrorTracker]:
    registry = CollectorRegistry()
    counter = Counter(
        metrics.COLLECTOR_ERRORS.name,
        metrics.COLLECTOR_ERRORS.help,
        labelnames=("run_id", "collector"),
        registry=registry,
    )
    return registry, ErrorTracker(counter, {"run_id": "t"})


def error_count(registry: CollectorRegistry, collector: str) -> float:
    # Not get_sample_value: that runs every collector after the counter when
    # the series is missing, i.e. one more scrape that may fail once more.
    # The counter is registered first, so stopping at its family runs no
    # other collector and the count is exactly that of the scrapes so far.
    for family in registry.collect():
        assert family.name == metrics.COLLECTOR_ERRORS.name.removesuffix("_total")
        for sample in family.samples:
            if sample.name == ERRORS and sample.labels == {"run_id": "t", "collector": collector}:
                return sample.value
        return 0.0
    raise AssertionError("no error counter registered")


def snapshot(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of exactly one scrape, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """Fake NVML at the hardware boundary: this machine has no GPU.

    Mirrors the pynvml functions the collector calls, with the units NVML
    uses (milliwatts, percent, bytes). ``fail`` names (function, device
    index) pairs that raise, like an unsupported field on a real board.
    It lacks the health functions (clocks, ECC, XID...), like bindings older
    than them: those fields are absent (support.fake_nvml has them all).
    """

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail: set[tuple[str, int]] | None = None, init_failures: int = 0) -> None:
        self.devices = [
            # Older pynvml returns the UUID as bytes, newer as str: cover both.
            dict(uuid=UUID_A.encode(), temp=71, used=3 * GIB, total=24 * GIB, util=42, power=250_500, limit=450_000),
            dict(uuid=UUID_B, temp=55, used=1 * GIB, total=80 * GIB, util=0, power=80_000, limit=700_000),
        ]
        self.fail = fail or set()
        self.init_failures = init_failures
        self.init_calls = 0
        self.shutdown_calls = 0

    def _device(self, function: str, handle: int) -> dict[str, Any]:
        if (function, handle) in self.fail:
            raise FakeNvmlError(f"{function} not supported on device {handle}")
        return self.devices[handle]

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_calls <= self.init_failures:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._device("nvmlDeviceGetHandleByIndex", index)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str | bytes:
        return self._device("nvmlDeviceGetUUID", handle)["uuid"]

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._device("nvmlDeviceGetTemperature", handle)["temp"]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        device = self._device("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(used=device["used"], total=device["total"], free=device["total"] - device["used"])

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._device("nvmlDeviceGetUtilizationRates", handle)["util"], memory=0)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._device("nvmlDeviceGetPowerUsage", handle)["power"]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._device("nvmlDeviceGetEnforcedPowerLimit", handle)["limit"]


def gpu_labels(index: int, uuid: str) -> dict[str, str]:
    return {"run_id": "t", "gpu": str(index), "UUID": uuid}


# --- GPU: real NVML ---------------------------------------------------------


def real_nvml_has_gpu() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_real_nvml_without_gpu_counts_one_error_and_exports_nothing() -> None:
    if real_nvml_has_gpu():
        pytest.skip("this machine has a GPU; the no-driver path needs one without")
    registry, errors = make_registry()
    clock = FakeClock()
    registry.register(GpuCollector({"run_id": "t"}, errors, clock=clock))

    first = scrape(registry)
    clock.now += 30  # within the retry interval: no second init attempt
    second = scrape(registry)

    assert "training_gpu_" not in first
    assert "training_gpu_" not in second
    assert error_count(registry, "gpu") == 1

    clock.now += 31  # past 60 s since the failure: one more attempt, one more error
    assert "training_gpu_" not in scrape(registry)
    assert error_count(registry, "gpu") == 2


def test_real_nvml_default_clock_does_not_retry_within_a_scrape_burst() -> None:
    if real_nvml_has_gpu():
        pytest.skip("this machine has a GPU; the no-driver path needs one without")
    registry, errors = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errors))
    for _ in range(5):
        scrape(registry)
    assert error_count(registry, "gpu") == 1


def test_real_nvml_with_gpu_exports_every_device() -> None:
    if not real_nvml_has_gpu():
        pytest.skip("no GPU on this machine")
    import pynvml

    registry, errors = make_registry()
    collector = GpuCollector({"run_id": "t"}, errors)
    registry.register(collector)
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    finally:
        pynvml.nvmlShutdown()
    text = scrape(registry)
    assert text.count("training_gpu_memory_total_bytes{") == count
    assert registry.get_sample_value(metrics.GPU_MEMORY_TOTAL.name, gpu_labels(0, uuid)) == total
    temperature = registry.get_sample_value(metrics.GPU_TEMPERATURE.name, gpu_labels(0, uuid))
    assert temperature is not None and 0 < temperature < 120
    collector.close()


# --- GPU: fake NVML -----------------------------------------------------------


def test_fake_gpus_export_every_value_and_label() -> None:
    registry, errors = make_registry()
    nvml = FakeNvml()
    registry.register(GpuCollector({"run_id": "t"}, errors, nvml=nvml))

    a, b = gpu_labels(0, UUID_A), gpu_labels(1, UUID_B)
    expected = {
        (metrics.GPU_TEMPERATURE, 0): 71.0,
        (metrics.GPU_TEMPERATURE, 1): 55.0,
        (metrics.GPU_MEMORY_USED, 0): 3.0 * GIB,
        (metrics.GPU_MEMORY_USED, 1): 1.0 * GIB,
        (metrics.GPU_MEMORY_TOTAL, 0): 24.0 * GIB,
        (metrics.GPU_MEMORY_TOTAL, 1): 80.0 * GIB,
        (metrics.GPU_UTILIZATION, 0): 0.42,
        (metrics.GPU_UTILIZATION, 1): 0.0,
        (metrics.GPU_POWER, 0): 250.5,
        (metrics.GPU_POWER, 1): 80.0,
        (metrics.GPU_POWER_LIMIT, 0): 450.0,
        (metrics.GPU_POWER_LIMIT, 1): 700.0,
    }
    for (spec, index), value in expected.items():
        assert registry.get_sample_value(spec.name, a if index == 0 else b) == value, (spec.name, index)

    assert error_count(registry, "gpu") == 0
    # Lazy and once: registering did not init, several scrapes init once.
    assert nvml.init_calls == 1


def test_registering_does_not_touch_nvml() -> None:
    registry, errors = make_registry()
    nvml = FakeNvml()
    collector = GpuCollector({"run_id": "t"}, errors, nvml=nvml)
    registry.register(collector)
    assert collector.describe() == []
    assert nvml.init_calls == 0


def test_const_labels_come_first_in_their_order() -> None:
    # A board with every field NVML has (health fields included: tests/test_gpu_health.py).
    board = Board(uuid=UUID_A, nvlink={0: (True, {})}, unsupported={"nvmlDeviceGetRetiredPagesPendingStatus"})
    registry, errors = make_registry()
    collector = GpuCollector({"run_id": "t", "rank": "3"}, errors, nvml=FakePynvml([board]))
    registry.register(collector)

    families = list(collector.collect())
    specs = {s.name.removesuffix("_total") if s.kind == "counter" else s.name: s
             for s in metrics.ALL if s.source == "gpu"}
    # Retired pages are those of pre-Ampere boards, which have no row remapping: never both.
    assert sorted(f.name for f in families) == sorted(set(specs) - {metrics.GPU_RETIRED_PAGES_PENDING.name})
    for family in families:
        spec = specs[family.name]
        assert family.documentation == spec.help
        assert family.type == spec.kind
        for sample in family.samples:
            assert list(sample.labels) == ["run_id", "rank", "gpu", "UUID", *spec.labels[2:]]
            assert sample.labels["rank"] == "3"


def test_one_failing_field_keeps_the_rest() -> None:
    registry, errors = make_registry()
    nvml = FakeNvml(fail={("nvmlDeviceGetTemperature", 1)})
    registry.register(GpuCollector({"run_id": "t"}, errors, nvml=nvml))

    snap = snapshot(registry)
    b = gpu_labels(1, UUID_B)
    assert key(metrics.GPU_TEMPERATURE.name, b) not in snap
    assert snap[key(metrics.GPU_TEMPERATURE.name, gpu_labels(0, UUID_A))] == 71.0
    assert snap[key(metrics.GPU_MEMORY_USED.name, b)] == 1.0 * GIB
    assert snap[key(metrics.GPU_MEMORY_TOTAL.name, b)] == 80.0 * GIB
    assert snap[key(metrics.GPU_UTILIZATION.name, b)] == 0.0
    assert snap[key(metrics.GPU_POWER.name, b)] == 80.0
    assert snap[key(metrics.GPU_POWER_LIMIT.name, b)] == 700.0
    assert sum(1 for name, _ in snap if name.startswith("training_gpu_")) == 11
    assert error_count(registry, "gpu") == 1

    snapshot(registry)  # every scrape meets the broken field again and counts it
    assert error_count(registry, "gpu") == 2


def test_failing_memory_info_drops_only_memory() -> None:
    registry, errors = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errors, nvml=FakeNvml(fail={("nvmlDeviceGetMemoryInfo", 0)})))
    a = gpu_labels(0, UUID_A)
    assert registry.get_sample_value(metrics.GPU_MEMORY_USED.name, a) is None
    assert registry.get_sample_value(metrics.GPU_MEMORY_TOTAL.name, a) is None
    assert registry.get_sample_value(metrics.GPU_UTILIZATION.name, a) == 0.42
    assert registry.get_sample_value(metrics.GPU_MEMORY_TOTAL.name, gpu_labels(1, UUID_B)) == 80.0 * GIB


def test_unreachable_device_keeps_the_others() -> None:
    registry, errors = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errors, nvml=FakeNvml(fail={("nvmlDeviceGetHandleByIndex", 0)})))
    snap = snapshot(registry)
    assert not any(dict(labels).get("UUID") == UUID_A for _, labels in snap)
    assert snap[key(metrics.GPU_TEMPERATURE.name, gpu_labels(1, UUID_B))] == 55.0
    assert sum(1 for name, _ in snap if name.startswith("training_gpu_")) == 6
    assert error_count(registry, "gpu") == 1


def test_failed_init_is_retried_after_the_interval_only() -> None:
    registry, errors = make_registry()
    clock = FakeClock()
    nvml = FakeNvml(init_failures=1)
    registry.register(GpuCollector({"run_id": "t"}, errors, nvml=nvml, clock=clock))

    assert "training_gpu_" not in scrape(registry)
    clock.now += 59.9
    assert "training_gpu_" not in scrape(registry)
    assert nvml.init_calls == 1

    clock.now += 0.2
    assert registry.get_sample_value(metrics.GPU_TEMPERATURE.name, gpu_labels(0, UUID_A)) == 71.0
    assert nvml.init_calls == 2
    scrape(registry)
    assert nvml.init_calls == 2
    assert error_count(registry, "gpu") == 1


def test_close_shuts_nvml_down_once_and_stops_exporting() -> None:
    registry, errors = make_registry()
    nvml = FakeNvml()
    collector = GpuCollector({"run_id": "t"}, errors, nvml=nvml)
    registry.register(collector)
    scrape(registry)

    collector.close()
    collector.close()
    assert nvml.shutdown_calls == 1
    assert "training_gpu_" not in scrape(registry)
    assert nvml.init_calls == 1


def test_close_before_any_scrape_does_not_touch_nvml() -> None:
    _, errors = make_registry()
    nvml = FakeNvml()
    GpuCollector({"run_id": "t"}, errors, nvml=nvml).close()
    assert nvml.init_calls == 0
    assert nvml.shutdown_calls == 0


# --- host ---------------------------------------------------------------------


def host_value(registry: CollectorRegistry, spec: metrics.MetricSpec) -> float:
    value = registry.get_sample_value(spec.name, {"run_id": "t"})
    assert value is not None, spec.name
    return value


def test_host_values_match_psutil(tmp_path: os.PathLike[str]) -> None:
    registry, errors = make_registry()
    registry.register(HostCollector({"run_id": "t"}, errors, disk_path=tmp_path))

    cpu = host_value(registry, metrics.HOST_CPU)
    assert 0.0 <= cpu <= 1.0

    memory_total = host_value(registry, metrics.HOST_MEMORY_TOTAL)
    assert memory_total == psutil.virtual_memory().total
    assert 0 < host_value(registry, metrics.HOST_MEMORY_USED) <= memory_total

    swap_total = host_value(registry, metrics.HOST_SWAP_TOTAL)
    assert swap_total == psutil.swap_memory().total
    assert 0 <= host_value(registry, metrics.HOST_SWAP_USED) <= swap_total

    disk_total = host_value(registry, metrics.HOST_DISK_TOTAL)
    assert disk_total == psutil.disk_usage(os.fspath(tmp_path)).total
    assert 0 < host_value(registry, metrics.HOST_DISK_USED) <= disk_total

    rss = host_value(registry, metrics.PROCESS_RSS)
    # pytest with prometheus_client and psutil loaded is well over 10 MiB.
    assert 10 * 2**20 < rss < memory_total

    assert error_count(registry, "host") == 0


def test_host_disk_of_a_directory_not_created_yet(tmp_path: os.PathLike[str]) -> None:
    registry, errors = make_registry()
    missing = os.path.join(tmp_path, "output", "checkpoints")
    registry.register(HostCollector({"run_id": "t"}, errors, disk_path=missing))

    assert host_value(registry, metrics.HOST_DISK_TOTAL) == psutil.disk_usage(os.fspath(tmp_path)).total
    assert error_count(registry, "host") == 0
    assert not os.path.exists(missing)


def test_existing_ancestor(tmp_path: os.PathLike[str]) -> None:
    root = os.fspath(tmp_path)
    assert existing_ancestor(tmp_path) == root
    assert existing_ancestor(os.path.join(root, "a", "b", "c")) == root


def test_failing_swap_keeps_memory_and_disk(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise PermissionError("swap accounting unavailable in this container")

    monkeypatch.setattr(psutil, "swap_memory", broken)
    registry, errors = make_registry()
    registry.register(HostCollector({"run_id": "t"}, errors, disk_path=tmp_path))

    snap = snapshot(registry)
    assert not any(name.startswith("training_host_swap_") for name, _ in snap)
    run = {"run_id": "t"}
    assert snap[key(metrics.HOST_MEMORY_TOTAL.name, run)] == psutil.virtual_memory().total
    assert 0 < snap[key(metrics.HOST_MEMORY_USED.name, run)] <= snap[key(metrics.HOST_MEMORY_TOTAL.name, run)]
    assert snap[key(metrics.HOST_DISK_TOTAL.name, run)] == psutil.disk_usage(os.fspath(tmp_path)).total
    assert snap[key(metrics.HOST_DISK_USED.name, run)] > 0
    assert snap[key(metrics.HOST_CPU.name, run)] >= 0
    assert snap[key(metrics.PROCESS_RSS.name, run)] > 0
    assert error_count(registry, "host") == 1


def test_host_collect_does_not_block(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real: Callable[..., Any] = psutil.cpu_percent

    def spy(interval: float | None = None, percpu: bool = False) -> Any:
        calls.append(interval)
        return real(interval=interval, percpu=percpu)

    monkeypatch.setattr(psutil, "cpu_percent", spy)
    _, errors = make_registry()
    collector = HostCollector({"run_id": "t"}, errors)
    list(collector.collect())
    assert calls == [None, None]  # primed once, read once, never a sampling interval


# --- exposition -----------------------------------------------------------------


def test_promtool_accepts_the_exposition(tmp_path: os.PathLike[str]) -> None:
    promtool = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
    if promtool is None:
        pytest.skip("promtool is not installed")
    registry, errors = make_registry()
    registry.register(GpuCollector({"run_id": "t"}, errors, nvml=FakeNvml(fail={("nvmlDeviceGetPowerUsage", 1)})))
    registry.register(HostCollector({"run_id": "t"}, errors, disk_path=tmp_path))
    # The counter is collected before the GPU collector, so a failure shows
    # from the next scrape on.
    generate_latest(registry)
    exposition = generate_latest(registry)
    assert b"training_gpu_power_watts{" in exposition
    assert b'training_exporter_collector_errors_total{collector="gpu",run_id="t"}' in exposition

    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
