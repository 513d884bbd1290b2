"""The exporter's numbers on the trainers people use: TRL's SFTTrainer (LoRA, gradient accumulation, packing),
the plain transformers Trainer, resumed runs, early stopping, and a plain loop with non-finite gradients.

Every expected value is computed independently of the exporter, by tests/support/trl_support.Recorder from the
micro-batches the model actually saw (a float64 cross-entropy of the logits, or TRL's fused-head
``log_probs`` / ``label_mask``), or from the trainer's own state.

Tolerances:
  * LOSS_REL = 1e-4 relative. The exporter's loss is float32 arithmetic (a float32 cross-entropy, or TRL's
    float32 ``log_probs`` summed in float32, then divided); the reference is the float64 sum of the same
    float32 per-token terms. A float32 sum of n <= 300 terms is within n * 2**-24 ~ 2e-5 relative of the
    exact one (every term has the same sign), so 1e-4 holds on any kernel; the aggregation mistakes these
    tests look for (mean of micro-batch means, a world-size scale) move the value by 1e-3 or more here, which
    each test checks on its own data (``assert_discriminates``).
  * PRED_REL = 1e-4 relative for entropy / confidences: the reference logits come from the model's unfused
    forward, the exporter's from whatever the trainer ran (TRL's chunked fused head); both are float32
    matmuls of the same float32 hidden states over a 32-wide hidden size (each logit within ~32 * 2**-24
    relative), followed by a float32 softmax over 64 entries: all far below 1e-4, while a wrong position set
    (unshifted labels, padding or sequence starts included) changes a mean over ~30-90 positions by >1e-2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from support.trl_support import (
    MODELS,
    PadCollator,
    Recorder,
    Step,
    TokenizedList,
    exported,
    lora_config,
    make_tokenizer,
    predictions_of,
    rel_diff,
    sft_config,
    text_dataset,
    tiny_llama,
    training_args,
)
from transformers import TrainerCallback

from exporter import PrometheusCallback
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor

trl = pytest.importorskip("trl")

LOSS_REL = 1e-4
PRED_REL = 1e-4
MAX_STEPS = 4
QUIET: dict[str, Any] = {"gpu": False, "host": False}


def exporter_callback(run_id: str, **settings: Any) -> PrometheusCallback:
    # A whole ExporterConfig: neither the environment nor a config file of the machine running the tests applies.
    return PrometheusCallback(ExporterConfig(listen_address="127.0.0.1:0", run_id=run_id, **QUIET, **settings))


def series(cb: PrometheusCallback, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one series on the exporter's registry (collecting flushes pending values)."""
    assert cb.monitor is not None
    return [(dict(s.labels), s.value) for fam in cb.monitor.registry.collect() for s in fam.samples if s.name == name]


def collector_errors(cb: PrometheusCallback) -> dict[str, float]:
    """The exporter's non-zero training_exporter_collector_errors_total, by collector (a failed hook loses data)."""
    return {lab["collector"]: v for lab, v in series(cb, "training_exporter_collector_errors_total") if v}


def assert_discriminates(steps: list[Step], rel: float) -> None:
    """Harness check: on this data a mean of micro-batch means differs from the token-weighted mean by > 10 rel
    on some step, so a test within ``rel`` can tell them apart."""
    gaps = [rel_diff(s.micro_mean, s.loss) for s in steps if len(s.micro) > 1]
    assert gaps and max(gaps) > 10 * rel, gaps


def loss_table(steps: list[Step]) -> list[tuple[int, float | None, float]]:
    return [(s.step, s.exported.get("training_loss"), s.loss) for s in steps]


# --------------------------------------------------------------------------- SFTTrainer + LoRA

SFT_MODES: dict[str, dict[str, Any]] = {
    # Right-padded rows, three micro-batches of different token counts per optimizer step.
    "ga3": {"gradient_accumulation_steps": 3},
    # Padding-free packed rows (TRL's bfd packing): one row of several sequences whose position_ids restart at 0.
    "packed": {"gradient_accumulation_steps": 2, "packing": True},
}
# Sequences of 12-46 tokens in bins of 48: bins hold one to three sequences and their token counts differ
# (with shorter sequences the bins fill to ~46 tokens each and micro-batches weigh the same).
SFT_DATA: dict[str, dict[str, int]] = {"ga3": {}, "packed": {"min_chars": 10, "max_chars": 44}}


def run_sft(out: Path, arch: str, mode: str, steps: int = MAX_STEPS) -> dict[str, Any]:
    from trl import SFTTrainer

    tok = make_tokenizer()
    cb = exporter_callback(f"sft-{arch}-{mode}")
    rec = Recorder(cb)
    trainer = SFTTrainer(
        model=MODELS[arch](tok),
        args=sft_config(str(out / f"sft-{arch}-{mode}"), steps, **SFT_MODES[mode]),
        train_dataset=text_dataset(**SFT_DATA[mode]),
        processing_class=tok,
        peft_config=lora_config(),
        callbacks=[cb, rec],  # the recorder reads the registry after the exporter's on_step_end
    )
    trainer.train()
    assert trainer.state.global_step == steps
    assert len(rec.steps) == steps
    return {"trainer": trainer, "cb": cb, "rec": rec}


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    def get(arch: str, mode: str) -> dict[str, Any]:
        if (arch, mode) not in cache:
            cache[arch, mode] = run_sft(tmp_path_factory.mktemp("sft"), arch, mode)
        return cache[arch, mode]

    return get


SFT_MATRIX = [(arch, mode) for arch in MODELS for mode in SFT_MODES]


@pytest.mark.parametrize(("arch", "mode"), SFT_MATRIX)
def test_sft_step_loss_is_the_token_weighted_mean(sft_runs: Any, arch: str, mode: str) -> None:
    rec: Recorder = sft_runs(arch, mode)["rec"]
    steps = rec.steps
    # The fused head (log_probs / label_mask, no logits) is what the model returned.
    assert {m.source for s in steps for m in s.micro} == {"fused"}
    assert all(len(s.micro) == SFT_MODES[mode]["gradient_accumulation_steps"] for s in steps)
    assert_discriminates(steps, LOSS_REL)
    bad = [(n, got, want) for n, got, want in loss_table(steps) if rel_diff(got, want) > LOSS_REL]
    assert not bad, f"(step, exported training_loss, token-weighted truth): {bad}"


@pytest.mark.parametrize(("arch", "mode"), SFT_MATRIX)
def test_sft_samples_are_the_sequences_seen(sft_runs: Any, arch: str, mode: str) -> None:
    steps: list[Step] = sft_runs(arch, mode)["rec"].steps
    if mode == "packed":
        # The harness sees packed rows: fewer rows than sequences.
        assert sum(m.rows for s in steps for m in s.micro) < sum(s.sequences for s in steps)
    truth = [sum(s.sequences for s in steps[: i + 1]) for i in range(len(steps))]
    got = [s.exported["training_samples_total"] for s in steps]
    assert got == truth, f"exported cumulative samples {got}, sequences seen {truth}"


@pytest.mark.parametrize(("arch", "mode"), SFT_MATRIX)
def test_sft_tokens_are_the_non_padding_tokens_seen(sft_runs: Any, arch: str, mode: str) -> None:
    steps: list[Step] = sft_runs(arch, mode)["rec"].steps
    if mode == "ga3":
        # Right-padded: the harness counts fewer tokens than positions.
        assert sum(s.tokens for s in steps) < sum(m.inputs["input_ids"].numel() for s in steps for m in s.micro)
    truth = [sum(s.tokens for s in steps[: i + 1]) for i in range(len(steps))]
    got = [s.exported["training_tokens_total"] for s in steps]
    assert got == truth, f"exported cumulative tokens {got}, non-padding tokens seen {truth}"


@pytest.mark.parametrize(("arch", "mode"), SFT_MATRIX)
def test_sft_no_collector_failed(sft_runs: Any, arch: str, mode: str) -> None:
    # A failing hook drops the rest of that micro-batch's observations (tokens, drift, predictions).
    assert collector_errors(sft_runs(arch, mode)["cb"]) == {}


PREDICTIONS = ("training_token_entropy_nats", "training_top1_confidence_ratio", "training_top5_confidence_ratio")


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_sft_entropy_and_confidence_match_a_direct_computation(tmp_path: Path, mode: str) -> None:
    # One micro-batch per step: the sampled forward is the last step's only one. float32 throughout: SFTConfig
    # defaults to bf16=True (autocast, on the CPU too), and a bf16 forward's logits carry ~2**-8 relative error,
    # too coarse to compare a statistic at 1e-4 (the loss tests keep the default: they compare sums of the very
    # log_probs the forward returned, whatever their precision).
    sft_mode = "ga3" if mode == "padded" else "packed"
    one_micro = {**SFT_MODES[sft_mode], "gradient_accumulation_steps": 1, "bf16": False}
    from trl import SFTTrainer

    tok = make_tokenizer()
    cb = exporter_callback(f"pred-{mode}", predictions_interval=1, min_sample_period_seconds=0)
    rec = Recorder(cb, snapshot=True)
    trainer = SFTTrainer(
        model=tiny_llama(tok), args=sft_config(str(tmp_path / mode), 3, **one_micro),
        train_dataset=text_dataset(**SFT_DATA[sft_mode]), processing_class=tok, peft_config=lora_config(),
        callbacks=[cb, rec],
    )  # fmt: skip
    trainer.train()
    last = rec.steps[-1]
    assert len(last.micro) == 1
    micro = last.micro[0]
    logits = rec.logits_of(micro)
    truth = predictions_of(logits, micro.inputs["labels"])
    assert truth["positions"] == micro.count  # the same label positions as TRL's label_mask
    # Harness check: the recomputed logits give back TRL's own per-token NLL of that forward.
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].double().reshape(-1, logits.shape[-1]), micro.inputs["labels"][:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum",
    )  # fmt: skip
    assert float(nll) == pytest.approx(micro.nll, rel=PRED_REL)
    # ... and TRL's fused entropy of that forward.
    assert micro.entropy_sum is not None
    assert micro.entropy_sum / micro.count == pytest.approx(truth["training_token_entropy_nats"], rel=PRED_REL)

    got = {name: exported(cb, name) for name in PREDICTIONS}
    want = {name: truth[name] for name in PREDICTIONS}
    assert all(rel_diff(got[n], want[n]) <= PRED_REL for n in PREDICTIONS), (
        f"exported {got}, direct {want}; collector errors {collector_errors(cb)}")
    # The exporter's entropy against TRL's own fused entropy (mean over label_mask) of the same forward.
    assert got["training_token_entropy_nats"] == pytest.approx(micro.entropy_sum / micro.count, rel=PRED_REL)
    assert not collector_errors(cb)


# --------------------------------------------------------------------------- plain Trainer


def plain_trainer(out: Path, callbacks: list[Any], steps: int = MAX_STEPS, eval_dataset: Any = None,
                  **args: Any) -> Any:
    from transformers import Trainer

    tok = make_tokenizer()
    return Trainer(
        model=tiny_llama(tok),
        args=training_args(str(out), steps, **args),
        train_dataset=TokenizedList(tok),
        eval_dataset=eval_dataset,
        data_collator=PadCollator(tok.pad_token_id),
        callbacks=callbacks,
    )


def test_plain_trainer_gradient_accumulation_loss_samples_tokens(tmp_path: Path) -> None:
    cb = exporter_callback("plain-ga3")
    rec = Recorder(cb)
    trainer = plain_trainer(tmp_path / "plain-ga3", [cb, rec], gradient_accumulation_steps=3)
    trainer.train()
    steps = rec.steps
    assert len(steps) == MAX_STEPS and all(len(s.micro) == 3 for s in steps)
    assert {m.source for s in steps for m in s.micro} == {"logits"}
    # The Trainer normalises by the step's label tokens: num_items_in_batch reaches the model's forward.
    for s in steps:
        assert {m.num_items_in_batch for m in s.micro} == {float(sum(m.count for m in s.micro))}
    assert_discriminates(steps, LOSS_REL)
    bad = [(n, got, want) for n, got, want in loss_table(steps) if rel_diff(got, want) > LOSS_REL]
    assert not bad, f"(step, exported training_loss, token-weighted truth): {bad}"
    # The Trainer's logged loss (rounded to 4 significant digits in transformers 5) agrees with the truth too.
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([s.loss for s in steps], rel=1e-3)
    assert [s.exported["training_samples_total"] for s in steps] == [
        sum(x.sequences for x in steps[: i + 1]) for i in range(len(steps))]
    assert [s.exported["training_tokens_total"] for s in steps] == [
        sum(x.tokens for x in steps[: i + 1]) for i in range(len(steps))]
    assert not collector_errors(cb)


# --------------------------------------------------------------------------- resume

SAMPLED = ("training_layer_grad_norm", "training_layer_update_ratio", "training_token_entropy_nats")


class SeriesProbe(TrainerCallback):
    """After the exporter's on_step_end: how many samples of each sampled series the registry holds, per step."""

    def __init__(self, cb: PrometheusCallback) -> None:
        self.cb = cb
        self.seen: dict[int, dict[str, int]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.seen[state.global_step] = {name: len(series(self.cb, name)) for name in SAMPLED}


def test_resumed_run_samples_at_its_first_step(tmp_path: Path) -> None:
    out = tmp_path / "resume"
    intervals = {"layers_interval": 50, "update_ratio_interval": 50, "predictions_interval": 50,
                 "min_sample_period_seconds": 0}  # fmt: skip
    first_cb = exporter_callback("first", **intervals)
    first_probe = SeriesProbe(first_cb)
    first = plain_trainer(out, [first_cb, first_probe], save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = out / "checkpoint-2"
    assert checkpoint.is_dir()
    # Harness check: a fresh run samples at its first step (step 1) with these intervals.
    assert all(first_probe.seen[1][name] > 0 for name in SAMPLED), (
        f"a fresh run's step 1: {first_probe.seen[1]}; collector errors {collector_errors(first_cb)}")

    cb = exporter_callback("resumed", **intervals)
    probe = SeriesProbe(cb)
    resumed = plain_trainer(out, [cb, probe])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(probe.seen) == [3, 4]  # resumed at step 2: steps 3 and 4 ran
    assert exported(cb, "training_step") == MAX_STEPS
    assert all(probe.seen[3][name] > 0 for name in SAMPLED), (
        f"series count on the registry after the first resumed step (3): {probe.seen[3]}")
    assert not collector_errors(cb)


# --------------------------------------------------------------------------- early stopping


def test_early_stopped_run_ends_completed(tmp_path: Path) -> None:
    from transformers import EarlyStoppingCallback

    tok = make_tokenizer()
    cb = exporter_callback("early")
    trainer = plain_trainer(
        tmp_path / "early", [cb, EarlyStoppingCallback(early_stopping_patience=1)], steps=8,
        eval_dataset=TokenizedList(tok, n=4, seed=1), eval_strategy="steps", eval_steps=1,
        # The eval loss falls as the model learns, which with greater_is_better counts as no improvement:
        # the second evaluation stops the run.
        metric_for_best_model="eval_loss", greater_is_better=True, learning_rate=5e-2,
        # The setup EarlyStoppingCallback asks for: the best checkpoint is loaded back after the loop.
        load_best_model_at_end=True, save_strategy="steps", save_steps=1, save_total_limit=1,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step < 8, "the run should have stopped early"
    state = {s: exported(cb, "training_state", state=s) for s in ("training", "completed", "crashed")}
    assert state["completed"] == 1.0 and state["training"] == 0.0, f"training_state after train(): {state}"
    assert exported(cb, "training_step") == trainer.state.global_step
    assert not collector_errors(cb)


# --------------------------------------------------------------------------- non-finite gradients, plain loop

NAN_STEPS = {15, 20, 21}
READ_AT = {10, 20, 30}


def test_nonfinite_gradients_counted_even_between_reads() -> None:
    tok = make_tokenizer()
    model = tiny_llama(tok)
    collate = PadCollator(tok.pad_token_id)
    data = TokenizedList(tok, n=60)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cfg = ExporterConfig(layers_interval=1, min_sample_period_seconds=0, **QUIET)
    mon = TrainingMonitor(cfg, run_id="nonfinite")
    mon.watch(model)
    mon.begin(max_steps=30)
    target = model.model.layers[0].mlp.down_proj.weight
    reads: dict[int, float | None] = {}
    nonfinite_steps = 0
    for step in range(1, 31):
        mon.step_begin()
        batch = collate([data[2 * step - 2], data[2 * step - 1]])
        model(**batch).loss.backward()
        if step in NAN_STEPS:
            target.grad.mul_(float("nan"))  # type: ignore[union-attr]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        nonfinite_steps += not finite
        mon.before_optimizer_step(opt)
        if finite:  # a loop that skips non-finite updates, like GradScaler does, so the weights stay finite
            opt.step()
        mon.after_optimizer_step()
        opt.zero_grad()
        mon.step_end()
        if step in READ_AT:  # reading the registry flushes the pending values, as a scrape does
            reads[step] = mon.registry.get_sample_value("training_nonfinite_gradients_total", {"run_id": "nonfinite"})
    mon.end(linger=False)
    final = mon.registry.get_sample_value("training_nonfinite_gradients_total", {"run_id": "nonfinite"})
    assert nonfinite_steps == 3
    assert math.isfinite(float(model.model.layers[0].mlp.down_proj.weight.detach().sum()))
    expected = {10: 0.0, 20: 2.0, 30: 3.0}  # steps 15 and 20 by the read at 20, step 21 by the read at 30
    assert (reads, final) == (expected, 3.0), f"reads {reads} final {final}; expected {expected} final 3.0"


# --------------------------------------------------------------------------- a loss changed in compute_loss


def test_nonfinite_loss_from_a_custom_compute_loss_is_counted_as_gradients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented limit (docs/metrics.md, "Loss"): the loss metrics are the model's own loss; a loss that
    a subclassed compute_loss makes non-finite reaches the gradients, which are counted on every sampled step,
    and the exporter says once that the backpropagated loss is not the model's."""
    import logging
    import types

    cb = exporter_callback("custom-loss", layers_interval=1, min_sample_period_seconds=0)
    trainer = plain_trainer(tmp_path / "custom-loss", [cb], steps=3, max_grad_norm=0.0)
    original = trainer.compute_loss

    def compute_loss(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(model, inputs, *args, **kwargs)
        # The usual custom-loss pattern: a term of the trainer's own; non-finite on the last step only.
        return loss * float("nan") if self.state.global_step == 2 else loss

    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    with caplog.at_level(logging.WARNING, logger="training_exporter"):
        trainer.train()
    assert exported(cb, "training_nonfinite_gradients_total") == 1.0
    # The model's own loss stayed finite on every step: the loss metrics do not see the custom term.
    assert exported(cb, "training_nonfinite_loss_total") == 0.0
    assert math.isfinite(exported(cb, "training_loss") or math.nan)
    warnings = [r.getMessage() for r in caplog.records if "backpropagated" in r.getMessage()]
    assert len(warnings) == 1
