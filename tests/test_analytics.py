"""Checkpoint analytics on real checkpoints of a real Trainer run (full fine-tune and LoRA), against plain torch.

Every figure is recomputed here independently: both state dicts loaded whole,
LoRA merged by peft itself (``merge_and_unload``), norms in float64, layers
from a regex of this file's own.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import NoneType
from typing import Any

import psutil
import pytest
import requests
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file
from support.numerics import U64, gamma, norm_rel, ratio_rel
from support.runif import run_if
from transformers import GPT2LMHeadModel, Trainer

from analytics_jobs import cli as analytics_cli
from analytics_jobs import status
from analytics_jobs.analysis import Analysis, AnalysisError, BaseModel, analyse
from analytics_jobs.daemon import AnalyticsDaemon
from exporter import cli
from exporter.demo.localstack.processes import free_port
from exporter.demo.task import ArithmeticDataset, CharTokenizer, DataCollator, build_model, make_training_args

STEPS = 4
TOKENIZER = CharTokenizer()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base model and two real Trainer runs from it (full fine-tune, LoRA), checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("analytics")
    build_model(TOKENIZER, lora=False, seed=0).save_pretrained(root / "base")
    out = {"root": root, "base": root / "base"}
    for key, lora in (("full", False), ("lora", True)):
        model = build_model(TOKENIZER, lora=lora, seed=0)
        args = make_training_args(str(root / f"{key}-run"), max_steps=STEPS, save_steps=2, logging_steps=2,
                                  disable_tqdm=True, learning_rate=1e-2)
        Trainer(model=model, args=args, train_dataset=ArithmeticDataset(64), data_collator=DataCollator()).train()
        out[key] = root / f"{key}-run"
        if lora:
            # The same adapter as a whole in-memory state dict: peft's names with the adapter name,
            # base_layer, modules_to_save.default and original_module copies.
            mem = root / "lora-memory" / f"checkpoint-{STEPS}"
            mem.mkdir(parents=True)
            save_file({n: t.detach().clone().contiguous() for n, t in model.state_dict().items()},
                      mem / "model.safetensors", metadata={"format": "pt"})
            for name in ("adapter_config.json", "trainer_state.json"):
                shutil.copy(out["lora"] / f"checkpoint-{STEPS}" / name, mem / name)
            out["lora-memory"] = mem
    return out


def _layer(name: str) -> str:
    m = re.match(r"(?:transformer\.h|model\.layers)\.(\d+)\.", name)
    if m:
        return m.group(1)
    return "-1" if name.startswith(("transformer.wte.", "transformer.wpe.", "model.embed_tokens.")) else "final"


def direct(ref: dict[str, torch.Tensor], cur: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per-layer figures the plain way: whole tensors, float64, masks."""
    acc: dict[str, dict[str, float]] = {}
    for name, c64 in ((n, t.double()) for n, t in cur.items()):
        a = acc.setdefault(_layer(name), {"ref": 0.0, "cur": 0.0, "delta": 0.0, "weight": 0.0, "max": 0.0,
                                          "min": math.inf, "params": 0})
        a["cur"] += float((c64**2).sum())
        a["weight"] += float((c64**2).sum())
        if name in ref:
            r64 = ref[name].double()
            a["ref"] += float((r64**2).sum())
            a["delta"] += float(((c64 - r64) ** 2).sum())
        nonzero = c64.abs()[c64 != 0]
        a["max"] = max(a["max"], float(c64.abs().max()))
        a["min"] = min(a["min"], float(nonzero.min())) if nonzero.numel() else a["min"]
        a["params"] += c64.numel()
    return acc


# The analysis sums squares in float32 pieces of at most 4096 elements (maths.sum_squares), added in
# float64: each norm is within norm_rel(4096) of the float64 reference whatever the kernel, and a
# relative change (a quotient of two) within ratio_rel(4096).
NORM_REL = norm_rel(4096)


def assert_matches(result: Analysis, expected: dict[str, dict[str, float]], extreme_abs: float = 0.0) -> None:
    """``extreme_abs``: 0 where max / min |w| are stored values (read exactly), else the merge's bound."""
    assert {row.layer for row in result.layers} == set(expected)
    rel = NORM_REL
    for row in result.layers:
        e = expected[row.layer]
        assert row.reference_norm == pytest.approx(math.sqrt(e["ref"]), rel=rel), row
        assert row.current_norm == pytest.approx(math.sqrt(e["cur"]), rel=rel), row
        assert row.delta_norm == pytest.approx(math.sqrt(e["delta"]), rel=rel), row
        assert row.relative_change == pytest.approx(math.sqrt(e["delta"] / e["ref"]), rel=ratio_rel(4096)), row
        assert row.weight_norm == pytest.approx(math.sqrt(e["weight"]), rel=rel), row
        assert abs(row.max_abs_weight - e["max"]) <= extreme_abs, row
        assert abs(row.min_abs_weight - e["min"]) <= extreme_abs, row
        assert row.params == e["params"], row
    ref = sum(e["ref"] for e in expected.values())
    delta = sum(e["delta"] for e in expected.values())
    assert result.total_relative_change == pytest.approx(math.sqrt(delta / ref), rel=ratio_rel(4096))
    assert result.total_params == sum(int(e["params"]) for e in expected.values())


def peft_merge64(
    model_cls: Any, base: Path, ckpt: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """peft's own merge of an adapter checkpoint, in float64, and a bound on its elements' error.

    With the base model in float64, peft casts the adapter to float64 too, so the merge is
    ``W0 + scale * B @ A`` of the stored values to float64 rounding, which is how the analysis
    defines max / min |w|. Each element is within ``gamma(r + 2)`` of its operands' magnitude
    (tests/support/numerics.lowrank_merge_abs) on either side, bounded here over the whole model:
    ``|w0| + scale * (r |b| |a| + |bias|)`` with the largest scale (rsLoRA, alpha_pattern).
    """
    from peft import PeftModel

    base_model = model_cls.from_pretrained(base).double()
    ref = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    merged = PeftModel.from_pretrained(base_model, ckpt).merge_and_unload()
    cur = {n: p.detach() for n, p in merged.named_parameters()}
    assert all(t.dtype == torch.float64 for t in cur.values())
    config = json.loads((ckpt / "adapter_config.json").read_text())
    rank = int(config["r"])
    alpha = max([float(config["lora_alpha"]), *map(float, (config.get("alpha_pattern") or {}).values())])
    largest = max(float(t.abs().max()) for t in load_file(ckpt / "adapter_model.safetensors").values())
    magnitude = max(float(t.abs().max()) for t in ref.values()) + alpha / math.sqrt(rank) * (
        rank * largest**2 + largest)
    return ref, cur, 2 * gamma(rank + 2, U64) * magnitude


def _base_state(runs: dict[str, Path]) -> dict[str, torch.Tensor]:
    return load_file(runs["base"] / "model.safetensors")


def _checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], like: Path) -> Path:
    """A full-model checkpoint-N folder written as the Trainer writes one (weights, config, state last)."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(like / "config.json", path / "config.json")
    shutil.copy(like / "trainer_state.json", path / "trainer_state.json")
    return path


# --------------------------------------------------------------------------- figures


def test_full_fine_tune_checkpoint_matches_direct_computation(runs: dict[str, Path]) -> None:
    ckpt = runs["full"] / f"checkpoint-{STEPS}"
    result = analyse(BaseModel(runs["base"]), ckpt, step=STEPS)
    expected = direct(_base_state(runs), load_file(ckpt / "model.safetensors"))
    assert_matches(result, expected)
    assert result.num_blocks == 2 and not result.adapter and result.problems == ()
    assert [row.layer for row in result.layers] == ["-1", "0", "1", "final"]
    assert all(row.relative_change > 1e-3 for row in result.layers)  # the run really trained every layer
    # The earlier checkpoint has moved less.
    early = analyse(BaseModel(runs["base"]), runs["full"] / "checkpoint-2")
    assert early.total_relative_change < result.total_relative_change


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft: tying notes on merging a modules_to_save head
def test_lora_checkpoint_matches_the_peft_merge(runs: dict[str, Path]) -> None:
    ckpt = runs["lora"] / f"checkpoint-{STEPS}"
    ref, cur, extreme_abs = peft_merge64(GPT2LMHeadModel, runs["base"], ckpt)
    # The merged model keeps the trained tied head as its own parameter, equal to the embedding.
    assert torch.equal(cur.pop("lm_head.weight"), cur["transformer.wte.weight"])
    result = analyse(BaseModel(runs["base"]), ckpt, step=STEPS)
    assert result.adapter and result.problems == ()
    assert_matches(result, direct(ref, cur), extreme_abs=extreme_abs)
    # LoRA moved the blocks; the frozen layer norms after them did not move.
    assert result.layer("0").relative_change > 0 and result.layer("final").relative_change == 0


def test_in_memory_peft_names_give_the_same_figures(runs: dict[str, Path]) -> None:
    base = BaseModel(runs["base"])
    saved = analyse(base, runs["lora"] / f"checkpoint-{STEPS}")
    memory = analyse(base, runs["lora-memory"])
    assert memory.problems == ()
    for a, b in zip(saved.layers, memory.layers, strict=True):
        assert a.layer == b.layer and a.params == b.params
        for field in ("reference_norm", "current_norm", "delta_norm", "max_abs_weight", "min_abs_weight"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-6, abs=1e-12), (a, b)


def test_sharded_checkpoint_gives_the_same_figures(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = runs["full"] / f"checkpoint-{STEPS}"
    GPT2LMHeadModel.from_pretrained(ckpt).save_pretrained(tmp_path / "checkpoint-4", max_shard_size="100KB")
    shutil.copy(ckpt / "trainer_state.json", tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-4" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "checkpoint-4").glob("model-*.safetensors"))) > 1
    base = BaseModel(runs["base"])
    assert analyse(base, tmp_path / "checkpoint-4").layers == analyse(base, ckpt).layers


def test_perturbing_one_block_shows_in_that_block_only(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = runs["full"] / f"checkpoint-{STEPS}"
    tensors = load_file(ckpt / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    for name in [n for n in tensors if n.startswith("transformer.h.1.")]:
        tensors[name] = tensors[name] + 0.05 * torch.randn(tensors[name].shape, generator=g)
    perturbed = _checkpoint(tmp_path, STEPS, tensors, ckpt)
    base = BaseModel(runs["base"])
    before, after = analyse(base, ckpt), analyse(base, perturbed)
    for old, new in zip(before.layers, after.layers, strict=True):
        if old.layer == "1":
            assert new.relative_change > 2 * old.relative_change
        else:
            assert new == old
    assert_matches(after, direct(_base_state(runs), tensors))
    assert after.total_relative_change > before.total_relative_change


def test_qwen_style_names_tied_embeddings_and_bf16(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers.2." in name:
                p.add_(0.01)
    model.save_pretrained(tmp_path / "checkpoint-10")
    ref = load_file(tmp_path / "base" / "model.safetensors")
    cur = load_file(tmp_path / "checkpoint-10" / "model.safetensors")
    assert "lm_head.weight" not in cur and cur["model.embed_tokens.weight"].dtype == torch.bfloat16
    result = analyse(BaseModel(tmp_path / "base"), tmp_path / "checkpoint-10")
    assert result.num_blocks == 3 and result.problems == ()
    assert [row.layer for row in result.layers] == ["-1", "0", "1", "2", "final"]
    assert [row.layer for row in result.layers if row.delta_norm > 0] == ["2"]
    assert result.total_params == sum(p.numel() for p in model.parameters())
    expected_delta = math.sqrt(sum(float(((cur[n].double() - ref[n].double()) ** 2).sum())
                                   for n in cur if ".layers.2." in n))
    assert result.layer("2").delta_norm == pytest.approx(expected_delta, rel=NORM_REL)


# --------------------------------------------------------------------------- bad input


def test_resized_vocabulary_compares_the_overlapping_rows(
    runs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = runs["full"] / f"checkpoint-{STEPS}"
    tensors = load_file(ckpt / "model.safetensors")
    wte = tensors["transformer.wte.weight"]
    tensors["transformer.wte.weight"] = torch.cat([wte, torch.full((3, wte.shape[1]), 0.5)])
    path = _checkpoint(tmp_path / "run", STEPS, tensors, ckpt)
    daemon = AnalyticsDaemon(BaseModel(runs["base"]), tmp_path / "run", run_id="r", registry=CollectorRegistry())
    with caplog.at_level(logging.WARNING, logger="training_exporter.analytics"):
        assert daemon.poll() == "analysed"
    assert "compared the overlapping [15, 64]" in caplog.text
    assert daemon.registry.get_sample_value("training_analytics_errors_total",
                                            {"run_id": "r", "reason": "shape_mismatch"}) == 1
    result = daemon.latest
    assert result is not None
    overlap = dict(tensors, **{"transformer.wte.weight": tensors["transformer.wte.weight"][: wte.shape[0]]})
    emb = direct(_base_state(runs), overlap)["-1"]
    row = result.layer("-1")
    assert row.delta_norm == pytest.approx(math.sqrt(emb["delta"]), rel=NORM_REL)
    assert row.reference_norm == pytest.approx(math.sqrt(emb["ref"]), rel=NORM_REL)
    # Stability covers the new rows too.
    assert row.weight_norm**2 == pytest.approx(emb["weight"] + 3 * 64 * 0.25, rel=2 * NORM_REL)
    assert row.params == emb["params"] + 3 * 64
    assert path.is_dir()


def test_tensor_without_base_counterpart_is_reported_and_kept_out_of_drift(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = runs["full"] / f"checkpoint-{STEPS}"
    tensors = load_file(ckpt / "model.safetensors")
    tensors["transformer.h.0.extra.weight"] = torch.full((4, 4), 2.0)
    _checkpoint(tmp_path / "run", STEPS, tensors, ckpt)
    base = BaseModel(runs["base"])
    daemon = AnalyticsDaemon(base, tmp_path / "run", run_id="r", registry=CollectorRegistry())
    assert daemon.poll() == "analysed"
    assert daemon.registry.get_sample_value("training_analytics_errors_total",
                                            {"run_id": "r", "reason": "missing_base_tensor"}) == 1
    assert daemon.latest is not None
    plain = analyse(base, ckpt).layer("0")
    row = daemon.latest.layer("0")
    assert (row.delta_norm, row.reference_norm, row.current_norm) == (
        plain.delta_norm, plain.reference_norm, plain.current_norm)
    assert row.weight_norm**2 == pytest.approx(plain.weight_norm**2 + 16 * 4.0)
    assert row.params == plain.params + 16


def test_adapter_for_another_base_is_a_shape_mismatch(runs: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    build_model(TOKENIZER, lora=False, n_embd=32, n_head=4).save_pretrained(other)
    with pytest.raises(AnalysisError) as err:
        analyse(BaseModel(other), runs["lora"] / f"checkpoint-{STEPS}")
    assert err.value.reason == "shape_mismatch"


def _copy_checkpoint(src: Path, dst: Path, with_state: bool = True) -> Path:
    dst.mkdir(parents=True)
    for name in ("model.safetensors", "config.json") + (("trainer_state.json",) if with_state else ()):
        shutil.copy(src / name, dst / name)
    return dst


def test_daemon_waits_for_incomplete_and_survives_a_truncated_file(runs: dict[str, Path], tmp_path: Path) -> None:
    watch = tmp_path / "run"
    _copy_checkpoint(runs["full"] / "checkpoint-2", watch / "checkpoint-2")
    # Being written: weights there, trainer_state.json (written last) not yet.
    newest = _copy_checkpoint(runs["full"] / "checkpoint-4", watch / "checkpoint-4", with_state=False)
    daemon = AnalyticsDaemon(BaseModel(runs["base"]), watch, run_id="r", status_dir=tmp_path / "status",
                             registry=CollectorRegistry())

    def errors(reason: str) -> float | None:
        return daemon.registry.get_sample_value("training_analytics_errors_total", {"run_id": "r", "reason": reason})

    assert daemon.poll() == "analysed"
    assert daemon.latest is not None and daemon.latest.checkpoint == "checkpoint-2"
    assert errors("incomplete") == 1
    assert daemon.poll() == "idle" and errors("incomplete") == 1  # reported once per checkpoint
    (newest / "trainer_state.json").write_text('{"global_step": 4, "log_hist')  # torn write
    assert daemon.poll() == "idle"
    shutil.copy(runs["full"] / "checkpoint-4" / "trainer_state.json", newest / "trainer_state.json")
    assert daemon.poll() == "analysed" and daemon.latest.checkpoint == "checkpoint-4"
    assert daemon.registry.get_sample_value("training_analytics_checkpoint_step", {"run_id": "r"}) == 4

    broken = _copy_checkpoint(runs["full"] / "checkpoint-4", watch / "checkpoint-6")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert daemon.poll() == "failed"
    assert errors("corrupt_file") == 1
    assert daemon.latest.checkpoint == "checkpoint-4"  # the last good analysis stays published
    assert daemon.registry.get_sample_value("training_analytics_checkpoint_step", {"run_id": "r"}) == 4
    assert daemon.poll() == "idle" and errors("corrupt_file") == 1  # not retried until the file changes
    (broken / "model.safetensors").write_bytes(data)
    assert daemon.poll() == "analysed" and daemon.latest.checkpoint == "checkpoint-6"
    history = json.loads((tmp_path / "status" / "layer_drift_history.json").read_text())
    assert [h["current_checkpoint"] for h in history] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert errors("internal") == 0


def test_missing_base_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["analytics", "--base", str(tmp_path / "nope"), "--checkpoint-dir", str(tmp_path), "--once",
                  "--status-dir", str(tmp_path / "status")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--base" in err and "nope" in err


def test_base_without_safetensors_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["analytics", "--base", str(tmp_path / "base"), "--checkpoint-dir", str(tmp_path), "--once",
                  "--status-dir", str(tmp_path / "status")])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "status").exists()  # nothing is created before the input is checked


# --------------------------------------------------------------------------- status documents

_FLOAT = (float, NoneType)  # JSON has no NaN / Infinity: a non-finite figure is null
DRIFT_SCHEMA: dict[str, Any] = {
    "timestamp": str,
    "reference_checkpoint": str,
    "current_checkpoint": str,
    "current_step": (int, NoneType),
    "total_params": int,
    "total_relative_change": _FLOAT,
    "summary": {
        "num_transformer_layers": int,
        "avg_relative_change": _FLOAT,
        "max_drift_layer": (int, NoneType),
        "max_drift_value": _FLOAT,
        "min_drift_layer": (int, NoneType),
        "min_drift_value": _FLOAT,
        "top_layers_avg": _FLOAT,
        "bottom_layers_avg": _FLOAT,
        "pattern": str,
    },
    "layers": [{"layer_idx": int, "relative_change": _FLOAT, "delta_norm": _FLOAT, "reference_norm": _FLOAT,
                "current_norm": _FLOAT}],
}
STABILITY_SCHEMA: dict[str, Any] = {
    "timestamp": str,
    "checkpoint": str,
    "step": (int, NoneType),
    "summary": {
        "num_layers": int,
        "avg_weight_norm": _FLOAT,
        "std_weight_norm": _FLOAT,
        "max_weight_norm": _FLOAT,
        "min_weight_norm": _FLOAT,
        "health_status": str,
        "total_alerts": int,
        "warning_alerts": int,
        "critical_alerts": int,
    },
    "alerts": [{"layer": int, "type": str, "severity": str, "value": _FLOAT, "threshold": float, "message": str}],
    "layers": [{"layer_idx": int, "weight_norm": _FLOAT, "max_abs_weight": _FLOAT, "min_abs_weight": _FLOAT}],
}


def check_schema(doc: Any, schema: Any, where: str = "$") -> None:
    if isinstance(schema, dict):
        assert isinstance(doc, dict) and set(doc) == set(schema), f"{where}: keys {sorted(doc)} != {sorted(schema)}"
        for key, sub in schema.items():
            check_schema(doc[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(doc, list), where
        for i, item in enumerate(doc):
            check_schema(item, schema[0], f"{where}[{i}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        assert type(doc) in types, f"{where}: {doc!r} is not {types}"  # type(), so a bool is no int


def test_status_documents_follow_the_seed_schema(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = runs["full"] / f"checkpoint-{STEPS}"
    tensors = load_file(ckpt / "model.safetensors")
    tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = 120.0  # exploding, warning
    tensors["transformer.h.1.attn.c_proj.weight"][0, 0] = 5e-13  # vanishing, critical
    _checkpoint(tmp_path / "run", 8, tensors, ckpt)
    code = cli.main(["analytics", "--base", str(runs["base"]), "--checkpoint-dir", str(tmp_path / "run"),
                     "--status-dir", str(tmp_path / "status"), "--once"])
    assert code == 0
    drift = json.loads((tmp_path / "status" / status.LAYER_DRIFT).read_text())
    stability = json.loads((tmp_path / "status" / status.PARAMETER_STABILITY).read_text())
    check_schema(drift, DRIFT_SCHEMA)
    check_schema(stability, STABILITY_SCHEMA)
    datetime.fromisoformat(drift["timestamp"])

    result = analyse(BaseModel(runs["base"]), tmp_path / "run" / "checkpoint-8")
    assert drift["reference_checkpoint"] == "base" and drift["current_checkpoint"] == "checkpoint-8"
    assert drift["current_step"] == 8 and stability["step"] == 8
    assert drift["total_params"] == result.total_params
    assert drift["total_relative_change"] == pytest.approx(result.total_relative_change)
    assert [x["layer_idx"] for x in drift["layers"]] == [-1, 0, 1, 2]  # 2: after the blocks (final)
    for row, doc in zip(result.layers, drift["layers"], strict=True):
        assert doc["relative_change"] == pytest.approx(row.relative_change)
        assert doc["delta_norm"] == pytest.approx(row.delta_norm)
    summary = drift["summary"]
    assert summary["num_transformer_layers"] == 2
    blocks = [result.layer("0").relative_change, result.layer("1").relative_change]
    assert summary["avg_relative_change"] == pytest.approx(sum(blocks) / 2)
    assert summary["max_drift_layer"] == blocks.index(max(blocks))
    top, bottom = summary["top_layers_avg"], summary["bottom_layers_avg"]
    assert (top, bottom) == (pytest.approx(blocks[1]), pytest.approx(blocks[0]))
    assert summary["pattern"] == ("top_heavy" if top > 1.5 * bottom else "bottom_heavy" if bottom > 1.5 * top
                                  else "uniform")

    alerts = {(a["layer"], a["type"]): a for a in stability["alerts"]}
    assert set(alerts) == {(0, "exploding"), (1, "vanishing")}
    assert (alerts[0, "exploding"]["severity"], alerts[0, "exploding"]["value"]) == ("warning", 120.0)
    assert alerts[0, "exploding"]["threshold"] == 100.0
    assert alerts[0, "exploding"]["message"] == "Layer 0 has extreme weight values"
    assert alerts[1, "vanishing"]["severity"] == "critical" and alerts[1, "vanishing"]["threshold"] == 1e-12
    assert alerts[1, "vanishing"]["value"] == pytest.approx(5e-13)
    assert stability["summary"]["health_status"] == "critical"
    assert (stability["summary"]["warning_alerts"], stability["summary"]["critical_alerts"]) == (1, 1)
    norms = [x["weight_norm"] for x in stability["layers"]]
    assert stability["summary"]["avg_weight_norm"] == pytest.approx(sum(norms) / len(norms))
    assert stability["summary"]["max_weight_norm"] == max(norms)

    # Histories: one entry per checkpoint, a re-analysis replaces its entry, bounded by --history.
    for step in (9, 10):
        _checkpoint(tmp_path / "run", step, tensors, ckpt)
        assert cli.main(["analytics", "--base", str(runs["base"]), "--checkpoint-dir", str(tmp_path / "run"),
                         "--status-dir", str(tmp_path / "status"), "--once", "--history", "2"]) == 0
    assert cli.main(["analytics", "--base", str(runs["base"]), "--checkpoint-dir", str(tmp_path / "run"),
                     "--status-dir", str(tmp_path / "status"), "--once", "--history", "2"]) == 0
    for name in (status.LAYER_DRIFT, status.PARAMETER_STABILITY):
        history = json.loads((tmp_path / "status" / status.history_name(name)).read_text())
        assert [h.get("current_step", h.get("step")) for h in history] == [9, 10]
        for entry in history:
            check_schema(entry, DRIFT_SCHEMA if name == status.LAYER_DRIFT else STABILITY_SCHEMA)
    assert not list((tmp_path / "status").glob(".*.tmp"))  # no temporary file left behind


def test_once_exits_1_when_the_newest_checkpoint_is_broken(runs: dict[str, Path], tmp_path: Path) -> None:
    broken = _copy_checkpoint(runs["full"] / "checkpoint-4", tmp_path / "run" / "checkpoint-4")
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    args = ["analytics", "--base", str(runs["base"]), "--checkpoint-dir", str(tmp_path / "run"),
            "--status-dir", str(tmp_path / "status"), "--once"]
    assert cli.main(args) == 1
    (tmp_path / "empty").mkdir()
    args[4] = str(tmp_path / "empty")
    assert cli.main(args) == 1


def test_run_id_is_derived_like_the_training_exporter() -> None:
    from exporter import callback

    # The training exporter's callback and this CLI derive run_id with the one function.
    assert analytics_cli.derive_run_id is callback.derive_run_id
    expected = {"out/llama-full-2": "llama-full-2", "out/llama-full-2/": "llama-full-2", "/": "run", "": "run",
                "run": "run"}
    for path, run_id in expected.items():
        assert analytics_cli.derive_run_id(path) == run_id


# --------------------------------------------------------------------------- the daemon on /metrics


@run_if(promtool=True)
def test_daemon_serves_metrics_that_promtool_accepts(runs: dict[str, Path], tmp_path: Path) -> None:
    watch = tmp_path / "llama-full-2"
    _copy_checkpoint(runs["full"] / f"checkpoint-{STEPS}", watch / f"checkpoint-{STEPS}")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "analytics", "--base", str(runs["base"]), "--checkpoint-dir",
         str(watch), "--status-dir", str(tmp_path / "status"), "--interval", "0.2",
         "--web.listen-address", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        page = ""
        while time.monotonic() < deadline and "training_analytics_layer_relative_drift_ratio{" not in page:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
        drift = json.loads((tmp_path / "status" / status.LAYER_DRIFT).read_text())
        for layer in drift["layers"]:
            label = "final" if layer["layer_idx"] == drift["summary"]["num_transformer_layers"] \
                else str(layer["layer_idx"])
            line = f'training_analytics_layer_relative_drift_ratio{{layer="{label}",run_id="llama-full-2"}} '
            value = float(page.split(line, 1)[1].split("\n", 1)[0])
            assert value == pytest.approx(layer["relative_change"])
        assert f'training_analytics_checkpoint_step{{run_id="llama-full-2"}} {float(STEPS)}' in page
        assert 'training_analytics_errors_total{reason="corrupt_file",run_id="llama-full-2"} 0.0' in page
        assert 'training_analytics_drift_pattern{pattern="uniform",run_id="llama-full-2"}' in page
        # The analytics host's own hardware, as the training exporter publishes it (no GPU here: NVML
        # missing is counted under collector "gpu", the host collector reports real figures).
        host_total = re.search(r'^training_host_memory_total_bytes\{run_id="llama-full-2"\} (\S+)$', page, re.M)
        assert host_total and float(host_total.group(1)) == pytest.approx(psutil.virtual_memory().total)
        assert 'training_exporter_collector_errors_total{collector="host",run_id="llama-full-2"} 0.0' in page
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "checkpoint-4 (step 4): total relative change" in out


def _lora_case(kind: str) -> tuple[torch.nn.Module, Any]:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, Qwen3Config

    if kind == "qwen-rslora-embedding":
        config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(config)
        lora = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj", "embed_tokens"],
                          init_lora_weights=False)
        return model, lora
    model = build_model(TOKENIZER, lora=False, seed=1)
    lora = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"c_fc": 16}, lora_bias=True, fan_in_fan_out=True,
                      target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    return model, lora


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["qwen-rslora-embedding", "gpt2-alpha-pattern-lora-bias"])
def test_lora_variants_match_the_peft_merge(kind: str, tmp_path: Path) -> None:
    """rsLoRA scale, LoRA on an embedding (saved with its base_layer copy), alpha_pattern, lora_bias,
    Linear (Llama / Qwen) and Conv1D (GPT-2, fan_in_fan_out) layouts: each against peft's own merge."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model, lora = _lora_case(kind)
    model.save_pretrained(tmp_path / "base")
    # init_lora_weights=False: B is random too, so every delta is non-zero without training.
    get_peft_model(model, lora).save_pretrained(tmp_path / "checkpoint-1")
    ref, cur, extreme_abs = peft_merge64(type(model), tmp_path / "base", tmp_path / "checkpoint-1")
    result = analyse(BaseModel(tmp_path / "base"), tmp_path / "checkpoint-1")
    assert result.problems == ()
    assert_matches(result, direct(ref, {n: t for n, t in cur.items() if n in ref}), extreme_abs=extreme_abs)
    assert all(row.delta_norm > 0 for row in result.layers if row.layer in ("0", "1"))
    assert (result.layer("-1").delta_norm > 0) == (kind == "qwen-rslora-embedding")


def test_nan_weights_are_exported_as_nan_and_written_as_null(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = runs["full"] / f"checkpoint-{STEPS}"
    tensors = load_file(ckpt / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 3] = float("nan")
    _checkpoint(tmp_path / "run", STEPS, tensors, ckpt)
    daemon = AnalyticsDaemon(BaseModel(runs["base"]), tmp_path / "run", run_id="r", status_dir=tmp_path / "status",
                             registry=CollectorRegistry())
    assert daemon.poll() == "analysed"
    value = daemon.registry.get_sample_value("training_analytics_layer_max_abs_weight", {"run_id": "r", "layer": "1"})
    assert value is not None and math.isnan(value)
    drift = json.loads((tmp_path / "status" / status.LAYER_DRIFT).read_text())
    stability = json.loads((tmp_path / "status" / status.PARAMETER_STABILITY).read_text())
    check_schema(drift, DRIFT_SCHEMA)
    check_schema(stability, STABILITY_SCHEMA)
    assert drift["layers"][2]["delta_norm"] is None and drift["total_relative_change"] is None
    assert drift["summary"]["max_drift_layer"] == 0  # the finite block
    assert stability["layers"][2]["max_abs_weight"] is None
    assert stability["alerts"] == [{"layer": 1, "type": "exploding", "severity": "critical", "value": None,
                                    "threshold": 150.0, "message": "Layer 1 has extreme weight values"}]
    assert stability["summary"]["health_status"] == "critical"
