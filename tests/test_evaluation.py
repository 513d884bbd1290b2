"""Metric maths of the fixed evaluation and of drift, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from exporter.evaluation.scoring import (
    answer_token_stats,
    classify,
    exact_match,
    expected_calibration_error,
    js_divergence,
    length_bucket,
    normalize,
    normalized_match,
)


@pytest.mark.parametrize(
    ("answer", "golden", "exact", "normalized"),
    [
        ("42", "42", True, True),
        ("42\n", "42", True, True),  # surrounding whitespace is not a different answer
        (" 42 ", "42", True, True),
        ("4 2", "42", False, False),  # inner whitespace is
        ("Socrates is mortal.", "Socrates is mortal", False, True),
        ("SOCRATES   is\tmortal", "Socrates is mortal", False, True),
        ("Socrates is immortal", "Socrates is mortal", False, False),
        ("", "", True, True),
        ("", "42", False, False),
        ("...", "", False, True),  # punctuation only folds to nothing
        ("ﬁne", "fine", False, True),  # NFKC ligature
        ("Straße", "STRASSE", False, True),  # casefold, not lower
    ],
)
def test_exact_and_normalized_match(answer: str, golden: str, exact: bool, normalized: bool) -> None:
    assert exact_match(answer, golden) is exact
    assert normalized_match(answer, golden) is normalized


def test_normalize() -> None:
    assert normalize("  Hello,   World!  ") == "hello world"
    assert normalize("a-b") == "a b"


@pytest.mark.parametrize(
    ("answer", "golden", "truncated", "contract", "expected"),
    [
        ("13", "13", False, {"digits_only": True}, "correct"),
        ("13", "13", True, None, "correct"),  # right is right, even at the bound
        ("", "13", False, None, "empty"),
        ("  ", "13", True, None, "empty"),
        ("1313131", "13", True, {"digits_only": True}, "truncated"),
        ("1+3", "13", True, {"digits_only": False}, "truncated"),  # truncation explains the rest
        ("1+3", "13", False, {"digits_only": False}, "wrong_format"),
        ("Thirteen.", "thirteen", False, None, "wrong_format"),  # right content, wrong form
        ("14", "13", False, {"digits_only": True}, "wrong_content"),
        ("14", "13", False, None, "wrong_content"),
        ("14", "13", False, {}, "wrong_content"),
    ],
)
def test_classify(answer: str, golden: str, truncated: bool, contract: dict[str, bool] | None,
                  expected: str) -> None:
    assert classify(answer, golden, truncated=truncated, contract=contract) == expected


def test_length_buckets() -> None:
    assert [length_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 256, 257, 10_000)] == [
        "0-2", "0-2", "0-2", "3-4", "3-4", "5-8", "5-8", "9-16", "129-256", "257+", "257+"]


def test_ece_hand_computed() -> None:
    # 15 bins of width 1/15: 0.95 -> bin 14, 0.5 -> bin 7, 0.1 -> bin 1.
    # bin 14: accuracy 1/2, confidence 0.95 -> 2/4 * 0.45 = 0.225
    # bin 7:  accuracy 1,   confidence 0.5  -> 1/4 * 0.5  = 0.125
    # bin 1:  accuracy 0,   confidence 0.1  -> 1/4 * 0.1  = 0.025
    assert expected_calibration_error([0.95, 0.95, 0.5, 0.1], [True, False, True, False]) == pytest.approx(0.375)


def test_ece_edges() -> None:
    assert expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)  # 1.0 is in the last bin
    assert expected_calibration_error([0.0, 0.0], [False, False]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0], [False]) == pytest.approx(1.0)
    # Same bin ([0.6, 0.667)): over- and under-confidence cancel inside a bin, as ECE defines.
    assert expected_calibration_error([0.61, 0.65], [True, False]) == pytest.approx(abs(0.5 - 0.63))
    # Different bins: they don't.
    assert expected_calibration_error([0.2, 0.9], [True, False]) == pytest.approx((0.8 + 0.9) / 2)
    assert math.isnan(expected_calibration_error([], []))
    assert math.isnan(expected_calibration_error([0.5, math.nan], [True, False]))
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 0.5], [True])


def test_ece_perfectly_calibrated_bins() -> None:
    # 10 predictions at 0.7 (bin 10), 7 of them right: no calibration error.
    conf = [0.7] * 10
    hit = [True] * 7 + [False] * 3
    assert expected_calibration_error(conf, hit) == pytest.approx(0.0, abs=1e-12)


def test_answer_token_stats_against_hand_computation() -> None:
    vocab = 6
    logits = torch.zeros(2, 4, vocab)
    # Example 0: the answer is tokens 3 and 4 at positions 2 and 3 (predicted from positions 1 and 2).
    logits[0, 1] = torch.tensor([0.0, 0.0, 0.0, math.log(5.0), 0.0, 0.0])  # p(3) = 5/10
    logits[0, 2] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, math.log(5.0)])  # argmax 5, label 4
    # Example 1: one answer token (2) at position 3; everything else is -100 (prompt or padding).
    logits[1, 2] = torch.tensor([0.0, 0.0, 100.0, 0.0, 0.0, 0.0])
    logits[0, 3] = 1e4  # never read: no label after the last position
    labels = torch.tensor([[-100, -100, 3, 4], [-100, -100, -100, 2]])
    stats = answer_token_stats(logits, labels)
    assert stats.example.tolist() == [0, 0, 1]
    assert stats.nll.tolist() == pytest.approx([math.log(2.0), math.log(10.0), 0.0], abs=1e-5)
    assert stats.confidence.tolist() == pytest.approx([0.5, 0.5, 1.0], abs=1e-5)
    assert stats.correct.tolist() == [True, False, True]
    # Top-5 of six tokens: everything but one of the 0.1s.
    assert stats.top5.tolist() == pytest.approx([0.9, 0.9, 1.0], abs=1e-5)
    h = -(0.5 * math.log(0.5) + 5 * 0.1 * math.log(0.1))
    assert stats.entropy.tolist() == pytest.approx([h, h, 0.0], abs=1e-5)


def test_answer_token_stats_cross_entropy_equals_the_model_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100
    labels[2, 5:] = -100
    stats = answer_token_stats(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert float(stats.nll.mean()) == pytest.approx(float(expected), rel=1e-6)
    assert int(stats.example.numel()) == int((labels[:, 1:] != -100).sum())


def test_answer_token_stats_without_answer_tokens() -> None:
    stats = answer_token_stats(torch.zeros(1, 3, 4), torch.full((1, 3), -100))
    assert stats.nll.numel() == 0


def test_js_divergence_known_values() -> None:
    assert js_divergence([1, 2, 3], [1, 2, 3]) == pytest.approx(0.0)
    assert js_divergence([1, 2, 3], [10, 20, 30]) == pytest.approx(0.0)  # counts need no normalising
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    assert js_divergence([5, 5, 0, 0], [0, 0, 3, 7]) == pytest.approx(1.0)
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4):
    # KL(P||M) = log2(4/3); KL(Q||M) = 1/2 log2(2/3) + 1/2 log2(2); JS = their mean.
    expected = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert js_divergence([1, 0], [1, 1]) == pytest.approx(expected)
    assert expected == pytest.approx(0.3113, abs=1e-4)
    assert js_divergence([1, 1], [1, 0]) == pytest.approx(expected)  # symmetric


def test_js_divergence_empty_and_bad_input() -> None:
    assert math.isnan(js_divergence([0, 0], [1, 1]))
    assert math.isnan(js_divergence([1, 1], [0, 0]))
    assert math.isnan(js_divergence([], []))
    with pytest.raises(ValueError):
        js_divergence([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        js_divergence([1, -1], [1, 1])
    with pytest.raises(ValueError):
        js_divergence([1, math.nan], [1, 1])
