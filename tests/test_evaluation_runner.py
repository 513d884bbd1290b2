"""The fixed evaluation on real tiny Trainer runs: live /metrics, values recomputed directly on the same model,
preview history lines against the schema, training unchanged by it, failures counted."""

from __future__ import annotations

import copy
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from support.numerics import U32, logprob_abs
from support.runif import run_if
from transformers import Trainer, TrainerCallback

from exporter import PrometheusCallback, metrics
from exporter.demo.run import build_trainer
from exporter.demo.task import (
    DIGITS_ONLY,
    ArithmeticDataset,
    CharTokenizer,
    DataCollator,
    build_model,
    greedy_answer,
    make_eval_set,
    make_training_args,
)
from exporter.errors import ErrorTracker
from exporter.evaluation import EvalExample, EvalExport, FixedEvaluator, TokenizerCodec
from exporter.previews import PreviewFilter, PreviewHistory, validate_record

STEPS = 150
INTERVAL = 50
TRAINER_EVAL_STEPS = 75  # a Trainer evaluation between two fixed ones: on_evaluate runs one too


class Probe(TrainerCallback):
    """Scrapes the live endpoint after each fixed evaluation, once the worker has scored it."""

    def __init__(self, exporter: PrometheusCallback) -> None:
        self.exporter = exporter
        self.pages: dict[int, str] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        mon = self.exporter.monitor
        if mon is None or mon.evaluator is None or mon.evaluator.last_step != state.global_step:
            return
        assert mon.evaluator.wait(30)
        self.pages[state.global_step] = requests.get(f"http://127.0.0.1:{mon.port}/metrics", timeout=10).text


def samples(page: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted((k, v) for k, v in s.labels.items() if k != "run_id"))] = float(s.value)
    return out


def one_digit_trainer(callbacks: Sequence[TrainerCallback], output_dir: Path, steps: int,
                      processing_class: Any = None, **overrides: Any) -> Trainer:
    """The demo task with one-digit operands: learned within a hundred steps, so exact match really moves."""
    tok = CharTokenizer()
    args = make_training_args(str(output_dir), steps, **{"save_strategy": "no", "logging_steps": 10,
                                                         "disable_tqdm": True, **overrides})
    return Trainer(
        model=build_model(tok, seed=0), args=args,
        train_dataset=ArithmeticDataset(4000, seed=0, digits=1, tokenizer=tok),
        eval_dataset=ArithmeticDataset(64, seed=1, digits=1, tokenizer=tok),
        data_collator=DataCollator(tok.pad_token_id), callbacks=list(callbacks), processing_class=processing_class,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("runs") / "eval-run"
    eval_set = make_eval_set(per_regime=10, small=2, train=12, digits=1)
    cb = PrometheusCallback(
        listen_address="127.0.0.1:0", gpu=False, eval_set=eval_set, tokenizer=CharTokenizer(),
        eval_contract=DIGITS_ONLY, eval_interval=INTERVAL, eval_budget=26, eval_failure_pool=4,
        drift_window=20, drift_reference_batches=20, drift_sample_every=1,
        scrape_window_seconds=0,  # each probe reads the step it is taken at, never a shared earlier render
    )
    probe = Probe(cb)
    trainer = one_digit_trainer([cb, probe], out, STEPS, eval_strategy="steps", eval_steps=TRAINER_EVAL_STEPS)
    trainer.train()
    assert cb.monitor is not None
    history = PreviewHistory(out / "logs" / "preview")
    records = history.query(limit=10_000, newest_first=False)
    return {"cb": cb, "mon": cb.monitor, "trainer": trainer, "probe": probe, "records": records,
            "eval_set": eval_set, "out": out}


def test_evaluations_ran_at_the_interval_and_at_trainer_evaluations(run: dict[str, Any]) -> None:
    steps = sorted({r["step"] for r in run["records"]})
    assert steps == [50, 75, 100, 150]  # 150 is both: asked once
    assert sorted(run["probe"].pages) == [50, 100, 150]  # (75 ran in on_evaluate, after the probe's on_step_end)
    assert run["mon"].evaluator.evaluations == 4


def test_history_lines_validate_and_follow_the_budget(run: dict[str, Any]) -> None:
    records = run["records"]
    assert records and all(validate_record(r) == [] for r in records)
    first = [r for r in records if r["step"] == 50]
    assert len(first) == 26  # the budget: 20 fixed, then the pool and train examples in rotation
    assert [r["source_pool"] for r in first] == ["fixed_eval"] * 20 + ["train"] * 6
    for r in records:
        assert r["checkpoint_id"] == f"checkpoint-{r['step']}"
        assert r["prompt_tokens"] == len(r["prompt"]) + 1  # bos + characters
        assert r["golden_tokens"] == len(r["golden"])
        assert r["contract_status"]["digits_only"] == (r["model_answer"].isdigit())
        assert (r["failure_mode"] is None) == r["exact_match"]
    # A train example answered wrong comes back from the failure pool at the next evaluation.
    wrong_train = {r["example_id"] for r in first if r["source_pool"] == "train" and not r["exact_match"]}
    second = [r for r in records if r["step"] == 75]
    retried = {r["example_id"] for r in second if r["source_pool"] == "failures"}
    assert retried <= wrong_train and len(retried) == min(4, len(wrong_train))


def _direct_ce(model: torch.nn.Module, tok: CharTokenizer, prompt: str, golden: str) -> tuple[float, float]:
    """The model's own loss over golden + eos, prompt masked, one example unpadded; and its largest |logit|."""
    context = [tok.bos_token_id, *tok.encode(prompt)]
    target = [*tok.encode(golden), tok.eos_token_id]
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([context + target]), labels=torch.tensor([[-100] * len(context) + target]))
    return float(out.loss), float(out.logits.abs().max())


def test_answers_and_cross_entropy_match_a_direct_recomputation(run: dict[str, Any]) -> None:
    model = run["trainer"].model
    tok = CharTokenizer()
    final = [r for r in run["records"] if r["step"] == STEPS]
    # The arithmetic, machine-independently: the evaluator's batched, padded passes on a float64 copy
    # of the model against unpadded float64 recomputations. The forward passes then differ by float64
    # rounding only (~1e-14 here), and the scoring's float32 log-softmax (evaluation.answer_token_stats)
    # by the bound of tests/support/numerics.logprob_abs plus the logits' rounding to float32.
    model64 = copy.deepcopy(model).double()
    examples = [EvalExample(r["prompt"], r["golden"]) for r in final]
    ev, _ = evaluator(examples, max_new_tokens=max(r["model_tokens"] for r in final) + 1)
    job = ev._evaluate(model64, STEPS)
    n, vocab = len(examples), len(tok)
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, job.stats.example, job.stats.nll.double())
    ones = torch.ones(job.stats.example.numel(), dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, job.stats.example, ones)
    for i, r in enumerate(final):
        ce, largest = _direct_ce(model64, tok, r["prompt"], r["golden"])
        bound = logprob_abs(vocab, largest) + 2 * U32 * largest + 1e-12
        assert abs(float(sums[i] / counts[i]) - ce) <= bound
    for r in final:
        # The run's own float32 records: the answer the float32 model gives, and its loss to float32
        # forward rounding (first order: ~6 dot products of length 64 deep, gamma(64) = 3.8e-6 of
        # logits below 20, so < 5e-4 absolute); 1e-3 shows the record holds this model's loss.
        assert r["model_answer"] == greedy_answer(model, tok, r["prompt"], max_new_tokens=r["model_tokens"] + 1)
        assert r["ce"] == pytest.approx(_direct_ce(model64, tok, r["prompt"], r["golden"])[0], abs=1e-3)
    page = run["probe"].pages[STEPS]
    em = samples(page, "training_eval_exact_match_ratio")
    for (regime, source) in {(r["regime"], r["source_pool"]) for r in final}:
        group = [r for r in final if (r["regime"], r["source_pool"]) == (regime, source)]
        key = (("regime", regime), ("source", source))
        assert em[key] == pytest.approx(sum(r["exact_match"] for r in group) / len(group))
        ce = samples(page, "training_eval_answer_cross_entropy_nats")[key]
        tokens = [r["golden_tokens"] + 1 for r in group]
        assert ce == pytest.approx(sum(r["ce"] * n for r, n in zip(group, tokens, strict=True)) / sum(tokens),
                                   rel=1e-6)


def test_exact_match_rises_on_a_task_the_model_learns(run: dict[str, Any]) -> None:
    def fixed_em(step: int) -> float:
        rows = [r for r in run["records"] if r["step"] == step and r["source_pool"] == "fixed_eval"]
        return sum(r["exact_match"] for r in rows) / len(rows)

    assert fixed_em(50) < fixed_em(STEPS)
    assert fixed_em(STEPS) >= 0.15  # 0.2 here (seeded); 1-digit sums reach 20-45% in 150 steps
    page = run["probe"].pages[STEPS]
    rolling = samples(page, "training_eval_rolling_exact_match_ratio")
    last = [r["exact_match"] for r in run["records"]]
    for window in (20, 50, 100):
        assert rolling[(("window", str(window)),)] == pytest.approx(sum(last[-window:]) / window)


def test_live_metrics_of_the_last_evaluation(run: dict[str, Any]) -> None:
    page = run["probe"].pages[STEPS]
    final = [r for r in run["records"] if r["step"] == STEPS]

    def one(name: str) -> float:
        (value,) = samples(page, name).values()
        return value

    assert one("training_eval_last_step") == STEPS
    assert one("training_eval_examples") == len(final)
    assert 0 < one("training_eval_duration_seconds") < 30
    assert 0 <= one("training_eval_calibration_error_ratio") <= 1
    assert 0 < one("training_eval_top1_confidence_ratio") <= one("training_eval_top5_confidence_ratio") <= 1
    assert one("training_eval_token_entropy_nats") > 0
    # Outcome counters: every answer of every evaluation counted once, by outcome.
    outcomes = samples(page, "training_eval_outcomes_total")
    assert sum(outcomes.values()) == len(run["records"])
    assert set(dict(k)["outcome"] for k in outcomes) == {"correct", "empty", "wrong_format", "wrong_content",
                                                          "truncated"}
    correct = sum(v for k, v in outcomes.items() if dict(k)["outcome"] == "correct")
    assert correct == sum(r["exact_match"] for r in run["records"])
    # Pattern x golden-length heatmap of the last evaluation.
    heat = samples(page, "training_eval_pattern_accuracy_ratio")
    assert {dict(k)["pattern"] for k in heat} == {"1d+1d"} and {dict(k)["length_bucket"] for k in heat} == {"0-2"}
    assert heat[(("length_bucket", "0-2"), ("pattern", "1d+1d"))] == pytest.approx(
        sum(r["exact_match"] for r in final) / len(final))
    # Best so far: the Trainer's eval loss (its evaluations at 75 and 150; the page was scraped before the
    # second, so the registry is read after the run), not the fixed eval's CE.
    trainer_losses = [(h["eval_loss"], h["step"]) for h in run["trainer"].state.log_history if "eval_loss" in h]
    assert [step for _, step in trainer_losses] == [75, 150]
    best = min(trainer_losses)
    assert one("training_eval_best_loss") == pytest.approx(trainer_losses[0][0])
    mon = run["mon"]
    assert mon.registry.get_sample_value("training_eval_best_loss", {"run_id": "eval-run"}) == pytest.approx(best[0])
    assert mon.registry.get_sample_value("training_eval_best_step", {"run_id": "eval-run"}) == best[1]
    # Drift: the same data throughout (20 reference batches, then a full window): near zero.
    drift = samples(page, "training_dataset_drift_js_divergence")
    assert set(dict(k)["feature"] for k in drift) == {"sequence_length", "token_frequency", "padding_fraction",
                                                      "truncation"}
    assert all(v < 0.05 for v in drift.values()), drift
    errors = samples(page, "training_exporter_collector_errors_total")
    assert errors[(("collector", "eval"),)] == 0 and errors[(("collector", "previews"),)] == 0


@run_if(promtool=True)
def test_live_endpoint_passes_promtool(run: dict[str, Any]) -> None:
    for page in run["probe"].pages.values():
        proc = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout


def test_eval_labels_are_the_bounded_metadata_only(run: dict[str, Any]) -> None:
    page = run["probe"].pages[STEPS]
    eval_set = run["eval_set"]
    allowed = {
        "run_id": {"eval-run"},
        "regime": {e.regime for e in eval_set},
        "source": {"fixed_eval", "train", "failures"},
        "domain": {e.domain for e in eval_set},
        "pattern": {e.pattern for e in eval_set},
        "outcome": {"correct", "empty", "wrong_format", "wrong_content", "truncated"},
        "length_bucket": {"0-2"},
        "window": {"20", "50", "100"},
        "feature": {"sequence_length", "token_frequency", "padding_fraction", "truncation"},
    }
    produced = {spec.name for spec in metrics.ALL if spec.source == "eval"}
    seen = 0
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name not in produced:
                continue
            seen += 1
            for key, value in s.labels.items():
                assert value in allowed.get(key, set()), s  # never a prompt, an answer or a step
    assert seen > 20


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_training_is_unchanged_by_the_evaluation(tmp_path: Path) -> None:
    runs = []
    for with_eval in (True, False):
        cb = PrometheusCallback(listen_address="127.0.0.1:0", gpu=False, host=False, eval_interval=5,
                                eval_budget=16)
        if with_eval:
            # No tokenizer given: the Trainer's processing_class (a transformers tokenizer) is used.
            cb.set_evaluation(make_eval_set(per_regime=6, small=1, train=8, digits=1), contract=DIGITS_ONLY)
        trainer = one_digit_trainer([cb], tmp_path / str(with_eval), 30, logging_steps=1,
                                    processing_class=char_level_hf_tokenizer())
        trainer.train()
        assert cb.monitor is not None
        runs.append((trainer, cb.monitor))
    (with_trainer, with_mon), (without_trainer, without_mon) = runs
    assert with_mon.evaluator is not None and with_mon.evaluator.evaluations == 6
    assert with_mon.evaluator.codec.hf
    assert without_mon.evaluator is None
    assert len(losses(with_trainer)) == 30
    assert losses(with_trainer) == losses(without_trainer)  # bit for bit: modes and RNG state restored
    assert with_trainer.model is not None and without_trainer.model is not None
    for p, q in zip(with_trainer.model.parameters(), without_trainer.model.parameters(), strict=True):
        assert torch.equal(p, q)
    final = PreviewHistory(tmp_path / "True" / "logs" / "preview").query(PreviewFilter(step_min=30), limit=100)
    assert len(final) == 16
    for r in final:
        assert r["model_answer"] == greedy_answer(with_trainer.model, CharTokenizer(), r["prompt"],
                                                  max_new_tokens=r["model_tokens"] + 1)


class BrokenTokenizer(CharTokenizer):
    def encode(self, text: str) -> list[int]:
        raise RuntimeError("tokenizer exploded")


def test_a_failing_evaluation_is_counted_and_training_goes_on(tmp_path: Path) -> None:
    cb = PrometheusCallback(listen_address="127.0.0.1:0", gpu=False, host=False, eval_interval=5,
                            eval_set=make_eval_set(per_regime=2, small=1, train=0), tokenizer=BrokenTokenizer())
    trainer = build_trainer([cb], output_dir=str(tmp_path / "broken"), max_steps=12, save_strategy="no",
                            disable_tqdm=True)
    trainer.train()
    mon = cb.monitor
    assert mon is not None and trainer.state.global_step == 12
    assert mon.registry.get_sample_value("training_exporter_collector_errors_total",
                                         {"run_id": "broken", "collector": "eval"}) == 2.0
    assert mon.registry.get_sample_value("training_eval_last_step", {"run_id": "broken"}) is None
    assert not (tmp_path / "broken" / "logs" / "preview").exists()


def test_bad_eval_set_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match="source must be one of"):
        PrometheusCallback(eval_set=[{"prompt": "1+1=", "golden": "2", "source": "elsewhere"}])
    with pytest.raises(ValueError, match="unknown key"):
        PrometheusCallback(eval_set=[{"prompt": "1+1=", "golden": "2", "answer": "2"}])
    with pytest.raises(ValueError, match="empty"):
        PrometheusCallback(eval_set=[])


# --------------------------------------------------------------------------- the runner on its own


def evaluator(examples: list[EvalExample], **kw: Any) -> tuple[FixedEvaluator, EvalExport]:
    export = EvalExport({"run_id": "unit"})
    ev = FixedEvaluator(examples, CharTokenizer(), export, ErrorTracker(None, {}), history_dir=None, **kw)
    return ev, export


def test_failure_pool_is_bounded_and_retried() -> None:
    tok = CharTokenizer()
    model = build_model(tok, seed=0)  # untrained: every answer is wrong
    fixed = [EvalExample(f"0{i}+01=", str(i + 1), source="fixed_eval") for i in range(4)]
    train = [EvalExample(f"1{i}+10=", str(20 + i), source="train") for i in range(6)]
    ev, export = evaluator(fixed + train, budget=7, failure_pool=2)
    assert ev.run(model, 1) and ev.wait()
    # train examples 0..2 were asked and failed; the pool keeps the newest two.
    assert ev.failure_pool_ids == ["eval-5", "eval-6"]
    asked = ev.select()
    assert [(a.index, a.source) for a in asked] == [
        (0, "fixed_eval"), (1, "fixed_eval"), (2, "fixed_eval"), (3, "fixed_eval"),
        (5, "failures"), (6, "failures"), (7, "train")]
    assert not ev.run(model, 1)  # once per step
    assert export.last is not None and export.last.examples == 7
    assert export.last.by_group[("default", "fixed_eval")][0] == 0.0


def test_plain_module_without_generate_gives_the_same_answers() -> None:
    tok = CharTokenizer()
    model = build_model(tok, seed=3, lora=False)

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    examples = [EvalExample(p, a) for p, a in (("12+34=", "46"), ("5+6=", "11"), ("99+99=", "198"))]
    got = []
    for m in (model, Plain(model)):
        ev, _ = evaluator(examples, max_new_tokens=5)
        job = ev._evaluate(m, 1)
        got.append([TokenizerCodec(tok).decode(ids) for ids in job.generated])
        got.append(job.stats.nll.tolist())
    assert got[0] == got[2]
    assert got[1] == pytest.approx(got[3], rel=1e-5)
    assert got[0] == [greedy_answer(model, tok, e.prompt, max_new_tokens=5) for e in examples]


def test_nan_cross_entropy_is_written_as_null(tmp_path: Path) -> None:
    tok = CharTokenizer()
    model = build_model(tok, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    ev, export = evaluator([EvalExample("1+1=", "2")])
    ev.history_dir = str(tmp_path)
    assert ev.run(model, 7) and ev.wait()
    (record,) = PreviewHistory(tmp_path).query()
    assert record["ce"] is None and record["step"] == 7
    # Exported as is, so that rules see a diverged model.
    snap = export.last
    assert snap is not None and snap.ece is not None and math.isnan(snap.ece)
    assert snap.top1 is not None and math.isnan(snap.top1)
    assert math.isnan(snap.by_group[("default", "fixed_eval")][2])


def char_level_hf_tokenizer() -> Any:
    """A transformers tokenizer with the demo's vocabulary, built in code: bos added to what it encodes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = CharTokenizer()
    vocab = {"<pad>": tok.pad_token_id, "<bos>": tok.bos_token_id, "<eos>": tok.eos_token_id,
             **{ch: tok.encode(ch)[0] for ch in tok.alphabet}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    inner.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_codec_over_a_transformers_tokenizer_matches_the_training_format() -> None:
    hf, char = TokenizerCodec(char_level_hf_tokenizer()), TokenizerCodec(CharTokenizer())
    assert hf.hf and not char.hf
    for text in ("12+34=", "7+8="):
        assert hf.prompt(text) == char.prompt(text) == [1, *CharTokenizer().encode(text)]
    assert hf.answer("46") == char.answer("46") == CharTokenizer().encode("46")
    assert hf.decode([*CharTokenizer().encode("46"), 2, 0]) == "46"  # specials skipped
    assert (hf.eos_token_id, hf.pad_token_id) == (2, 0)


def test_prompt_longer_than_the_context_is_cut_not_fatal() -> None:
    tok = CharTokenizer()
    model = build_model(tok, seed=0)  # 32 positions
    long = EvalExample("1" * 40 + "+1=", "1" * 40)  # even the golden answer does not fit
    ok = EvalExample("12+34=", "46")
    ev, export = evaluator([long, ok])
    assert ev.run(model, 3) and ev.wait()
    assert export.last is not None and export.last.examples == 2


def test_plain_loop_core_runs_it_when_due(tmp_path: Path) -> None:
    from exporter.config import ExporterConfig
    from exporter.core import TrainingMonitor

    tok = CharTokenizer()
    model = build_model(tok, seed=0)
    mon = TrainingMonitor(ExporterConfig(gpu=False, host=False, eval_interval=10), run_id="plain",
                          output_dir=tmp_path)
    mon.set_evaluation([EvalExample("12+34=", "46")], tok)
    assert [mon.maybe_evaluate(model, step) for step in (9, 10, 10, 11)] == [False, True, False, False]
    assert mon.maybe_evaluate(model, 11, force=True)  # a Trainer-style evaluation outside the interval
    mon.end(linger=False)  # waits for the scoring
    assert mon.registry.get_sample_value("training_eval_last_step", {"run_id": "plain"}) == 11
    steps = [r["step"] for r in PreviewHistory(tmp_path / "logs" / "preview").query(newest_first=False)]
    assert steps == [10, 11]
    assert not TrainingMonitor(ExporterConfig(gpu=False, host=False)).maybe_evaluate(model, 250)  # no eval set


def test_a_contract_that_raises_marks_the_answer_off_contract() -> None:
    tok = CharTokenizer()
    model = build_model(tok, seed=0)
    errors = ErrorTracker(None, {})

    def fragile(answer: str) -> dict[str, bool]:
        raise KeyError(answer)

    ev = FixedEvaluator([EvalExample("12+34=", "46")], tok, EvalExport({}), errors, contract=fragile)
    job = ev._evaluate(model, 1)
    (record,) = ev.score(job)
    assert record["contract_status"] == {"end_marker": record["contract_status"]["end_marker"], "contract": False}
    assert record["failure_mode"] in ("empty", "truncated", "wrong_format")


def test_demo_eval_set() -> None:
    examples = make_eval_set()
    fixed = [e for e in examples if e.source == "fixed_eval"]
    train = [e for e in examples if e.source == "train"]
    assert len(fixed) == 48 and len(train) == 32
    assert sum(e.regime == "carry" for e in fixed) == 24
    assert sum(e.pattern == "1d+1d" for e in fixed) == 4
    assert len({e.prompt for e in fixed}) == 48
    for e in examples:
        a, b = (int(x) for x in e.prompt.rstrip("=").split("+"))
        assert e.golden == str(a + b)
        assert (e.regime == "carry") == (a % 10 + b % 10 >= 10 or a // 10 + b // 10 + (a % 10 + b % 10) // 10 >= 10)
        assert DIGITS_ONLY(e.golden) == {"digits_only": True}
    # The train examples are the training set's first ones, in order.
    dataset = ArithmeticDataset(32, seed=0)
    assert [e.prompt for e in train] == [p for p, _ in dataset.examples]
