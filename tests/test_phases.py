"""Step phases and checkpoints on a real Trainer run and a plain loop (CPU, host clock; nothing faked).

Trainer: a tiny Llama, 6 optimizer steps of 2 micro-batches, evaluation and a save every 3 steps, and a
collator that sleeps ``SLEEP`` per batch and times itself. Expected values are measured independently:

  * the phases tile the monitor's life, from its ``begin`` (in the exporter's on_train_begin) to its ``end``
    (in on_train_end). Timing callbacks before and after the exporter's bracket those two instants, so the
    phase sum must lie within [first.on_train_end - last.on_train_begin, last.on_train_end -
    first.on_train_begin] (up to float rounding, 1e-6 s); ``train()``'s wall time exceeds it by what the
    exporter cannot see: before on_train_begin (model and data loader preparation) and after on_train_end;
  * data_loading >= the collator's own time on training batches (it runs inside the data loader's next(),
    all of it data loading), evaluation >= its time on evaluation batches (told apart by batch size);
  * the checkpoint count is the number of on_save calls, the size the sum of the file sizes under
    checkpoint-6 (os.stat, the ``du -sb --apparent-size`` of the files), the interval the time between the
    two on_save calls seen by the last callback, the duration at most that callback's on_evaluate ->
    on_save time (the save follows the evaluation; the exporter opens checkpointing at its on_evaluate).
    Tolerance 0.05 s for the last two: the difference is what the exporter's own on_save / on_evaluate do
    (a thread start, a few gauge writes), milliseconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from support.trl_support import PadCollator, TokenizedList, make_tokenizer, tiny_llama, training_args
from transformers import Trainer, TrainerCallback

from exporter import PrometheusCallback
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor
from exporter.metrics import PHASES
from exporter.phases import directory_size

SLEEP = 0.05
STEPS = 6
ACCUMULATION = 2
TRAIN_BATCH, EVAL_BATCH = 2, 3
QUIET: dict[str, Any] = {"gpu": False, "host": False, "watchdog": False}


class TimedCollator(PadCollator):
    def __init__(self, pad_id: int) -> None:
        super().__init__(pad_id)
        self.seconds = {"train": 0.0, "eval": 0.0}
        self.calls = {"train": 0, "eval": 0}

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        time.sleep(SLEEP)
        batch = super().__call__(examples)
        kind = "eval" if len(examples) == EVAL_BATCH else "train"
        self.seconds[kind] += time.perf_counter() - start
        self.calls[kind] += 1
        return batch


class Clock(TrainerCallback):
    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {}

    def _at(self, event: str) -> None:
        self.t.setdefault(event, []).append(time.perf_counter())

    def on_train_begin(self, *a: Any, **k: Any) -> None:
        self._at("begin")

    def on_train_end(self, *a: Any, **k: Any) -> None:
        self._at("end")

    def on_evaluate(self, *a: Any, **k: Any) -> None:
        self._at("evaluate")

    def on_save(self, *a: Any, **k: Any) -> None:
        self._at("save")


def samples(mon: TrainingMonitor, name: str) -> dict[str, float]:
    return {s.labels.get("phase", ""): s.value for fam in mon.registry.collect() for s in fam.samples
            if s.name == name}


def value(mon: TrainingMonitor, name: str) -> float | None:
    return samples(mon, name).get("")


def test_trainer_phases_tile_the_run_and_checkpoints(tmp_path: Path) -> None:
    tok = make_tokenizer()
    cb = PrometheusCallback(ExporterConfig(listen_address="127.0.0.1:0", run_id="phases", **QUIET))
    first, last = Clock(), Clock()
    collator = TimedCollator(tok.pad_token_id)
    seen: dict[str, set[str]] = {"forward": set(), "backward": set()}
    trainer = Trainer(
        model=tiny_llama(tok),
        args=training_args(str(tmp_path), STEPS, gradient_accumulation_steps=ACCUMULATION,
                           per_device_train_batch_size=TRAIN_BATCH, per_device_eval_batch_size=EVAL_BATCH,
                           eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3),
        train_dataset=TokenizedList(tok), eval_dataset=TokenizedList(tok, n=6, seed=1),
        data_collator=collator, callbacks=[first, cb, last],
    )  # fmt: skip
    # The phase open while a layer runs forward and backward (the exporter's hooks are on the whole model).
    layer = trainer.model.model.layers[0]  # type: ignore[union-attr]
    layer.register_forward_hook(lambda *a: seen["forward"].add(cb.monitor.phase_timer.current))  # type: ignore[union-attr]
    layer.register_full_backward_hook(lambda *a: seen["backward"].add(cb.monitor.phase_timer.current))  # type: ignore[union-attr]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    mon = cb.monitor
    assert mon is not None
    phases = samples(mon, "training_phase_seconds_total")
    assert set(phases) == set(PHASES)
    total = sum(phases.values())
    low = first.t["end"][0] - last.t["begin"][0]
    high = last.t["end"][0] - first.t["begin"][0]
    unseen = (first.t["begin"][0] - t0) + (wall - (last.t["end"][0] - t0))
    print(f"phases {phases}, sum {total:.4f} s, monitor span in [{low:.4f}, {high:.4f}], train() {wall:.4f} s")
    assert low - 1e-6 <= total <= high + 1e-6
    assert wall - total <= unseen + (high - low) + 1e-6
    # Training forwards in forward, evaluation forwards in evaluation, backward in backward.
    assert seen == {"forward": {"forward", "evaluation"}, "backward": {"backward"}}
    assert collator.calls["train"] >= STEPS * ACCUMULATION and collator.calls["eval"] == 2 * 2
    assert phases["data_loading"] >= collator.seconds["train"] >= STEPS * ACCUMULATION * SLEEP
    assert phases["evaluation"] >= collator.seconds["eval"]
    assert phases["checkpointing"] > 0 and phases["forward"] > 0 and phases["backward"] > 0
    assert phases["optimizer"] > 0 and phases["other"] > 0

    saves = last.t["save"]
    assert value(mon, "training_checkpoints_total") == len(saves) == 2
    assert value(mon, "training_checkpoint_step") == STEPS
    ckpt = tmp_path / f"checkpoint-{STEPS}"
    truth = sum(os.stat(p).st_size for p in ckpt.rglob("*") if p.is_file() and not p.is_symlink())
    assert truth > 0 and value(mon, "training_checkpoint_size_bytes") == truth == directory_size(str(ckpt))
    interval = value(mon, "training_checkpoint_interval_seconds")
    assert interval is not None and abs(interval - (saves[1] - saves[0])) < 0.05
    duration = value(mon, "training_checkpoint_duration_seconds")
    held = saves[1] - last.t["evaluate"][1]
    assert duration is not None and 0 < duration <= held < duration + 0.05
    stamp = value(mon, "training_checkpoint_timestamp_seconds")
    assert stamp is not None and time.time() - wall <= stamp <= time.time()
    errors = {lab: v for lab, v in samples(mon, "training_exporter_collector_errors_total").items() if v}
    assert errors == {}


def test_plain_loop_marks_phases_and_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = TrainingMonitor(ExporterConfig(listen_address="127.0.0.1:0", **QUIET), run_id="loop")
    mon.watch(model)
    inside: list[str] = []
    model[0].register_forward_hook(lambda *a: inside.append(mon.phase_timer.current))
    t0 = time.perf_counter()
    mon.begin(max_steps=3)
    for step in range(1, 4):
        time.sleep(SLEEP)  # "data loading"
        mon.step_begin()
        model(torch.randn(4, 8)).square().mean().backward()
        mon.before_optimizer_step(opt)
        opt.step()
        mon.after_optimizer_step()
        opt.zero_grad()
        mon.step_end()
        with mon.phase("evaluation"):
            time.sleep(SLEEP)
            assert mon.phase_timer.current == "evaluation"
        assert mon.phase_timer.current == "data_loading"
        path = tmp_path / f"ckpt-{step}"
        with mon.checkpointing(step, path):
            assert mon.phase_timer.current == "checkpointing"
            path.mkdir()
            (path / "w.bin").write_bytes(b"x" * 1000 * step)
            time.sleep(SLEEP)
    mon.end(linger=False)
    wall = time.perf_counter() - t0
    mon.stop()
    phases = samples(mon, "training_phase_seconds_total")
    assert inside == ["forward"] * 3
    assert phases["data_loading"] >= 3 * SLEEP and phases["evaluation"] >= 3 * SLEEP
    assert phases["checkpointing"] >= 3 * SLEEP
    assert sum(phases.values()) <= wall
    assert value(mon, "training_checkpoints_total") == 3
    assert value(mon, "training_checkpoint_size_bytes") == 3000
    duration = value(mon, "training_checkpoint_duration_seconds")
    assert duration is not None and duration >= SLEEP
    interval = value(mon, "training_checkpoint_interval_seconds")
    assert interval is not None and 2 * SLEEP <= interval <= wall


def test_phases_off_exports_none_but_keeps_the_current_phase() -> None:
    mon = TrainingMonitor(ExporterConfig(listen_address="127.0.0.1:0", phases=False, **QUIET), run_id="off")
    mon.begin()
    mon.step_begin()
    assert mon.phase_timer.current == "other"
    mon.mark_phase("evaluation")
    assert mon.phase_timer.current == "evaluation"
    mon.end(linger=False)
    mon.stop()
    assert samples(mon, "training_phase_seconds_total") == {}
