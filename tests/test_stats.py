"""The pure loss and logit maths of exporter.stats, against direct computations (statistics, torch)."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from exporter.stats import LossStats, label_source, logit_statistics, predictions, step_loss, token_count


def test_loss_stats_match_a_direct_computation() -> None:
    rng = random.Random(7)
    values = [2.0 + rng.gauss(0, 0.2) for _ in range(50)]
    values[10] = float("nan")
    values[20] = float("inf")
    stats = LossStats(ema_alpha=0.1, variance_window=16, window_seconds=5.0)
    accepted = [stats.observe(v, float(t)) for t, v in enumerate(values)]
    finite = [v for v in values if math.isfinite(v)]
    assert accepted == [math.isfinite(v) for v in values]
    ema = finite[0]
    for v in finite[1:]:
        ema = 0.1 * v + 0.9 * ema
    # The same recurrence in the same order: equal to the last bit.
    assert stats.ema == ema
    variance = stats.variance()
    assert variance is not None
    # Two-pass variance of 16 values near 2: relative rounding error a few ulps times n.
    assert variance == pytest.approx(statistics.variance(finite[-16:]), rel=64 * 2**-52)


def test_recent_max_and_spike_ratio_keep_a_window_of_time() -> None:
    stats = LossStats(ema_alpha=0.5, variance_window=8, window_seconds=10.0)
    for t, v in [(0.0, 1.0), (1.0, 1.0), (2.0, 3.0), (3.0, 1.0)]:
        stats.observe(v, t)
    # The spike at t=2 was 3x the EMA (1.0) before it.
    assert stats.recent_max(now=5.0) == (3.0, 3.0)
    # At t=12.5 only the step at t=3 is within 10 s; its ratio is 1 / EMA(2.0) before it.
    assert stats.recent_max(now=12.5) == (1.0, 0.5)
    assert stats.recent_max(now=100.0) is None
    assert LossStats(0.5, 8, 10.0).variance() is None


def test_step_loss_weights_micro_batches_by_their_tokens() -> None:
    labels_a = torch.tensor([[5, 6, 7, -100]])  # shifted: positions 1.. count -> 2 tokens (6, 7)
    labels_b = torch.tensor([[1, 2, 3, 4, 5, 6]])  # 5 tokens
    module = torch.nn.Linear(1, 1)
    a = label_source(module, {}, {"labels": labels_a})
    b = label_source(module, {}, {"labels": labels_b})
    assert int(token_count(a)) == 2 and int(token_count(b)) == 5  # type: ignore[arg-type]
    loss = step_loss([(torch.tensor(1.0), a, None), (torch.tensor(3.0), b, None)])
    assert float(loss) == pytest.approx((1.0 * 2 + 3.0 * 5) / 7, rel=4 * 2**-52)
    # A loss divided by num_items_in_batch (7 tokens of the whole step) times 7 is its token sum.
    f64 = torch.float64
    scaled = step_loss([(torch.tensor(2 / 7, dtype=f64), a, 7), (torch.tensor(15 / 7, dtype=f64), b, 7)])
    assert float(scaled) == pytest.approx(17 / 7, rel=8 * 2**-52)
    # No labels: the plain mean.
    assert float(step_loss([(torch.tensor(1.0), None, None), (torch.tensor(2.0), None, None)])) == 1.5


def test_logit_statistics_equal_the_direct_entropy_and_confidence() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float32) * 3
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 4:] = -100
    means = predictions(logit_statistics(logits, labels, None).tolist())
    assert means is not None
    # Position t predicts label t+1: keep positions whose next label is not -100.
    keep = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1)).reshape(-1)
    rows = logits.reshape(-1, 11)[keep].double()
    p = torch.softmax(rows, -1)
    entropy = float(-(p * torch.log_softmax(rows, -1)).sum(-1).mean())
    top1 = float(p.max(-1).values.mean())
    top5 = float(p.topk(5, -1).values.sum(-1).mean())
    # float32 softmax over 11 logits: each term is off by a few float32 ulps.
    tol = 64 * 2**-23
    assert means.entropy == pytest.approx(entropy, rel=tol)
    assert means.top1 == pytest.approx(top1, rel=tol)
    assert means.top5 == pytest.approx(top5, rel=tol)
    assert predictions([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]) is None
