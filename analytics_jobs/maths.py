"""The tensor maths of the analysis, free of files and Prometheus.

Everything is accumulated in float32 per block and summed across blocks in
float64 (Python floats), whatever the stored dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# Inner length of the float32 partial sums in `sum_squares`.
_SUM_BLOCK = 4096
# Elements per pass of the per-element work (see `Workspace`).
SUB_BLOCK = 1 << 20

# Integer views whose sign-cleared bit patterns order like |x| (IEEE 754).
_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


def sum_squares(x: torch.Tensor) -> float:
    """Sum of squares of a float32 tensor, within ``gamma(4098)`` (2.4e-4) relative on any kernel.

    A float32 sum of n squares is only bounded by ``gamma(n)`` relative (0.18
    for 3M elements), and a flat float32 ``vector_norm`` measurably lost
    1.5e-3 on 16M elements. Norms of 4096-element pieces, squared and summed
    in float64, keep the float32 speed with a bound that does not grow with
    the tensor; the typical error is far smaller (~1e-8 measured).
    """
    flat = x.reshape(-1)
    n = flat.numel()
    whole = n - n % _SUM_BLOCK
    total = 0.0
    if whole:
        norms = torch.linalg.vector_norm(flat[:whole].view(-1, _SUM_BLOCK), dim=1).double()
        total += float(torch.dot(norms, norms))
    if whole < n:
        total += float(torch.linalg.vector_norm(flat[whole:]).double()) ** 2
    return total


def extremes(x: torch.Tensor) -> tuple[float, float]:
    """``(max |x|, smallest non-zero |x|)``; the second is ``inf`` when every element is zero.

    Works on the bit patterns: with the sign bit cleared, IEEE floats order
    like their absolute values, so one integer max gives the largest |x|
    (NaN sorts above Inf, so a NaN weight makes the result NaN, as it
    should), and subtracting 1 modulo 2^(bits-1) turns 0 into the largest
    pattern so that one integer min skips the zeros (only needed when the
    first min says there are zeros). On bf16 that is 4-5x faster than
    ``abs`` + ``masked_fill`` + ``min`` in float32 (measured).
    """
    if x.numel() == 0:
        return 0.0, math.inf
    spec = _BITS.get(x.dtype)
    if spec is None:
        x = x.float()
        spec = _BITS[torch.float32]
    int_dtype, mask = spec
    bits = x.reshape(-1).view(int_dtype).bitwise_and(mask)
    low_t, top_t = torch.aminmax(bits)
    top, low = int(top_t), int(low_t)
    if low == 0:  # some zeros (rare in trained weights): skip them, one more pass
        low = int(bits.sub_(1).bitwise_and_(mask).min())
        low = mask if low == mask else low + 1
    largest = _from_bits(top, int_dtype, x.dtype)
    smallest = math.inf if low == mask else _from_bits(low, int_dtype, x.dtype)
    return largest, smallest


def _from_bits(value: int, int_dtype: torch.dtype, dtype: torch.dtype) -> float:
    return float(torch.tensor([value], dtype=int_dtype).view(dtype)[0])


@dataclass
class TensorStats:
    """What one tensor contributes: squared norms of the reference, the current weight and their difference,
    and the extremes of the current weight."""

    ref_sq: float = 0.0
    cur_sq: float = 0.0
    delta_sq: float = 0.0
    max_abs: float = 0.0
    min_abs: float = math.inf

    def add_extremes(self, largest: float, smallest: float) -> None:
        # A NaN must win and stay (a plain `>` would drop it).
        if not math.isnan(self.max_abs) and (math.isnan(largest) or largest > self.max_abs):
            self.max_abs = largest
        if smallest < self.min_abs:
            self.min_abs = smallest


class Workspace:
    """Float32 buffers reused for every sub-block of an analysis.

    Converting into memory that is already mapped avoids the page faults of a
    fresh allocation per block, and a 1M-element sub-block (4 MiB per buffer)
    keeps the several passes over it in cache: 30-40% faster than fresh
    float32 copies of 4M-element blocks (measured on bf16 0.6B-shaped pairs).
    """

    def __init__(self, elements: int = SUB_BLOCK) -> None:
        self.elements = elements
        self.ref = torch.empty(elements, dtype=torch.float32)
        self.cur = torch.empty(elements, dtype=torch.float32)
        self.delta = torch.empty(elements, dtype=torch.float32)


def _pieces(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def pair_block(
    ref: torch.Tensor, cur: torch.Tensor, stats: TensorStats, need_ref: bool = True, work: Workspace | None = None
) -> None:
    """Add one block of a full tensor and its base counterpart (same shape) to ``stats``."""
    work = work or Workspace(min(SUB_BLOCK, max(cur.numel(), 1)))
    ref_flat, cur_flat = ref.reshape(-1), cur.reshape(-1)
    for a, b in _pieces(cur_flat.numel(), work.elements):
        rf = work.ref[: b - a].copy_(ref_flat[a:b])
        cf = work.cur[: b - a].copy_(cur_flat[a:b])
        if need_ref:
            stats.ref_sq += sum_squares(rf)
        stats.cur_sq += sum_squares(cf)
        stats.delta_sq += sum_squares(torch.sub(cf, rf, out=work.delta[: b - a]))
        stats.add_extremes(*extremes(cur_flat[a:b]))


def single_block(cur: torch.Tensor, stats: TensorStats, work: Workspace | None = None) -> None:
    """Add one block of a tensor on its own (no counterpart): its norm and extremes, as both ref and current."""
    work = work or Workspace(min(SUB_BLOCK, max(cur.numel(), 1)))
    flat = cur.reshape(-1)
    for a, b in _pieces(flat.numel(), work.elements):
        sq = sum_squares(work.cur[: b - a].copy_(flat[a:b]))
        stats.ref_sq += sq
        stats.cur_sq += sq
        stats.add_extremes(*extremes(flat[a:b]))


class LowRank:
    """A LoRA delta ``scale * B @ A`` in the stored layout of the weight it adapts, never materialised whole.

    peft computes ``delta = scale * B @ A`` (``d_out x d_in``) from ``A``
    (``r x d_in``) and ``B`` (``d_out x r``), with ``scale = alpha / r`` (or
    ``alpha / sqrt(r)`` with rsLoRA). GPT-2's ``Conv1D`` (``fan_in_fan_out``)
    and embeddings store the weight transposed, so the delta is ``(B @ A)^T``
    there. Writing the stored delta as ``scale * L @ R`` (``L, R = B, A`` or
    ``A^T, B^T``), with ``L`` rows x r and ``R`` r x cols:

    * ``||scale L R||_F^2 = scale^2 tr(R^T L^T L R) = scale^2 tr((L^T L)(R R^T))``
      by the cyclic property of the trace: two r x r Gram matrices, whatever
      the size of the weight (computed in float64);
    * ``<C, scale L R> = scale tr(C^T L R) = scale * sum(L * (C R^T))``: ``C R^T``
      is rows x r, so a weight ``C`` streamed by row blocks gives the inner
      product block by block; then
      ``||C + delta||^2 = ||C||^2 + 2 <C, delta> + ||delta||^2``.

    Only the extremes need the elements of ``C + delta``;
    :meth:`merged_extremes` gives them for a row block (``rows x cols``, the
    block size is bounded), merged in float64: see there why.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool) -> None:
        a32, b32 = a.float(), b.float()
        self.left, self.right = (a32.T.contiguous(), b32.T.contiguous()) if transposed else (b32, a32)
        self.scale = scale
        # rows x r and r x cols: float64 copies are small whatever the weight.
        self._left64, self._right64 = self.left.double(), self.right.double()

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def norm_sq(self) -> float:
        left, right = self.left.double(), self.right.double()
        gram_left = left.T @ left
        gram_right = right @ right.T
        return self.scale**2 * float((gram_left * gram_right).sum())

    def inner(self, start: int, block: torch.Tensor) -> float:
        """``<block, delta[start:start + rows]>`` for a float32 row block of a weight in the stored layout."""
        left = self.left[start:start + block.shape[0]]
        return self.scale * float((left * (block @ self.right.T)).double().sum())

    def merged32(self, start: int, block: torch.Tensor) -> torch.Tensor:
        """``block + delta[start:start + rows]`` in float32."""
        left = self.left[start:start + block.shape[0]]
        return torch.addmm(block, left, self.right, alpha=self.scale)

    def merged64(self, start: int, block: torch.Tensor) -> torch.Tensor:
        """``block + delta[start:start + rows]`` in float64: exact to float64 rounding."""
        left = self._left64[start:start + block.shape[0]]
        return torch.addmm(block.double(), left, self._right64, alpha=self.scale)

    def merged_extremes(self, start: int, block: torch.Tensor) -> tuple[float, float]:
        """``(max |w|, smallest non-zero |w|)`` of ``block + delta[start:start + rows]``, exact to float64 rounding.

        The reported extremes are those of the exact ``C + scale * L @ R`` of the
        stored values. A float32 merge is not enough: each element carries an
        absolute error up to ``gamma(r + 2) (|c| + scale sum_k |l_k r_k|)`` (the
        r-term product, the scaling and the addition, in any kernel's order),
        which near a cancellation is a large part of the element, so the
        smallest |w| would depend on the machine's matmul (bench/drift.py
        ``--adapter`` finds the float32 one 7x to 31x off on random factors);
        at ``|c| ~ 0.02`` that error is ~1e-9, above the 1e-10 / 1e-12
        vanishing-weight thresholds. In float64 it is ~1e-16 of the operands.
        Measured cost on a 0.6B-shaped model with rank 16 on every linear
        layer: 0.96x and 1.18x the float32 analysis time in two runs, within
        their noise (the analysis is bound by reading the base weights).
        Recomputing only the candidate extremes in float64 was slower still
        (1.28x): its extra passes over the block cost more than the wider merge.
        """
        return extremes(self.merged64(start, block))


def lowrank_stats(
    blocks: Iterable[tuple[int, torch.Tensor, torch.Tensor | None]], delta: LowRank, stats: TensorStats
) -> None:
    """Stats of ``W = C + delta`` against the base ``W0``, from row blocks ``(start, C, W0 or None)``.

    ``C`` is the weight the adapter sits on: the base weight itself (``W0``
    is then None and ``W - W0 = delta``), or the ``base_layer`` copy found in
    a checkpoint, compared with ``W0`` as ``(C - W0) + delta``.
    """
    delta_sq = delta.norm_sq()
    c_sq = w0_sq = diff_sq = cross_c = cross_diff = 0.0
    framed = False
    for start, c_block, w0_block in blocks:
        cf = c_block.float()
        c_sq += sum_squares(cf)
        cross_c += delta.inner(start, cf)
        stats.add_extremes(*delta.merged_extremes(start, cf))
        if w0_block is not None:
            framed = True
            wf = w0_block.float()
            w0_sq += sum_squares(wf)
            diff = torch.sub(cf, wf)
            diff_sq += sum_squares(diff)
            cross_diff += delta.inner(start, diff)
    stats.cur_sq += max(0.0, c_sq + 2.0 * cross_c + delta_sq)
    if framed:
        stats.ref_sq += w0_sq
        stats.delta_sq += max(0.0, diff_sq + 2.0 * cross_diff + delta_sq)
    else:
        stats.ref_sq += c_sq
        stats.delta_sq += delta_sq
