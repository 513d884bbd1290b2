"""Error bounds for the tests' numeric assertions, derived from the arithmetic.

A float32 result depends on the machine: the kernel's summation order,
blocking, FMA use and thread count differ between CPUs and library builds.
So a test compares a float32 result with a float64 reference from the same
inputs, within the worst-case bound of the float32 arithmetic that produced
it, never within a tolerance that happens to hold on one machine.

The bounds are the standard ones (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., sections 2-4): with unit roundoff ``u`` and
``gamma(n) = n u / (1 - n u)``, a sum of ``n`` terms in any order is within
``gamma(n - 1) * sum |x_i|`` of the exact sum, and so a dot product of
length ``n`` is within ``gamma(n) * sum |x_i y_i|``. They hold for every
order and blocking, which is what makes them machine-independent; they are
also far below the size of the mistakes the tests look for (a missing
tensor, a wrong group, a wrong scale), which change a figure by 1e-3 to 1.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    """``n u / (1 - n u)``: the relative bound of ``n`` chained roundings."""
    assert n * u < 1, "bound undefined: too many operations for this precision"
    return n * u / (1 - n * u)


def norm_rel(elements: int, tensors: int = 1) -> float:
    """Relative bound of a float32 2-norm over ``elements`` values held in ``tensors`` tensors.

    Per tensor: ``n`` squares and ``n - 1`` additions of non-negative terms give
    a sum of squares within ``gamma(n)`` relative; the per-tensor norms are
    squared again and summed over ``tensors`` terms (grouped norms), then one
    square root halves the relative error and adds one rounding. Bounded here
    without the halving: ``gamma(elements + 2 * tensors + 2)``.
    """
    return gamma(elements + 2 * tensors + 2)


def ratio_rel(elements: int, tensors: int = 1) -> float:
    """Relative bound of a quotient of two such norms (update ratios): both errors and the division."""
    return 2 * norm_rel(elements, tensors) + U32


def logprob_abs(vocab: int, max_abs_logit: float) -> float:
    """Absolute bound of a float32 ``log p = x - logsumexp(x)`` over a vocabulary of ``vocab``.

    ``logsumexp = m + log(sum exp(x - m))``: the shifted exponentials carry
    ``2u`` each, their sum ``gamma(vocab)`` relative, which the log turns into
    an absolute error, plus one rounding of each of the additions, whose
    operands are at most ``|x| + |lse| <= 2 max|x| + log(vocab)``.
    """
    return gamma(vocab + 3) + 3 * U32 * (2 * max_abs_logit + 1 + vocab.bit_length())


def entropy_abs(vocab: int, positions: int, max_abs_logit: float, entropy: float) -> float:
    """Absolute bound of a float32 mean entropy ``-sum p log p`` over ``positions`` rows of ``vocab`` logits.

    Each ``log p`` is within ``d = logprob_abs``; ``p = exp(log p)`` then within
    ``d + u`` relative, so each term ``p log p`` is within
    ``p (|log p| (d + 2u) + d + u)``, and a row's entropy within
    ``(d + 2u)(H + 1) + gamma(vocab) H``. The mean over rows (a dot product
    with 0/1 weights, then a division) adds ``gamma(positions + 1)`` of it.
    """
    d = logprob_abs(vocab, max_abs_logit)
    per_row = (d + 2 * U32) * (entropy + 1) + gamma(vocab) * entropy
    return per_row + gamma(positions + 1) * (entropy + per_row)


def confidence_rel(vocab: int, positions: int, max_abs_logit: float, k: int = 1) -> float:
    """Relative bound of a float32 mean of the top-``k`` probabilities' sum over ``positions`` rows."""
    return logprob_abs(vocab, max_abs_logit) + 2 * U32 + gamma(k) + gamma(positions + 1)


def lowrank_merge_abs(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, u: float = U32) -> float:
    """Largest absolute error of the elements of ``w0 + scale * (b @ a)`` computed in a precision of roundoff ``u``.

    Element ``(i, j)`` is a length-``r`` dot product (``gamma(r)`` of
    ``sum_k |b_ik a_kj|``), then a scaling and an addition (one rounding each,
    of operands at most ``|w0_ij| + scale * sum_k |b_ik a_kj|``). The
    transposed layout has the same elements. Computed in float64 from the
    magnitudes, so the bound itself is exact to far below its size.
    """
    magnitude = scale * (b.double().abs() @ a.double().abs())
    if magnitude.shape != w0.shape:
        magnitude = magnitude.T
    r = a.shape[0]
    return float((gamma(r + 2, u) * (w0.double().abs() + magnitude)).max())
