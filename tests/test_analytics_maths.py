"""The analysis maths against plain torch, on random tensors (no files)."""

from __future__ import annotations

import math

import pytest
import torch
from support.numerics import U32, U64, gamma, lowrank_merge_abs, norm_rel

from analytics_jobs import report
from analytics_jobs.analysis import Analysis, LayerResult
from analytics_jobs.maths import LowRank, TensorStats, extremes, lowrank_stats, pair_block, sum_squares


def test_sum_squares_bound_does_not_grow_with_the_tensor() -> None:
    # Each 4096-element float32 piece is within gamma(4096 + 2) of its exact sum
    # of squares in any summation order (the squares and the additions); the
    # pieces are added in float64. So the whole is within the same relative bound
    # for 3M elements as for 4096, where a flat float32 sum is only bounded by
    # gamma(3M) = 0.18. (Typical errors are far smaller, but depend on the kernel.)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_001, generator=g) * 0.02
    exact = float((x.double() ** 2).sum())
    bound = gamma(4096 + 2) + gamma(3_000_001 // 4096 + 2, U64)
    assert abs(sum_squares(x) - exact) <= bound * exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_extremes_match_abs_max_and_nonzero_min(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1000, generator=g) * 3).to(dtype)
    x[::7] = 0
    x[3] = -0.0
    x[5] = -1e-3
    a = x.double().abs()
    largest, smallest = extremes(x)
    assert largest == float(a.max())
    assert smallest == float(a[a > 0].min())


def test_extremes_of_zeros_nan_and_empty() -> None:
    assert extremes(torch.zeros(10, dtype=torch.bfloat16)) == (0.0, math.inf)
    assert extremes(torch.zeros(0)) == (0.0, math.inf)
    nan_max, smallest = extremes(torch.tensor([1.0, float("nan"), -2.0]))
    assert math.isnan(nan_max) and smallest == 1.0
    assert extremes(torch.tensor([float("-inf"), 3.0]))[0] == math.inf
    assert extremes(torch.tensor([1e-40, 0.0]))[1] == pytest.approx(1e-40, rel=1e-3)  # subnormal float32


def test_pair_block_matches_direct_norms() -> None:
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    cur = (ref.float() + 0.01 * torch.randn(64, 48, generator=g)).to(torch.bfloat16)
    stats = TensorStats()
    for rows in (slice(0, 20), slice(20, 64)):
        pair_block(ref[rows], cur[rows], stats)
    r, c = ref.double(), cur.double()
    assert stats.ref_sq == pytest.approx(float((r**2).sum()), rel=1e-6)
    assert stats.cur_sq == pytest.approx(float((c**2).sum()), rel=1e-6)
    assert stats.delta_sq == pytest.approx(float(((c - r) ** 2).sum()), rel=1e-6)
    assert stats.max_abs == float(c.abs().max())


@pytest.mark.parametrize("transposed", [False, True])
def test_lowrank_norms_from_rank_products_equal_the_merged_matrix(transposed: bool) -> None:
    g = torch.Generator().manual_seed(3)
    d_out, d_in, r, scale = 40, 24, 4, 2.5
    a = torch.randn(r, d_in, generator=g)
    b = torch.randn(d_out, r, generator=g)
    w0 = torch.randn(d_in, d_out, generator=g) if transposed else torch.randn(d_out, d_in, generator=g)
    # The exact merged matrix of the stored (float32) factors, to float64 rounding.
    delta64 = scale * (b.double() @ a.double())
    if transposed:
        delta64 = delta64.T
    w = w0.double() + delta64
    lr = LowRank(a, b, scale, transposed)
    assert lr.shape == tuple(w0.shape)
    assert lr.norm_sq() == pytest.approx(float((delta64**2).sum()), rel=gamma(2 * r * r + 2, U64) * 4)
    stats = TensorStats()
    blocks = [(0, w0[:7], None), (7, w0[7:], None)]
    lowrank_stats(iter(blocks), lr, stats)
    n = w0.numel()
    # Norms: float32 pieces (sum_squares) and float32 row-block products for <C, delta>, each within
    # gamma(length) of the magnitudes; relative to ||W||^2 that is at most a few gamma(n).
    mags = float((w0.double().abs() * delta64.abs()).sum())
    cross = 2 * gamma(max(d_in, d_out) + 2) * mags
    assert abs(stats.ref_sq - float((w0.double() ** 2).sum())) <= norm_rel(n) * float((w0.double() ** 2).sum())
    assert abs(stats.cur_sq - float((w**2).sum())) <= norm_rel(n) * float((w0.double() ** 2).sum()) + cross
    assert stats.delta_sq == float(lr.norm_sq())
    # Extremes: exact to float64 rounding (LowRank.merged_extremes), so within the float64 merge bound
    # of both sides (ours and the reference), an absolute bound: an element near a cancellation has a
    # relative error as large as the operands allow. A float32 merge's bound is ~1e9 x larger, and a
    # relative check on its min |w| depends on the machine's matmul kernel.
    merge = 2 * lowrank_merge_abs(w0, a, b, scale, u=U64)
    assert lowrank_merge_abs(w0, a, b, scale, u=U32) > 1e-3 * float(w.abs().min())
    assert abs(stats.max_abs - float(w.abs().max())) <= merge
    assert abs(stats.min_abs - float(w.abs().min())) <= merge

    # With a base_layer copy C that moved away from W0: W - W0 = (C - W0) + delta.
    c = w0 + 0.1 * torch.randn(w0.shape, generator=g)
    framed = TensorStats()
    lowrank_stats(iter([(0, c[:5], w0[:5]), (5, c[5:], w0[5:])]), lr, framed)
    moved = c.double() + delta64
    diff_sq = float(((c - w0).double() ** 2).sum())
    cross_c = 2 * gamma(max(d_in, d_out) + 2) * float((c.double().abs() * delta64.abs()).sum())
    cross_d = 2 * gamma(max(d_in, d_out) + 2) * float(((c - w0).double().abs() * delta64.abs()).sum())
    assert abs(framed.delta_sq - float(((moved - w0.double()) ** 2).sum())) <= norm_rel(n) * diff_sq + cross_d
    assert abs(framed.cur_sq - float((moved**2).sum())) <= norm_rel(n) * float((c.double() ** 2).sum()) + cross_c


@pytest.mark.parametrize("transposed", [False, True])
def test_lowrank_extremes_are_exact_where_float32_cancels(transposed: bool) -> None:
    # W0 is minus the delta rounded to float32, so every merged element is a rounding residue (~1e-8 of
    # operands ~1), the case where a float32 merge gets the smallest |w| wrong by up to 100%. One element
    # is pulled to a clear maximum.
    g = torch.Generator().manual_seed(5)
    d_out, d_in, r, scale = 40, 24, 4, 0.75
    a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    delta64 = scale * (b.double() @ a.double())
    if transposed:
        delta64 = delta64.T
    w0 = (-delta64).float()
    w0[3, 5] += 0.5
    lr = LowRank(a, b, scale, transposed)
    w = w0.double() + delta64
    stats = TensorStats()
    lowrank_stats(iter([(0, w0[:9], None), (9, w0[9:], None)]), lr, stats)
    bound = 2 * lowrank_merge_abs(w0, a, b, scale, u=U64)
    nonzero = w.abs()[w != 0]
    assert abs(stats.min_abs - float(nonzero.min())) <= bound
    assert abs(stats.max_abs - float(w.abs().max())) <= bound
    # Float32 alone is far off here (relative to the smallest element), which is why it is not used.
    merged32 = torch.cat([lr.merged32(0, w0[:9]), lr.merged32(9, w0[9:])]).double().abs()
    assert abs(float(merged32[merged32 > 0].min()) - float(nonzero.min())) > 100 * bound


def _analysis(drifts: list[float], max_abs: float = 1.0, min_abs: float = 1e-6) -> Analysis:
    rows = [LayerResult("-1", 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1e-3, 10)]
    rows += [LayerResult(str(i), 2.0, 2.0, 2 * d, d, 2.0, max_abs if i == 1 else 1.0, min_abs if i == 2 else 1e-3, 10)
             for i, d in enumerate(drifts)]
    rows.append(LayerResult("final", 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1e-3, 10))
    return Analysis("base", "checkpoint-8", 8, False, tuple(rows), len(drifts), 90, 0.1, 0, 0.0)


def test_pattern_uses_top_and_bottom_quarters_and_the_seed_ratio() -> None:
    # 8 blocks: quarters are blocks 0-1 and 6-7.
    top = report.drift_summary(_analysis([0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.16, 0.16]))
    assert (top.bottom_avg, top.top_avg, top.pattern) == (0.1, 0.16, "top_heavy")
    assert report.drift_summary(_analysis([0.1, 0.1, 0, 0, 0, 0, 0.15, 0.15])).pattern == "uniform"
    assert report.drift_summary(_analysis([0.31, 0.31, 0, 0, 0, 0, 0.2, 0.2])).pattern == "bottom_heavy"
    summary = report.drift_summary(_analysis([0.2, 0.4, 0.1]))
    assert (summary.max_layer, summary.max_value, summary.min_layer, summary.min_value) == (1, 0.4, 2, 0.1)
    assert summary.avg == pytest.approx(0.7 / 3)


@pytest.mark.parametrize(
    ("max_abs", "min_abs", "expected", "health"),
    [
        (100.0, 1e-10, [], "healthy"),
        (120.0, 1e-6, [("exploding", "warning", 100.0)], "warning"),
        (150.5, 1e-6, [("exploding", "critical", 150.0)], "critical"),
        (1.0, 5e-11, [("vanishing", "warning", 1e-10)], "warning"),
        (1.0, 5e-13, [("vanishing", "critical", 1e-12)], "critical"),
        (1.0, 0.0, [], "healthy"),  # 0 means no non-zero weight, not a vanishing one
    ],
)
def test_stability_alerts_follow_the_seed_thresholds(
    max_abs: float, min_abs: float, expected: list[tuple[str, str, float]], health: str
) -> None:
    analysis = _analysis([0.1, 0.1, 0.1], max_abs=max_abs, min_abs=min_abs)
    found = report.alerts(analysis)
    assert [(a.type, a.severity, a.threshold) for a in found] == expected
    assert all(a.layer == (1 if a.type == "exploding" else 2) for a in found)
    doc = report.parameter_stability_document(analysis)
    assert doc["summary"]["health_status"] == health
    assert doc["summary"]["total_alerts"] == len(expected)
    # The layer after the blocks is listed with the next index; embeddings keep -1.
    assert [x["layer_idx"] for x in doc["layers"]] == [-1, 0, 1, 2, 3]
