"""Training FLOPs of a model, LoRA-aware, and the peak FLOP/s of the device that runs it.

What is counted (docs/metrics.md, "FLOPs and MFU"):

* every matmul module (``torch.nn.Linear``, transformers' ``Conv1D`` of GPT-2, a peft LoRA layer's
  base layer and its ``lora_A`` / ``lora_B``, the LM head) costs ``2 * in * out`` FLOPs per token
  forward; its backward needs the activation gradient (another ``2 * in * out``) when its input
  requires a gradient, and the weight gradient (another ``2 * in * out``) only when its weight does.
  Full fine-tuning is about 6N per token; a frozen base with LoRA about 4N plus the adapters, less
  the activation gradients of the first layers, whose inputs depend on no trainable weight;
* attention: ``4 * T * d_attn`` per token and layer forward (``Q K^T`` and ``A V``, the full T x T
  square as dense kernels and ``torch.utils.flop_counter.FlopCounterMode`` count it, causal mask or
  not), twice that backward when the attention's output needs a gradient;
* TRL's fused LM head (a forward called with ``fused_lm_head=True``: ``ChunkedLogProbFunction``
  multiplies by the head's weight in tiles, never calling the head module): ``2 * d * V`` per scored
  row forward, the same backward for the hidden-state gradient when the last hidden state requires
  one and for the weight gradient when the head's weight does. The scored rows are the valid labels
  where TRL scores only those (Triton devices: the output's ``label_mask.sum()``, a device count kept
  unsynced and read by :meth:`FlopMeter.take` on the exporting thread), every shifted position
  elsewhere (from the shape);
* embedding lookups, norms, activations and the loss: 0 (no matmul);
* hardware FLOPs add what the device recomputes: the forward of the blocks under gradient
  (activation) checkpointing, and the fused head's logits, which its backward recomputes tile by tile
  (one more ``2 * d * V`` per scored row when that backward runs).

Which inputs need a gradient is not guessed from the module order (the first layer's k_proj comes
after a trainable q_proj adapter and still needs no input gradient; under gradient checkpointing the
Trainer makes the embedding output require one, and every layer then computes them): the first
training forward, and its backward where checkpointed blocks recompute, is observed once with hooks
on the matmul and attention modules. They read the host-side ``requires_grad`` flag of each input
(no device->host sync) and count how often each module ran inside the model's forward and outside
it (recomputation; a forward *post*-hook, because non-reentrant checkpointing stops recomputing once
the backward has what it needs, inside a block's last modules). The attention's backward runs when
the input of its out projection, the last matmul inside it, requires a gradient. The hooks are
removed when that micro-batch's step ends, or when the next training forward starts. Calls of the
matmul modules after the model's forward with autograd off (the monitor's sampled predictions
project a few drawn rows through the LM head) are not training compute and not counted. From then on
a micro-batch costs two integer multiply-adds from the shape of its ``input_ids`` (B x T), every
matmul module taken to see all B x T tokens (true of causal LMs, whose head projects every
position). Padding tokens are counted: the device computes them. A padding-free packed row counts
its attention on the row length (T^2), which is what the sdpa and eager kernels compute and an
upper bound for varlen flash-attention kernels, which compute the sum of the packed sequences' T_i^2.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# ----------------------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class StepCost:
    """Integer FLOP coefficients of one micro-batch of ``rows`` x ``cols`` tokens.

    ``*_per_token`` multiply ``rows * cols``; ``attention_*`` multiply ``rows * cols * cols`` (every
    query position against every key position of its row).
    """

    forward_per_token: int
    backward_per_token: int
    recompute_per_token: int
    attention_forward: int
    attention_backward: int
    attention_recompute: int
    # TRL's fused LM head (``fused_lm_head=True``): per scored row, the head's matmul that no module call
    # shows. Its backward recomputes the logits tile by tile: ``head_recompute`` is hardware FLOPs only.
    head_forward: int = 0
    head_backward: int = 0
    head_recompute: int = 0

    def head_flops(self, head_rows: int) -> tuple[int, int]:
        """Model and hardware FLOPs of the fused LM head on ``head_rows`` scored positions."""
        model = (self.head_forward + self.head_backward) * head_rows
        return model, model + self.head_recompute * head_rows

    def model_flops(self, rows: int, cols: int) -> int:
        tokens = rows * cols
        return ((self.forward_per_token + self.backward_per_token) * tokens
                + (self.attention_forward + self.attention_backward) * tokens * cols)

    def hardware_flops(self, rows: int, cols: int) -> int:
        tokens = rows * cols
        return (self.model_flops(rows, cols) + self.recompute_per_token * tokens
                + self.attention_recompute * tokens * cols)

    def per_token(self, seq_len: int) -> tuple[int, int]:
        """Model and hardware FLOPs per token of a row of ``seq_len`` tokens."""
        return self.model_flops(1, seq_len) // seq_len, self.hardware_flops(1, seq_len) // seq_len


@dataclass
class _Leaf:
    """A matmul module and what the observed forward told about it."""

    module: torch.nn.Module
    flops: int  # 2 * in * out: one product of a token with the weight
    adapter: bool
    forward_calls: int = 0
    recompute_calls: int = 0
    grad_seen: bool = False  # called once with grad mode on: it is in the autograd graph
    input_grad: bool = False


@dataclass
class _Attention:
    module: torch.nn.Module
    width: int  # query heads x head dim
    forward_calls: int = 0
    recompute_calls: int = 0
    output_grad: bool = False
    # Set by the leaves called inside one call of this module: the out projection is the last one.
    last_input_grad: bool | None = None


def _matmul_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    # transformers.pytorch_utils.Conv1D (GPT-2): weight (nx, nf), forward addmm(bias, x, weight).
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if type(module).__name__ == "Conv1D" and isinstance(nx, int) and isinstance(nf, int):
        return nx, nf
    return None


def _attention_width(module: torch.nn.Module) -> int | None:
    """Query heads x head dim of a transformers attention module (LlamaAttention, GPT2Attention...)."""
    if not type(module).__name__.endswith("Attention"):
        return None
    head_dim = getattr(module, "head_dim", None)
    heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    if isinstance(head_dim, int) and isinstance(heads, int) and head_dim > 0 and heads > 0:
        return heads * head_dim
    return None


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = (kwargs or {}).get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


@dataclass
class _Probe:
    leaves: list[_Leaf]
    attention: list[_Attention]
    handles: list[Any] = field(default_factory=list)
    in_forward: bool = False
    forwards: int = 0
    current: _Attention | None = None  # the attention module running now
    # Whether the last hidden state (what a fused LM head projects) requires a gradient: read on the
    # backbone's output, or, without a backbone, from any matmul output requiring one (each feeds the
    # residual stream that ends in the last hidden state).
    hidden_grad: bool | None = None
    leaf_output_grad: bool = False


class FlopMeter:
    """Counts the model and hardware FLOPs of the training micro-batches of one model.

    Built once (:meth:`TrainingMonitor.watch <exporter.core.TrainingMonitor.watch>`); the first
    training forward and its backward are observed (see the module docstring), then
    :meth:`observe` adds a micro-batch from its ``input_ids`` shape and :meth:`take` hands the sums
    to the exporting thread.

    Example::

        meter = FlopMeter(model)
        loss = model(input_ids=ids, labels=ids).loss
        meter.observe(ids)
        loss.backward()
        meter.settle()                      # the first step is over: the cost is known
        meter.cost.model_flops(*ids.shape)  # FLOPs of one such micro-batch
        model_flops, hardware_flops = meter.take()
    """

    def __init__(self, model: torch.nn.Module, on_error: Callable[[BaseException], None] | None = None) -> None:
        # The observation hooks run inside the model's forward and backward: a failure there is handed to
        # on_error (the monitor counts it under collector="flops") and ends the counting, never raised.
        self._on_error = on_error
        self.failed = False
        leaves: list[_Leaf] = []
        attention: list[_Attention] = []
        for name, module in model.named_modules():
            shape = _matmul_shape(module)
            if shape is not None:
                # peft keeps the adapter matrices in lora_A / lora_B (lora_embedding_* are lookups).
                adapter = ".lora_A." in name or ".lora_B." in name
                leaves.append(_Leaf(module, 2 * shape[0] * shape[1], adapter))
            elif (width := _attention_width(module)) is not None:
                attention.append(_Attention(module, width))
        self.cost: StepCost | None = None
        self._lock = threading.Lock()
        self._model_flops = 0
        self._hardware_flops = 0
        self._early: list[tuple[int, int]] = []  # micro-batches seen before the cost was known
        # Rows a fused LM head scored: host ints, and device counts (label_mask.sum(), never synced in the
        # training loop) read by take() on the exporting thread.
        self._head_rows = 0
        self._head_pending: list[torch.Tensor] = []
        self._model = model
        probe = _Probe(leaves, attention)
        self._probe: _Probe | None = probe
        guard = self._guarded
        probe.handles.append(model.register_forward_pre_hook(guard(self._model_pre_hook)))
        # First among the model's forward hooks: what others run after the forward (the monitor's sampled
        # predictions project drawn rows through the LM head, under no_grad) is not the model's forward.
        probe.handles.append(model.register_forward_hook(guard(self._model_post_hook), prepend=True))
        backbone = backbone_of(model)
        if backbone is not None:
            probe.handles.append(backbone.register_forward_hook(guard(self._backbone_hook)))
        for leaf in leaves:
            probe.handles.append(leaf.module.register_forward_hook(guard(self._leaf_hook(leaf))))
        for attn in attention:
            probe.handles.append(attn.module.register_forward_pre_hook(guard(self._attn_pre_hook(attn)),
                                                                       with_kwargs=True))
            probe.handles.append(attn.module.register_forward_hook(guard(self._attn_post_hook(attn))))

    def _guarded(self, hook: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(hook)
        def run(*args: Any) -> None:
            try:
                hook(*args)
            except Exception as exc:
                self._fail(exc)

        return run

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self.close()
        with self._lock:
            self._early = []
            self._head_rows = 0
            self._head_pending = []
        if self._on_error is not None:
            self._on_error(exc)

    # ------------------------------------------------------------------ probe (first micro-batch)

    def _model_pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        probe = self._probe
        if probe is None or not module.training:
            return
        if probe.forwards:
            # A second training forward (gradient accumulation): the first one's backward is done.
            self.settle()
            return
        probe.forwards = 1
        probe.in_forward = True

    def _model_post_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._probe is not None:
            self._probe.in_forward = False

    def _backbone_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        probe = self._probe
        if probe is None or not probe.in_forward or not module.training:
            return
        hidden = _output_field(output, "last_hidden_state")
        if isinstance(hidden, torch.Tensor):
            probe.hidden_grad = torch.is_grad_enabled() and hidden.requires_grad

    def _leaf_hook(self, leaf: _Leaf) -> Any:
        # A post-hook: non-reentrant checkpointing stops its recomputation once every tensor the
        # backward needs is back, so a block's last matmuls may be entered but never run there.
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            probe = self._probe
            x = _first_tensor(args)
            if probe is None or not probe.forwards or not module.training or x is None:
                return
            if probe.in_forward:
                leaf.forward_calls += 1
            elif torch.is_grad_enabled():
                leaf.recompute_calls += 1  # outside the model's forward: checkpoint recomputation
            else:
                return  # outside the forward, no autograd: not training compute (e.g. the sampled predictions)
            if torch.is_grad_enabled():
                leaf.grad_seen = True
                leaf.input_grad |= x.requires_grad
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    probe.leaf_output_grad = True
                if probe.current is not None and not leaf.adapter:
                    probe.current.last_input_grad = x.requires_grad

        return hook

    def _attn_pre_hook(self, attn: _Attention) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            probe = self._probe
            if probe is None or not probe.forwards or not module.training:
                return
            attn.last_input_grad = None
            probe.current = attn

        return hook

    def _attn_post_hook(self, attn: _Attention) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            probe = self._probe
            if probe is None or probe.current is not attn:
                return
            probe.current = None
            if probe.in_forward:
                attn.forward_calls += 1
            else:
                attn.recompute_calls += 1
            # The out projection (the last matmul inside) reads the attention's output: its input
            # needs a gradient exactly when the attention's backward runs.
            if torch.is_grad_enabled() and attn.last_input_grad:
                attn.output_grad = True

        return hook

    def settle(self) -> None:
        """End the observation once the first training micro-batch's backward has run (at step end)."""
        probe = self._probe
        if probe is None or not probe.forwards:
            return
        self._probe = None
        for handle in probe.handles:
            handle.remove()
        fwd = bwd = rec = 0
        for leaf in probe.leaves:
            fwd += leaf.forward_calls * leaf.flops
            rec += leaf.recompute_calls * leaf.flops
            if leaf.grad_seen:
                weight = getattr(leaf.module, "weight", None)
                weight_grad = isinstance(weight, torch.Tensor) and weight.requires_grad
                bwd += leaf.forward_calls * leaf.flops * (int(leaf.input_grad) + int(weight_grad))
        a_fwd = a_bwd = a_rec = 0
        for attn in probe.attention:
            # Q K^T and A V: 2 FLOPs per multiply-add, query width x key positions, each.
            one = 4 * attn.width
            a_fwd += attn.forward_calls * one
            a_rec += attn.recompute_calls * one
            if attn.output_grad:
                # dA = dO V^T, dV = A^T dO, dQ = dS K, dK = dS^T Q.
                a_bwd += attn.forward_calls * 2 * one
        h_fwd = h_bwd = h_rec = 0
        head = output_embedding(self._model)
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            # ChunkedLogProbFunction: hidden [N, d] @ weight[V, d].T forward; its backward recomputes each
            # logits tile, then the hidden gradient (when the hidden state needs one) and the weight gradient.
            one = 2 * int(weight.shape[0]) * int(weight.shape[1])
            hidden_grad = probe.hidden_grad if probe.hidden_grad is not None else probe.leaf_output_grad
            grads = int(hidden_grad) + int(weight.requires_grad)
            bias = getattr(head, "bias", None)
            backward = grads > 0 or (isinstance(bias, torch.Tensor) and bias.requires_grad)
            h_fwd, h_bwd, h_rec = one, one * grads, one if backward else 0
        cost = StepCost(fwd, bwd, rec, a_fwd, a_bwd, a_rec, h_fwd, h_bwd, h_rec)
        with self._lock:
            self.cost = cost
            early, self._early = self._early, []
            for rows, cols in early:
                self._model_flops += cost.model_flops(rows, cols)
                self._hardware_flops += cost.hardware_flops(rows, cols)

    # ------------------------------------------------------------------ hot path and export

    def observe(self, input_ids: torch.Tensor, kwargs: dict[str, Any] | None = None, output: Any = None) -> None:
        """Add one training micro-batch (from the shape only: host ints, no sync).

        ``kwargs`` and ``output`` are the forward's: with TRL's ``fused_lm_head=True`` the LM head's rows
        are added, the count of valid labels (a device tensor, read at :meth:`take`) where TRL scores only
        those, every position otherwise.
        """
        shape = input_ids.shape
        if len(shape) == 0 or self.failed:
            return
        rows = int(shape[0]) if len(shape) > 1 else 1
        cols = int(shape[-1])
        if kwargs is not None and kwargs.get("fused_lm_head") is True:
            mask = _output_field(output, "label_mask")
            if isinstance(mask, torch.Tensor):
                if _fused_head_compact(mask.device):
                    with self._lock:
                        self._head_pending.append(mask.sum())
                        if len(self._head_pending) >= 256:  # fold on the device: bounded, still no sync
                            self._head_pending = [torch.stack(self._head_pending).sum()]
                else:
                    with self._lock:
                        self._head_rows += mask.numel()
        with self._lock:
            cost = self.cost
            if cost is None:
                self._early.append((rows, cols))
                return
            self._model_flops += cost.model_flops(rows, cols)
            self._hardware_flops += cost.hardware_flops(rows, cols)

    def take(self) -> tuple[int, int]:
        """The model and hardware FLOPs added since the last call (reads the fused head's device counts)."""
        with self._lock:
            out = (self._model_flops, self._hardware_flops)
            self._model_flops = self._hardware_flops = 0
            cost = self.cost
            if cost is None:
                return out  # the fused head's rows wait for the cost
            head_rows, pending = self._head_rows, self._head_pending
            self._head_rows, self._head_pending = 0, []
        if pending:
            head_rows += int(torch.stack([t.reshape(()).to(pending[0].device) for t in pending]).sum())
        head_model, head_hardware = cost.head_flops(head_rows)
        return out[0] + head_model, out[1] + head_hardware

    def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            for handle in probe.handles:
                handle.remove()


def backbone_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformer under a (peft-wrapped) causal LM, whose last hidden state a fused head projects."""
    inner = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    prefix = getattr(inner, "base_model_prefix", "")
    backbone = getattr(inner, prefix, None) if prefix else None
    return backbone if isinstance(backbone, torch.nn.Module) and backbone is not inner else None


def output_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, torch.nn.Module) else None


def _output_field(output: Any, name: str) -> Any:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def _fused_head_compact(device: torch.device) -> bool:
    """Whether TRL's fused LM head scores only the valid labels on ``device`` (its ``_use_triton``)."""
    # The name add_fused_lm_head's forward calls, loaded once a fused head ran (trl is optional: not imported).
    for name in ("trl.trainer.utils", "trl.kernels.chunked_logprob"):
        use_triton = getattr(sys.modules.get(name), "_use_triton", None)
        if callable(use_triton):
            return bool(use_triton(device))
    return device.type in ("cuda", "xpu")


# ----------------------------------------------------------------------------------------- peak FLOP/s

# Dense (no structured sparsity) tensor-core peaks per GPU, FLOP/s, from NVIDIA's datasheets; the
# datasheets print the sparse figure first, these are half of it. "fp32" is the plain (CUDA-core)
# FP32 peak, "tf32" the TF32 tensor-core peak. Matched against the lower-cased device name (NVML and
# torch.cuda.get_device_name agree on it, e.g. "NVIDIA H100 80GB HBM3") in this order: the first
# entry whose every pattern matches wins, so the specific variants come first.
PEAK_TABLE: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    # B200: HGX B200 datasheet, 8 GPUs: FP16/BF16 36 PF, TF32 18 PF (sparse), FP32 600 TF.
    ((r"\bb200\b",), {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1125e12, "fp32": 75e12}),
    # H200 NVL / H200 SXM: H200 datasheet (BF16 1,671 / 1,979 TF sparse; TF32 835 / 989; FP32 60 / 67).
    ((r"\bh200\b", r"\bnvl\b"), {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ((r"\bh200\b",), {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12}),
    # GH200: the Grace Hopper datasheet lists the H100 SXM's tensor-core figures.
    ((r"\bgh200\b",), {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 67e12}),
    # H100 datasheet: SXM (NVML "H100 80GB HBM3" / "H100 SXM5"), PCIe, NVL (per GPU).
    ((r"\bh100\b", r"\bnvl\b"), {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ((r"\bh100\b", r"pcie"), {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12}),
    ((r"\bh100\b", r"sxm|hbm3"), {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    # A100 datasheet: the same for SXM4 and PCIe, 40 and 80 GB (BF16 312 TF, TF32 156 TF, FP32 19.5 TF).
    ((r"\ba100\b",), {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    # L40S / L40 / L4 datasheets (BF16 733 / 362.1 / 242 TF sparse; TF32 366 / 181 / 120; FP32 91.6 / 90.5 / 30.3).
    ((r"\bl40s\b",), {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ((r"\bl40\b",), {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ((r"\bl4\b",), {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    # A10 datasheet (BF16 250 TF sparse, TF32 125, FP32 31.2). AWS's A10G has no NVIDIA datasheet of its
    # own; it is an A10 variant and these are upper bounds for it: set mfu.peak_flops_per_second when known.
    ((r"\ba10g?\b",), {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    # T4 datasheet: FP16 mixed-precision tensor cores 65 TF, FP32 8.1 TF; Turing has no BF16 or TF32
    # tensor cores (bf16 is emulated: no peak to compare with).
    ((r"\bt4\b",), {"fp16": 65e12, "fp32": 8.1e12}),
    # V100 datasheet: SXM2 125 / 15.7 TF, PCIe 112 / 14 TF, V100S PCIe 130 / 16.4 TF (FP16 tensor / FP32).
    ((r"\bv100s\b",), {"fp16": 130e12, "fp32": 16.4e12}),
    ((r"\bv100\b", r"sxm"), {"fp16": 125e12, "fp32": 15.7e12}),
    ((r"\bv100\b", r"pcie"), {"fp16": 112e12, "fp32": 14e12}),
    # Ada whitepaper v2.1, RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 TF dense, TF32 82.6 TF,
    # FP32 82.6 TF.
    ((r"\brtx 4090\b",), {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
)
DTYPES = ("bf16", "fp16", "tf32", "fp32")


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a device (by its NVML / CUDA name) for a training dtype, or None if unknown."""
    name = device_name.lower()
    for patterns, peaks in PEAK_TABLE:
        if all(re.search(p, name) for p in patterns):
            return peaks.get(dtype)
    return None


def tf32_enabled() -> bool:
    """Whether float32 matmuls on CUDA run on TF32 tensor cores."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        # torch >= 2.9 refuses to answer once the legacy and the new TF32 settings were both used.
        return torch.get_float32_matmul_precision() != "highest"


def _dtype_name(dtype: torch.dtype) -> str | None:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "tf32" if tf32_enabled() else "fp32"
    return None


def _matmul_weights(model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, int]]:
    for module in model.modules():
        shape = _matmul_shape(module)
        weight = getattr(module, "weight", None)
        if shape is not None and isinstance(weight, torch.Tensor):
            yield weight, shape[0] * shape[1]


def training_dtype(model: torch.nn.Module, autocast: str | None = None) -> str | None:
    """The dtype the training matmuls run in: ``"bf16"``, ``"fp16"``, ``"tf32"``, ``"fp32"`` or None.

    ``autocast`` (the Trainer's ``bf16`` / ``fp16`` setting) wins; otherwise the dtype holding most
    of the matmul weights (a bf16 base with float32 LoRA adapters, as peft upcasts them, runs its
    bulk in bf16), with float32 as TF32 when TF32 matmuls are enabled. Quantised weights (int8,
    4-bit) give None: their kernels have other peaks.
    """
    if autocast in ("bf16", "fp16"):
        return autocast
    sizes: dict[torch.dtype, int] = {}
    for weight, size in _matmul_weights(model):
        sizes[weight.dtype] = sizes.get(weight.dtype, 0) + size
    if not sizes:
        return None
    return _dtype_name(max(sizes, key=lambda d: sizes[d]))


def device_peak(model: torch.nn.Module, autocast: str | None = None) -> float | None:
    """Peak FLOP/s of the CUDA device holding the model for its training dtype, from :data:`PEAK_TABLE`."""
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "cuda":
        return None
    dtype = training_dtype(model, autocast)
    if dtype is None:
        return None
    return peak_flops(torch.cuda.get_device_name(first.device), dtype)
