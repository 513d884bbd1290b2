"""The fp16 GradScaler's loss scale and skipped steps (exporter/amp.py), with real scalers and optimizers.

The Trainer gives fp16 runs a GradScaler only on an accelerator: accelerate's ``Accelerator`` sets
``scaler = None`` on the CPU (``fp16=True`` with ``use_cpu=True`` trains without one, measured here with
transformers 5.24 / accelerate 1.16). So on this machine:

* a plain loop drives ``torch.amp.GradScaler("cpu")`` and a real AdamW (the scale-decrease path);
* a plain loop drives accelerate's real ``AcceleratedOptimizer`` around a CPU GradScaler, with a fused and an
  unfused AdamW: its host-side ``step_was_skipped`` misses every skip of the fused one (the Trainer's default
  ``adamw_torch_fused``), which is why the exporter compares scales instead (exporter/amp.py);
* a real Trainer with ``fp16=True`` on the CPU, given the CPU GradScaler that accelerate would have built for
  a GPU (``trainer.accelerator.scaler`` and ``native_amp`` set before ``train()``: the one substitution, at the
  accelerator boundary). Autocast then runs in float16 on the CPU, the scaler scales, unscales, skips and
  updates as on a GPU, and the callback finds it through the optimizer the Trainer passes to its hooks;
* with CUDA, the untouched Trainer fp16 path (skipped without a GPU).

A skip is forced by turning one step's loss into +Inf: the scaled gradients are then Inf/NaN, the GradScaler
skips that step and halves its scale. The expected count is the number of steps on which the test saw the
scale go down (read by the test after each step; the exporter itself reads nothing on the training thread).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from exporter import PrometheusCallback
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor

QUIET: dict[str, Any] = {"listen_address": "127.0.0.1:0", "gpu": False, "host": False, "watchdog": False,
                         "final_scrape_timeout_seconds": 0}
INF_STEPS = (1, 5)  # the first step too: the comparison with the initial scale counts it
STEPS = 12


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (n, 2, 8))]


def sample(mon: TrainingMonitor, name: str) -> float | None:
    return mon.registry.get_sample_value(name, {"run_id": mon.run_id})


def train_plain(
    mon: TrainingMonitor, scaler: torch.amp.GradScaler, accelerated: Any = None, fused: bool = False
) -> list[float]:
    """A plain fp16-style loop; returns the scale after every step, as the test reads it."""
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    stepper = accelerated(optimizer) if accelerated is not None else optimizer
    mon.watch(model)
    mon.watch_scaler(scaler)
    mon.begin(max_steps=STEPS)
    scales = []
    for n, batch in enumerate(batches(STEPS), start=1):
        mon.step_begin()
        loss = model(**batch).loss
        if n in INF_STEPS:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mon.before_optimizer_step(optimizer)
        if accelerated is not None:
            stepper.step()  # accelerate's: scaler.step and scaler.update inside
        else:
            scaler.step(optimizer)
            scaler.update()
        mon.after_optimizer_step()
        optimizer.zero_grad()
        mon.step_end()
        scales.append(scaler.get_scale())
    return scales


def decreases(initial: float, scales: list[float]) -> int:
    return sum(1 for before, after in itertools.pairwise([initial, *scales]) if after < before)


def test_plain_loop_scale_and_skipped_steps() -> None:
    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="amp", registry=CollectorRegistry())
    # growth_interval 3: the scale also grows during the run, which is no skip.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scales = train_plain(mon, scaler)
    assert decreases(1024.0, scales) == len(INF_STEPS)
    assert any(after > before for before, after in itertools.pairwise(scales)), scales
    assert sample(mon, "training_amp_loss_scale") == scaler.get_scale()
    assert sample(mon, "training_amp_skipped_steps_total") == len(INF_STEPS)
    # Read at export only: the next read adds nothing.
    mon.flush()
    assert sample(mon, "training_amp_skipped_steps_total") == len(INF_STEPS)
    mon.end()


@pytest.mark.parametrize("fused", [False, True])
def test_skips_under_accelerates_optimizer_are_counted_fused_or_not(fused: bool) -> None:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    skipped: list[bool] = []

    def accelerated(optimizer: torch.optim.Optimizer) -> AcceleratedOptimizer:
        wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
        step = wrapped.step

        def recording_step(*args: Any, **kwargs: Any) -> None:
            step(*args, **kwargs)
            skipped.append(wrapped.step_was_skipped)

        wrapped.step = recording_step
        return wrapped

    mon = TrainingMonitor(ExporterConfig(**QUIET), run_id="amp-acc", registry=CollectorRegistry())
    scales = train_plain(mon, scaler, accelerated, fused=fused)
    assert decreases(1024.0, scales) == len(INF_STEPS)
    # accelerate's bool: right for an unfused optimizer, False on every skip of a fused one.
    assert sum(skipped) == (0 if fused else len(INF_STEPS)), skipped
    assert sample(mon, "training_amp_skipped_steps_total") == len(INF_STEPS)
    assert sample(mon, "training_amp_loss_scale") == scaler.get_scale()
    mon.end()


def test_amp_off_exports_nothing() -> None:
    mon = TrainingMonitor(ExporterConfig(**QUIET, amp=False), run_id="amp-off", registry=CollectorRegistry())
    train_plain(mon, torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert mon.amp is None
    assert sample(mon, "training_amp_loss_scale") is None and sample(mon, "training_amp_skipped_steps_total") is None
    mon.end()


class InfLossOnce(TrainerCallback):
    """Makes the model's loss +Inf on the given optimizer steps (a forward hook) and records the scale."""

    def __init__(self, model: torch.nn.Module, at: tuple[int, ...]) -> None:
        self.at = at
        self.step = 0
        self.scales: list[float] = []
        self.accelerate_skipped: list[bool] = []
        self.scaler: Any = None
        model.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if module.training and self.step + 1 in self.at:
            output.loss = output.loss * float("inf")
        return output

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        self.step = state.global_step
        if optimizer.scaler is not None:
            self.scales.append(optimizer.scaler.get_scale())
            self.accelerate_skipped.append(optimizer.step_was_skipped)


def trainer_run(
    tmp_path: Path, use_cpu: bool, inf_steps: tuple[int, ...] = INF_STEPS
) -> tuple[Trainer, PrometheusCallback, InfLossOnce]:
    model = tiny_gpt2()
    data = [b for batch in batches(STEPS) for b in ({"input_ids": r, "labels": r} for r in batch["input_ids"])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
                             report_to=[], use_cpu=use_cpu, fp16=True, save_strategy="no", disable_tqdm=True,
                             logging_steps=1, dataloader_num_workers=0, max_grad_norm=1.0)
    callback = PrometheusCallback(ExporterConfig(**QUIET, run_id="amp-trainer"))
    inf = InfLossOnce(model, inf_steps)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, inf])
    return trainer, callback, inf


def assert_trainer_exports(trainer: Trainer, callback: PrometheusCallback, inf: InfLossOnce, initial: float) -> None:
    mon = callback.monitor
    assert mon is not None and mon.amp is not None
    scaler = trainer.accelerator.scaler
    assert decreases(initial, inf.scales) == len(INF_STEPS), inf.scales
    assert sample(mon, "training_amp_skipped_steps_total") == len(INF_STEPS)
    assert sample(mon, "training_amp_loss_scale") == scaler.get_scale()


def test_trainer_fp16_on_cpu_has_no_scaler(tmp_path: Path) -> None:
    # What a CPU fp16 run is without the substitution: no scaler, so nothing to export (and no error).
    trainer, callback, _ = trainer_run(tmp_path, use_cpu=True, inf_steps=())
    trainer.train()
    assert trainer.accelerator.scaler is None
    assert callback.monitor is not None and callback.monitor.amp is None
    assert sample(callback.monitor, "training_amp_loss_scale") is None


def test_trainer_fp16_with_the_scaler_accelerate_builds_on_a_gpu(tmp_path: Path) -> None:
    trainer, callback, inf = trainer_run(tmp_path, use_cpu=True)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    trainer.accelerator.native_amp = True
    trainer.train()
    assert_trainer_exports(trainer, callback, inf, 1024.0)
    # The Trainer's default optimizer is the fused AdamW: accelerate's bool says no step was skipped.
    assert trainer.args.optim == "adamw_torch_fused" and not any(inf.accelerate_skipped), inf.accelerate_skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Trainer builds a GradScaler on a GPU only")
def test_trainer_fp16_on_cuda(tmp_path: Path) -> None:
    trainer, callback, inf = trainer_run(tmp_path, use_cpu=False)
    trainer.train()
    assert_trainer_exports(trainer, callback, inf, 65536.0)
