"""Failure accounting: every failure inside the exporter is counted and logged once.

The training loop must never see an exception from the exporter. Code that can
fail wraps itself in :meth:`ErrorTracker.guard` (or calls :meth:`record`), which
swallows the exception, increments
``training_exporter_collector_errors_total{collector=...}`` and logs the first
failure of each collector with its traceback; later ones only count, so a
broken collector cannot flood the training log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from prometheus_client import Counter

log = logging.getLogger("training_exporter")


class ErrorTracker:
    def __init__(self, counter: Counter | None, const_labels: dict[str, str]) -> None:
        self._counter = counter
        self._const = const_labels
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def record(self, collector: str, exc: BaseException, traceback: bool = True, logged: bool = False) -> None:
        """Count a failure; log it if it is the collector's first, unless the caller ``logged`` it already."""
        try:
            if self._counter is not None:
                self._counter.labels(**self._const, collector=collector).inc()
            with self._lock:
                first = collector not in self._seen
                self._seen.add(collector)
            if first and not logged:
                log.warning(
                    "training-exporter: collector %r failed (%s: %s); training continues, "
                    "further failures are only counted",
                    collector,
                    type(exc).__name__,
                    exc,
                    exc_info=exc if traceback else None,
                )
        except Exception:  # pragma: no cover - accounting must never raise either
            pass

    def touch(self, collector: str) -> None:
        """Make the error series exist at 0 so rate() works before the first failure."""
        if self._counter is not None:
            self._counter.labels(**self._const, collector=collector)

    @contextlib.contextmanager
    def guard(self, collector: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.record(collector, exc)
