"""The fp16 GradScaler's loss scale and skipped steps, without a per-step device->host sync.

``torch.amp.GradScaler`` keeps its scale as a one-element device tensor and
multiplies it by ``backoff_factor`` (< 1) on every step whose scaled gradients
held Inf or NaN, which it then skips; it grows it only after ``growth_interval``
clean steps. So a skipped step is a step whose scale went down: at each
``step_end`` (after ``scaler.update()``) ``scale < previous`` is taken on the
device and added to a device count, and the previous scale kept as a device
copy (three tiny kernels, no sync). The first step is compared with the
scaler's initial scale, so that the usual skips of the first fp16 steps (65536
is too large for most models) are counted too.

Why not accelerate's ``AcceleratedOptimizer.step_was_skipped``, a host bool the
Trainer holds anyway: accelerate sets it when ``GradScaler.step`` did not call
the optimizer's ``step``. A fused optimizer (``_step_supports_amp_scaling``:
``torch.optim.AdamW(fused=True)``, the Trainer's default ``adamw_torch_fused``
since torch 2.8) is always called, with the ``found_inf`` tensor, and skips the
update inside its kernel, without a host sync; the bool then stays False on
every skipped step (accelerate 1.16, torch 2.13; tests/test_amp.py shows it).

The scale itself (``scaler.get_scale()``, a device read) and the device count
are read at export, on the scrape thread.
"""

from __future__ import annotations

from typing import Any

import torch


class ScalerWatch:
    """Counts the skipped steps of one GradScaler and reads its scale at export.

    Args:
        scaler: a ``torch.amp.GradScaler`` (or one with its interface: ``get_scale``,
            ``is_enabled``, the ``_scale`` tensor after the first ``scale`` call).
    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        # Device-side running count of scale decreases (never reset: the reader takes differences).
        self._skipped: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._exported = 0

    def enabled(self) -> bool:
        is_enabled = getattr(self.scaler, "is_enabled", None)
        return bool(is_enabled()) if callable(is_enabled) else True

    def step_end(self) -> None:
        """On the training thread after the step's ``scaler.update()``: count it if it lowered the scale."""
        scale = getattr(self.scaler, "_scale", None)
        if not isinstance(scale, torch.Tensor):
            return  # no scale() call yet, or a disabled scaler
        previous = self._previous
        if previous is None:
            # The initial scale is a host float: a device tensor of it needs no sync.
            previous = torch.full_like(scale, float(getattr(self.scaler, "_init_scale", 2.0**16)))
        decreased = (scale < previous).to(torch.int64)
        total = self._skipped
        # Out of place: the scrape thread may be reading the tensor it replaces.
        self._skipped = decreased if total is None else total + decreased
        self._previous = scale.detach().clone()

    def read(self) -> tuple[float | None, int]:
        """On the scrape thread: (the current scale or None when disabled, skipped steps since the last read)."""
        scale = float(self.scaler.get_scale()) if self.enabled() else None
        skipped = self._skipped
        total = int(skipped) if skipped is not None else 0
        delta, self._exported = total - self._exported, total
        return scale, delta
