"""The advisor's HTTP side: PromQL over the Prometheus HTTP API, turned into :class:`RunData`.

Kept thin on purpose: every judgement is in :mod:`exporter.advisor.analysis`; :func:`advise` fetches a
run and hands it to that module.
Series are aggregated per run (``max`` / ``avg`` / ``sum`` without any label),
so a run exported by several ranks, or scraped under another instance after a
restart, still reads as one.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import requests

from exporter.advisor.analysis import (
    PLATEAU_WINDOW_SECONDS,
    TREND_MEAN_WINDOW,
    TREND_RESOLUTION_SECONDS,
    Alert,
    Report,
    RunData,
    Sample,
    Series,
    Waiting,
    analyse,
    trend_window,
)

# Points per range query at most (Prometheus refuses more than 11,000): a day
# of run is read at ~30 s resolution, a week at ~3.5 min. Evaluations and
# checkpoints closer together than the resolution can be missed.
MAX_POINTS = 3000
DURATION = re.compile(r"^(\d+)(ms|s|m|h|d|w|y)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
STATE_PRIORITY = {"crashed": 0, "terminated": 1, "training": 2, "paused": 3, "completed": 4, "idle": 5}
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


class AdvisorError(Exception):
    """Prometheus unreachable, an unknown run, an answer that is not Prometheus': one line, exit code 2."""


def duration_seconds(text: str) -> float:
    """Seconds of a Prometheus duration with one unit (``90s``, ``30m``, ``7d``)."""
    match = DURATION.match(text)
    if match is None:
        raise ValueError(f"expected a duration like 30m, 12h or 7d, got {text!r}")
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def _reason(exc: requests.RequestException) -> str:
    """A short cause for a requests failure (its own message is a paragraph)."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    found = _ERRNO.search(str(exc))
    if found:
        return found[1].strip().lower()
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__


class Prometheus:
    """The few Prometheus HTTP API calls the advisor makes."""

    def __init__(self, url: str, timeout: float = 5.0, session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        try:
            response = self.session.get(self.url + path, params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise AdvisorError(f"cannot reach Prometheus at {self.url}: {_reason(exc)}") from None
        try:
            body = response.json()
        except ValueError:
            raise AdvisorError(f"{self.url} does not answer like Prometheus (HTTP {response.status_code} "
                               f"on {path}, not JSON)") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error", "") if isinstance(body, dict) else ""
            kind = body.get("errorType", "") if isinstance(body, dict) else ""
            raise AdvisorError(f"Prometheus at {self.url} answered HTTP {response.status_code} on {path}: "
                               f"{kind}: {error}".rstrip(": "))
        return body.get("data")

    def query(self, expr: str, at: float) -> list[tuple[dict[str, str], float]]:
        data = self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})
        return [(item["metric"], float(item["value"][1])) for item in data.get("result", [])]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[tuple[dict[str, str], Series]]:
        data = self._get("/api/v1/query_range",
                         {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
        return [(item["metric"], [(float(t), float(v)) for t, v in item["values"]])
                for item in data.get("result", [])]

    def alerts(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/alerts")
        return list(data.get("alerts", [])) if isinstance(data, dict) else []


def selector(run_id: str) -> str:
    # A JSON string is a valid PromQL string literal (same escapes).
    return "{run_id=" + json.dumps(run_id) + "}"


def list_runs(prom: Prometheus, now: float, lookback: str) -> dict[str, float | None]:
    """Every run seen within ``lookback``, with its (latest) start time where it has one."""
    runs: dict[str, float | None] = {}
    for labels, _ in prom.query(f'count by (run_id) (last_over_time(training_state{{run_id!=""}}[{lookback}]))', now):
        runs[labels.get("run_id", "")] = None
    starts = prom.query(
        f'max by (run_id) (last_over_time(training_start_time_seconds{{run_id!=""}}[{lookback}]))', now)
    for labels, value in starts:
        runs[labels.get("run_id", "")] = value if math.isfinite(value) else None
    runs.pop("", None)
    return runs


def pick_run(runs: Mapping[str, float | None], wanted: str | None) -> str | None:
    """The run asked for, else the newest by start time; None when there is nothing to pick."""
    if wanted:
        if wanted not in runs:
            seen = ", ".join(sorted(runs)[:5]) + (", ..." if len(runs) > 5 else "")
            raise AdvisorError(f"unknown run {wanted!r}: no series with that run_id"
                               + (f" (runs seen: {seen})" if runs else " (no runs seen at all)"))
        return wanted
    started = {run: t for run, t in runs.items() if t is not None}
    if started:
        return max(started, key=lambda run: (started[run] or 0.0, run))
    return min(runs) if runs else None


def trend_resolution(span: float) -> float:
    """Step of the trend series: the rules' 1m, or finer where a short run's window is short, so that its
    window holds as many values of m as a full one (60), one second at the finest."""
    points = PLATEAU_WINDOW_SECONDS / TREND_RESOLUTION_SECONDS
    return float(max(1, min(TREND_RESOLUTION_SECONDS, math.floor(trend_window(0.0, span) / points))))


def loss_mean_expr(sel: str) -> str:
    """m: the mean of every finite step loss over TREND_MEAN_WINDOW, from the histogram, pooled over the run's
    series; absent (not 0/0 = NaN) where no step was taken in it."""
    w = TREND_MEAN_WINDOW
    return (f"sum(rate(training_step_loss_sum{sel}[{w}])) / "
            f"(sum(rate(training_step_loss_count{sel}[{w}])) > 0)")


def cumulative(result: list[tuple[dict[str, str], Series]]) -> Series:
    """One never-decreasing count from the run's counters (one per target, rank or restart): each adds its
    first value and then each rise, a drop being a restart from 0, and keeps its total once it is gone."""
    increments: dict[float, float] = {}
    for _, values in result:
        previous = None
        for t, v in values:
            if not math.isfinite(v):
                continue
            grew = v if previous is None or v < previous else v - previous
            increments[t] = increments.get(t, 0.0) + grew
            previous = v
    out: list[Sample] = []
    total = 0.0
    for t in sorted(increments):
        total += increments[t]
        out.append((t, total))
    return out


def _alert(raw: Mapping[str, Any]) -> Alert:
    labels = raw.get("labels", {}) or {}
    notes = raw.get("annotations", {}) or {}
    return Alert(
        name=str(labels.get("alertname", "")),
        severity=str(labels.get("severity", "")),
        state=str(raw.get("state", "")),
        summary=str(notes.get("summary", "")),
        description=str(notes.get("description", "")),
        recommendation=str(notes.get("recommendation", "")),
        active_at=raw.get("activeAt"),
        value=raw.get("value"),
    )


def fetch_run(
    prom: Prometheus, run_id: str, now: float, lookback: str, save_steps: int | None = None
) -> RunData:
    """Everything the analysis needs about one run: a handful of range queries over its lifetime."""
    sel = selector(run_id)
    span = duration_seconds(lookback)
    first_start = prom.query(f"min(min_over_time(training_start_time_seconds{sel}[{lookback}]))", now)
    if not first_start or not math.isfinite(first_start[0][1]):
        # Not begun: nothing to read, the analysis says "waiting for data".
        return RunData(run_id=run_id, now=now, save_steps=save_steps)
    begin = max(now - span, first_start[0][1])
    resolution = max(1.0, math.ceil((now - begin) / MAX_POINTS))
    begin -= resolution

    def series(expr: str) -> Series:
        result = prom.query_range(expr, begin, now, resolution)
        return result[0][1] if result else []

    # The trend statistic's inputs, at the rules' subquery step (aligned as a subquery's), over the last
    # MAX_POINTS steps.
    trend_step = trend_resolution(now - first_start[0][1])
    trend_begin = math.floor(max(begin, now - MAX_POINTS * trend_step) / trend_step) * trend_step

    def trend(expr: str) -> list[tuple[dict[str, str], Series]]:
        return prom.query_range(expr, trend_begin, now, trend_step)

    def one(result: list[tuple[dict[str, str], Series]]) -> Series:
        return result[0][1] if result else []

    latest_start = prom.query(f"max(last_over_time(training_start_time_seconds{sel}[{lookback}]))", now)
    # The state set to 1 at the newest sample; ranks that disagree: the most telling one.
    state, newest = None, -math.inf
    for labels, values in prom.query_range(f"max by (state) (training_state{sel})", begin, now, resolution):
        ones = [t for t, v in values if v == 1]
        name = labels.get("state", "")
        if ones and (ones[-1], -STATE_PRIORITY.get(name, 9)) > (newest, -STATE_PRIORITY.get(state or "", 9)):
            state, newest = name, ones[-1]
    alerts = [_alert(a) for a in prom.alerts() if (a.get("labels") or {}).get("run_id") == run_id]
    return RunData(
        run_id=run_id,
        now=now,
        state=state,
        start_time=latest_start[0][1] if latest_start and math.isfinite(latest_start[0][1]) else None,
        step=series(f"max(training_step{sel})"),
        max_steps=series(f"max(training_max_steps{sel})"),
        loss=series(f"avg(training_loss{sel})"),
        loss_ema=series(f"avg(training_loss_ema{sel})"),
        loss_mean=one(trend(loss_mean_expr(sel))),
        loss_variance=one(trend(f"avg(training_loss_variance{sel})")),
        loss_count=cumulative(trend(f"training_step_loss_count{sel}")),
        grad_norm=one(trend(f"avg(training_grad_norm{sel})")),
        eval_loss=series(f"avg(training_eval_loss{sel})"),
        eval_step=series(f"max(training_eval_step{sel})"),
        eval_best_loss=series(f"avg(training_eval_best_loss{sel})"),
        eval_best_step=series(f"max(training_eval_best_step{sel})"),
        checkpoint_step=series(f"max(training_checkpoint_step{sel})"),
        nonfinite_losses=series(f"sum(training_nonfinite_loss_total{sel})"),
        alerts=alerts,
        save_steps=save_steps,
    )


def gather(
    prom: Prometheus, now: float, *, run_id: str | None = None, lookback: str = "7d", save_steps: int | None = None
) -> RunData | Waiting:
    """The data of the run asked for (or the newest), or Waiting when Prometheus has no run yet."""
    runs = list_runs(prom, now, lookback)
    chosen = pick_run(runs, run_id)
    if chosen is None:
        return Waiting(None, f"no training run in Prometheus at {prom.url} yet (no training_state series "
                             f"within {lookback})", now)
    return fetch_run(prom, chosen, now, lookback, save_steps)


def advise(
    prom: Prometheus,
    *,
    run_id: str | None = None,
    lookback: str = "7d",
    save_steps: int | None = None,
    now: float | None = None,
) -> Report | Waiting:
    """Fetch and judge one run (the newest when ``run_id`` is empty); raises AdvisorError."""
    at = time.time() if now is None else now
    data = gather(prom, at, run_id=run_id or None, lookback=lookback, save_steps=save_steps)
    return data if isinstance(data, Waiting) else analyse(data)
