"""Step phases and checkpoints: where the training loop's time goes.

:class:`PhaseTimer` splits the loop's time into the phases of
``metrics.PHASES`` with one mark per phase change: ``mark(phase)`` closes the
open phase (its elapsed time is added to it) and opens the next; ``current``
is the open phase (the hang watchdog, exporter/watchdog.py, reads it to excuse
evaluation and checkpointing). The phases tile the time between
``TrainingMonitor.begin`` and ``end``: every second in between lands in
exactly one phase.

Marks, from the monitor's hooks (exporter/core.py) and the callback's
(exporter/callback.py), checked against the transformers 5.x Trainer loop
(``Trainer._run_epoch``, ``get_batch_samples``, ``_maybe_log_save_evaluate``):

============================  ==================  ==============================================
mark                          opens               what runs in the phase it opens
============================  ==================  ==============================================
``begin`` (on_train_begin)    data_loading        ``iter(train_dataloader)`` (``evaluation``
                                                  instead with ``eval_on_start``)
the train data loader's       data_loading        the fetch (collate, worker queue, accelerate's
``next()`` (Trainer)                              device copy) of each batch of the step, all
                                                  fetched by ``get_batch_samples`` before
                                                  on_step_begin
... and its hand-over         other               ``get_batch_samples``' gather of the token
                                                  count across ranks
                                                  (``average_tokens_across_devices``), which
                                                  waits for every rank
``step_begin``                other               ``_prepare_inputs``, DDP's pre-forward buffer
(on_step_begin)                                   broadcast (waits for every rank), up to the
                                                  watched model's forward
forward pre-hook on the       forward             the watched model's forward
watched model (training)
forward hook (training)       backward            loss scaling, ``backward()`` (under DDP the
                                                  gradient all-reduce, which waits for every
                                                  rank), the Trainer's NaN check of the loss,
                                                  gradient clipping
``on_substep_end`` (between   other               the next micro-batch's input preparation, up
micro-batches)                                    to its forward
``before_optimizer_step``     optimizer           ``optimizer.step()``
(on_pre_optimizer_step)
``after_optimizer_step``      other               learning-rate scheduler, ``zero_grad``, the
(on_optimizer_step)                               other callbacks' on_step_end
``step_end`` (on_step_end)    data_loading        the next step's batches; ``other`` instead
                                                  when the Trainer logs now (its loss gather
                                                  and ``.item()``), ``evaluation`` when it
                                                  evaluates, ``checkpointing`` when it saves
                                                  (``control.should_log`` / ``should_evaluate``
                                                  / ``should_save``, set by DefaultFlowCallback,
                                                  which runs before this callback)
``on_log`` after a step's     evaluation /        the evaluation or save that follows the log
logging (open phase other)    checkpointing /
                              data_loading
``on_epoch_end``              as step_end         an epoch-strategy log, evaluation or save
``on_evaluate``               checkpointing or    the save that follows an evaluation
                              data_loading
``on_save``                   data_loading        (closes checkpointing: the save's duration)
the fixed evaluation          evaluation, then    ``maybe_evaluate``'s generation pass
(``maybe_evaluate``)          the phase before
``end`` (on_train_end)        (none)              closes the open phase
============================  ==================  ==============================================

So under DDP the waits for other ranks are in backward (the gradient
all-reduce) and other (the token-count gather, the buffer broadcast, the
logging gather), never in data_loading, forward or optimizer: those three are
the rank's own work, which the straggler rules compare across ranks
(prometheus/rules/phases.rules.yml). A plain loop gets the same split when it
calls ``step_begin`` after fetching its batch.

A save the callback did not see coming (``save_strategy="best"`` decides after
the evaluation) is found at on_save: the phase opened by the last mark is
relabelled ``checkpointing`` before it is counted. Not seen at all: the time of
``train()`` before on_train_begin (model and data loader preparation) and after
on_train_end, and, at the end of an epoch, the loop's own tail (counted as
data_loading).

Plain loops get the same marks from the same methods, plus
``TrainingMonitor.mark_phase(name)`` / ``with monitor.phase(name):`` for their
own evaluations and ``with monitor.checkpointing(step, path):`` for saves.

Clocks. On the CPU the phases are ``time.perf_counter()`` differences. With
the watched model on a CUDA device each mark records a CUDA event
(``enable_timing=True``) on the current stream, from a bounded pool; the
elapsed time between consecutive events is read at export (the scrape thread)
once both have completed, an event not yet reached is left for the next
export. Nothing waits for the device on the training thread. These are device
timeline intervals, and they tile it as the host marks tile the host's: work
the device is still running when the host moves on is counted in the phase
that queued it, and a phase in which the device sits idle (waiting for the
data loader, a host-side save) counts that idle time, because the next event
completes as soon as the host queues it. A data loader that runs while the
device is still busy with the previous step therefore costs nothing, which is
what "data-loader bound" should mean. A mark made during CUDA graph capture,
or past the pool's bound, falls back to the host clock for that interval.
On CUDA the counters lag the host by the device's queue (a step at most); on
the CPU the open phase is counted up to the export.

Checkpoints. ``CheckpointLog`` keeps the recent save ends (for the median
interval); the size of a checkpoint directory (the sum of its regular files'
sizes, ``du -sb --apparent-size`` without the directory entries) is measured
by a worker thread, never on the training thread.
"""

from __future__ import annotations

import itertools
import os
import stat
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.metrics import PHASES

# Marks kept before the training thread drains the completed ones itself (nobody scraping); a few hundred
# steps' worth. Past twice this (the device thousands of marks behind), the oldest are dropped.
MAX_PENDING_MARKS = 4096
# Free CUDA events kept for reuse.
POOL_SIZE = 64
# Save ends kept for the median interval.
CHECKPOINT_WINDOW = 10


@dataclass
class _Mark:
    phase: str | None  # None: the end mark
    t: float  # perf_counter() on the host
    event: Any = None  # torch.cuda.Event, or None on the host clock


class PhaseTimer:
    """Per-phase seconds of one training loop. Marks come from the training thread, :meth:`take` from the
    exporting one; ``enabled=False`` keeps only ``current`` and the time of the last mark."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.current: str = "other"
        self.running = False
        self.last_mark = time.perf_counter()  # the host time the open phase began
        self.checkpoint_started: float | None = None
        self.dropped = 0  # intervals lost past the bound
        self._device: Any = None
        self._marks: deque[_Mark] = deque()
        self._pool: list[Any] = []
        self._lock = threading.Lock()  # the marks deque
        self._consume = threading.Lock()  # one consumer at a time
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._final = False

    # ------------------------------------------------------------ training thread

    def use_device(self, device: Any) -> None:
        """Time with CUDA events on ``device`` (a CUDA ``torch.device``) from the next mark on; None: host."""
        self._device = device

    def start(self, phase: str = "data_loading") -> None:
        with self._lock:
            self._marks.clear()
        self._final = False
        self.running = True
        self.current = ""  # so that the mark below is taken
        self.mark(phase)

    def mark(self, phase: str) -> None:
        """Close the open phase and open ``phase`` (same phase: nothing)."""
        if not self.running or phase == self.current:
            return
        now = time.perf_counter()
        self.current = phase
        self.last_mark = now
        if phase == "checkpointing":
            self.checkpoint_started = now
        if self.enabled:
            self._append(_Mark(phase, now, self._record()))

    def relabel(self, phase: str) -> None:
        """Count the open phase (since the last mark) as ``phase``."""
        if not self.running:
            return
        with self._lock:
            if self._marks:
                self._marks[-1].phase = phase
        self.current = phase
        if phase == "checkpointing":
            self.checkpoint_started = self.last_mark

    def stop(self) -> None:
        """Close the open phase; the next :meth:`take` waits for its end on the device."""
        if not self.running:
            return
        self.running = False
        if self.enabled:
            self._append(_Mark(None, time.perf_counter(), self._record()))
        self._final = True
        self.current = "other"

    def _record(self) -> Any:
        device = self._device
        if device is None:
            return None
        import torch

        if torch.cuda.is_current_stream_capturing():
            return None
        with self._lock:
            event = self._pool.pop() if self._pool else None
        if event is None:
            event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def _append(self, mark: _Mark) -> None:
        with self._lock:
            self._marks.append(mark)
            backlog = len(self._marks)
        if backlog > MAX_PENDING_MARKS and self._consume.acquire(blocking=False):
            try:
                self._drain(wait=False)
                with self._lock:
                    while len(self._marks) > 2 * MAX_PENDING_MARKS:
                        self._marks.popleft()
                        self.dropped += 1
            finally:
                self._consume.release()

    # ------------------------------------------------------------ export

    def take(self) -> dict[str, float]:
        """Seconds per phase counted since the last call (completed intervals; on the host clock the open
        phase up to now too)."""
        with self._consume:
            self._drain(wait=self._final)
            with self._lock:
                out, self._totals = self._totals, dict.fromkeys(PHASES, 0.0)
        return out

    def _drain(self, wait: bool) -> None:
        """Move completed intervals into the totals; the caller holds ``_consume``."""
        while True:
            with self._lock:
                if len(self._marks) < 2:
                    break
                a, b = self._marks[0], self._marks[1]
            if a.event is not None and b.event is not None:
                if not b.event.query():
                    if not wait:
                        break
                    b.event.synchronize()
                seconds = a.event.elapsed_time(b.event) / 1000.0
            else:
                seconds = b.t - a.t
            with self._lock:
                if a.phase is not None:
                    self._totals[a.phase] += max(seconds, 0.0)
                self._marks.popleft()
                if a.event is not None and len(self._pool) < POOL_SIZE:
                    self._pool.append(a.event)
        with self._lock:
            if len(self._marks) == 1:
                last = self._marks[0]
                if last.phase is None:
                    self._marks.clear()
                elif last.event is None and self.running:
                    # The open phase on the host clock, up to now (a long evaluation shows while it runs).
                    now = time.perf_counter()
                    self._totals[last.phase] += max(now - last.t, 0.0)
                    last.t = now


class CheckpointLog:
    """Save ends and sizes: the median interval between the recent saves, the size measured off the loop."""

    def __init__(self, window: int = CHECKPOINT_WINDOW) -> None:
        self._ends: deque[float] = deque(maxlen=window + 1)
        self._seq = 0
        self._done = 0
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def ended(self, now: float) -> float | None:
        """Record a save that ended at ``now`` (monotonic); the median interval, from the second save on."""
        self._ends.append(now)
        ends = list(self._ends)
        if len(ends) < 2:
            return None
        return statistics.median(b - a for a, b in itertools.pairwise(ends))

    def measure(self, path: str, report: Callable[[int], None], on_error: Callable[[Exception], None]) -> None:
        """Measure ``path``'s size in a worker thread and ``report`` it, unless a newer save reported first."""
        with self._lock:
            self._seq += 1
            seq = self._seq

        def work() -> None:
            try:
                size = directory_size(path)
                if size is None:
                    return  # not on this machine's disk (another node's rank saved it)
                with self._lock:
                    if seq < self._done:
                        return
                    self._done = seq
                report(size)
            except Exception as exc:
                on_error(exc)

        worker = threading.Thread(target=work, name="training-exporter-checkpoint-size", daemon=True)
        self._worker = worker
        worker.start()

    def join(self, timeout: float) -> None:
        """Wait (bounded) for the last size measurement: at the end of the run, for the final values."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)


def directory_size(path: str) -> int | None:
    """Sum of the sizes of the regular files under ``path`` (links not followed); None if it is no directory."""
    if not os.path.isdir(path):
        return None
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # removed meanwhile (save_total_limit rotation)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def checkpoint_duration(timer: PhaseTimer, now: float) -> float:
    """Seconds the save that ends ``now`` held the loop: since the mark that opened checkpointing; a save
    not announced by such a mark is the phase opened by the last mark, relabelled."""
    if timer.current != "checkpointing" or timer.checkpoint_started is None:
        timer.relabel("checkpointing")
        return max(now - timer.last_mark, 0.0)
    return max(now - timer.checkpoint_started, 0.0)


def mark_batches(loader: Any, mark: Callable[[str], None]) -> bool:
    """Make the Trainer's train data loader mark ``data_loading`` while a batch is fetched and ``other`` once
    it is handed over, so that what the loop does between fetches (the Trainer's cross-rank gather of the
    token count in ``get_batch_samples``) is not counted as data loading.

    The loader is accelerate's adapter (``DataLoaderShard``...), which iterates its ``base_dataloader`` by
    an explicit ``base_dataloader.__iter__()`` call: an instance attribute of that name wraps it. False
    (nothing changed) for any other loader.
    """
    base = vars(loader).get("base_dataloader")
    if base is None:
        return False
    original = base.__iter__
    if getattr(original, "_training_exporter_marks", False):
        return False

    def marked() -> Any:
        iterator = original()
        while True:
            mark("data_loading")
            try:
                batch = next(iterator)
            except StopIteration:
                return
            mark("other")
            yield batch

    marked._training_exporter_marks = True  # type: ignore[attr-defined]
    base.__iter__ = marked
    return True
