"""Hang watchdog: a daemon thread that notices when the training loop stops taking steps.

The training thread's whole share is one attribute write per step:
:meth:`TrainingMonitor.step_end <exporter.core.TrainingMonitor.step_end>` stores
``(perf_counter(), step)`` as one tuple in ``monitor.step_progress`` (a single
store, so the watchdog never sees a time of one step with the number of
another). It takes no lock and calls nothing here; everything else runs on
the watchdog's own thread:

* every tick (a tenth of the threshold, between 0.05 s and 5 s) it reads that
  tuple; a new one is progress. From the progress it sees it keeps the recent
  seconds per step (each sighting gives the mean of the steps since the one
  before, so fast steps seen a few per tick still count), and the threshold is
  ``max(watchdog.floor_seconds, watchdog.multiple x median)`` over the last
  :data:`WINDOW` sightings, exported as ``training_hang_threshold_seconds``;
* it is armed from the first completed step on: the first step holds the
  compilation and warm-up (CUDA context, autotuning, ``torch.compile``), whose
  length says nothing of a hang, and it is never a step time of the median
  (which starts with the interval between the first and the second step);
  until then the threshold is the floor;
* it is disarmed while the monitor's phase is ``evaluation`` or
  ``checkpointing`` (``monitor.phase_timer.current``), and the clock of time
  without progress restarts when such a phase ends; outside state
  ``training`` (paused, ended) it is disarmed too; an interval between two
  sightings that held such a phase is no step time and stays out of the median;
* past the threshold it sets ``training_hang_suspected`` to 1, writes every
  Python thread's stack once to ``training-exporter-hang-rank<R>-<unixtime>.txt``
  in the monitor's output dir (thread names and ids, then
  :func:`faulthandler.dump_traceback`), counts it in
  ``training_hang_dumps_total`` and logs the path once at WARNING. The next
  progress sets the gauge back to 0 and re-arms the dump.

The thread holds the monitor by a weak reference, so a monitor dropped without
:meth:`~exporter.core.TrainingMonitor.end` is still collected (and its thread
ends). Every failure inside the loop is counted under the collector name
``watchdog`` and the loop goes on.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from exporter import metrics as m

if TYPE_CHECKING:
    from exporter.core import TrainingMonitor

log = logging.getLogger("training_exporter")

# Recent seconds-per-step sightings the median is taken over.
WINDOW = 50
# Phases whose length is no hang: the loop is busy elsewhere on purpose.
EXCUSED_PHASES = ("evaluation", "checkpointing")
MIN_TICK_SECONDS = 0.05
MAX_TICK_SECONDS = 5.0


class HangWatchdog:
    """Watches ``monitor.step_progress`` from its own daemon thread (see the module docstring).

    Args:
        monitor: the monitor whose steps are watched; held weakly.
        multiple: a hang is suspected after this many recent median step times without a step.
        floor_seconds: but never sooner than this.
    """

    def __init__(self, monitor: TrainingMonitor, multiple: float, floor_seconds: float) -> None:
        self._monitor = weakref.ref(monitor)
        self._errors = monitor.errors
        self.multiple = multiple
        self.floor_seconds = floor_seconds
        self._suspected = monitor.child(m.HANG_SUSPECTED)
        self._threshold_gauge = monitor.child(m.HANG_THRESHOLD)
        self._dumps = monitor.child(m.HANG_DUMPS)
        self._suspected.set(0)
        self._threshold_gauge.set(floor_seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._per_step: deque[float] = deque(maxlen=WINDOW)
        self._seen: tuple[float, int] | None = None
        # perf_counter() from which time without progress is counted: the last progress seen, or the
        # last tick of an excused phase.
        self._since: float | None = None
        self._dumped = False
        # An excused phase (or a pause) since the last progress seen: that interval is no step time.
        self._excused = False
        self.threshold = floor_seconds
        self.last_dump: str | None = None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self) -> None:
        """Start the thread (again after :meth:`stop`); a running one is kept."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._seen = None
        self._since = None
        self._per_step.clear()
        self._dumped = False
        self._excused = False
        self._suspected.set(0)
        self._thread = threading.Thread(target=self._run, name="training-exporter-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread and wait for it at most ``timeout`` s (it is a daemon: it never holds up exit)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._suspected.set(0)

    def _tick_seconds(self) -> float:
        return min(MAX_TICK_SECONDS, max(MIN_TICK_SECONDS, self.threshold / 10))

    def _run(self) -> None:
        while not self._stop.wait(self._tick_seconds()):
            try:
                if not self.check(time.perf_counter()):
                    return
            except Exception as exc:
                self._errors.record("watchdog", exc)

    def check(self, now: float) -> bool:
        """One tick at ``now`` (``perf_counter()``); False once the monitor is gone."""
        mon = self._monitor()
        if mon is None:
            return False
        progress = mon.step_progress
        if progress is not None and progress != self._seen:
            self._progress(progress)
        self.threshold = self._threshold()
        self._threshold_gauge.set(self.threshold)
        if progress is None or self._since is None:
            return True  # not armed before the first step
        timer = getattr(mon, "phase_timer", None)
        if mon.state != "training" or getattr(timer, "current", None) in EXCUSED_PHASES:
            self._since = max(self._since, now)
            self._excused = True
            return True
        if now - self._since > self.threshold and not self._dumped:
            self._dumped = True
            self._suspected.set(1)
            self._dump(mon, now - self._since)
        return True

    def _progress(self, progress: tuple[float, int]) -> None:
        seen = self._seen
        if self._excused:
            self._excused = False
        elif seen is not None and progress[1] > seen[1] and progress[0] > seen[0]:
            self._per_step.append((progress[0] - seen[0]) / (progress[1] - seen[1]))
        self._seen = progress
        self._since = progress[0] if self._since is None else max(self._since, progress[0])
        if self._dumped:
            self._dumped = False
            self._suspected.set(0)

    def _threshold(self) -> float:
        if not self._per_step:
            return self.floor_seconds
        return max(self.floor_seconds, self.multiple * statistics.median(self._per_step))

    def _dump(self, mon: TrainingMonitor, idle: float) -> None:
        try:
            os.makedirs(mon.output_dir, exist_ok=True)
            path = os.path.join(mon.output_dir, f"training-exporter-hang-rank{mon.rank}-{int(time.time())}.txt")
            # Never through a symlink planted under that name.
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            with os.fdopen(os.open(path, flags, 0o644), "w", encoding="utf-8") as f:
                f.write(_header(mon, idle, self.threshold))
                f.flush()
                # Writes straight to the descriptor, from C: it works whatever the other threads hold.
                faulthandler.dump_traceback(f, all_threads=True)
            self._dumps.inc()
            self.last_dump = path
            log.warning("training-exporter: no training step for %.1f s (threshold %.1f s): hang suspected; "
                        "every thread's stack is in %s", idle, self.threshold, path)
        except Exception as exc:
            self._errors.record("watchdog", exc)


def _header(mon: TrainingMonitor, idle: float, threshold: float) -> str:
    frames: dict[int, Any] = sys._current_frames()
    lines = [
        f"training-exporter hang dump: run_id={mon.run_id} rank={mon.rank} pid={os.getpid()}",
        f"no training step for {idle:.1f} s (threshold {threshold:.1f} s); last step {mon._step}",
        f"written by thread {threading.current_thread().name!r}",
        "",
        "threads (id as in the stacks below, name, daemon, function running now):",
    ]
    for thread in threading.enumerate():
        ident = thread.ident or 0
        frame = frames.get(ident)
        where = f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})" if frame else "-"
        lines.append(f"  0x{ident:016x}  {thread.name}  daemon={thread.daemon}  {where}")
    return "\n".join(lines) + "\n\n"
