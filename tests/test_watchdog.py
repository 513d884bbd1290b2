"""The hang watchdog (exporter/watchdog.py), for real: real threads, real clocks, real files, real HTTP scrapes.

Plain loops on a TrainingMonitor with ``watchdog.floor_seconds`` 0.3 and ``watchdog.multiple`` 3, and one real
Trainer run. Timing margins: the watchdog ticks every max(0.05 s, threshold / 10), so it flags a hang at most
one tick (plus scheduling delay) after the threshold; the blocks last 1.5 s against a threshold of 0.3 s, and
the fast steps take 10 ms, 30x below it, so that a loaded 2-core machine neither misses a hang nor sees one in
the fast steps. Nothing is faked: evaluation and checkpointing are marked with the monitor's own
``phase`` / ``checkpointing`` blocks.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from exporter import PrometheusCallback
from exporter.config import ExporterConfig
from exporter.core import TrainingMonitor

FLOOR = 0.3
MULTIPLE = 3.0
FAST = 0.01
BLOCK = 1.5


def config(**overrides: Any) -> ExporterConfig:
    return ExporterConfig(**{
        "listen_address": "127.0.0.1:0", "gpu": False, "host": False, "final_scrape_timeout_seconds": 0,
        "watchdog_floor_seconds": FLOOR, "watchdog_multiple": MULTIPLE,
        # The scraper follows the gauge as it changes: no render shared over a second.
        "scrape_window_seconds": 0, **overrides,
    })


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[TrainingMonitor]:
    mon = TrainingMonitor(config(), run_id="hang", output_dir=tmp_path, registry=CollectorRegistry())
    mon.start()
    yield mon
    mon.end()
    mon.stop()


def value(mon: TrainingMonitor, name: str) -> float | None:
    return mon.registry.get_sample_value(name, {"run_id": mon.run_id})


def dumps(directory: Path) -> list[Path]:
    return sorted(directory.glob("training-exporter-hang-rank*-*.txt"))


def steps(mon: TrainingMonitor, n: int, seconds: float = FAST) -> None:
    for _ in range(n):
        mon.step_begin()
        time.sleep(seconds)
        mon.step_end()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class Scraper:
    """Scrapes /metrics over HTTP every 20 ms from its own thread and keeps each value of one gauge."""

    def __init__(self, port: int, name: str) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.name = name
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            for family in text_string_to_metric_families(text):
                self.values += [s.value for s in family.samples if s.name == self.name]

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _blocked_in_collective() -> None:
    # Stands for an all_reduce that never returns: a name the stack dump must show.
    time.sleep(BLOCK)


def test_a_blocked_step_is_flagged_once_dumped_and_cleared_by_the_next_step(
    monitor: TrainingMonitor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="training_exporter")
    monitor.begin(max_steps=30)
    steps(monitor, 10)
    assert value(monitor, "training_hang_suspected") == 0
    # 3 x ~10 ms is below the floor: the threshold is the floor.
    assert wait_for(lambda: value(monitor, "training_hang_threshold_seconds") == FLOOR)
    assert monitor.port is not None
    with Scraper(monitor.port, "training_hang_suspected") as scraper:
        monitor.step_begin()
        _blocked_in_collective()
        seen_during_block = list(scraper.values)
        monitor.step_end()
        steps(monitor, 3)
        assert wait_for(lambda: bool(scraper.values) and scraper.values[-1] == 0)
    assert seen_during_block[0] == 0 and 1 in seen_during_block, seen_during_block
    assert value(monitor, "training_hang_suspected") == 0
    assert value(monitor, "training_hang_dumps_total") == 1
    errors = monitor.registry.get_sample_value(
        "training_exporter_collector_errors_total", {"run_id": "hang", "collector": "watchdog"})
    assert errors == 0

    [dump] = dumps(tmp_path)
    text = dump.read_text()
    main = threading.main_thread()
    watchdog = monitor.watchdog
    assert watchdog is not None and watchdog.thread is not None
    assert "_blocked_in_collective" in text
    # The training thread, by name and by the id faulthandler gives it; the watchdog wrote the dump.
    assert f"0x{main.ident:016x}  MainThread" in text
    assert f"Thread 0x{main.ident:016x} (most recent call first)" in text
    assert f"Current thread 0x{watchdog.thread.ident:016x}" in text
    assert "written by thread 'training-exporter-watchdog'" in text
    warnings = [r.getMessage() for r in caplog.records if "hang suspected" in r.getMessage()]
    assert len(warnings) == 1 and str(dump) in warnings[0], warnings


def test_the_dump_is_written_on_the_watchdog_thread(
    monitor: TrainingMonitor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import exporter.watchdog as wd

    threads: list[threading.Thread] = []
    real = wd.faulthandler.dump_traceback

    def recording(*args: Any, **kwargs: Any) -> None:
        threads.append(threading.current_thread())
        real(*args, **kwargs)

    monkeypatch.setattr(wd.faulthandler, "dump_traceback", recording)
    monitor.begin()
    steps(monitor, 5)
    _blocked_in_collective()
    assert monitor.watchdog is not None
    assert threads == [monitor.watchdog.thread] and threads[0] is not threading.current_thread()


def test_steady_slow_steps_raise_the_threshold_instead_of_firing(monitor: TrainingMonitor, tmp_path: Path) -> None:
    # 0.15 s steps with a floor of 0.05 s: a floor-only watchdog would fire on every step. The floor is
    # lowered once a median exists (until the second step ends, the floor is the whole threshold).
    monitor.begin()
    steps(monitor, 3, seconds=0.15)
    assert monitor.watchdog is not None
    monitor.watchdog.floor_seconds = 0.05
    steps(monitor, 8, seconds=0.15)
    threshold = value(monitor, "training_hang_threshold_seconds")
    assert threshold is not None and MULTIPLE * 0.15 <= threshold < MULTIPLE * 0.15 * 1.5, threshold
    assert value(monitor, "training_hang_suspected") == 0 and dumps(tmp_path) == []
    assert value(monitor, "training_hang_dumps_total") == 0


def test_not_armed_before_the_first_step(monitor: TrainingMonitor, tmp_path: Path) -> None:
    monitor.begin()
    time.sleep(BLOCK)  # the first step's compilation and warm-up
    assert value(monitor, "training_hang_suspected") == 0 and dumps(tmp_path) == []
    monitor.step_end()
    # Armed now: no second step within the threshold is a hang.
    assert wait_for(lambda: value(monitor, "training_hang_suspected") == 1, timeout=BLOCK)
    assert len(dumps(tmp_path)) == 1


def test_no_hang_after_end(monitor: TrainingMonitor, tmp_path: Path) -> None:
    monitor.begin()
    steps(monitor, 5)
    monitor.end()
    assert monitor.watchdog is not None and monitor.watchdog.thread is not None
    assert not monitor.watchdog.thread.is_alive()  # joined by end()
    time.sleep(BLOCK)
    assert value(monitor, "training_hang_suspected") == 0 and dumps(tmp_path) == []


@pytest.mark.parametrize("phase", ["evaluation", "checkpointing"])
def test_evaluation_and_checkpointing_are_excused_and_restart_the_clock(
    monitor: TrainingMonitor, tmp_path: Path, phase: str
) -> None:
    monitor.begin()
    steps(monitor, 5)
    # The plain loop's own ways to mark the two phases (exporter/phases.py).
    block = monitor.phase("evaluation") if phase == "evaluation" else monitor.checkpointing(5)
    with block:
        assert monitor.phase_timer.current == phase
        time.sleep(BLOCK)
    assert monitor.phase_timer.current not in ("evaluation", "checkpointing")
    # 1.5 s since the last step, but the clock restarted when the phase ended: a step within the threshold
    # of the phase's end is no hang.
    time.sleep(FLOOR / 3)
    steps(monitor, 1)
    time.sleep(0.1)
    assert value(monitor, "training_hang_suspected") == 0 and dumps(tmp_path) == []
    # Re-armed after the phase (and the phase's interval kept out of the median): a real hang still fires.
    _blocked_in_collective()
    assert value(monitor, "training_hang_suspected") == 1 and len(dumps(tmp_path)) == 1


def test_a_failing_dump_is_counted_and_the_watchdog_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output dir should be")
    mon = TrainingMonitor(config(), run_id="hang", output_dir=blocker, registry=CollectorRegistry())
    try:
        mon.begin()
        steps(mon, 5)
        _blocked_in_collective()
        errors = {"run_id": "hang", "collector": "watchdog"}
        assert mon.registry.get_sample_value("training_exporter_collector_errors_total", errors) == 1
        assert value(mon, "training_hang_suspected") == 1 and value(mon, "training_hang_dumps_total") == 0
        steps(mon, 1)
        assert wait_for(lambda: value(mon, "training_hang_suspected") == 0)
        assert mon.watchdog is not None and mon.watchdog.thread is not None and mon.watchdog.thread.is_alive()
    finally:
        mon.end()


def test_watchdog_off_starts_no_thread_and_exports_nothing(tmp_path: Path) -> None:
    mon = TrainingMonitor(config(watchdog=False), run_id="hang", output_dir=tmp_path, registry=CollectorRegistry())
    before = {t.name for t in threading.enumerate()}
    mon.begin()
    steps(mon, 2)
    assert mon.watchdog is None and "training-exporter-watchdog" not in {t.name for t in threading.enumerate()} - before
    assert value(mon, "training_hang_suspected") is None and value(mon, "training_hang_threshold_seconds") is None
    mon.end()


# ------------------------------------------------------------------ a real Trainer


class SleepOnce(TrainerCallback):
    """Sleeps once in on_step_end of step ``at``: a stand-in for a step that hangs and then recovers."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.at:
            _sleep_once_in_step_end()


def _sleep_once_in_step_end() -> None:
    time.sleep(BLOCK)


def test_a_trainer_step_that_hangs_fires_and_dumps_into_the_output_dir(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    ids = torch.randint(0, 64, (40, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=12, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1,
                             dataloader_num_workers=0)
    callback = PrometheusCallback(config(run_id="trainer-hang"))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, SleepOnce(at=6)]).train()
    mon = callback.monitor
    assert mon is not None
    labels = {"run_id": "trainer-hang"}
    assert mon.registry.get_sample_value("training_hang_dumps_total", labels) == 1
    assert mon.registry.get_sample_value("training_hang_suspected", labels) == 0
    [dump] = dumps(out)
    text = dump.read_text()
    assert "_sleep_once_in_step_end" in text and "on_step_end" in text and "_inner_training_loop" in text
    assert mon.watchdog is not None and mon.watchdog.thread is not None
    assert f"Current thread 0x{mon.watchdog.thread.ident:016x}" in text
    assert not mon.watchdog.thread.is_alive()
