"""The end of a run as Prometheus must see it: the final state is scraped before the endpoint closes, and a
scheduler's SIGTERM is a final state of its own.

Final scrape. A run whose endpoint closes in ``end()`` is never scraped in state ``completed``, and a run
that stops before ``max_steps`` (``EarlyStoppingCallback``) then looks to TrainingExporterDown like a crash.
So ``end()`` returns at once and the endpoint goes on serving in the background until every client that was
scraping it has read the final state, for at most ``web.final_scrape_timeout_seconds`` (120 s), then closes:

* a client is an (address, User-Agent) pair: each of two Prometheus replicas gets its read, and a ``curl``
  from the Prometheus host does not stand in for Prometheus;
* a client is awaited until twice its last scrape interval plus 1 s after its last scrape: one that does not
  come back (a stopped Prometheus) stops being waited for; a client seen only once is awaited up to the bound;
* an endpoint nobody scraped closes at once: nothing saw the run, so nothing can page about it.

The server's threads are daemon threads, which the interpreter's exit would cut short, so an ``atexit``
step waits for the pending final scrapes (the same bound). That delays the exit of the process, never the
return of ``trainer.train()``. ``web.linger_seconds`` still blocks ``end()`` for its time, as before.

SIGTERM (``signals.sigterm``). Schedulers stop jobs with SIGTERM; without a handler a scraper sees what it
sees after SIGKILL: ``training``, then nothing. From the main thread (the only one ``signal.signal`` works
in), ``begin()`` installs a handler that sets state ``terminated``, flushes, keeps the endpoint up until the
state is read (at most ``web.sigterm_timeout_seconds``, 25 s, below the 30 s grace of Kubernetes and Slurm)
and chains to the handler found at installation:

* a Python callable is called at once (it may have a checkpoint to save within the grace period); should it
  end the process, the ``atexit`` step above waits for the read;
* ``SIG_DFL``: training goes on while the endpoint waits for the read, then the signal is raised again with
  the default action, so the process dies of SIGTERM as it would have (exit status -15). Waiting in the
  handler instead could wait on the exporter's own locks held by the interrupted frame, which a scrape needs;
* ``SIG_IGN`` (SIGTERM ignored on purpose) or a handler installed outside Python: nothing is installed.

A second SIGTERM during the wait ends the process at once. A Python handler runs only between bytecodes of
the main thread, so a process stuck in a C call (a hung collective) dies of the scheduler's SIGKILL instead
of its SIGTERM; ``--no-signals.sigterm`` leaves the default action alone. Nothing here raises into the
training loop; what the handler chains to behaves as it would have without it.

This module reads and sets a few private fields of :class:`~exporter.core.TrainingMonitor` (``_ended``,
``_httpd``, ``_set_state``): it is the monitor's own lifecycle, kept apart from its hot path.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from exporter.core import TrainingMonitor
    from exporter.server import MetricsServer, Request

log = logging.getLogger("training_exporter")

LIVE_STATES = ("training", "paused")
STATE_METRIC = "training_state"
# Scrape durations vary: a client is awaited this much longer than twice its interval.
SLACK_S = 1.0
# How long the SIGTERM handler holds the interrupted frame while the state changes. What is not done by
# then is blocked on a lock that frame holds, and finishes once the frame runs on.
MARK_WAIT_S = 1.0
# shutdown() of the HTTP server polls every 0.5 s: time for a close after its deadline.
CLOSE_S = 2.0
# Clients whose awaited time has passed are forgotten once there are this many.
MAX_CLIENTS = 64

SignalHandler = Callable[[int, FrameType | None], Any]


# --------------------------------------------------------------------------- who read the final state


@dataclass
class _Client:
    last: float
    interval: float | None = None
    read: int = -1  # generation of the final state it has read

    def awaited_until(self, unknown: float) -> float:
        return self.last + (2 * self.interval + SLACK_S if self.interval is not None else unknown)


class ScrapeLog:
    """Who scrapes the endpoint, how often, and who has read the final state (a full 200 answer to a scrape
    that started after :meth:`arm`)."""

    def __init__(self, unknown_interval: float) -> None:
        # Re-entrant: a signal handler on a thread that holds it must not deadlock.
        self._cond = threading.Condition(threading.RLock())
        self._clients: dict[tuple[str, str], _Client] = {}
        self._unknown = unknown_interval
        self._generation = 0
        self._armed = False
        self.answered = 0

    def begin(self, request: Request) -> tuple[tuple[str, str], int | None] | None:
        """A scrape starts (:class:`exporter.server.Observer`): who it is, and which final state it can read."""
        if not _reads_state(request):
            return None
        key = (request.remote_addr, request.header("user-agent"))
        with self._cond:
            return key, (self._generation if self._armed else None)

    def end(self, token: tuple[tuple[str, str], int | None] | None, status: int, complete: bool) -> None:
        """The scrape is answered; only a full 200 answer reads the state (a client that hung up read nothing)."""
        if token is not None and complete and status == 200:
            self._answered(*token)

    def _answered(self, key: tuple[str, str], generation: int | None) -> None:
        now = time.monotonic()
        with self._cond:
            self.answered += 1
            client = self._clients.get(key)
            if client is None:
                if len(self._clients) >= MAX_CLIENTS:
                    self._forget(now)
                client = self._clients[key] = _Client(now)
            else:
                client.interval, client.last = now - client.last, now
            if self._armed and generation == self._generation:
                client.read = generation
            self._cond.notify_all()

    def _forget(self, now: float) -> None:
        for key, client in list(self._clients.items()):
            if client.awaited_until(self._unknown) < now:
                del self._clients[key]

    def arm(self) -> None:
        """The final state is set: from now on a scrape reads it."""
        with self._cond:
            self._generation += 1
            self._armed = True
            self._cond.notify_all()

    def disarm(self) -> None:
        with self._cond:
            self._armed = False
            self._cond.notify_all()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def next_change(self, now: float) -> float | None:
        """None when no awaited client still has to read the final state, else when the first one stops
        being awaited."""
        with self._cond:
            if not self._armed:
                return None
            until = [c.awaited_until(self._unknown) for c in self._clients.values() if c.read != self._generation]
            until = [t for t in until if t > now]
            return min(until) if until else None

    def wait(self, deadline: Callable[[], float], cancelled: Callable[[], bool]) -> bool:
        """Block until every awaited client has read the final state (True), or ``deadline()`` passes or
        ``cancelled()`` (False)."""
        with self._cond:
            while not cancelled():
                now = time.monotonic()
                until = self.next_change(now)
                if until is None:
                    return True
                end = deadline()
                if now >= end:
                    return False
                self._cond.wait(min(until, end) - now)
            return False


def _reads_state(request: Request) -> bool:
    if request.method != "GET" or request.path == "/favicon.ico":
        return False
    names = parse_qs(request.query).get("name[]")
    return not names or STATE_METRIC in names


# --------------------------------------------------------------------------- closing after the read


class _Closer:
    """Stops a monitor's endpoint once its final state has been read (or at the deadline), on its own thread."""

    def __init__(self, scrapes: ScrapeLog, close: Callable[[], None], deadline: float) -> None:
        self.scrapes = scrapes
        self.deadline = deadline
        self.done = threading.Event()
        # Dropped once done: the monitor's finale holds this closer, and this closer must not hold the monitor.
        self._close: Callable[[], None] | None = close
        self._lock = threading.Lock()
        self._cancelled = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        _CLOSERS.add(self)
        thread = threading.Thread(target=self._run, name="training-exporter-final-scrape", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            # No new threads while the interpreter shuts down (Python >= 3.12): this is the exit, wait here.
            self._run()
            return
        self._thread = thread

    def _run(self) -> None:
        try:
            self.scrapes.wait(lambda: self.deadline, lambda: self._cancelled)
            with self._lock:
                close, self._close = self._close, None
                if self._cancelled or close is None:
                    return
                self._closing = True
            close()
        except Exception as exc:  # a daemon thread's exception would only be printed
            log.debug("training-exporter: closing the endpoint failed: %s", exc)
        finally:
            self._close = None
            _CLOSERS.discard(self)
            self.done.set()

    def cancel(self, wait: bool = True) -> None:
        """Keep the endpoint; with ``wait``, return only once a close already under way has finished."""
        with self._lock:
            self._cancelled = True
            closing = self._closing
        self.scrapes.notify()
        if wait and closing and threading.current_thread() is not self._thread:
            self.done.wait()

    def shorten(self, deadline: float) -> None:
        if deadline < self.deadline:
            self.deadline = deadline
            self.scrapes.notify()


class _Finale:
    """A monitor's scrape log and the closer of its endpoint."""

    def __init__(self, unknown_interval: float) -> None:
        self.scrapes = ScrapeLog(unknown_interval)
        self.closer: _Closer | None = None
        self.serving = False

    def pending(self, now: float) -> bool:
        return self.serving and self.scrapes.next_change(now) is not None


_FINALES: weakref.WeakKeyDictionary[TrainingMonitor, _Finale] = weakref.WeakKeyDictionary()
_FINALES_LOCK = threading.Lock()
_CLOSERS: set[_Closer] = set()


def finale(mon: TrainingMonitor) -> _Finale:
    with _FINALES_LOCK:
        fin = _FINALES.get(mon)
        if fin is None:
            cfg = mon.config
            fin = _FINALES[mon] = _Finale(max(cfg.final_scrape_timeout_seconds, cfg.sigterm_timeout_seconds))
        return fin


def scrapes(mon: TrainingMonitor) -> ScrapeLog:
    """The monitor's scrape log (``answered`` counts full answers to scrapes)."""
    return finale(mon).scrapes


def watch_scrapes(mon: TrainingMonitor, httpd: MetricsServer) -> None:
    """Record the answers of ``httpd``."""
    fin = finale(mon)
    httpd.add_observer(fin.scrapes)
    fin.serving = True


def keep_serving(mon: TrainingMonitor) -> None:
    """A new run on this monitor: the previous run's final scrape no longer closes the endpoint (once a
    close under way has finished, ``mon._httpd`` tells whether it still serves)."""
    fin = finale(mon)
    closer, fin.closer = fin.closer, None
    if closer is not None:
        closer.cancel()
    fin.scrapes.disarm()


def stopped(mon: TrainingMonitor) -> None:
    """The endpoint is closing (``stop()``, from any thread, the closer's own included)."""
    fin = finale(mon)
    fin.serving = False
    if fin.closer is not None:
        fin.closer.cancel(wait=False)
    fin.scrapes.notify()


def final_state_set(mon: TrainingMonitor) -> None:
    # A render shared from before the final state must not count as its read.
    mon.exposition.invalidate()
    finale(mon).scrapes.arm()


def close_when_read(mon: TrainingMonitor, timeout: float) -> None:
    """Stop serving once the final state has been read, within ``timeout`` s, without blocking the caller
    (``timeout`` 0: stop now, in the caller)."""
    fin = finale(mon)
    if fin.closer is not None:
        fin.closer.cancel()
        fin.closer = None
    if mon._httpd is None or timeout <= 0:
        mon.stop()
        return
    closer = _Closer(fin.scrapes, mon.stop, time.monotonic() + timeout)
    fin.closer = closer
    closer.start()


def _any_pending() -> bool:
    now = time.monotonic()
    return any(fin.pending(now) for fin in list(_FINALES.values()))


def _wait_all(deadline: float) -> None:
    for fin in list(_FINALES.values()):
        if fin.serving:
            fin.scrapes.wait(lambda: deadline, _closed(fin))


def _closed(fin: _Finale) -> Callable[[], bool]:
    return lambda: not fin.serving


@atexit.register
def _at_exit() -> None:
    closers = [c for c in list(_CLOSERS) if not c.done.is_set()]
    if closers:
        longest = max(c.deadline for c in closers) - time.monotonic()
        if longest > 1:
            log.info("training-exporter: exit waits up to %.0f s for a scrape of the final state "
                     "(web.final_scrape_timeout_seconds)", longest)
        for closer in closers:
            closer.done.wait(max(0.0, closer.deadline - time.monotonic()) + CLOSE_S)
    if _TERM.scheduled:
        # A SIGTERM with the default action was deferred for the read: the process still dies of it.
        _die(signal.SIGTERM)


# --------------------------------------------------------------------------- SIGTERM


class _Termination:
    """Process-wide: whether a SIGTERM with the default action is deferred until the final state is read."""

    scheduled = False


_TERM = _Termination()
_SIGTERM_MONITORS: weakref.WeakSet[TrainingMonitor] = weakref.WeakSet()


def _forget_the_parent() -> None:
    # A forked child (a DataLoader worker) has none of the parent's threads: no server of the parent's answers
    # there and nothing is awaited, so the SIGTERM handler it inherits just chains, and its exit does not wait.
    # Locks another thread held at the fork would never be released: none of the parent's is used again.
    global _FINALES_LOCK
    _FINALES_LOCK = threading.Lock()
    _FINALES.clear()
    _CLOSERS.clear()
    _SIGTERM_MONITORS.clear()
    _TERM.scheduled = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_the_parent)


def handle_sigterm(mon: TrainingMonitor) -> None:
    """Make ``mon`` end in state terminated on SIGTERM (called by ``begin()``; see the module docstring)."""
    if not mon.config.sigterm:
        return
    _SIGTERM_MONITORS.add(mon)
    if threading.current_thread() is not threading.main_thread():
        log.debug("training-exporter: not in the main thread: no SIGTERM handler installed from here")
        return
    try:
        current = signal.getsignal(signal.SIGTERM)
        if isinstance(current, _SigtermHandler):
            return
        if current is signal.SIG_IGN or current is None:
            # Ignored on purpose, or a handler from outside Python that cannot be chained to.
            return
        signal.signal(signal.SIGTERM, _SigtermHandler(current))
    except (ValueError, OSError, RuntimeError) as exc:  # not the main interpreter, or no signals here
        log.debug("training-exporter: no SIGTERM handler: %s", exc)


class _SigtermHandler:
    """Final state terminated, then the handler found at installation (see the module docstring)."""

    def __init__(self, previous: SignalHandler | int) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous
        if not callable(previous):
            if _TERM.scheduled:
                # The final state has been read (the signal raised again), or a second SIGTERM: no more waiting.
                _die(signum)
                return
            _TERM.scheduled = True
        try:
            pending = _terminate_all(signum, then_die=not callable(previous))
        except Exception as exc:
            # Nothing will raise the signal again: the default action must not be lost.
            log.debug("training-exporter: SIGTERM handling failed: %s", exc)
            pending = False
        if callable(previous):
            previous(signum, frame)
        elif not pending:
            _die(signum)


def _terminate_all(signum: int, then_die: bool) -> bool:
    """Set state terminated on every live monitor and shorten every wait for a final scrape to
    ``web.sigterm_timeout_seconds``; with ``then_die``, raise the signal again once the final states are read.
    Returns whether a read is still awaited (True when not known yet)."""
    monitors = list(_SIGTERM_MONITORS)
    live = [mon for mon in monitors if not mon._ended and mon.state in LIVE_STATES]
    for mon in live:
        # end() from the training loop, still running, now leaves the state alone.
        mon._ended = True
    bound = max((mon.config.sigterm_timeout_seconds for mon in monitors), default=0.0)
    deadline = time.monotonic() + bound
    marked = threading.Event()
    pending = [True]

    def work() -> None:
        try:
            for mon in live:
                _terminate(mon)
            for closer in list(_CLOSERS):
                closer.shorten(deadline)
            pending[0] = _any_pending()
        finally:
            marked.set()
        if then_die:
            if pending[0]:
                _wait_all(deadline)
            _resignal(signum)

    if live:
        log.info("training-exporter: SIGTERM: state terminated, kept for a scrape for up to %.0f s "
                 "(web.sigterm_timeout_seconds)", bound)
    try:
        threading.Thread(target=work, name="training-exporter-sigterm", daemon=True).start()
    except RuntimeError:  # interpreter shutdown: there is nothing left to wait for
        return False
    marked.wait(MARK_WAIT_S)
    return pending[0] if marked.is_set() else True


def _terminate(mon: TrainingMonitor) -> None:
    with mon.errors.guard("step"):
        mon._set_state("terminated")
        final_state_set(mon)
        close_when_read(mon, mon.config.sigterm_timeout_seconds)
        mon.flush()


def _resignal(signum: int) -> None:
    # To the main thread, so that a blocking call there is interrupted and the handler runs soon.
    try:
        ident = threading.main_thread().ident
        if ident is not None and hasattr(signal, "pthread_kill"):
            signal.pthread_kill(ident, signum)
            return
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signum)


def _die(signum: int) -> None:
    """Die of ``signum`` with its default action (main thread only)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
