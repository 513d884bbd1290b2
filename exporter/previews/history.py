"""The preview history's store: every scored preview as one JSON line, one file per UTC day.

Layout of the history directory (``logs/preview/`` by default)::

    preview_history_2025-11-22.jsonl       today and the last ``compress_after_days`` days
    preview_history_2025-11-10.jsonl.gz    older days, gzipped; deleted after ``delete_after_days``

A day's age is counted in whole UTC days from the clock's today: with the
defaults (7 and 30) a file stays plain while its age is 0..7, is gzipped at
age 8..30 and is deleted at age 31, so a history holds 31 days. Each line is
one record of :mod:`exporter.previews.records`.

Concurrency: :meth:`PreviewHistory.append` writes a whole batch on an
``O_APPEND`` descriptor while holding an exclusive ``flock``; compression
holds the same lock on the day file from before the gzip is written until the
plain file is removed, and readers take a shared
lock while they read a plain file. So lines from several threads or processes
never interleave, a reader never sees half a line, and no line is lost when a
writer waited on a file that was compressed meanwhile (it reopens the path).
``flock`` is advisory and may not work on some network file systems.

Files: a day file is opened without following a symlink (``O_NOFOLLOW``) and
must be a regular file, so a symlink planted in the directory cannot send
lines outside it; a batch the disk refuses part of (full, quota, file size
limit) is truncated away again, so the file is left as it was
(:mod:`exporter.files`). Either failure is a :class:`PreviewHistoryError`,
which the fixed evaluation counts and logs once.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from exporter.files import FileProblem, append_whole, open_append
from exporter.previews.layout import day_path, list_days
from exporter.previews.query import PreviewFilter, QueryStats, iter_query, read_page
from exporter.previews.records import (
    InvalidPreviewRecord,
    PreviewHistoryError,
    format_ts,
    normalise_record,
    validate_record,
)

log = logging.getLogger("training_exporter.previews")

# Leftovers of a compression interrupted by a crash; removed by maintain().
_TMP_PREFIX = ".preview_history_"
_TMP_SUFFIX = ".tmp"
_COPY_CHUNK = 1 << 16


class PreviewHistory:
    """Append-only preview history in ``directory`` (created on the first write).

    Args:
        directory: the history directory.
        compress_after_days: days a file stays plain after its day (>= 1: today's file is never compressed).
        delete_after_days: days after which a day's files are deleted (>= 1).
        clock: seconds since the epoch; it picks the day file, fills a missing
            ``ts`` and dates retention (tests pass a fake one).

    Raises:
        ValueError: ``compress_after_days`` or ``delete_after_days`` is below 1.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        compress_after_days: int = 7,
        delete_after_days: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if compress_after_days < 1:
            raise ValueError(f"compress_after_days must be >= 1 (today's file is never compressed), "
                             f"got {compress_after_days}")
        if delete_after_days < 1:
            raise ValueError(f"delete_after_days must be >= 1, got {delete_after_days}")
        self.directory = Path(directory)
        self.compress_after_days = compress_after_days
        self.delete_after_days = delete_after_days
        self._clock = clock
        self._lock = threading.Lock()
        self._maintained_on: date | None = None
        self.lines_written = 0
        self.maintain_errors = 0
        self.last_query_stats = QueryStats()

    # ------------------------------------------------------------------ paths and days

    def path_for(self, day: date, *, compressed: bool = False) -> Path:
        return day_path(self.directory, day, compressed=compressed)

    def _today(self) -> date:
        return datetime.fromtimestamp(self._clock(), tz=timezone.utc).date()

    def days(self) -> dict[date, tuple[bool, bool]]:
        """Each day present in the directory -> (has a plain file, has a gzipped file)."""
        return list_days(self.directory)

    # ------------------------------------------------------------------ writing

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append the records to today's file as one write; returns the number of lines written.

        Raises :class:`InvalidPreviewRecord` (nothing written) when a record does
        not match the schema, :class:`PreviewHistoryError` when the disk refuses
        (nothing written either) or the day file is a symlink or not a regular file.
        Runs :meth:`maintain` after the first write of each UTC day; its failures
        are logged and counted in ``maintain_errors``, not raised, because the
        lines were written.
        """
        now = self._clock()
        default_ts = format_ts(now)
        lines: list[bytes] = []
        problems: list[str] = []
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                problems.append(f"record {index}: expected a mapping, got {type(record).__name__}")
                continue
            row = normalise_record(record, default_ts)
            bad = validate_record(row)
            if bad:
                problems.extend(f"record {index}: {problem}" for problem in bad)
                continue
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False).encode())
        if problems:
            raise InvalidPreviewRecord(problems)
        if not lines:
            return 0
        day = datetime.fromtimestamp(now, tz=timezone.utc).date()
        path = self.path_for(day)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write(path, b"\n".join(lines) + b"\n")
        except FileProblem as exc:
            raise PreviewHistoryError(str(exc)) from exc
        except OSError as exc:
            raise PreviewHistoryError(f"cannot append to {path}: {exc}") from exc
        with self._lock:
            self.lines_written += len(lines)
            due = self._maintained_on != day
            self._maintained_on = day
        if due:
            try:
                self.maintain()
            except PreviewHistoryError as exc:
                with self._lock:
                    self.maintain_errors += 1
                    first = self.maintain_errors == 1
                if first:
                    log.warning("preview history: maintenance failed (%s); appends go on, further "
                                "failures are only counted", exc)
        return len(lines)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        # Each retry means the file was compressed and removed while we waited on its lock; a new, empty
        # file is never compressed, so the second try normally succeeds.
        for _ in range(100):
            # Refuses a symlink or anything but a regular file (FileProblem), before any byte is written.
            fd = open_append(path, "preview history file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                info = os.fstat(fd)
                if info.st_nlink == 0:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    # lstat: a symlink put in its place meanwhile is a different file, refused on the reopen.
                    if os.lstat(path).st_ino != info.st_ino:
                        continue
                # A writer killed mid-line left a partial line: end it so ours stays whole.
                if info.st_size and os.pread(fd, 1, info.st_size - 1) != b"\n":
                    data = b"\n" + data
                # All of it or, when the disk refuses part, none: truncated back under the lock.
                append_whole(fd, data)
                return
            finally:
                os.close(fd)  # also releases the lock
        raise OSError(f"{path} kept being replaced while waiting to append")

    # ------------------------------------------------------------------ retention

    def maintain(self) -> None:
        """Gzip day files older than ``compress_after_days``, delete those older than ``delete_after_days``.

        Safe to run from several processes at once and while others append.
        Raises :class:`PreviewHistoryError` after trying every file when one failed.
        """
        today = self._today()
        failures: list[str] = []
        for day, (plain, _gz) in sorted(self.days().items()):
            age = (today - day).days
            try:
                if age > self.delete_after_days:
                    for path in (self.path_for(day), self.path_for(day, compressed=True)):
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            log.debug("preview history: deleted %s (%d days old)", path, age)
                elif age > self.compress_after_days and plain:
                    self._compress(day)
            except OSError as exc:
                failures.append(f"{day}: {exc}")
        self._remove_stale_temporaries()
        if failures:
            raise PreviewHistoryError(f"maintenance of {self.directory} failed for {len(failures)} file(s): "
                                      + "; ".join(failures[:3]))

    def _compress(self, day: date) -> None:
        source, target = self.path_for(day), self.path_for(day, compressed=True)
        try:
            # Not through a symlink either: that would copy a file from outside into the history.
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{source} is not a regular file")
            # Held until the plain file is gone: appenders wait and then reopen, readers see either file.
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = os.fstat(fd)
            if info.st_nlink == 0:
                return  # another process compressed it while we waited
            if info.st_size == 0:
                # Most likely just created by an appender still waiting for this lock: leave it to it
                # (compressing it would send that appender round again); retention deletes it if it stays empty.
                return
            tmp_fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
            try:
                # mkstemp makes the file private; whoever could read the day file can read its gzip.
                os.fchmod(tmp_fd, stat.S_IMODE(info.st_mode))
                with open(tmp_fd, "wb") as out:
                    # A gzip of this day exists when a late writer appended after it was compressed:
                    # gzip members concatenate, so the old one is kept and the new lines follow it.
                    with contextlib.suppress(FileNotFoundError), open(target, "rb") as previous:
                        while chunk := previous.read(_COPY_CHUNK):
                            out.write(chunk)
                    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as packed:
                        with open(fd, "rb", closefd=False) as plain:
                            while chunk := plain.read(_COPY_CHUNK):
                                packed.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp_name, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise
            os.unlink(source)
            log.debug("preview history: compressed %s", source)
        finally:
            os.close(fd)

    def _remove_stale_temporaries(self) -> None:
        # File times are real times, whatever the clock says: a temporary is stale after a real day.
        cutoff = time.time() - 86400
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                path = self.directory / name
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()

    # ------------------------------------------------------------------ reading (exporter.previews.query)

    def iter_query(self, where: PreviewFilter | None = None, *, newest_first: bool = True,
                   stats: QueryStats | None = None) -> Generator[dict[str, Any], None, None]:
        """The records matching ``where`` (all when None), lazily; stop iterating and nothing more is read.

        Order is append order (oldest first) or its reverse. Corrupt lines are
        skipped, counted in ``stats`` and logged once per file.
        Raises :class:`PreviewHistoryError` when a file can't be read.
        """
        return iter_query(self.directory, where if where is not None else PreviewFilter(),
                          newest_first=newest_first, stats=stats)

    def query(self, where: PreviewFilter | None = None, *, limit: int = 100, offset: int = 0,
              newest_first: bool = True) -> list[dict[str, Any]]:
        """One page of :meth:`iter_query` (``offset`` matches skipped, then up to ``limit``).

        Reads only as many day files as the page needs. What was read, corrupt
        lines included, is in ``last_query_stats``.
        Raises ``ValueError`` for a negative ``limit`` or ``offset``.
        """
        stats = QueryStats()
        try:
            return read_page(self.directory, where if where is not None else PreviewFilter(), limit=limit,
                             offset=offset, newest_first=newest_first, stats=stats)
        finally:
            self.last_query_stats = stats
