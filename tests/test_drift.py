"""Dataset drift: reference vs rolling profile on real token batches, directly and through a model's forward hook."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor
from exporter.drift import FEATURES, LENGTH_EDGES, DriftProfiler, divergences
from exporter.errors import ErrorTracker

VOCAB = 50
EOS = 2


def batch(rng: random.Random, *, lengths: tuple[int, int], tokens: tuple[int, int], eos: bool = True,
          size: int = 8, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded (or left-padded) batch: each sequence ``lengths`` long, ids uniform in ``tokens``."""
    seqs = []
    for _ in range(size):
        n = rng.randint(*lengths)
        body = [rng.randint(*tokens) for _ in range(n - 1)]
        seqs.append([*body, EOS if eos else rng.randint(*tokens)])
    width = max(map(len, seqs))
    ids = torch.zeros(size, width, dtype=torch.long)
    mask = torch.zeros(size, width, dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left_pad else slice(0, len(s))
        ids[row, span] = torch.tensor(s)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def profiler(**kw: int) -> DriftProfiler:
    args = {"window": 40, "reference_batches": 40, "top_k": 20, "vocab_size": VOCAB, **kw}
    return DriftProfiler({"run_id": "t"}, ErrorTracker(None, {}), eos_token_ids=(EOS,), **args)


def feed(p: DriftProfiler, n: int, rng: random.Random, **kw: object) -> None:
    for _ in range(n):
        b = batch(rng, **kw)  # type: ignore[arg-type]
        p.observe(b["input_ids"], b["attention_mask"])


BASE = {"lengths": (8, 24), "tokens": (3, 30)}


def test_same_distribution_stays_near_zero() -> None:
    rng = random.Random(0)
    p = profiler()
    feed(p, 40, rng, **BASE)
    assert p.reference_ready
    assert p.divergences() == {}  # the window is not full yet
    feed(p, 39, rng, **BASE)
    assert p.divergences() == {}
    feed(p, 1, rng, **BASE)
    js = p.divergences()
    assert set(js) == set(FEATURES)
    assert all(v < 0.02 for v in js.values()), js
    assert js["truncation"] == pytest.approx(0.0)  # every sequence ends with eos on both sides


def test_shifted_stream_is_flagged_per_feature() -> None:
    rng = random.Random(1)
    p = profiler()
    feed(p, 40, rng, **BASE)
    # Longer sequences over other tokens, without the end-of-sequence token.
    feed(p, 40, rng, lengths=(40, 90), tokens=(25, 49), eos=False)
    js = p.divergences()
    assert js["sequence_length"] > 0.5, js
    assert js["token_frequency"] > 0.2, js
    assert js["truncation"] == pytest.approx(1.0)  # all complete vs all cut short: disjoint
    assert 0 <= js["padding_fraction"] < js["sequence_length"]


def test_window_rolls_back_to_the_reference_distribution() -> None:
    rng = random.Random(2)
    p = profiler()
    feed(p, 40, rng, **BASE)
    feed(p, 40, rng, lengths=(40, 90), tokens=(3, 30))
    assert p.divergences()["sequence_length"] > 0.5
    feed(p, 40, rng, **BASE)  # the window forgets the shifted batches
    assert p.divergences()["sequence_length"] < 0.02


def test_only_a_length_shift_moves_only_length_features() -> None:
    rng = random.Random(3)
    p = profiler()
    feed(p, 40, rng, **BASE)
    feed(p, 40, rng, lengths=(40, 60), tokens=(3, 30))
    js = p.divergences()
    assert js["sequence_length"] > 0.5
    assert js["token_frequency"] < 0.03  # same token distribution: a length change is not a vocabulary change
    assert js["truncation"] == pytest.approx(0.0)


def test_max_length_defines_truncation() -> None:
    rng = random.Random(4)
    p = profiler(max_length=30)
    feed(p, 40, rng, lengths=(8, 20), tokens=(3, 30))
    feed(p, 40, rng, lengths=(30, 30), tokens=(3, 30))  # every sequence at the limit
    assert p.divergences()["truncation"] == pytest.approx(1.0)


def test_left_padding_finds_the_last_real_token() -> None:
    rng = random.Random(5)
    p = profiler()
    feed(p, 40, rng, **BASE)
    feed(p, 40, rng, **BASE, left_pad=True)
    js = p.divergences()
    assert js["truncation"] == pytest.approx(0.0)
    assert js["sequence_length"] < 0.02


def test_user_reference_and_out_of_range_ids() -> None:
    rng = random.Random(6)
    p = profiler()
    used = p.set_reference(batch(rng, **BASE) for _ in range(100))  # type: ignore[arg-type]
    assert used == 40 and p.reference_ready
    ids = torch.tensor([[5, 7, VOCAB + 10, -3, EOS]])  # ids outside the vocabulary must not crash
    for _ in range(39):
        b = batch(rng, **BASE)  # type: ignore[arg-type]
        p.observe(b["input_ids"], b["attention_mask"])
    p.observe(ids)
    js = p.divergences()
    assert set(js) == set(FEATURES) and all(math.isfinite(v) for v in js.values())


def test_without_eos_or_max_length_there_is_no_truncation_feature() -> None:
    rng = random.Random(7)
    p = DriftProfiler({}, ErrorTracker(None, {}), window=5, reference_batches=5, vocab_size=None)
    feed(p, 10, rng, **BASE)
    assert set(p.divergences()) == {"sequence_length", "padding_fraction"}


def test_divergences_layout() -> None:
    nb = len(LENGTH_EDGES) + 1
    ref = [0.0] * (nb + 4 + 3)
    cur = list(ref)
    ref[3], cur[5] = 10, 10  # disjoint lengths
    ref[nb], cur[nb] = 9, 9  # same real / padding
    ref[nb + 1], cur[nb + 1] = 1, 1
    ref[nb + 2], cur[nb + 2] = 4, 4  # same truncation
    ref[nb + 4], cur[nb + 5] = 7, 7  # disjoint tokens
    js = divergences(ref, cur, nb)
    assert js == {"sequence_length": 1.0, "token_frequency": 1.0, "padding_fraction": 0.0, "truncation": 0.0}


def test_forward_hook_of_a_monitored_model() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=EOS))
    cfg = ExporterConfig(gpu=False, host=False, drift_window=6, drift_reference_batches=6, drift_top_k=10,
                         drift_sample_every=1)
    mon = TrainingMonitor(cfg, run_id="drift")
    mon.watch(model)
    rng = random.Random(8)

    def js(feature: str) -> float:
        value = mon.registry.get_sample_value("training_dataset_drift_js_divergence",
                                              {"run_id": "drift", "feature": feature})
        assert value is not None, feature
        return value

    model.train()
    for _ in range(6):
        model(**batch(rng, lengths=(6, 12), tokens=(3, 20)))
    model.eval()
    for _ in range(10):  # evaluation forwards are not training data
        model(**batch(rng, lengths=(60, 100), tokens=(30, 49)))
    model.train()
    for _ in range(6):
        model(**batch(rng, lengths=(60, 100), tokens=(30, 49), eos=False))
    assert js("sequence_length") == pytest.approx(1.0)
    # Half the reference's mass is outside its top 10 ("other"), where all the new tokens land too.
    assert js("token_frequency") > 0.3
    assert js("truncation") == pytest.approx(1.0)
    for _ in range(6):
        model(**batch(rng, lengths=(6, 12), tokens=(3, 20)))
    assert js("sequence_length") < 0.1
    assert mon.registry.get_sample_value("training_exporter_collector_errors_total",
                                         {"run_id": "drift", "collector": "drift"}) == 0.0
    mon.unwatch()


def test_every_nth_training_batch_is_profiled() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=EOS))
    cfg = ExporterConfig(gpu=False, host=False, drift_window=2, drift_reference_batches=2, drift_sample_every=3)
    mon = TrainingMonitor(cfg, run_id="sampled")
    mon.watch(model)
    assert mon.drift is not None
    rng = random.Random(9)
    model.train()
    # Batches 1 and 4 make the reference; 2, 3, 5 and 6 are not profiled.
    for _ in range(6):
        model(**batch(rng, lengths=(6, 12), tokens=(3, 20)))
    assert mon.drift.reference_ready
    # Batches 7 and 10 are the window: long ones, so the lengths are disjoint from the reference; the
    # short batches between them are skipped and cannot pull the divergence down.
    for i in range(4):
        long = i in (0, 3)
        model(**batch(rng, lengths=(60, 100) if long else (6, 12), tokens=(3, 20)))
    value = mon.registry.get_sample_value("training_dataset_drift_js_divergence",
                                          {"run_id": "sampled", "feature": "sequence_length"})
    assert value == pytest.approx(1.0)
    mon.unwatch()
