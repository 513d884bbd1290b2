"""Pure maths of the fixed evaluation and of dataset drift: no threads, no metrics, no I/O.

* answer matching: exact (surrounding whitespace ignored) and normalized
  (Unicode NFKC, case folded, punctuation removed, whitespace collapsed);
* failure-mode classification of one generated answer;
* expected calibration error with 15 equal-width confidence bins;
* cross-entropy, top-1 / top-5 confidence and entropy over the answer tokens
  of a teacher-forced pass (labels of -100 ignored, causal shift applied);
* Jensen-Shannon divergence (base 2, so 0..1) of two histograms.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
ECE_BINS = 15

OUTCOMES = ("correct", "empty", "wrong_format", "wrong_content", "truncated")

# Golden-answer length buckets (tokens, end marker not counted) of the pattern
# x length heatmap: powers of two, so one fixed label set fits one-token
# answers and 500-token explanations alike, with at most nine columns.
LENGTH_BUCKETS: tuple[tuple[int, str], ...] = (
    (2, "0-2"), (4, "3-4"), (8, "5-8"), (16, "9-16"), (32, "17-32"), (64, "33-64"), (128, "65-128"),
    (256, "129-256"),
)
LONGEST_BUCKET = "257+"

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Fold what does not change an answer's meaning: Unicode form, case, punctuation, runs of whitespace."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in folded)
    return _SPACE.sub(" ", kept).strip()


def exact_match(answer: str, golden: str) -> bool:
    """Identical text apart from whitespace around it (a trailing newline is not a different answer)."""
    return answer.strip() == golden.strip()


def normalized_match(answer: str, golden: str) -> bool:
    return normalize(answer) == normalize(golden)


def classify(answer: str, golden: str, *, truncated: bool = False, contract: Mapping[str, bool] | None = None) -> str:
    """The outcome of one generated answer, one of :data:`OUTCOMES`.

    Checked in this order, the first that applies wins:

    ``correct``        exact match;
    ``empty``          nothing but whitespace was generated;
    ``truncated``      generation hit the token bound (or the context) before
                       the end marker: the cause of whatever else is wrong;
    ``wrong_format``   a contract check failed (``contract`` maps check name
                       to pass), or the answer only matches after
                       normalisation (right content, wrong form);
    ``wrong_content``  anything else: well-formed, finished and wrong.
    """
    if exact_match(answer, golden):
        return "correct"
    if not answer.strip():
        return "empty"
    if truncated:
        return "truncated"
    if (contract and not all(contract.values())) or normalized_match(answer, golden):
        return "wrong_format"
    return "wrong_content"


def length_bucket(tokens: int) -> str:
    for upper, label in LENGTH_BUCKETS:
        if tokens <= upper:
            return label
    return LONGEST_BUCKET


def expected_calibration_error(
    confidences: Sequence[float] | torch.Tensor, correct: Sequence[bool] | torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE = sum over bins of |bin| / n * |accuracy(bin) - mean confidence(bin)|.

    ``bins`` equal-width bins over [0, 1]: bin i holds confidences in
    [i/bins, (i+1)/bins), the last one also 1.0. Empty bins contribute
    nothing. NaN when there is nothing to measure or a confidence is NaN (a
    diverged model), so that it shows as such.
    """
    conf = torch.as_tensor(confidences, dtype=torch.float64).reshape(-1)
    hit = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
    if conf.numel() != hit.numel():
        raise ValueError(f"{conf.numel()} confidences but {hit.numel()} correctness values")
    n = conf.numel()
    if n == 0:
        return math.nan
    if bool(conf.isnan().any()):
        return math.nan
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidences must lie in [0, 1]")
    index = (conf * bins).floor().long().clamp_(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit)
    # |sum(acc) - sum(conf)| per bin / n == |bin|/n * |acc(bin) - conf(bin)|.
    return float((hit_sum - conf_sum).abs().sum() / n)


@dataclass(frozen=True)
class AnswerTokenStats:
    """Per labelled position (one row per answer token, in batch order): which example and what was predicted."""

    example: torch.Tensor  # long, index of the example (batch row)
    nll: torch.Tensor  # -log p(label)
    confidence: torch.Tensor  # top-1 probability
    correct: torch.Tensor  # bool, argmax == label
    top5: torch.Tensor  # probability mass of the five most likely tokens
    entropy: torch.Tensor  # nats

    def cpu(self) -> AnswerTokenStats:
        return AnswerTokenStats(*(t.detach().cpu() for t in (
            self.example, self.nll, self.confidence, self.correct, self.top5, self.entropy)))


def answer_token_stats(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> AnswerTokenStats:
    """Statistics of the next-token distributions at every position whose label is not ``ignore_index``.

    ``logits`` (batch, seq, vocab) and ``labels`` (batch, seq) as a causal LM
    takes them: with ``shift`` the logits at position t are scored against the
    label at t+1, as the model's own loss does.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != ignore_index
    rows = keep.nonzero(as_tuple=True)
    picked = logits[rows].float()
    target = labels[rows]
    logp = torch.log_softmax(picked, dim=-1)
    p = logp.exp()
    top = p.topk(min(5, p.shape[-1]), dim=-1)
    return AnswerTokenStats(
        example=rows[0],
        nll=-logp.gather(-1, target.unsqueeze(-1)).squeeze(-1),
        confidence=top.values[:, 0],
        correct=top.indices[:, 0] == target,
        top5=top.values.sum(-1),
        entropy=-(p * logp).sum(-1),
    )


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits (0: same distribution, 1: disjoint supports).

    ``p`` and ``q`` are histograms over the same bins; they need not be
    normalised. NaN when either holds no mass: there is no distribution to
    compare, and NaN keeps a threshold rule from firing on it.
    """
    if len(p) != len(q):
        raise ValueError(f"histograms differ in length ({len(p)} vs {len(q)})")
    if any(not math.isfinite(x) or x < 0 for x in (*p, *q)):
        raise ValueError("histogram counts must be finite and >= 0")
    sp, sq = float(sum(p)), float(sum(q))
    if sp <= 0 or sq <= 0:
        return math.nan
    total = 0.0
    for a, b in zip(p, q, strict=True):
        pa, qb = a / sp, b / sq
        m = (pa + qb) / 2
        if pa > 0:
            total += pa * math.log2(pa / m)
        if qb > 0:
            total += qb * math.log2(qb / m)
    return min(max(total / 2, 0.0), 1.0)
