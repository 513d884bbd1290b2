"""The pure maths behind the loss and prediction metrics: no registry, no threads, no I/O.

:class:`LossStats` turns finite step losses into the EMA, the windowed
variance, the recent maximum and the spike ratio. :func:`step_loss` weights a
step's micro-batch losses by their loss tokens as the trainers do.
:func:`logit_statistics` reduces a batch's logits to entropy and confidence
sums with a static shape. The monitor (:mod:`exporter.core`) feeds them and
exports what they return.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Entropy / confidence of a sampled batch look at no more positions than fit
# PREDICTION_BUDGET logits (64 MB per float32 copy: 111 positions of a 150k
# vocabulary) and at most PREDICTION_MAX_POSITIONS.
PREDICTION_BUDGET = 2**24
PREDICTION_MAX_POSITIONS = 1024


class LossStats:
    """Running statistics of the finite step losses.

    Args:
        ema_alpha: weight of the newest loss in the exponential moving average.
        variance_window: how many recent finite losses the variance is taken over.
        window_seconds: how long a loss counts towards :meth:`recent_max` and the spike ratio.

    Example:
        >>> stats = LossStats(ema_alpha=0.5, variance_window=10, window_seconds=60)
        >>> [stats.observe(v, t) for t, v in enumerate([4.0, 2.0, float("nan")])]
        [True, True, False]
        >>> stats.ema, stats.variance(), stats.recent_max(now=2.0)
        (3.0, 2.0, (4.0, 1.0))
    """

    def __init__(self, ema_alpha: float, variance_window: int, window_seconds: float) -> None:
        self.alpha = ema_alpha
        self.window_seconds = window_seconds
        self.ema: float | None = None
        self._window: collections.deque[float] = collections.deque(maxlen=variance_window)
        # (monotonic time, loss, loss / EMA before it)
        self._recent: collections.deque[tuple[float, float, float]] = collections.deque()

    def observe(self, value: float, at: float) -> bool:
        """Take one step loss seen at monotonic time ``at``; a NaN or Inf changes nothing and returns False."""
        if not math.isfinite(value):
            return False
        # Against the EMA *before* this step: during a run's fast descent
        # every step is below it, a spike is far above it.
        ratio = value / self.ema if self.ema is not None and self.ema > 0 else 1.0
        self.ema = value if self.ema is None else self.alpha * value + (1 - self.alpha) * self.ema
        self._window.append(value)
        self._recent.append((at, value, ratio))
        return True

    def variance(self) -> float | None:
        """The sample variance (n - 1) of the last ``variance_window`` finite losses; None below two."""
        n = len(self._window)
        if n < 2:
            return None
        mean = sum(self._window) / n
        return sum((x - mean) ** 2 for x in self._window) / (n - 1)

    def recent_max(self, now: float) -> tuple[float, float] | None:
        """The largest loss and the largest spike ratio within ``window_seconds`` before ``now``; None if none.

        The last-step gauge shows one step per scrape; at 1 step/s and a 15 s
        scrape most steps are never seen. The max over a time window keeps a
        one-step spike on /metrics until a scrape has seen it.
        """
        horizon = now - self.window_seconds
        recent = self._recent
        while recent and recent[0][0] < horizon:
            recent.popleft()
        if not recent:
            return None
        return max(v for _, v, _ in recent), max(r for _, _, r in recent)


# Where a micro-batch's loss-token count comes from, read only when the step loss needs it: ("count", n),
# ("mask", a 0/1 tensor to sum), ("labels", labels whose non -100 entries count), ("shifted", causal labels
# whose positions 1.. count), or None when unknown.
Tokens = tuple[str, Any] | None
MicroBatch = tuple[torch.Tensor, Tokens, "torch.Tensor | int | float | None"]


def step_loss(micro: list[MicroBatch], items_are_local: bool = True) -> torch.Tensor:
    """The step's loss from its micro-batches ``(loss, tokens, num_items_in_batch)``: this process's token mean.

    That is how the trainers weight a step (the Trainer divides the summed
    token losses of all micro-batches by their token count, TRL's SFTTrainer
    likewise). A micro-batch loss the model divided by ``num_items_in_batch``
    (the tokens of the whole step, of every rank under
    ``average_tokens_across_devices``) times that number is its own token sum;
    a plain per-micro-batch mean times its token count is too. Dividing by
    this process's own token count gives its token mean, whatever the other
    ranks saw. Device ops only, and none for one micro-batch whose loss is
    already its own token mean (the common case).
    """
    if len(micro) == 1 and (micro[0][2] is None or items_are_local):
        return micro[0][0]
    counts = [token_count(source) for _, source, _ in micro]
    if all(c is not None for c in counts):
        device = micro[0][0].device
        sums, ns = [], []
        for (loss, _, items), count in zip(micro, counts, strict=True):
            c = torch.as_tensor(count, device=device).reshape(()).to(torch.float64)
            weight = c if items is None else torch.as_tensor(items, device=device).reshape(())
            total = loss.reshape(()).to(device, torch.float64) * weight
            # A micro-batch without loss tokens adds nothing (its own loss may be 0 / 0).
            sums.append(torch.where(c > 0, total, torch.zeros((), dtype=torch.float64, device=device)))
            ns.append(c)
        n, summed = torch.stack(ns).sum(), torch.stack(sums).sum()
        return torch.where(n > 0, summed / n.clamp_min(1), summed)
    # Loss tokens unknown (no labels seen): the plain mean of the micro-batch losses.
    return torch.stack([t.reshape(()).to(micro[0][0].device) for t, _, _ in micro]).mean()


def token_count(source: Tokens) -> torch.Tensor | int | None:
    """The number of loss tokens ``source`` stands for (a device tensor, or an int when known on the host)."""
    if source is None:
        return None
    kind, value = source
    if kind == "count":
        return value
    if kind == "mask":
        return value.sum()
    if kind == "labels":
        return (value != -100).sum()
    return (value[..., 1:] != -100).sum()


def label_source(module: torch.nn.Module, output: Any, kwargs: Mapping[str, Any]) -> Tokens:
    """Where the loss-token count of a micro-batch comes from (no device op here; see :func:`token_count`).

    TRL's fused head returns its own ``label_mask``. A causal LM's loss is over
    the labels shifted by one (``shift_labels`` when the caller shifted them);
    an encoder-decoder's over its labels; a sequence classifier's over its rows.
    """
    # By name only: a plain tuple output has no label mask at any position.
    label_mask = output.get("label_mask") if isinstance(output, Mapping) else getattr(output, "label_mask", None)
    if isinstance(label_mask, torch.Tensor):
        return ("mask", label_mask)
    shifted = kwargs.get("shift_labels")
    if isinstance(shifted, torch.Tensor):
        return ("labels", shifted)
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor):
        return None
    if labels.dim() == 1:
        return ("count", labels.numel())
    if getattr(getattr(module, "config", None), "is_encoder_decoder", False):
        return ("labels", labels)
    return ("shifted", labels)


@dataclass(frozen=True)
class Predictions:
    """Mean token entropy (nats) and top-1 / top-5 confidence over the positions looked at."""

    entropy: float
    top1: float
    top5: float


def head_vocab(head: torch.nn.Module) -> int:
    """The vocabulary size an output projection maps to."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(getattr(head, "out_features", 1))


def logit_statistics(logits: torch.Tensor, labels: Any, mask: Any, head: torch.nn.Module | None = None,
                     budget: int | None = None, max_positions: int | None = None) -> torch.Tensor:
    """Sums of ``p log p``, of the top-1..5 probabilities and of the weights over a bounded number of positions.

    Returns one small device tensor; :func:`predictions` turns it into means
    once it is on the host. Fixed-size on purpose: a boolean-mask selection
    would need a device->host sync to learn its size, and a softmax over every
    position of a large vocabulary would double the logits' memory. Positions
    are drawn with topk over "labelled + random tie-break" scores, which
    prefers labelled ones and has a static shape; unlabelled picks get weight 0.
    With ``head``, ``logits`` are the hidden states a fused head would project.
    ``budget`` and ``max_positions`` default to :data:`PREDICTION_BUDGET` and
    :data:`PREDICTION_MAX_POSITIONS`.
    """
    budget = PREDICTION_BUDGET if budget is None else budget
    max_positions = PREDICTION_MAX_POSITIONS if max_positions is None else max_positions
    with torch.no_grad():
        # With a head only the drawn rows are projected, so the cost is that of the drawn positions, not of
        # the sequence (what a fused head exists to avoid).
        vocab = logits.shape[-1] if head is None else head_vocab(head)
        flat = logits.reshape(-1, logits.shape[-1])
        if isinstance(labels, torch.Tensor) and labels.shape == logits.shape[:-1]:
            # Causal LM: the logits at position t predict the label at t+1.
            keep = torch.nn.functional.pad(labels[..., 1:] != -100, (0, 1)).reshape(-1).float()
        elif isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:-1]:
            keep = (mask != 0).reshape(-1).float()
        else:
            keep = torch.ones(flat.shape[0], device=logits.device)
        positions = max(1, min(max_positions, budget // vocab))
        if keep.numel() <= positions:
            weight, rows = keep, flat
        else:
            score = torch.rand(keep.shape, device=keep.device).mul_(0.5).add_(keep)
            top_score, idx = score.topk(positions)
            weight, rows = (top_score >= 1.0).float(), flat.index_select(0, idx)
        if head is not None:
            rows = head(rows)
        # x - logsumexp(x) rather than log_softmax: the same values, and on a
        # CPU less than half the time for the small rows sampled here.
        logp = rows.float()
        logp = logp - logp.logsumexp(-1, keepdim=True)
        p = logp.exp()
        top = p.topk(min(5, vocab), dim=-1).values
        # One weighted sum gives every statistic: columns are sum p*log p, the
        # top-k probabilities and the weight itself (weights are 0/1, so
        # weight . weight counts the positions).
        per_pos = torch.cat([(p * logp).sum(-1, keepdim=True), top, weight.unsqueeze(-1)], dim=-1)
        return weight @ per_pos


def predictions(sums: list[float]) -> Predictions | None:
    """The means behind :func:`logit_statistics`'s sums (read to the host); None when no position was labelled."""
    neg_entropy, *top, positions = sums
    if positions <= 0:
        return None
    return Predictions(entropy=-neg_entropy / positions, top1=top[0] / positions, top5=sum(top) / positions)
