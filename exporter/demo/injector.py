"""Fault injection: a Trainer callback that corrupts the training loss at chosen steps.

Used by the demo (``--inject``), the tests and the benchmarks to make the
exporter's alerts fire on purpose; the faults themselves are `exporter.demo.faults`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from exporter.demo.faults import DEFAULT_SPIKE_FACTOR, FaultSpec, parse_fault

__all__ = ["FaultInjector"]


class FaultInjector(TrainerCallback):
    """Trainer callback that corrupts the training loss at chosen steps.

    ``spike`` multiplies the loss of that step by a factor (gradients grow by
    the same factor; ``max_grad_norm`` clipping then bounds the update, as it
    would a real spike). ``nan`` multiplies it by NaN, so the step's loss and
    every gradient are NaN. To keep the run alive afterwards, the injector
    zeroes non-finite gradients in ``on_pre_optimizer_step`` of that step, the
    way AMP's GradScaler skips a step whose gradients are not finite; without
    it AdamW would write NaN into every weight and all later losses would be
    NaN too. (With zero gradients AdamW still applies its momentum, so the
    weights move a little but stay finite.)

    Usage::

        injector = FaultInjector(["nan@50", "spike@80"])
        injector.attach(model)  # before other forward hooks, see `attach`
        Trainer(model=model, ..., callbacks=[injector])

    For a plain PyTorch loop, call `set_step` before each step's forward
    passes instead of relying on the Trainer's ``on_step_begin``.
    """

    def __init__(self, faults: Iterable[str | FaultSpec] = (), spike_factor: float = DEFAULT_SPIKE_FACTOR) -> None:
        self.spike_factor = spike_factor
        self.faults: dict[int, FaultSpec] = {}
        for fault in faults:
            spec = parse_fault(fault) if isinstance(fault, str) else fault
            if spec.step in self.faults:
                raise ValueError(f"two faults at step {spec.step}")
            self.faults[spec.step] = spec
        # (step, kind) of every injection, one per micro-batch; handy for tests and logs.
        self.injected: list[tuple[int, str]] = []
        self._step: int | None = None
        self._model: nn.Module | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, model: nn.Module) -> FaultInjector:
        """Register the loss-corrupting forward hook on ``model`` (the top-level, e.g. PEFT-wrapped, model).

        ``prepend=True`` puts the hook ahead of every forward hook already on
        the module, and hooks added later run after it anyway, so any
        loss-observing hook sees the corrupted loss, as it would a real fault.
        """
        self.detach()
        self._model = model
        self._handle = model.register_forward_hook(self._hook, prepend=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._model = None

    def set_step(self, step: int | None) -> None:
        """Set the 1-based optimizer step now being computed (for non-Trainer loops)."""
        self._step = step

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        fault = self.faults.get(self._step) if self._step is not None else None
        if fault is None or not module.training:
            return None
        if fault.kind == "nan":
            factor = math.nan
        else:
            factor = fault.factor if fault.factor is not None else self.spike_factor
        if isinstance(output, Mapping):
            loss = output.get("loss")
            if loss is None:
                return None
            # Item assignment updates both the mapping and the attribute of a ModelOutput.
            output["loss"] = loss * factor  # type: ignore[index]
        elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            output = (output[0] * factor, *output[1:])
        else:
            return None
        self.injected.append((fault.step, fault.kind))
        return output

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # global_step counts finished optimizer steps; the one starting now is the next.
        self._step = state.global_step + 1

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        fault = self.faults.get(self._step) if self._step is not None else None
        if fault is None or fault.kind != "nan":
            return
        model = self._model if self._model is not None else kwargs.get("model")
        if model is None:
            return
        for param in model.parameters():
            if param.grad is not None:
                param.grad.nan_to_num_(0.0, 0.0, 0.0)
