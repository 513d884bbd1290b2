"""The Prometheus side of the fixed evaluation: the ``training_eval_*`` metrics, read at scrape time.

:class:`EvalExport` holds the aggregates of the last evaluation
(:class:`EvalSnapshot`), the outcome counters, the rolling exact match and
the best eval loss so far, and yields them as metric families on each scrape.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter import metrics as m
from exporter.evaluation.scoring import OUTCOMES

ROLLING_WINDOWS = (20, 50, 100)


@dataclass
class EvalSnapshot:
    """The aggregates of one evaluation, as exported until the next one."""

    step: int
    duration: float
    examples: int
    by_group: dict[tuple[str, str], tuple[float, float, float]]  # (regime, source) -> em, nm, ce
    pattern: dict[tuple[str, str], float]  # (pattern, length bucket) -> em
    # None when no answer token was scored; NaN (exported as is) when the model gave NaN.
    ece: float | None
    top1: float | None
    top5: float | None
    entropy: float | None


class EvalExport:
    """What the fixed evaluation and the Trainer's evaluations export; read at scrape time.

    Always present in a monitor (cheap): best-so-far comes from the Trainer's
    ``eval_loss`` even without a fixed eval set.
    """

    def __init__(self, const_labels: Mapping[str, str]) -> None:
        self.const_labels = dict(const_labels)
        self._lock = threading.Lock()
        self._last: EvalSnapshot | None = None
        self._outcomes: dict[tuple[str, str, str, str], int] = {}
        self._rolling: collections.deque[bool] = collections.deque(maxlen=max(ROLLING_WINDOWS))
        # kind ("trainer": eval_loss of Trainer evaluations, "fixed": answer CE) -> (loss, step)
        self._best: dict[str, tuple[float, int]] = {}

    def declare(self, combos: Iterable[tuple[str, str, str]]) -> None:
        """Create the outcome counters of every (regime, source, domain) at 0, so increase() sees the first."""
        with self._lock:
            for regime, source, domain in combos:
                for outcome in OUTCOMES:
                    self._outcomes.setdefault((regime, source, domain, outcome), 0)

    def observe_loss(self, loss: float, step: int, kind: str = "trainer") -> None:
        if not math.isfinite(loss):
            return
        with self._lock:
            best = self._best.get(kind)
            if best is None or loss < best[0]:
                self._best[kind] = (float(loss), int(step))

    def best(self) -> tuple[float, int] | None:
        """The Trainer's best eval loss and its step; without Trainer evaluations, the fixed eval's answer CE."""
        with self._lock:
            return self._best.get("trainer") or self._best.get("fixed")

    def publish(self, snap: EvalSnapshot, outcomes: Iterable[tuple[str, str, str, str]],
                matches: Iterable[bool]) -> None:
        with self._lock:
            self._last = snap
            for key in outcomes:
                self._outcomes[key] = self._outcomes.get(key, 0) + 1
            self._rolling.extend(matches)

    @property
    def last(self) -> EvalSnapshot | None:
        return self._last

    def collect(self) -> Iterator[Metric]:
        const = self.const_labels
        names, values = list(const), list(const.values())

        def gauge(spec: m.MetricSpec) -> GaugeMetricFamily:
            return GaugeMetricFamily(spec.name, spec.help, labels=[*names, *spec.labels])

        with self._lock:
            snap = self._last
            outcomes = dict(self._outcomes)
            rolling = list(self._rolling)
        best = self.best()
        if outcomes:
            counter = CounterMetricFamily(m.EVAL_OUTCOMES.name, m.EVAL_OUTCOMES.help,
                                          labels=[*names, *m.EVAL_OUTCOMES.labels])
            for key, count in sorted(outcomes.items()):
                counter.add_metric([*values, *key], count)
            yield counter
        if best is not None:
            for spec, value in ((m.EVAL_BEST_LOSS, best[0]), (m.EVAL_BEST_STEP, float(best[1]))):
                family = gauge(spec)
                family.add_metric(values, value)
                yield family
        if rolling:
            family = gauge(m.EVAL_ROLLING_EXACT_MATCH)
            for window in ROLLING_WINDOWS:
                tail = rolling[-window:]
                family.add_metric([*values, str(window)], sum(tail) / len(tail))
            yield family
        if snap is None:
            return
        by_group = sorted(snap.by_group.items())
        for spec, pos in ((m.EVAL_EXACT_MATCH, 0), (m.EVAL_NORMALIZED_MATCH, 1), (m.EVAL_ANSWER_CROSS_ENTROPY, 2)):
            family = gauge(spec)
            for (regime, source), triple in by_group:
                family.add_metric([*values, regime, source], triple[pos])
            yield family
        family = gauge(m.EVAL_PATTERN_ACCURACY)
        for (pattern, bucket), rate in sorted(snap.pattern.items()):
            family.add_metric([*values, pattern, bucket], rate)
        yield family
        scalars: list[tuple[m.MetricSpec, float | None]] = [
            (m.EVAL_CALIBRATION_ERROR, snap.ece), (m.EVAL_TOP1_CONFIDENCE, snap.top1),
            (m.EVAL_TOP5_CONFIDENCE, snap.top5), (m.EVAL_TOKEN_ENTROPY, snap.entropy),
            (m.EVAL_LAST_STEP, float(snap.step)), (m.EVAL_DURATION, snap.duration),
            (m.EVAL_EXAMPLES, float(snap.examples)),
        ]
        for spec, scalar in scalars:
            if scalar is None:
                continue
            family = gauge(spec)
            family.add_metric(values, scalar)
            yield family
