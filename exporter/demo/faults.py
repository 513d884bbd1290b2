"""What a fault is and how ``--inject`` spells it: ``nan@STEP``, ``spike@STEP``, ``spike@STEPxFACTOR``.

Plain Python on purpose: the command line parses ``--inject`` with
`parse_fault` before torch is imported. `exporter.demo.injector.FaultInjector`
applies the faults to a training run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["DEFAULT_SPIKE_FACTOR", "FAULT_KINDS", "FaultSpec", "parse_fault"]

FAULT_KINDS = ("nan", "spike")
DEFAULT_SPIKE_FACTOR = 8.0
_FAULT_RE = re.compile(r"(?P<kind>[A-Za-z_]+)@(?P<step>[^x]+)(?:x(?P<factor>.+))?")


@dataclass(frozen=True)
class FaultSpec:
    """One fault: ``kind`` at 1-based optimizer step ``step``.

    ``factor`` is the spike multiplier; None means the injector's default.
    """

    kind: str
    step: int
    factor: float | None = None

    def __str__(self) -> str:
        """The spec as ``--inject`` takes it, e.g. ``spike@80x20``: `parse_fault` reads it back."""
        if self.factor is None:
            return f"{self.kind}@{self.step}"
        factor = str(int(self.factor)) if self.factor.is_integer() else repr(self.factor)
        return f"{self.kind}@{self.step}x{factor}"


def parse_fault(spec: str) -> FaultSpec:
    """Parse ``"nan@STEP"`` or ``"spike@STEP"`` / ``"spike@STEPxFACTOR"`` (e.g. ``"spike@80x20"``).

    STEP is the Trainer's 1-based global step. Raises `ValueError` with a
    one-line message on anything else.
    """
    text = spec.strip()
    usage = "expected nan@STEP, spike@STEP or spike@STEPxFACTOR"
    match = _FAULT_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad fault spec {spec!r}: {usage}")
    kind = match["kind"].lower()
    if kind not in FAULT_KINDS:
        raise ValueError(f"bad fault spec {spec!r}: unknown kind {kind!r}, {usage}")
    try:
        step = int(match["step"])
    except ValueError:
        raise ValueError(f"bad fault spec {spec!r}: step {match['step']!r} is not an integer") from None
    if step < 1:
        raise ValueError(f"bad fault spec {spec!r}: step must be >= 1 (steps are 1-based), got {step}")
    factor = None
    if match["factor"] is not None:
        if kind != "spike":
            raise ValueError(f"bad fault spec {spec!r}: only spike takes a factor")
        try:
            factor = float(match["factor"])
        except ValueError:
            raise ValueError(f"bad fault spec {spec!r}: factor {match['factor']!r} is not a number") from None
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"bad fault spec {spec!r}: factor must be a positive finite number")
    return FaultSpec(kind, step, factor)
