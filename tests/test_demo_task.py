"""Tests for the synthetic demo task: data pipeline, model, and fault injection."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from exporter.demo.faults import FaultSpec, parse_fault
from exporter.demo.injector import FaultInjector
from exporter.demo.task import (
    IGNORE_INDEX,
    ArithmeticDataset,
    CharTokenizer,
    DataCollator,
    build_model,
    collate,
    greedy_answer,
    make_examples,
    make_training_args,
)


def _trainer(model: nn.Module, tmp_path: Path, max_steps: int, dataset: ArithmeticDataset, **overrides: Any) -> Trainer:
    args = make_training_args(str(tmp_path), max_steps, save_strategy="no", disable_tqdm=True, **overrides)
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator(dataset.tokenizer.pad_token_id),
        callbacks=[],
    )


# --- tokenizer and data ------------------------------------------------------


def test_tokenizer_round_trip_and_specials() -> None:
    tok = CharTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size == 15
    text = "0123456789+="
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert min(ids) >= 3 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *tok.encode("12+3="), tok.eos_token_id, tok.pad_token_id]) == "12+3="
    assert tok.decode(torch.tensor(tok.encode("42"))) == "42"
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("1-2")
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode([99])


def test_make_examples_is_deterministic_and_correct() -> None:
    examples = make_examples(50, seed=7)
    assert examples == make_examples(50, seed=7)
    assert examples != make_examples(50, seed=8)
    for prompt, answer in examples:
        assert len(prompt) == 6 and prompt[2] == "+" and prompt.endswith("=")
        a, b = prompt[:-1].split("+")
        assert int(answer) == int(a) + int(b)
        assert answer == str(int(answer))  # no leading zeros
    assert all(len(p) == 8 for p, _ in make_examples(5, seed=0, digits=3))
    with pytest.raises(ValueError):
        make_examples(1, seed=0, digits=0)


def test_dataset_masks_prompt_and_appends_eos() -> None:
    tok = CharTokenizer()
    ds = ArithmeticDataset(20, seed=3, tokenizer=tok)
    assert len(ds) == 20
    lengths = set()
    for i in range(len(ds)):
        prompt, answer = ds.examples[i]
        item = ds[i]
        ids, mask, labels = item["input_ids"], item["attention_mask"], item["labels"]
        n_ctx = 1 + len(prompt)
        assert ids == [tok.bos_token_id, *tok.encode(prompt + answer), tok.eos_token_id]
        assert mask == [1] * len(ids)
        assert labels[:n_ctx] == [IGNORE_INDEX] * n_ctx
        assert labels[n_ctx:] == ids[n_ctx:]
        assert tok.decode(labels[n_ctx:]) == answer
        lengths.add(len(ids))
    assert len(lengths) > 1, "answers of different lengths are what gives batches padding"


def test_collate_right_pads_exactly() -> None:
    batch = [
        {"input_ids": [1, 4, 13, 5, 14, 6, 2], "attention_mask": [1] * 7, "labels": [-100] * 5 + [6, 2]},
        {"input_ids": [1, 12, 13, 12, 14, 4, 11, 2], "attention_mask": [1] * 8, "labels": [-100] * 5 + [4, 11, 2]},
    ]
    out = collate(batch, pad_token_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in out.values())
    assert torch.equal(out["input_ids"], torch.tensor([[1, 4, 13, 5, 14, 6, 2, 0], [1, 12, 13, 12, 14, 4, 11, 2]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]]))
    assert torch.equal(
        out["labels"],
        torch.tensor([[-100, -100, -100, -100, -100, 6, 2, -100], [-100, -100, -100, -100, -100, 4, 11, 2]]),
    )
    # The inputs are not modified, and the collator object does the same.
    assert batch[0]["input_ids"] == [1, 4, 13, 5, 14, 6, 2]
    again = DataCollator(0)(batch)
    assert all(torch.equal(again[k], out[k]) for k in out)


def test_realistic_batches_contain_padding() -> None:
    ds = ArithmeticDataset(64, seed=0)
    out = collate([ds[i] for i in range(len(ds))])
    assert int(out["attention_mask"].sum()) < out["attention_mask"].numel()
    assert bool((out["labels"][out["attention_mask"] == 0] == IGNORE_INDEX).all())


# --- model -------------------------------------------------------------------


def test_build_model_is_seeded_and_lora_wrapped() -> None:
    tok = CharTokenizer()
    rng_before = torch.random.get_rng_state()
    a = build_model(tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "must not disturb the caller's RNG"
    b = build_model(tok, seed=3)
    c = build_model(tok, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)

    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert any(".wte." in n for n in trainable), "the token embedding is trained"
    frozen = [n for n, p in a.named_parameters() if not p.requires_grad and "lora" not in n]
    assert any("c_attn.base_layer" in n for n in frozen)
    base = build_model(tok, lora=False)
    assert all(p.requires_grad for p in base.parameters())

    # Only the answer positions carry loss, so a forward pass gives a finite scalar loss.
    batch = collate([ArithmeticDataset(4, seed=0)[i] for i in range(4)])
    loss = a(**batch).loss
    assert loss.dim() == 0 and torch.isfinite(loss)


# --- fault specs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nan@50", FaultSpec("nan", 50)),
        ("spike@80", FaultSpec("spike", 80)),
        ("spike@80x20", FaultSpec("spike", 80, 20.0)),
        (" NaN@1 ", FaultSpec("nan", 1)),
    ],
)
def test_parse_fault_accepts(spec: str, expected: FaultSpec) -> None:
    assert parse_fault(spec) == expected


@pytest.mark.parametrize(
    "spec", ["boom@3", "nan@x", "nan@-1", "nan@0", "nan", "@5", "nan@5x2", "spike@5x0", "spike@5xabc", "nan@5@6", ""]
)
def test_parse_fault_rejects_with_one_line_message(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_fault(spec)
    message = str(info.value)
    assert message and "\n" not in message


def test_injector_rejects_bad_specs_and_duplicate_steps() -> None:
    with pytest.raises(ValueError):
        FaultInjector(["boom@3"])
    with pytest.raises(ValueError, match="step 4"):
        FaultInjector(["nan@4", "spike@4"])


def test_spike_scales_loss_only_in_training_at_its_step() -> None:
    tok = CharTokenizer()
    model = build_model(tok)
    batch = collate([ArithmeticDataset(8, seed=1)[i] for i in range(8)])
    injector = FaultInjector(["spike@3", "spike@4x2"]).attach(model)
    model.train()
    with torch.no_grad():
        clean = model(**batch).loss
        injector.set_step(3)
        spiked = model(**batch).loss
        injector.set_step(4)
        custom = model(**batch).loss
        model.eval()
        injector.set_step(3)
        evaluated = model(**batch).loss
        model.train()
        injector.detach()
        detached = model(**batch).loss
    assert torch.allclose(spiked, clean * 8.0)
    assert torch.allclose(custom, clean * 2.0)
    assert torch.allclose(evaluated, clean)
    assert torch.allclose(detached, clean)
    assert injector.injected == [(3, "spike"), (4, "spike")]


# --- real Trainer runs -------------------------------------------------------


def test_trainer_run_loss_falls(tmp_path: Path) -> None:
    tok = CharTokenizer()
    # One-digit operands: the tiny model learns these within 150 steps, while
    # two-digit sums take thousands (the demo runs long enough for those).
    dataset = ArithmeticDataset(2400, seed=0, digits=1, tokenizer=tok)
    model = build_model(tok, lora=True, seed=0)
    trainer = _trainer(model, tmp_path, 150, dataset, seed=0)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 15
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    # Learned sums, not just the answer format: the untrained model gets none
    # of the 100 problems right and the best prompt-blind guess ("9") gets 10;
    # this run gets 20-45 depending on the seed.
    problems = [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    assert sum(greedy_answer(model, tok, p) == a for p, a in problems) >= 15


class _StepTracker(TrainerCallback):
    def __init__(self) -> None:
        self.step = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step + 1


@pytest.mark.parametrize("accumulation", [1, 2])
def test_nan_fault_hits_one_step_and_training_survives(tmp_path: Path, accumulation: int) -> None:
    tok = CharTokenizer()
    dataset = ArithmeticDataset(400, seed=0, tokenizer=tok)
    model = build_model(tok, seed=0)
    injector = FaultInjector(["nan@5"]).attach(model)

    # Registered after attach, so it sees the loss the injector produced.
    tracker = _StepTracker()
    seen: list[tuple[int, float]] = []

    def capture(module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            seen.append((tracker.step, float(output.loss.detach())))

    model.register_forward_hook(capture)
    trainer = _trainer(model, tmp_path, 10, dataset, gradient_accumulation_steps=accumulation)
    trainer.add_callback(tracker)
    trainer.add_callback(injector)
    trainer.train()

    steps = [step for step, _ in seen]
    assert steps == [s for s in range(1, 11) for _ in range(accumulation)]
    at_fault = [loss for step, loss in seen if step == 5]
    assert len(at_fault) == accumulation and all(math.isnan(x) for x in at_fault)
    assert all(math.isfinite(loss) for step, loss in seen if step != 5), seen
    assert injector.injected == [(5, "nan")] * accumulation
    assert all(torch.isfinite(p).all() for p in model.parameters())
