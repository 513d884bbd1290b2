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
from support.numerics import confidence_rel, entropy_abs, norm_rel, ratio_rel
from transformers import GPT2Config, GPT2LMHeadModel

from exporter.config import ExporterConfig
from exporter.core import PortInUseError, TrainingMonitor
from exporter.layers import ParamGroups, layer_and_module

# No watchdog: these monitors are left in state training, and its dump would land in the working directory.
QUIET = {"gpu": False, "host": False, "watchdog": False}


def sample(mon: TrainingMonitor, name: str, **labels: str) -> float | None:
    return mon.registry.get_sample_value(name, {"run_id": mon.run_id, **labels})


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def group_size(model: torch.nn.Module, key: tuple[str, str] | None = None) -> tuple[int, int]:
    """Elements and tensors of one (layer, module) group, or of every parameter: what a norm bound needs."""
    params = [p for n, p in model.named_parameters() if key is None or layer_and_module(n) == key]
    return sum(p.numel() for p in params), len(params)


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
        assert value == pytest.approx(math.sqrt(expected[label]), rel=norm_rel(*group_size(model, label))), label


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

    # Float32 norms against float64 references of the same gradients: within the bounds of
    # tests/support/numerics, which hold for any kernel (the per-group norms, then their squares summed).
    g = group_norm(grads, "1", "mlp.c_fc")
    assert sample(mon, "training_layer_grad_norm", layer="1", module="mlp.c_fc") == pytest.approx(
        g, rel=norm_rel(*group_size(model, ("1", "mlp.c_fc"))))
    total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in grads.values()))
    elements, tensors = group_size(model)
    assert sample(mon, "training_grad_norm") == pytest.approx(total, rel=norm_rel(elements, 2 * tensors))
    assert sample(mon, "training_dead_layers") == 0.0
    # W_after - W_before is one correctly rounded float32 subtraction on both sides: the same values.
    deltas = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    after = {n: p.detach() for n, p in model.named_parameters()}
    ratio = group_norm(deltas, "0", "attn.c_attn") / group_norm(after, "0", "attn.c_attn")
    assert sample(mon, "training_layer_update_ratio", layer="0", module="attn.c_attn") == pytest.approx(
        ratio, rel=ratio_rel(*group_size(model, ("0", "attn.c_attn"))))

    # Entropy / confidence over the 18 labelled next-token positions.
    logits = out.logits.detach()[:, :-1][b["labels"][:, 1:] != -100]
    assert_predictions(mon, logits)


def assert_predictions(mon: TrainingMonitor, logits: torch.Tensor) -> None:
    """The exported entropy and confidences against float64 softmax of the same rows (positions x vocab),
    within the float32 bounds of tests/support/numerics."""
    positions, vocab = logits.shape
    largest = float(logits.abs().max())
    p = logits.double().softmax(-1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert sample(mon, "training_token_entropy_nats") == pytest.approx(
        entropy, abs=entropy_abs(vocab, positions, largest, entropy))
    top = p.topk(min(5, vocab), dim=-1).values
    assert sample(mon, "training_top1_confidence_ratio") == pytest.approx(
        float(top[:, 0].mean()), rel=confidence_rel(vocab, positions, largest))
    assert sample(mon, "training_top5_confidence_ratio") == pytest.approx(
        float(top.sum(-1).mean()), rel=confidence_rel(vocab, positions, largest, k=5))


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
    # Both sides are float32 norms (two kernels): twice the bound of one.
    assert sample(mon, "training_layer_grad_norm", layer="1", module="mlp.c_fc") == pytest.approx(
        expected, rel=2 * norm_rel(*group_size(model, ("1", "mlp.c_fc"))))


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
    bias_grad = model.transformer.h[0].mlp.c_fc.bias.grad  # type: ignore[union-attr]
    assert sample(mon, "training_layer_grad_norm", layer="0", module="mlp.c_fc") == pytest.approx(
        float(bias_grad.double().norm()), rel=norm_rel(bias_grad.numel()))
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
        with caplog.at_level(logging.INFO, logger="training_exporter"):
            mon.start()
        assert mon.port is None
        assert sample(mon, "training_exporter_collector_errors_total", collector="http_server") == 1.0
        # Logged once (not again by the error accounting), in one line.
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
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
    # final_scrape_timeout_seconds 0: stop at the end, without waiting for a scrape (tests/test_lifecycle.py).
    cfg = ExporterConfig(listen_address="127.0.0.1:0", labels={"team": "nlp", "cluster": "a"}, gpu=False,
                         final_scrape_timeout_seconds=0)
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
    import exporter.stats as stats

    monkeypatch.setattr(stats, "PREDICTION_MAX_POSITIONS", 8)  # fewer than the 18 labelled positions
    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="draw")
    labelled = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    logits = torch.full((3, 8, 5), 7.0)  # unlabelled positions: a very different distribution
    labels = torch.full((3, 8), -100)
    labels[:, 2:] = 1  # positions 1..6 of each row predict a label
    logits[:, 1:7] = labelled
    mon._observe_logits(logits, labels, None)
    mon.flush()
    # 8 drawn positions, all labelled (every one holds the same distribution).
    assert_predictions(mon, labelled.expand(8, 5))


def test_the_plain_loop_example_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.core as core

    doc = core.__doc__ or ""
    code = textwrap.dedent(doc.split("::\n", 1)[1].split('"""', 1)[0])
    assert "import torch" in code and "describe_model" in code
    monkeypatch.chdir(tmp_path)
    # Its settings come from the environment, as the callback's do: a free port here.
    monkeypatch.setenv("TRAINING_EXPORTER_WEB_LISTEN_ADDRESS", "127.0.0.1:0")
    monkeypatch.setenv("TRAINING_EXPORTER_COLLECTOR_GPU", "false")
    namespace: dict[str, object] = {}
    exec(compile(code, "exporter/core.py docstring", "exec"), namespace)
    mon = namespace["monitor"]
    assert isinstance(mon, TrainingMonitor)
    assert sample(mon, "training_step") == 20.0 and sample(mon, "training_max_steps") == 20.0
    assert sample(mon, "training_state", state="completed") == 1.0
    assert sample(mon, "training_samples_total") == 80.0 and sample(mon, "training_tokens_total") == 80.0 * 16
    info = next(f for f in mon.registry.collect() if f.name == "training_info").samples[0].labels
    assert info["model_type"] == "gpt2" and info["adapter"] == "none"
    assert mon.output_dir == "runs/my-run"


def _loop(mon: TrainingMonitor, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
          poison: set[int] = frozenset(), read_at: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    for step in range(1, steps + 1):
        mon.step_begin()
        model(**batch(step)).loss.backward()
        if step in poison:
            next(model.parameters()).grad.mul_(float("nan"))  # type: ignore[union-attr]
        mon.before_optimizer_step(opt)
        if step not in poison:  # skipped, as AMP's GradScaler skips a non-finite update
            opt.step()
        mon.after_optimizer_step()
        opt.zero_grad()
        mon.step_end()
        if step in read_at:
            mon.flush()


def test_every_sampled_step_with_nonfinite_gradients_is_counted() -> None:
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = TrainingMonitor(ExporterConfig(layers_interval=1, min_sample_period_seconds=0, **QUIET), run_id="nan")
    mon.watch(model)
    mon.begin()
    # NaN at 15 (between reads at 10 and 20) and at 20 and 21.
    _loop(mon, model, opt, 30, poison={15, 20, 21}, read_at={10, 20, 30})
    assert sample(mon, "training_nonfinite_gradients_total") == 3.0


def test_first_step_of_a_resumed_process_is_sampled_and_update_ratio_skips_lr_zero() -> None:
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = ExporterConfig(layers_interval=50, update_ratio_interval=50, predictions_interval=50, **QUIET)
    mon = TrainingMonitor(cfg, run_id="resumed")
    mon.watch(model)
    mon.begin(start_step=120)  # resumed at step 120: no multiple of 50 comes next
    for group in opt.param_groups:
        group["lr"] = 0.0  # warmup from 0 on the first resumed step
    _loop(mon, model, opt, 1)
    mon.flush()
    assert sample(mon, "training_step") == 121.0
    assert sample(mon, "training_layer_grad_norm", layer="1", module="mlp.c_fc") is not None
    assert sample(mon, "training_token_entropy_nats") is not None
    # A step that updated nothing gives no update-ratio sample; the next one with lr > 0 does.
    assert sample(mon, "training_layer_update_ratio", layer="0", module="attn.c_attn") is None
    for group in opt.param_groups:
        group["lr"] = 0.1
    _loop(mon, model, opt, 1)
    mon.flush()
    ratio = sample(mon, "training_layer_update_ratio", layer="0", module="attn.c_attn")
    assert ratio is not None and ratio > 0


def test_step_loss_is_the_token_weighted_mean_of_micro_batches() -> None:
    # Two micro-batches of 3 and 9 loss tokens: the step loss weights them 1 : 3.
    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="weighted")
    mon.begin()
    mon.step_begin()
    mon.observe_loss(torch.tensor(2.0), tokens=torch.tensor(3))
    mon.observe_loss(torch.tensor(1.0), tokens=9)
    mon.step_end()
    assert sample(mon, "training_loss") == pytest.approx((2.0 * 3 + 1.0 * 9) / 12, rel=1e-15)


def test_packed_rows_count_their_sequences() -> None:
    model = tiny_gpt2()
    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="packed")
    mon.watch(model)
    mon.begin()
    ids = torch.randint(0, 20, (1, 9))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # three sequences in one padding-free row
    labels = ids.clone()
    labels[positions == 0] = -100
    mon.step_begin()
    model(input_ids=ids, position_ids=positions, labels=labels)
    model(input_ids=ids, position_ids=positions, labels=labels,
          cu_seq_lens_q=torch.tensor([0, 3, 5, 9], dtype=torch.int32))  # the collator's own boundaries
    mon.step_end()
    assert sample(mon, "training_samples_total") == 6.0
    assert sample(mon, "training_tokens_total") == 18.0


def test_predictions_a_model_cannot_give_are_a_series_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    class LossOnly(torch.nn.Module):
        """A model whose output holds its loss only: no logits, no hidden state, no output embedding."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_gpt2()

        def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": self.inner(**batch).loss}

    model = LossOnly()
    mon = TrainingMonitor(ExporterConfig(predictions_interval=1, min_sample_period_seconds=0, **QUIET),
                          run_id="loss-only")
    mon.watch(model)
    mon.begin()
    with caplog.at_level(logging.WARNING, logger="training_exporter"):
        for step in range(3):
            mon.step_begin()
            model(**batch(step))["loss"].backward()
            mon.step_end()
    mon.flush()
    for statistic in ("token_entropy", "top1_confidence", "top5_confidence"):
        assert sample(mon, "training_statistic_unavailable", statistic=statistic, reason="no_logits") == 1.0
    assert sample(mon, "training_token_entropy_nats") is None
    assert sample(mon, "training_loss") is not None  # the rest goes on
    assert len([r for r in caplog.records if "entropy and confidence not exported" in r.getMessage()]) == 1
    assert sample(mon, "training_exporter_collector_errors_total", collector="predictions") == 0.0
