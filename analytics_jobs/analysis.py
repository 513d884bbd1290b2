"""Per-layer drift and parameter stability of one checkpoint against the base model, streamed.

Drift figures (reference / current / delta norm, relative change) compare the
tensors the checkpoint and the base model have in common; stability figures
(weight norm, max |w|, min non-zero |w|) describe every weight of the
checkpoint's model. The two agree unless a tensor has no base counterpart or
a different shape, which is reported.

What a checkpoint holds:

* a full model (``model.safetensors`` or shards): every tensor is compared with
  its base counterpart; a base tensor the checkpoint lacks counts as unchanged
  and is reported (``missing_checkpoint_tensor``);
* a peft adapter (``adapter_model.safetensors``): LoRA modules give
  ``W = W0 + scale * B @ A``, whose norms come from r x r products
  (:class:`analytics_jobs.maths.LowRank`) and whose max / min |w| come from
  ``W0 + delta`` built in float64 one row block at a time (bounded memory, never a whole
  merged matrix); ``modules_to_save`` copies are compared like full tensors;
  every other base tensor is unchanged (its base figures are computed once
  and cached).

A tied output embedding (``lm_head.weight`` absent from the base because it
shares the input embedding) is compared with the base's input embedding, or
skipped when the checkpoint's copy equals the checkpoint's input embedding
(the same tensor saved twice, as peft does with ``ensure_weight_tying``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analytics_jobs import names
from analytics_jobs.maths import LowRank, TensorStats, Workspace, lowrank_stats, pair_block, single_block
from analytics_jobs.weights import DEFAULT_BLOCK_ELEMENTS, TensorRef, WeightsError, WeightSet

log = logging.getLogger("training_exporter.analytics")

ADAPTER_CONFIG = "adapter_config.json"
# Bounded values of the `reason` label of training_analytics_errors_total.
REASONS = (
    "incomplete",
    "corrupt_file",
    "read_error",
    "missing_base_tensor",
    "missing_checkpoint_tensor",
    "shape_mismatch",
    "unsupported",
    "write_error",
    "internal",
)
# Tensor names quoted in one problem message at most.
_NAMES_SHOWN = 3


class AnalysisError(Exception):
    """The checkpoint cannot be analysed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Cancelled(Exception):
    pass


@dataclass(frozen=True)
class Problem:
    """Something reported about an analysis that still completed."""

    reason: str
    message: str


@dataclass
class _LayerAcc:
    ref_sq: float = 0.0
    cur_sq: float = 0.0
    delta_sq: float = 0.0
    weight_sq: float = 0.0
    max_abs: float = 0.0
    min_abs: float = math.inf
    params: int = 0

    def add(self, stats: TensorStats, numel: int, compared: bool = True, weight_sq: float | None = None) -> None:
        if compared:
            self.ref_sq += stats.ref_sq
            self.cur_sq += stats.cur_sq
            self.delta_sq += stats.delta_sq
        self.weight_sq += stats.cur_sq if weight_sq is None else weight_sq
        if not math.isnan(self.max_abs) and (math.isnan(stats.max_abs) or stats.max_abs > self.max_abs):
            self.max_abs = stats.max_abs
        self.min_abs = min(self.min_abs, stats.min_abs)
        self.params += numel


@dataclass(frozen=True)
class LayerResult:
    layer: str  # "-1", "0".., "final"
    reference_norm: float
    current_norm: float
    delta_norm: float
    relative_change: float
    weight_norm: float
    max_abs_weight: float
    min_abs_weight: float  # smallest non-zero |w|; 0.0 when the layer has no non-zero weight
    params: int


@dataclass(frozen=True)
class Analysis:
    reference: str
    checkpoint: str
    step: int | None
    adapter: bool
    layers: tuple[LayerResult, ...]
    num_blocks: int
    total_params: int
    total_relative_change: float
    bytes_read: int
    seconds: float
    problems: tuple[Problem, ...] = ()

    def layer(self, label: str) -> LayerResult:
        return next(x for x in self.layers if x.layer == label)


def layer_sort_key(label: str) -> tuple[int, int]:
    if label == "final":
        return (2, 0)
    return (0, -1) if label == "-1" else (1, int(label))


def _relative(delta: float, ref: float) -> float:
    if ref > 0:
        return delta / ref
    return 0.0 if delta == 0 else math.inf


class BaseModel:
    """The reference weights: tensor index, display name, block count and cached per-tensor figures."""

    def __init__(self, path: str | Path, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> None:
        self.path = Path(path)
        self.weights = WeightSet.open(self.path)
        if self.weights.is_adapter:
            raise WeightsError("unsupported", f"{self.path} holds a peft adapter; give the model it was trained from")
        self.block_elements = block_elements
        self.name = display_name(self.path)
        blocks = [int(x) for n in self.weights.tensors if (x := names.layer_of(n)) not in ("-1", "final")]
        self.num_blocks = max(blocks) + 1 if blocks else 0
        self.input_embedding = next((n for n in self.weights.tensors if names.is_input_embedding(n)), None)
        self._unchanged: dict[str, TensorStats] = {}
        # Sum of squares of base tensors already read, so that later analyses skip that pass.
        self.ref_sq: dict[str, float] = {}

    def unchanged_stats(self, name: str, work: Workspace | None = None) -> tuple[TensorStats, int]:
        """Figures of a base tensor on its own (ref = current, no delta), cached; and the bytes read for them."""
        cached = self._unchanged.get(name)
        if cached is not None:
            return cached, 0
        ref = self.weights.tensors[name]
        stats = TensorStats()
        for _, block in self.weights.blocks(ref, self.block_elements):
            single_block(block, stats, work)
        self._unchanged[name] = stats
        self.ref_sq[name] = stats.ref_sq
        return stats, ref.nbytes


def display_name(path: Path) -> str:
    """``Qwen3-0.6B`` for ``/models/Qwen3-0.6B`` or ``/models/Qwen3-0.6B/model.safetensors``."""
    resolved = path.resolve()
    if resolved.is_file():
        return resolved.parent.name if resolved.name in ("model.safetensors", "adapter_model.safetensors") \
            else resolved.stem
    return resolved.name


@dataclass
class _Module:
    """Everything a checkpoint holds for one base tensor."""

    target: str
    whole: TensorRef | None = None  # full tensor, modules_to_save copy, or LoRA base_layer
    a: TensorRef | None = None
    b: TensorRef | None = None
    lora_bias: TensorRef | None = None
    embedding: bool = False
    reference: str | None = None  # base tensor compared with (target, or the tied input embedding)


@dataclass
class _Run:
    base: BaseModel
    ckpt: WeightSet
    config: dict[str, Any]
    should_stop: Callable[[], bool]
    layers: dict[str, _LayerAcc] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    bytes_read: int = 0
    work: Workspace = field(default_factory=Workspace)

    def acc(self, target: str) -> _LayerAcc:
        return self.layers.setdefault(names.layer_of(target), _LayerAcc())

    def problem(self, reason: str, item: str) -> None:
        self.problems.setdefault(reason, []).append(item)

    def check_stop(self) -> None:
        if self.should_stop():
            raise Cancelled()


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnalysisError("unsupported", f"{directory}: LoRA factors without {ADAPTER_CONFIG} (scale unknown)") \
            from None
    except (OSError, ValueError) as exc:
        raise AnalysisError("corrupt_file", f"{path}: {exc}") from None
    if not isinstance(config, dict):
        raise AnalysisError("corrupt_file", f"{path}: not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AnalysisError("unsupported", f"{path}: peft_type {config.get('peft_type')!r} (only LORA is read)")
    if config.get("use_dora"):
        raise AnalysisError("unsupported", f"{path}: DoRA adapters are not supported (the delta is not low-rank)")
    return config


def lora_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``; ``alpha_pattern`` honoured."""
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def analyse(
    base: BaseModel,
    checkpoint: str | Path,
    *,
    name: str | None = None,
    step: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Analysis:
    """Analyse the checkpoint directory (or weights file) ``checkpoint`` against ``base``.

    Raises :class:`AnalysisError` when the checkpoint cannot be analysed at
    all; smaller problems are returned in ``Analysis.problems``.
    """
    started = time.perf_counter()
    path = Path(checkpoint)
    try:
        ckpt = WeightSet.open(path)
    except WeightsError as exc:
        raise AnalysisError(exc.reason, str(exc)) from None
    modules = _plan(base, ckpt, path)
    has_lora = any(m.a is not None or m.b is not None or m.lora_bias is not None for m in modules.values())
    config = read_adapter_config(path if path.is_dir() else path.parent) if has_lora else {}
    run = _Run(base, ckpt, config, should_stop)
    try:
        _resolve_ties(run, modules)
        by_reference: dict[str, list[_Module]] = {}
        for module in modules.values():
            if module.reference is not None:
                by_reference.setdefault(module.reference, []).append(module)
        for ref_name in base.weights.tensors:
            run.check_stop()
            if ref_name not in by_reference:
                _unchanged(run, ref_name, reported=not ckpt.is_adapter)
            for module in by_reference.get(ref_name, ()):
                if module.a is not None or module.b is not None:
                    _lora(run, module)
                elif module.lora_bias is not None:
                    _lora_bias(run, module, modules)
                elif module.whole is not None:
                    _full(run, module)
        for module in modules.values():
            if module.reference is None and module.whole is not None:
                run.check_stop()
                _orphan(run, module)
            elif module.reference is None:  # LoRA factors or bias for a weight the base lacks
                run.problem("missing_base_tensor", module.target)
    except WeightsError as exc:
        raise AnalysisError(exc.reason, str(exc)) from None
    layers = tuple(_result(label, run.layers[label]) for label in sorted(run.layers, key=layer_sort_key))
    ref_total = math.sqrt(sum(a.ref_sq for a in run.layers.values()))
    delta_total = math.sqrt(sum(a.delta_sq for a in run.layers.values()))
    problems = tuple(_summarise(reason, items) for reason, items in run.problems.items())
    return Analysis(
        reference=base.name,
        checkpoint=name or path.name,
        step=step,
        adapter=ckpt.is_adapter,
        layers=layers,
        num_blocks=base.num_blocks,
        total_params=sum(a.params for a in run.layers.values()),
        total_relative_change=_relative(delta_total, ref_total),
        bytes_read=run.bytes_read,
        seconds=time.perf_counter() - started,
        problems=problems,
    )


def _summarise(reason: str, items: list[str]) -> Problem:
    if reason == "shape_mismatch":
        return Problem(reason, "; ".join(items))
    shown = ", ".join(items[:_NAMES_SHOWN]) + (f" and {len(items) - _NAMES_SHOWN} more" if len(items) > _NAMES_SHOWN
                                                else "")
    what = {
        "missing_base_tensor": "tensor(s) without a base-model counterpart, left out of the drift figures",
        "missing_checkpoint_tensor": "base tensor(s) absent from the full checkpoint, counted as unchanged",
    }.get(reason, reason)
    return Problem(reason, f"{len(items)} {what}: {shown}")


def _result(label: str, acc: _LayerAcc) -> LayerResult:
    ref, cur, delta = math.sqrt(acc.ref_sq), math.sqrt(acc.cur_sq), math.sqrt(acc.delta_sq)
    return LayerResult(
        layer=label,
        reference_norm=ref,
        current_norm=cur,
        delta_norm=delta,
        relative_change=_relative(delta, ref),
        weight_norm=math.sqrt(acc.weight_sq),
        max_abs_weight=acc.max_abs,
        min_abs_weight=0.0 if math.isinf(acc.min_abs) else acc.min_abs,
        params=acc.params,
    )


def _plan(base: BaseModel, ckpt: WeightSet, path: Path) -> dict[str, _Module]:
    modules: dict[str, _Module] = {}
    adapters: set[str] = set()
    for tensor_name, ref in ckpt.tensors.items():
        parsed = names.parse(tensor_name)
        if parsed.role == "skip":
            continue
        if parsed.role == "unsupported":
            raise AnalysisError("unsupported", f"{path}: {tensor_name}: only LoRA adapters and full weights are read")
        module = modules.setdefault(parsed.target, _Module(parsed.target))
        if parsed.adapter:
            adapters.add(parsed.adapter)
        if parsed.role in ("full", "frame"):
            if module.whole is not None:
                raise AnalysisError("corrupt_file", f"{path}: two tensors for {parsed.target}")
            module.whole = ref
        elif parsed.role == "A":
            module.a, module.embedding = ref, parsed.embedding
        elif parsed.role == "B":
            module.b, module.embedding = ref, parsed.embedding
        else:
            module.lora_bias = ref
    if len(adapters) > 1:
        raise AnalysisError("unsupported", f"{path}: several adapters ({', '.join(sorted(adapters))}); save one")
    for module in modules.values():
        if (module.a is None) != (module.b is None):
            raise AnalysisError("corrupt_file", f"{path}: {module.target}: a LoRA factor without its pair")
        if module.target in base.weights.tensors:
            module.reference = module.target
    return modules


def _resolve_ties(run: _Run, modules: dict[str, _Module]) -> None:
    """Point a tied output embedding that the base does not store at the base's input embedding."""
    embedding = run.base.input_embedding
    if embedding is None:
        return
    for module in list(modules.values()):
        if module.reference is not None or module.whole is None or not names.is_output_embedding(module.target):
            continue
        own = next((m for m in modules.values() if m.reference == embedding and m.whole is not None), None)
        if own is not None and _equal(run, own.whole, module.whole):  # type: ignore[arg-type]
            del modules[module.target]
            continue
        if len(run.base.weights.tensors[embedding].shape) != len(module.whole.shape):
            continue
        module.reference = embedding
        if own is None:
            # The checkpoint's only copy of the tied pair: it is the embedding's current value too.
            module.target = embedding


def _equal(run: _Run, x: TensorRef, y: TensorRef) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    blocks = zip(run.ckpt.blocks(x, run.base.block_elements), run.ckpt.blocks(y, run.base.block_elements),
                 strict=True)
    run.bytes_read += x.nbytes + y.nbytes
    return all(torch.equal(bx, by) for (_, bx), (_, by) in blocks)


def _unchanged(run: _Run, ref_name: str, reported: bool) -> None:
    stats, nbytes = run.base.unchanged_stats(ref_name, run.work)
    run.bytes_read += nbytes
    run.acc(ref_name).add(stats, run.base.weights.tensors[ref_name].numel)
    if reported:
        run.problem("missing_checkpoint_tensor", ref_name)


def _full(run: _Run, module: _Module) -> None:
    assert module.whole is not None and module.reference is not None
    cur = module.whole
    ref = run.base.weights.tensors[module.reference]
    acc = run.acc(module.target)
    n = run.base.block_elements
    if cur.shape == ref.shape:
        stats = TensorStats()
        cached = run.base.ref_sq.get(ref.name)
        pairs = zip(run.base.weights.blocks(ref, n), run.ckpt.blocks(cur, n), strict=True)
        for (_, rb), (_, cb) in pairs:
            pair_block(rb, cb, stats, need_ref=cached is None, work=run.work)
        if cached is None:
            run.base.ref_sq[ref.name] = stats.ref_sq
        else:
            stats.ref_sq = cached
        run.bytes_read += ref.nbytes + cur.nbytes
        acc.add(stats, cur.numel)
        return
    if len(cur.shape) != len(ref.shape):
        run.problem("shape_mismatch", f"{module.target}: checkpoint shape {list(cur.shape)} vs base "
                                      f"{list(ref.shape)}: not comparable, left out of the drift figures")
        _orphan(run, module, report=False)
        return
    region = tuple(min(a, b) for a, b in zip(cur.shape, ref.shape, strict=True))
    run.problem("shape_mismatch", f"{module.target}: checkpoint shape {list(cur.shape)} vs base {list(ref.shape)}: "
                                  f"compared the overlapping {list(region)}")
    drift = TensorStats()
    for (_, rb), (_, cb) in zip(run.base.weights.blocks(ref, n, region), run.ckpt.blocks(cur, n, region),
                                   strict=True):
        pair_block(rb, cb, drift, work=run.work)
    whole = TensorStats()
    for _, cb in run.ckpt.blocks(cur, n):
        single_block(cb, whole, run.work)
    drift.max_abs, drift.min_abs = whole.max_abs, whole.min_abs
    run.bytes_read += 2 * math.prod(region) * (ref.nbytes // max(ref.numel, 1)) + cur.nbytes
    acc.add(drift, cur.numel, weight_sq=whole.cur_sq)


def _orphan(run: _Run, module: _Module, report: bool = True) -> None:
    """A checkpoint tensor with nothing to compare with: stability figures only."""
    assert module.whole is not None
    stats = TensorStats()
    for _, block in run.ckpt.blocks(module.whole, run.base.block_elements):
        single_block(block, stats, run.work)
    run.bytes_read += module.whole.nbytes
    run.acc(module.target).add(stats, module.whole.numel, compared=False)
    if report:
        run.problem("missing_base_tensor", module.whole.name)


def _lowrank(run: _Run, module: _Module, ref: TensorRef) -> LowRank:
    assert module.a is not None and module.b is not None
    a, b = run.ckpt.read(module.a), run.ckpt.read(module.b)
    run.bytes_read += module.a.nbytes + module.b.nbytes
    if a.dim() != 2 or b.dim() != 2 or len(ref.shape) != 2:
        raise AnalysisError("unsupported", f"{module.target}: LoRA on a {len(ref.shape)}-d weight is not supported")
    if a.shape[0] != b.shape[1]:
        raise AnalysisError("shape_mismatch", f"{module.target}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                                              "disagree on the rank")
    straight, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    transposed = module.embedding or bool(run.config.get("fan_in_fan_out", False))
    expected = flipped if transposed else straight
    if ref.shape != expected:
        if ref.shape != (straight if transposed else flipped):
            raise AnalysisError("shape_mismatch", f"{module.target}: LoRA delta {list(straight)} does not fit the "
                                                  f"base weight {list(ref.shape)} (adapter of another base model?)")
        transposed = not transposed
    rank = int(a.shape[0])
    return LowRank(a, b, lora_scale(run.config, names.module_path(module.target), rank), transposed)


def _lora(run: _Run, module: _Module) -> None:
    assert module.reference is not None
    ref = run.base.weights.tensors[module.reference]
    delta = _lowrank(run, module, ref)
    n = run.base.block_elements
    frame = module.whole
    stats = TensorStats()
    blocks: Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]
    if frame is None:
        blocks = ((start, block, None) for start, block in run.base.weights.blocks(ref, n))
        run.bytes_read += ref.nbytes
    else:
        if frame.shape != ref.shape:
            raise AnalysisError("shape_mismatch", f"{frame.name}: shape {list(frame.shape)} vs base "
                                                  f"{list(ref.shape)}")
        pairs = zip(run.ckpt.blocks(frame, n), run.base.weights.blocks(ref, n), strict=True)
        blocks = ((start, cb, wb) for (start, cb), (_, wb) in pairs)
        run.bytes_read += ref.nbytes + frame.nbytes
    lowrank_stats(blocks, delta, stats)
    run.acc(module.target).add(stats, ref.numel)


def _lora_bias(run: _Run, module: _Module, modules: dict[str, _Module]) -> None:
    """``lora_bias``: peft adds ``scale * lora_B.bias`` to the layer's bias."""
    assert module.reference is not None and module.lora_bias is not None
    owner = modules.get(module.target.rsplit(".", 1)[0] + ".weight")
    if owner is None or owner.a is None:
        raise AnalysisError("corrupt_file", f"{module.lora_bias.name}: a LoRA bias without its LoRA factors")
    ref = run.base.weights.tensors[module.reference]
    base_bias = run.base.weights.read(ref)
    frame = run.ckpt.read(module.whole) if module.whole is not None else base_bias
    # float64, as the merged LoRA weights (maths.LowRank.merged): the smallest |b| is exact.
    extra = run.ckpt.read(module.lora_bias).double()
    if extra.shape != base_bias.shape or frame.shape != base_bias.shape:
        raise AnalysisError("shape_mismatch", f"{module.lora_bias.name}: shape {list(extra.shape)} vs base "
                                              f"{list(base_bias.shape)}")
    scale = lora_scale(run.config, names.module_path(module.target), int(owner.a.shape[0]))
    stats = TensorStats()
    pair_block(base_bias, frame.double() + scale * extra, stats)
    run.bytes_read += 2 * ref.nbytes + module.lora_bias.nbytes
    run.acc(module.target).add(stats, ref.numel)
