"""Dataset drift: reference vs rolling profile on real token batches, directly and through a model's forward hook."""

from __future__ import annotations

import math
import random
from typing import Any

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


def monitored_model(run_id: str, **drift: Any) -> tuple[GPT2LMHeadModel, TrainingMonitor]:
    """A tiny GPT-2 watched by a monitor with these drift settings (``drift_window`` etc.)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=EOS))
    mon = TrainingMonitor(ExporterConfig(gpu=False, host=False, **drift), run_id=run_id)
    mon.watch(model)
    return model, mon


def test_forward_hook_of_a_monitored_model() -> None:
    model, mon = monitored_model("drift", drift_window=6, drift_reference_batches=6, drift_top_k=10,
                                 drift_sample_every=1)
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
    model, mon = monitored_model("sampled", drift_window=2, drift_reference_batches=2, drift_sample_every=3)
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


# ------------------------------------------------------------ packed (padding-free) rows


def packed(seqs: list[list[int]], *, pad: int = 0) -> dict[str, torch.Tensor]:
    """One padding-free row as TRL's collator builds it: the sequences back to back, position ids restarting
    at 0 for each, no attention mask; ``pad`` trailing slots (pad_to_multiple_of) have position id 0."""
    ids = [tok for s in seqs for tok in s] + [0] * pad
    positions = [i for s in seqs for i in range(len(s))] + [0] * pad
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}


def padded(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """The same sequences as a right-padded batch with an attention mask."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sequences(rng: random.Random, lengths: list[int], eos: list[bool]) -> list[list[int]]:
    return [[*(rng.randint(3, 30) for _ in range(n - 1)), EOS if end else rng.randint(3, 30)]
            for n, end in zip(lengths, eos, strict=True)]


def counts(p: DriftProfiler, b: dict[str, torch.Tensor]) -> list[int]:
    batch = p._batch(b["input_ids"], b.get("attention_mask"), b.get("position_ids"))
    return [int(x) for x in p._counts(batch, with_tokens=True)]


def observe(p: DriftProfiler, b: dict[str, torch.Tensor]) -> None:
    p.observe(b["input_ids"], b.get("attention_mask"), position_ids=b.get("position_ids"))


def length_bin(n: int) -> int:
    return sum(edge <= n for edge in LENGTH_EDGES)


NB = len(LENGTH_EDGES) + 1
SEQ = slice(0, NB)
PAD = slice(NB, NB + 2)
TRUNC = slice(NB + 2, NB + 4)


@pytest.mark.parametrize("max_length", [0, 20])
def test_packed_row_counts_each_sequence_like_a_padded_batch(max_length: int) -> None:
    rng = random.Random(10)
    lengths = [3, 20, 1, 7, 2, 40, 5]  # bins 3, 8, 1, 5, 2, 10, 4
    seqs = sequences(rng, lengths, eos=[True, False, True, False, True, True, False])
    p = profiler(max_length=max_length)
    row, rows = counts(p, packed(seqs)), counts(p, padded(seqs))
    assert row[SEQ] == rows[SEQ]
    assert row[TRUNC] == rows[TRUNC]
    expected = [0] * NB
    for n in lengths:
        expected[length_bin(n)] += 1
    assert row[SEQ] == expected
    cut = sum(n >= 20 for n in lengths) if max_length else 3  # at the limit, or without the eos
    assert row[TRUNC] == [len(lengths) - cut, cut]
    assert row[PAD] == [sum(lengths), 0]  # a padding-free row is all real tokens
    # pad_to_multiple_of: trailing slots with position id 0 are padding, not sequences of one token.
    tail = counts(p, packed(seqs, pad=6))
    assert tail[SEQ] == rows[SEQ] and tail[TRUNC] == rows[TRUNC]
    assert tail[PAD] == [sum(lengths), 6]
    # A mask, where the batch has one, decides which slots are padding.
    b = packed(seqs, pad=6)
    b["attention_mask"] = (torch.arange(b["input_ids"].shape[1]) < sum(lengths)).long().unsqueeze(0)
    assert counts(p, b) == tail


def test_packed_stream_vs_the_padded_version_of_the_same_data() -> None:
    rng = random.Random(11)
    p = profiler(window=6, reference_batches=6)
    stream = []
    for _ in range(12):
        n = rng.randint(2, 6)
        stream.append(sequences(rng, [rng.randint(2, 60) for _ in range(n)], [rng.random() < 0.7 for _ in range(n)]))
    for seqs in stream[:6]:
        observe(p, padded(seqs))
    for seqs in stream[6:]:
        observe(p, packed(seqs))
    before = p.divergences()
    assert before["sequence_length"] > 0 and before["truncation"] > 0  # different batches: not zero by chance
    for seqs in stream[:6]:  # the reference's own data, packed
        observe(p, packed(seqs, pad=3))
    js = p.divergences()
    assert js["sequence_length"] == 0.0
    assert js["truncation"] == 0.0
    assert js["token_frequency"] == 0.0  # the trailing padding is not counted as tokens


def test_packed_stream_against_an_unpacked_reference() -> None:
    rng = random.Random(12)
    p = profiler(window=2, reference_batches=2)
    for _ in range(2):  # reference: lengths 5, 5, 10, 10, all complete
        observe(p, padded(sequences(rng, [5, 10, 5, 10], [True] * 4)))
    for _ in range(2):  # packed: lengths 5, 20, 20, 20, one of them without the eos
        observe(p, packed(sequences(rng, [5, 20, 20, 20], [True, True, False, True])))

    def js(p_: list[float], q: list[float]) -> float:
        m = [(a + b) / 2 for a, b in zip(p_, q, strict=True)]
        kl = [sum(a * math.log2(a / c) for a, c in zip(x, m, strict=True) if a) for x in (p_, q)]
        return (kl[0] + kl[1]) / 2

    out = p.divergences()
    # Bins of 5, 10, 20 tokens: [4, 6), [8, 12), [16, 24).
    assert out["sequence_length"] == pytest.approx(js([0.5, 0.5, 0.0], [0.25, 0.0, 0.75]), abs=1e-12)
    assert out["sequence_length"] == pytest.approx(0.655639, abs=1e-6)
    assert out["truncation"] == pytest.approx(js([1.0, 0.0], [0.75, 0.25]), abs=1e-12)
    # Real vs padding slots: reference 30 of 40 real (each 4 x 10 batch), packed 65 of 65.
    assert out["padding_fraction"] == pytest.approx(js([0.75, 0.25], [1.0, 0.0]), abs=1e-12)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers makes them for a padded batch: from the first real token, 1 on padding."""
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("max_length", [0, 12])
def test_rows_that_are_not_packed_count_as_without_position_ids(max_length: int) -> None:
    rng = random.Random(13)
    right = batch(rng, **BASE)  # type: ignore[arg-type]
    left = batch(rng, **BASE, left_pad=True)  # type: ignore[arg-type]
    empty = batch(rng, **BASE)  # type: ignore[arg-type]
    empty["attention_mask"][3] = 0  # a row with no real token
    cases = [(b, hf_positions(b["attention_mask"])) for b in (right, left, empty)]
    ids = right["input_ids"]
    cases += [
        ({"input_ids": ids}, torch.arange(ids.shape[1]).expand_as(ids)),  # no mask, one sequence a row
        ({"input_ids": ids}, torch.arange(ids.shape[1]).unsqueeze(0)),  # one set of positions for all rows
        (right, torch.arange(ids.shape[1]).expand_as(ids)),  # arange over the padding too
        ({"input_ids": ids[0]}, torch.arange(ids.shape[1])),  # 1-D
        (right, torch.zeros(3, *ids.shape, dtype=torch.long)),  # multimodal rotary positions: ignored
    ]
    for b, positions in cases:
        plain, with_positions = profiler(max_length=max_length), profiler(max_length=max_length)
        for _ in range(40):  # the reference phase, then the window
            observe(plain, b)
            observe(with_positions, {**b, "position_ids": positions})
        assert counts(plain, b) == counts(with_positions, {**b, "position_ids": positions})
        assert plain._ref_sum is not None and with_positions._ref_sum is not None
        assert torch.equal(plain._ref_sum, with_positions._ref_sum)
        assert plain._reference_dev is not None and with_positions._reference_dev is not None
        assert torch.equal(plain._reference_dev, with_positions._reference_dev)


def test_user_reference_with_position_ids() -> None:
    rng = random.Random(14)
    lengths = [4, 30, 9, 2]
    seqs = sequences(rng, lengths, [True] * 4)
    as_lists = {k: v.tolist() for k, v in packed(seqs).items()}
    p, q = profiler(reference_batches=2), profiler(reference_batches=2)
    assert p.set_reference([as_lists, packed(seqs)]) == 2
    assert q.set_reference([padded(seqs)] * 2) == 2
    assert p._reference_dev is not None and q._reference_dev is not None
    assert p._reference_dev[SEQ].tolist() == q._reference_dev[SEQ].tolist()
    assert p._reference_dev[TRUNC].tolist() == [8, 0]


class _NoSync(torch.overrides.TorchFunctionMode):
    """Fails on a device->host read: a scalar or list out of a tensor, its truth value, or a shape that
    depends on its values."""

    SYNC = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                      "masked_select", "unique", "numpy", "argwhere"})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in self.SYNC:
            raise AssertionError(f"device->host synchronisation: {name}")
        if name in ("__getitem__", "__setitem__") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args[1:2])):
            raise AssertionError(f"boolean-mask indexing: {name}")
        return func(*args, **(kwargs or {}))


def _flat(items: tuple[object, ...]) -> list[object]:
    out: list[object] = []
    for item in items:
        out.extend(_flat(tuple(item)) if isinstance(item, (tuple, list)) else [item])
    return out


@pytest.mark.parametrize("max_length", [0, 16])
def test_the_training_path_never_reads_the_device(max_length: int) -> None:
    rng = random.Random(15)
    p = profiler(window=2, reference_batches=2, max_length=max_length)
    failures: list[BaseException] = []
    p.errors.record = lambda collector, exc, *a, **k: failures.append(exc)  # type: ignore[method-assign]
    left = batch(rng, **BASE, left_pad=True)  # type: ignore[arg-type]
    stream = [packed(sequences(rng, [3, 17, 8], [True, False, True]), pad=2),
              padded(sequences(rng, [3, 17, 8], [True, False, True])),
              {**left, "position_ids": hf_positions(left["attention_mask"])}]
    with _NoSync():
        with pytest.raises(AssertionError, match="synchronisation"):
            torch.ones(2).sum().item()  # the mode sees what it is meant to catch
        for b in stream * 2:  # the reference (and its completion), then the window
            p.observe_forward(b["input_ids"], b.get("attention_mask"), position_ids=b.get("position_ids"))
    assert failures == []
    assert set(p.divergences()) == set(FEATURES)


def test_forward_hook_splits_packed_rows() -> None:
    model, mon = monitored_model("packed", drift_window=4, drift_reference_batches=4, drift_top_k=10,
                                 drift_sample_every=1)
    rng = random.Random(16)
    stream = [sequences(rng, [rng.randint(2, 20) for _ in range(4)], [True, True, False, True]) for _ in range(4)]
    model.train()
    for seqs in stream:  # reference: padded batches
        model(**padded(seqs))
    for seqs in stream:  # the same sequences, packed: GPT-2 takes position_ids, the hook passes them on
        model(**packed(seqs))
    for feature in ("sequence_length", "truncation", "token_frequency"):
        value = mon.registry.get_sample_value("training_dataset_drift_js_divergence",
                                              {"run_id": "packed", "feature": feature})
        assert value == 0.0, feature
    assert mon.registry.get_sample_value("training_exporter_collector_errors_total",
                                         {"run_id": "packed", "collector": "drift"}) == 0.0
    mon.unwatch()
