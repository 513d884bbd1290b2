"""The Prometheus side: a collector over the newest analysis, and the loop that watches the checkpoint dir.

Series describe the newest analysed checkpoint only; a custom collector
yields fresh families from it on every scrape, so layers of an older
checkpoint never linger. Nothing here raises out of the loop: every failure is
logged and counted in ``training_analytics_errors_total{reason=...}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from analytics_jobs import metrics as m
from analytics_jobs import report, status
from analytics_jobs.analysis import REASONS, Analysis, AnalysisError, BaseModel, Cancelled, analyse
from analytics_jobs.checkpoints import Checkpoint, list_checkpoints, not_ready, signature

log = logging.getLogger("training_exporter.analytics")


class AnalyticsCollector(Collector):
    """Yields the gauges of the newest analysis and the job's own timings."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._lock = threading.Lock()
        self._latest: Analysis | None = None
        self._last_success: float | None = None
        self._duration: float | None = None

    def publish(self, analysis: Analysis, finished: float) -> None:
        with self._lock:
            self._latest = analysis
            self._last_success = finished

    def set_duration(self, seconds: float) -> None:
        with self._lock:
            self._duration = seconds

    def describe(self) -> list[Metric]:
        return []

    def _family(self, spec: m.MetricSpec) -> GaugeMetricFamily:
        return GaugeMetricFamily(spec.name, spec.help, labels=["run_id", *spec.labels])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            latest, last_success, duration = self._latest, self._last_success, self._duration
        run = self.run_id
        if latest is not None:
            per_layer = [
                (m.LAYER_RELATIVE_DRIFT, "relative_change"),
                (m.LAYER_DELTA_NORM, "delta_norm"),
                (m.LAYER_REFERENCE_NORM, "reference_norm"),
                (m.LAYER_CURRENT_NORM, "current_norm"),
                (m.LAYER_MAX_ABS_WEIGHT, "max_abs_weight"),
                (m.LAYER_MIN_ABS_WEIGHT, "min_abs_weight"),
            ]
            for spec, attr in per_layer:
                family = self._family(spec)
                for row in latest.layers:
                    family.add_metric([run, row.layer], getattr(row, attr))
                yield family
            total = self._family(m.TOTAL_RELATIVE_DRIFT)
            total.add_metric([run], latest.total_relative_change)
            yield total
            current = report.drift_summary(latest).pattern
            pattern = self._family(m.DRIFT_PATTERN)
            for name in report.PATTERNS:
                pattern.add_metric([run, name], 1.0 if name == current else 0.0)
            yield pattern
            if latest.step is not None:
                step = self._family(m.CHECKPOINT_STEP)
                step.add_metric([run], latest.step)
                yield step
        if last_success is not None:
            family = self._family(m.LAST_SUCCESS)
            family.add_metric([run], last_success)
            yield family
        if duration is not None:
            family = self._family(m.DURATION)
            family.add_metric([run], duration)
            yield family


class AnalyticsDaemon:
    """Analyses the newest complete checkpoint of ``checkpoint_dir`` that it has not analysed yet."""

    def __init__(
        self,
        base: BaseModel,
        checkpoint_dir: Path,
        *,
        run_id: str,
        status_dir: Path | None = None,
        history: int = status.DEFAULT_HISTORY,
        registry: CollectorRegistry | None = None,
        hardware: bool = True,
    ) -> None:
        self.base = base
        self.checkpoint_dir = checkpoint_dir
        self.status_dir = status_dir
        self.history = history
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.collector = AnalyticsCollector(run_id)
        self.registry.register(self.collector)
        self._errors = Counter(m.ERRORS.name, m.ERRORS.help, ["run_id", *m.ERRORS.labels], registry=self.registry)
        for reason in REASONS:
            self._errors.labels(run_id, reason)
        if hardware:
            self._register_hardware(run_id)
        self.run_id = run_id
        self.stop = threading.Event()
        self.latest: Analysis | None = None
        self._done: tuple[Path, tuple[tuple[str, int, int], ...]] | None = None
        self._failed: dict[Path, tuple[tuple[str, int, int], ...]] = {}
        self._reported: set[tuple[Path, str]] = set()
        self._said_empty = False

    def _register_hardware(self, run_id: str) -> None:
        """The training exporter's GPU (NVML) and host (psutil) collectors, so that the Hardware
        dashboard shows the analytics host beside the training host (same families, this job)."""
        from exporter import metrics as tm
        from exporter.collectors.gpu import GpuCollector
        from exporter.collectors.host import HostCollector
        from exporter.errors import ErrorTracker

        const = {"run_id": run_id}
        counter = Counter(tm.COLLECTOR_ERRORS.name, tm.COLLECTOR_ERRORS.help, ["run_id", *tm.COLLECTOR_ERRORS.labels],
                          registry=self.registry)
        errors = ErrorTracker(counter, const)
        for name in ("gpu", "host"):
            errors.touch(name)
        self.registry.register(GpuCollector(const, errors))
        self.registry.register(HostCollector(const, errors, disk_path=self.checkpoint_dir))

    def error(self, reason: str, message: str, exc_info: BaseException | None = None) -> None:
        log.error("%s", message, exc_info=exc_info)
        self._errors.labels(self.run_id, reason).inc()

    def newest_ready(self, report_skipped: bool = True) -> Checkpoint | None:
        """The newest complete checkpoint; newer ones still being written are skipped (logged once each)."""
        found = list_checkpoints(self.checkpoint_dir)
        if not found and not self._said_empty:
            log.info("no checkpoint-N folder in %s yet; waiting", self.checkpoint_dir)
            self._said_empty = True
        for ckpt in reversed(found):
            why = not_ready(ckpt.path)
            if why is None:
                return ckpt
            reason, message = why
            if report_skipped and (ckpt.path, reason) not in self._reported:
                self._reported.add((ckpt.path, reason))
                if reason == "incomplete":
                    log.info("skipping %s until it is complete: %s", ckpt.name, message)
                    self._errors.labels(self.run_id, reason).inc()
                else:
                    self.error(reason, f"{ckpt.name}: {message}")
        return None

    def poll(self) -> str:
        """One look at the checkpoint dir: ``analysed``, ``failed`` or ``idle`` (nothing new)."""
        ckpt = self.newest_ready()
        if ckpt is None:
            return "idle"
        sig = signature(ckpt.path)
        if self._done == (ckpt.path, sig) or self._failed.get(ckpt.path) == sig:
            return "idle"
        ok = self.analyse(ckpt)
        if ok:
            self._done = (ckpt.path, sig)
            self._failed.pop(ckpt.path, None)
        else:
            self._failed[ckpt.path] = sig
        return "analysed" if ok else "failed"

    def analyse(self, ckpt: Checkpoint) -> bool:
        """Analyse ``ckpt``, publish the result and write the status files; False when that failed."""
        started = time.perf_counter()
        try:
            result = analyse(self.base, ckpt.path, name=ckpt.name, step=ckpt.step, should_stop=self.stop.is_set)
        except Cancelled:
            raise
        except AnalysisError as exc:
            self.error(exc.reason, f"{ckpt.name}: {exc}; not analysed")
            return False
        except Exception as exc:
            self.error("internal", f"{ckpt.name}: analysis failed: {type(exc).__name__}: {exc}", exc_info=exc)
            return False
        finally:
            self.collector.set_duration(time.perf_counter() - started)
        for problem in result.problems:
            log.warning("%s: %s", ckpt.name, problem.message)
            self._errors.labels(self.run_id, problem.reason).inc()
        self.latest = result
        self.collector.publish(result, time.time())
        written = self.write_status(result)
        summary = report.drift_summary(result)
        log.info(
            "%s (step %s): total relative change %.4g over %d parameters, pattern %s, "
            "max drift layer %s (%.4g), health %s; %.2f s, %.1f MB read",
            ckpt.name, ckpt.step, result.total_relative_change, result.total_params, summary.pattern,
            summary.max_layer, summary.max_value, report.health(report.alerts(result)), result.seconds,
            result.bytes_read / 1e6,
        )
        return written

    def write_status(self, result: Analysis) -> bool:
        if self.status_dir is None:
            return True
        try:
            self.status_dir.mkdir(parents=True, exist_ok=True)
            status.publish(self.status_dir, status.LAYER_DRIFT, report.layer_drift_document(result), self.history)
            status.publish(self.status_dir, status.PARAMETER_STABILITY,
                           report.parameter_stability_document(result), self.history)
        except (OSError, ValueError) as exc:
            self.error("write_error", f"cannot write the status files in {self.status_dir}: {exc}")
            return False
        return True

    def run_forever(self, interval: float) -> None:
        """Poll every ``interval`` seconds until :attr:`stop` is set; never raises."""
        while not self.stop.is_set():
            try:
                self.poll()
            except Cancelled:
                break
            except Exception as exc:  # the loop must go on whatever a checkpoint holds
                self.error("internal", f"poll failed: {type(exc).__name__}: {exc}", exc_info=exc)
            self.stop.wait(interval)
