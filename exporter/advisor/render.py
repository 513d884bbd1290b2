"""The advisor's two outputs: a short text report for people, a stable JSON document for scripts.

The JSON schema (``schema_version`` 1) is documented in ``docs/advisor.md``;
fields are only ever added to it. Numbers that are NaN or infinite are written
as the strings ``"NaN"``, ``"+Inf"`` and ``"-Inf"``, as Prometheus' own API
writes sample values, so that the output stays strict JSON.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from typing import Any

from exporter.advisor.analysis import (
    DIVERGE_MIN_RISE,
    DIVERGE_Z,
    OVERFIT_EVAL_RATIO,
    PLATEAU_MIN_IMPROVEMENT,
    PLATEAU_Z,
    Alert,
    EvalPoint,
    Report,
    Waiting,
    human_duration,
    per_text,
)

SCHEMA_VERSION = 1
WIDTH = 100


def _num(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("+Inf" if x > 0 else "-Inf")


def _point(p: EvalPoint | None) -> dict[str, Any] | None:
    return None if p is None else {"step": p.step, "loss": _num(p.loss), "time": p.time}


def _alert(a: Alert) -> dict[str, Any]:
    return {
        "name": a.name,
        "severity": a.severity,
        "state": a.state,
        "summary": a.summary,
        "description": a.description,
        "recommendation": a.recommendation,
        "active_at": a.active_at,
        "value": a.value,
    }


def to_dict(result: Report | Waiting, prometheus: str) -> dict[str, Any]:
    if isinstance(result, Waiting):
        return {
            "schema_version": SCHEMA_VERSION,
            "status": "waiting",
            "generated_at": result.generated_at,
            "prometheus": prometheus,
            "run_id": result.run_id,
            "message": f"waiting for data: {result.reason}",
        }
    p, loss, ev, rec = result.progress, result.loss, result.evaluation, result.recommendation
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "generated_at": result.generated_at,
        "prometheus": prometheus,
        "run_id": result.run_id,
        "progress": {
            "state": p.state,
            "step": p.step,
            "max_steps": p.max_steps,
            "ratio": _num(p.ratio),
            "start_time": p.start_time,
            "last_step_time": p.last_step_time,
            "elapsed_seconds": _num(p.elapsed_seconds),
            "steps_per_second": _num(p.steps_per_second),
            "eta_seconds": _num(p.eta_seconds),
        },
        "loss": {
            "last": _num(loss.last),
            "ema": _num(loss.ema),
            "trend": loss.trend,
            "relative_change": _num(loss.relative_change),
            "window_seconds": _num(loss.window_seconds),
            "window_steps": loss.window_steps,
            "plateau": loss.plateau,
            "nonfinite_steps": loss.nonfinite_steps,
            "nonfinite_after_step": loss.nonfinite_after_step,
            "nonfinite_by_step": loss.nonfinite_by_step,
            "rate": _num(loss.rate),
            "rate_se": _num(loss.rate_se),
            "rate_seconds": _num(loss.rate_seconds),
            "level": _num(loss.level),
            "plateau_bound": _num(loss.plateau_bound),
            "plateau_at": _num(loss.plateau_at),
            "falling": loss.falling,
            "diverging": loss.diverging,
            "rise_rate": _num(loss.rise_rate),
            "rise_rate_se": _num(loss.rise_rate_se),
            "rise_rate_seconds": _num(loss.rise_rate_seconds),
            "rise_window_seconds": _num(loss.rise_window_seconds),
            "rise_window_steps": loss.rise_window_steps,
            "rise_began_step": loss.rise_began_step,
            "grad_norm_ratio": _num(loss.grad_norm_ratio),
        },
        "evaluation": {
            "count": len(ev.points),
            "best": _point(ev.best),
            "last": _point(ev.last),
            "best_checkpoint": None if ev.best_checkpoint is None else f"checkpoint-{ev.best_checkpoint}",
            "best_checkpoint_eval": _point(ev.best_checkpoint_eval),
            "change_from_best": _num(ev.change_from_best),
            "train_change_since_best": _num(ev.train_change_since_best),
            "overfitting": ev.overfitting,
            "steps_exact": ev.steps_exact,
            "points": [_point(pt) for pt in ev.points],
        },
        "checkpoints": list(result.checkpoints),
        "alerts": [_alert(a) for a in result.alerts],
        "recommendation": {
            "action": rec.action,
            "checkpoint": rec.checkpoint,
            "checkpoint_step": rec.checkpoint_step,
            "verdict": rec.verdict,
            "reason": rec.reason,
        },
    }


def to_json(result: Report | Waiting, prometheus: str) -> str:
    return json.dumps(to_dict(result, prometheus), allow_nan=False, sort_keys=False)


def error_json(message: str, prometheus: str) -> str:
    """What ``--watch --json`` prints for a refresh that failed (the loop goes on)."""
    return json.dumps({"schema_version": SCHEMA_VERSION, "status": "error", "generated_at": time.time(),
                       "prometheus": prometheus, "message": message})


def _f(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _se(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _row(label: str, text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=f"{label:<13}", subsequent_indent=" " * 13) or [label]


def to_text(result: Report | Waiting) -> str:
    if isinstance(result, Waiting):
        return f"waiting for data: {result.reason}\n"
    p, loss, ev, rec = result.progress, result.loss, result.evaluation, result.recommendation
    lines: list[str] = []
    done = "-" if p.ratio is None else f"{p.ratio:.0%}"
    rate = "-" if p.steps_per_second is None else f"{p.steps_per_second:.3g} steps/s"
    lines += _row("run", f"{result.run_id}  state {p.state}  step {p.step}/{p.max_steps or '-'} ({done})  "
                         f"ETA {human_duration(p.eta_seconds)}  {rate}  elapsed {human_duration(p.elapsed_seconds)}")
    window = human_duration(loss.window_seconds)
    per = per_text(loss.rate_seconds)
    trend = loss.trend if loss.rate is None else (
        f"{loss.trend} ({_pct(loss.rate)} ± {_se(loss.rate_se)} per {per} over the last {window}, "
        f"{loss.window_steps} steps)")
    lines += _row("loss", f"last {_f(loss.last)}  EMA {_f(loss.ema)}  trend {trend}")
    if loss.trend == "unknown":
        plateau = "too early to tell"
    elif loss.plateau:
        ago = "" if loss.plateau_at is None or loss.plateau_at >= p.last_step_time else (
            f" {human_duration(p.last_step_time - loss.plateau_at)} ago")
        plateau = (f"yes: improves by at most {loss.plateau_bound or 0.0:.1%} per {per} ({PLATEAU_Z:g} standard "
                   f"errors){ago}, less than {PLATEAU_MIN_IMPROVEMENT:.0%}")
    else:
        plateau = "no"
    lines += _row("plateau", plateau)
    if loss.diverging:
        rise_per = per_text(loss.rise_rate_seconds)
        bound = (loss.rise_rate or 0.0) - DIVERGE_Z * (loss.rise_rate_se or 0.0)
        grad = "" if loss.grad_norm_ratio is None else f"; gradient norm x{loss.grad_norm_ratio:.2g}"
        began = "" if loss.rise_began_step is None else f"; lowest 5m mean from step {loss.rise_began_step}"
        lines += _row("diverging", f"yes: rising at least {bound:+.1%} per {rise_per} ({DIVERGE_Z:g} standard "
                                   f"errors, more than {DIVERGE_MIN_RISE:.0%}) over the last "
                                   f"{human_duration(loss.rise_window_seconds)}{grad}{began}")
    if loss.nonfinite_steps:
        lines += _row("non-finite", f"{loss.nonfinite_steps} step(s) with a NaN/Inf loss"
                                    + (f", the first after step {loss.nonfinite_after_step}"
                                       if loss.nonfinite_after_step is not None else "")
                                    + (f" and by step {loss.nonfinite_by_step}"
                                       if loss.nonfinite_by_step is not None else ""))
    if ev.best is None or ev.last is None:
        lines += _row("evaluation", "no evaluation yet")
    else:
        approx = "" if ev.steps_exact else " (steps approximate: no training_eval_step series)"
        ckpt = ""
        if ev.best_checkpoint is not None and ev.best_checkpoint == ev.best.step:
            ckpt = f", checkpoint-{ev.best_checkpoint}"
        elif ev.best_checkpoint is not None and ev.best_checkpoint_eval is not None:
            ckpt = (f" (no checkpoint; best saved: checkpoint-{ev.best_checkpoint}, "
                    f"{ev.best_checkpoint_eval.loss:.4g} at step {ev.best_checkpoint_eval.step})")
        lines += _row("evaluation", f"{len(ev.points)} evaluation(s); best {ev.best.loss:.4g} at step "
                                    f"{ev.best.step}{ckpt}; last {ev.last.loss:.4g} at step {ev.last.step} "
                                    f"({_pct(ev.change_from_best)} vs best){approx}")
        if ev.overfitting:
            over = (f"yes: eval loss more than {OVERFIT_EVAL_RATIO - 1:.0%} above its best while the training "
                    f"loss still falls significantly ({_pct(loss.rate)} per {per}; "
                    f"{_pct(ev.train_change_since_best)} since step {ev.best.step})")
        else:
            over = "no"
        lines += _row("overfitting", over)
    if result.checkpoints:
        shown = result.checkpoints[-8:]
        more = f"{len(result.checkpoints) - len(shown)} earlier, " if len(result.checkpoints) > len(shown) else ""
        lines += _row("checkpoints", more + ", ".join(str(c) for c in shown))
    else:
        lines += _row("checkpoints", "none known")
    if not result.alerts:
        lines += _row("alerts", "none")
    for i, alert in enumerate(result.alerts):
        state = "" if alert.firing else f" ({alert.state})"
        lines += _row("alerts" if i == 0 else "", f"[{alert.severity or '?'}] {alert.name}{state}: {alert.summary}")
        if alert.recommendation:
            lines += textwrap.wrap(f"what to do: {alert.recommendation}", WIDTH, initial_indent=" " * 15,
                                   subsequent_indent=" " * 17)
    head = {"continue": "CONTINUE", "stop": "STOP", "use_checkpoint": f"USE {rec.checkpoint}"}[rec.action]
    lines.append("")
    lines += textwrap.wrap(f"recommendation: {head} ({rec.verdict}): {rec.reason}", WIDTH, subsequent_indent="  ")
    return "\n".join(lines) + "\n"
