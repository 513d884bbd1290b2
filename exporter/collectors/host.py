"""Scrape-time host and process metrics read from psutil.

Every reading is non-blocking: a scrape must never sleep to sample CPU time,
and must never wait on the training process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import psutil
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import metrics
from exporter.errors import ErrorTracker

COLLECTOR = "host"


def existing_ancestor(path: str | os.PathLike[str]) -> str:
    """``path`` itself or its nearest existing parent.

    The output dir is usually created by the trainer after the exporter
    starts; the filesystem it will live on is already the parent's.
    """
    current = os.path.abspath(os.fspath(path))
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


class HostCollector(Collector):
    """CPU, memory, swap, disk of the output dir's filesystem, and this process's RSS."""

    def __init__(
        self,
        const_labels: dict[str, str],
        errors: ErrorTracker,
        disk_path: str | os.PathLike[str] = ".",
    ) -> None:
        self._const_names = list(const_labels)
        self._const_values = list(const_labels.values())
        self._errors = errors
        self._disk_path = disk_path
        self._process: psutil.Process | None = None
        with errors.guard(COLLECTOR):
            self._process = psutil.Process()
            # cpu_percent(interval=None) measures since its previous call and
            # returns a meaningless 0.0 the first time: prime it here so the
            # first scrape already reports the utilisation since start-up.
            psutil.cpu_percent(interval=None)

    def describe(self) -> list[GaugeMetricFamily]:
        # Empty so that registering does not run a collect().
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # One reading per psutil call, each guarded on its own: e.g. swap
        # accounting is unavailable in some containers, which must not hide
        # memory or disk.
        readings: list[tuple[tuple[metrics.MetricSpec, ...], Callable[[], tuple[float, ...]]]] = [
            ((metrics.HOST_CPU,), lambda: (psutil.cpu_percent(interval=None) / 100,)),
            ((metrics.HOST_MEMORY_USED, metrics.HOST_MEMORY_TOTAL), self._memory),
            ((metrics.HOST_SWAP_USED, metrics.HOST_SWAP_TOTAL), self._swap),
            ((metrics.HOST_DISK_USED, metrics.HOST_DISK_TOTAL), self._disk),
            ((metrics.PROCESS_RSS,), self._rss),
        ]
        families: list[GaugeMetricFamily] = []
        for specs, read in readings:
            try:
                values = read()
            except Exception as exc:
                self._errors.record(COLLECTOR, exc)
                continue
            for spec, value in zip(specs, values, strict=True):
                family = GaugeMetricFamily(
                    spec.name, spec.help, labels=[*self._const_names, *spec.labels], unit=spec.unit
                )
                family.add_metric(self._const_values, float(value))
                families.append(family)
        yield from families

    @staticmethod
    def _memory() -> tuple[float, float]:
        memory = psutil.virtual_memory()
        # total - available rather than .used: .used leaves out reclaimable
        # caches inconsistently across platforms, available is what matters
        # for the next allocation.
        return memory.total - memory.available, memory.total

    @staticmethod
    def _swap() -> tuple[float, float]:
        swap = psutil.swap_memory()
        return swap.used, swap.total

    def _disk(self) -> tuple[float, float]:
        # Resolved every scrape: the directory may appear after start-up and
        # may be a mount point of its own then.
        usage = psutil.disk_usage(existing_ancestor(self._disk_path))
        return usage.used, usage.total

    def _rss(self) -> tuple[float]:
        # Re-created after a fork so a child serving metrics reports itself,
        # not the parent whose pid the cached Process still holds.
        if self._process is None or self._process.pid != os.getpid():
            self._process = psutil.Process()
        return (self._process.memory_info().rss,)
