"""The framework-agnostic core fed by a plain PyTorch loop, checked against direct computations."""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
import torch
from prometheus_client import generate_latest
from transformers import GPT2Config, GPT2LMHeadModel

from exporter.config import ExporterConfig
from exporter.core import PortInUseError, TrainingMonitor
from exporter.layers import ParamGroups, layer_and_module

QUIET = {"gpu": False, "host": False}


def sample(mon: TrainingMonitor, name: str, **labels: str) -> float | None:
    return mon.registry.get_sample_value(name, {"run_id": mon.run_id, **labels})


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # 2 padding tokens
    labels = ids.clone()
    labels[0, 6:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("transformer.h.3.attn.c_attn.weight", ("3", "attn.c_attn")),
        ("base_model.model.transformer.h.11.mlp.c_fc.lora_A.default.weight", ("11", "mlp.c_fc")),
        ("base_model.model.model.layers.27.self_attn.q_proj.lora_B.default.weight", ("27", "self_attn.q_proj")),
        ("model.embed_tokens.weight", ("-1", "embed_tokens")),
        ("base_model.model.transformer.wte.modules_to_save.default.weight", ("-1", "wte")),
        ("transformer.wpe.weight", ("-1", "wpe")),
        ("transformer.ln_f.bias", ("final", "ln_f")),
        ("lm_head.weight", ("final", "lm_head")),
        ("bert.encoder.layer.4.attention.self.query.weight", ("4", "attention.self.query")),
    ],
)
def test_layer_and_module(name: str, expected: tuple[str, str]) -> None:
    assert layer_and_module(name) == expected


def test_grouped_norms_match_direct_computation() -> None:
    model = tiny_gpt2()
    model(**batch()).loss.backward()
    groups = ParamGroups.from_named(model.named_parameters())
    got = groups.grouped_norms([p.grad for p in groups.params]).tolist()
    expected: dict[tuple[str, str], float] = {}
    for name, p in model.named_parameters():
        key = layer_and_module(name)
        expected[key] = expected.get(key, 0.0) + float(p.grad.double().pow(2).sum())  # type: ignore[union-attr]
    assert groups.labels == list(expected)
    for label, value in zip(groups.labels, got, strict=True):
        assert value == pytest.approx(math.sqrt(expected[label]), rel=1e-5), label


def test_loss_ema_variance_and_nonfinite_from_a_plain_loop() -> None:
    mon = TrainingMonitor(ExporterConfig(ema_alpha=0.5, **QUIET), run_id="plain")
    mon.begin(max_steps=4)
    for loss in (4.0, 2.0, float("nan"), 1.0):
        mon.step_begin()
        mon.observe_loss(torch.tensor(loss))
        mon.step_end()
    # Nothing is read from the device until an export (here: the registry read below).
    assert len(mon._pending_losses) == 4
    assert sample(mon, "training_loss") == 1.0
    assert sample(mon, "training_loss_ema") == 2.0  # 4 -> 3 -> (NaN skipped) -> 2
    assert sample(mon, "training_loss_variance") == pytest.approx(7 / 3)  # sample variance of 4, 2, 1
    assert sample(mon, "training_nonfinite_loss_total") == 1.0
    assert sample(mon, "training_step_loss_count") == 3.0
    assert sample(mon, "training_step_loss_sum") == 7.0  # NaN never reaches the histogram
    assert sample(mon, "training_step") == 4.0
    assert sample(mon, "training_max_steps") == 4.0
    assert sample(mon, "training_step_duration_seconds_count") == 4.0


def test_nan_is_exported_as_is() -> None:
    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="nan")
    mon.begin()
    for loss in (1.5, float("inf"), float("nan")):
        mon.step_begin()
        mon.observe_loss(loss)
        mon.step_end()
    mon.flush()
    assert math.isnan(sample(mon, "training_loss"))  # type: ignore[arg-type]
    assert sample(mon, "training_nonfinite_loss_total") == 2.0
    assert sample(mon, "training_loss_ema") == 1.5


def test_hooked_model_loop_grads_updates_tokens_predictions() -> None:
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = ExporterConfig(layers_interval=1, update_ratio_interval=1, predictions_interval=1, **QUIET)
    mon = TrainingMonitor(cfg, run_id="hooked")
    mon.watch(model)
    mon.begin(max_steps=1)
    b = batch()
    mon.step_begin()
    out = model(**b)
    out.loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    mon.before_optimizer_step(opt)
    opt.step()
    mon.after_optimizer_step()
    mon.step_end()
    mon.flush()

    assert sample(mon, "training_loss") == pytest.approx(out.loss.item())
    assert sample(mon, "training_tokens_total") == 22.0  # 24 positions, 2 padding
    assert sample(mon, "training_samples_total") == 3.0
    assert sample(mon, "training_learning_rate") == 0.1

    def group_norm(tensors: dict[str, torch.Tensor], layer: str, module: str) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for n, t in tensors.items()
                             if layer_and_module(n) == (layer, module)))

    g = group_norm(grads, "1", "mlp.c_fc")
    assert sample(mon, "training_layer_grad_norm", layer="1", module="mlp.c_fc") == pytest.approx(g, rel=1e-5)
    total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in grads.values()))
    assert sample(mon, "training_grad_norm") == pytest.approx(total, rel=1e-5)
    assert sample(mon, "training_dead_layers") == 0.0
    deltas = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    after = {n: p.detach() for n, p in model.named_parameters()}
    ratio = group_norm(deltas, "0", "attn.c_attn") / group_norm(after, "0", "attn.c_attn")
    assert sample(mon, "training_layer_update_ratio", layer="0", module="attn.c_attn") == pytest.approx(ratio, rel=1e-4)

    # Entropy / confidence over the 18 labelled next-token positions.
    logits = out.logits.detach()[:, :-1][b["labels"][:, 1:] != -100]
    p = logits.double().softmax(-1)
    assert sample(mon, "training_token_entropy_nats") == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    top = p.topk(5, dim=-1).values
    assert sample(mon, "training_top1_confidence_ratio") == pytest.approx(float(top[:, 0].mean()), rel=1e-5)
    assert sample(mon, "training_top5_confidence_ratio") == pytest.approx(float(top.sum(-1).mean()), rel=1e-5)


@pytest.mark.parametrize("period", [0.0, 3600.0])
def test_samples_at_most_once_per_min_period(period: float) -> None:
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = ExporterConfig(layers_interval=1, update_ratio_interval=1, predictions_interval=1,
                         min_sample_period_seconds=period, **QUIET)
    mon = TrainingMonitor(cfg, run_id="period")
    mon.watch(model)
    mon.begin(max_steps=3)
    norms = []
    for step in range(3):
        mon.step_begin()
        model(**batch(step)).loss.backward()
        c_fc = model.transformer.h[1].mlp.c_fc  # type: ignore[union-attr]
        norms.append(math.hypot(float(c_fc.weight.grad.norm()), float(c_fc.bias.grad.norm())))
        mon.before_optimizer_step(opt)
        opt.step()
        mon.after_optimizer_step()
        opt.zero_grad()
        mon.step_end()
    mon.flush()
    assert len(set(norms)) == 3
    # Period 0: the newest step's gradients; one hour: only the first step was sampled.
    expected = norms[-1] if period == 0 else norms[0]
    assert sample(mon, "training_layer_grad_norm", layer="1", module="mlp.c_fc") == pytest.approx(expected, rel=1e-5)


def test_dead_layers_counted() -> None:
    model = tiny_gpt2()
    cfg = ExporterConfig(layers_interval=1, **QUIET)
    mon = TrainingMonitor(cfg, run_id="dead")
    mon.watch(model)
    mon.begin()
    mon.step_begin()
    model(**batch()).loss.backward()
    for name, p in model.named_parameters():
        if ".h.0.mlp." in name:  # two modules (c_fc, c_proj) get no signal
            p.grad = None if name.endswith("c_fc.weight") else torch.zeros_like(p)
    mon.before_optimizer_step()
    mon.step_end()
    mon.flush()
    assert sample(mon, "training_dead_layers") == 2.0
    assert sample(mon, "training_layer_grad_norm", layer="0", module="mlp.c_fc") == pytest.approx(
        float(model.transformer.h[0].mlp.c_fc.bias.grad.norm())  # type: ignore[union-attr]
    )
    assert sample(mon, "training_layer_grad_norm", layer="0", module="mlp.c_proj") == 0.0


def test_failing_collector_is_counted_and_scrape_goes_on() -> None:
    mon = TrainingMonitor(ExporterConfig(gpu=False, host=True), run_id="broken")
    mon.start_collectors()

    def boom() -> None:
        raise RuntimeError("sensor gone")

    mon._host.collect = boom
    mon.begin()
    mon.observe_loss(2.0)
    mon.step_end()
    for _ in range(3):
        text = generate_latest(mon.registry).decode()
    assert 'training_exporter_collector_errors_total{collector="host",run_id="broken"} 3.0' in text
    assert 'training_loss{run_id="broken"} 2.0' in text


def test_taken_port_is_logged_counted_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        mon = TrainingMonitor(ExporterConfig(listen_address=f"127.0.0.1:{port}", **QUIET), run_id="busy")
        with caplog.at_level(logging.ERROR, logger="training_exporter"):
            mon.start()
        assert mon.port is None
        assert sample(mon, "training_exporter_collector_errors_total", collector="http_server") == 1.0
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "\n" not in lines[0]
        mon.begin()
        mon.observe_loss(1.0)
        mon.step_end()
        mon.end()
        assert sample(mon, "training_state", state="completed") == 1.0

        strict = TrainingMonitor(
            ExporterConfig(listen_address=f"127.0.0.1:{port}", port_in_use="fail", **QUIET), run_id="busy2"
        )
        with pytest.raises(PortInUseError, match="cannot listen"):
            strict.start()


def test_crash_turns_state_to_crashed_before_exit(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import sys
        from exporter.config import ExporterConfig
        from exporter.core import TrainingMonitor
        mon = TrainingMonitor(ExporterConfig(listen_address="127.0.0.1:0", linger_seconds=30, gpu=False,
                                             host=False), run_id="crashy")
        mon.start()
        print(mon.port, flush=True)
        mon.begin(max_steps=10)
        for step in range(3):
            mon.step_begin(); mon.observe_loss(1.0); mon.step_end()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if 'state="crashed"} 1.0' in body:
                break
            time.sleep(0.2)
        assert 'training_state{run_id="crashy",state="crashed"} 1.0' in body
        assert 'training_state{run_id="crashy",state="training"} 0.0' in body
        assert 'training_step{run_id="crashy"} 3.0' in body
        assert proc.poll() is None  # still lingering so Prometheus can scrape the crash
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_extra_labels_on_every_series_and_server_stops() -> None:
    cfg = ExporterConfig(listen_address="127.0.0.1:0", labels={"team": "nlp", "cluster": "a"}, gpu=False)
    mon = TrainingMonitor(cfg, run_id="labelled")
    mon.start()
    port = mon.port
    assert port
    mon.begin(max_steps=1)
    mon.step_begin()
    mon.observe_loss(0.5)
    mon.step_end()
    page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = [line for line in page.splitlines() if line and not line.startswith("#")]
    assert len(samples) > 40
    for line in samples:
        assert 'run_id="labelled"' in line and 'team="nlp"' in line and 'cluster="a"' in line, line
    mon.end()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_recent_max_keeps_a_one_step_spike_visible() -> None:
    mon = TrainingMonitor(ExporterConfig(loss_window_seconds=0.5, **QUIET), run_id="spiky")
    mon.begin()
    for loss in (1.0, 8.0, float("nan"), 1.1, 0.9):
        mon.step_begin()
        mon.observe_loss(loss)
        mon.step_end()
    # Several steps after the spike, the last-step gauge has moved on but the window max has not.
    assert sample(mon, "training_loss") == pytest.approx(0.9)
    assert sample(mon, "training_loss_recent_max") == 8.0
    assert sample(mon, "training_loss_recent_spike_ratio") == 8.0  # 8.0 against the EMA of 1.0 before it
    time.sleep(0.6)
    mon.step_begin()
    mon.observe_loss(1.2)
    mon.step_end()
    assert sample(mon, "training_loss_recent_max") == pytest.approx(1.2)  # the spike left the window
    ema_before = 0.9 * (0.9 * (0.9 * 1.0 + 0.1 * 8.0) + 0.1 * 1.1) + 0.1 * 0.9
    assert sample(mon, "training_loss_recent_spike_ratio") == pytest.approx(1.2 / ema_before, rel=1e-6)


def test_spike_ratio_stays_low_through_a_fast_descent() -> None:
    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="descent")
    mon.begin()
    for i in range(200):
        mon.step_begin()
        mon.observe_loss(0.3 + 2.5 * 0.97**i)  # 2.8 -> 0.31, most of it in the first 100 steps
        mon.step_end()
    assert sample(mon, "training_loss_recent_max") == pytest.approx(2.8)
    assert sample(mon, "training_loss_recent_spike_ratio") == 1.0  # no step ever exceeded the EMA before it


def test_prediction_statistics_draw_only_labelled_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.core as core

    monkeypatch.setattr(core, "PREDICTION_MAX_POSITIONS", 8)  # fewer than the 18 labelled positions
    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="draw")
    labelled = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    logits = torch.full((3, 8, 5), 7.0)  # unlabelled positions: a very different distribution
    labels = torch.full((3, 8), -100)
    labels[:, 2:] = 1  # positions 1..6 of each row predict a label
    logits[:, 1:7] = labelled
    mon._observe_logits(logits, labels, None)
    mon.flush()
    p = labelled.double().softmax(-1)
    assert sample(mon, "training_token_entropy_nats") == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert sample(mon, "training_top1_confidence_ratio") == pytest.approx(float(p.max()), rel=1e-5)
    assert sample(mon, "training_top5_confidence_ratio") == pytest.approx(1.0, rel=1e-5)
