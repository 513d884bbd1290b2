"""Reading the preview history: which records match a :class:`PreviewFilter`, one page at a time.

Day files are read newest first (or oldest first), plain and gzipped alike,
and only as many as the page needs. A plain file is read under a shared
``flock``, so a reader never sees half a line of a concurrent append (see
:mod:`exporter.previews.history` for the writers' side). Corrupt lines are
skipped, counted in :class:`QueryStats` and logged once per file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import zlib
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

from exporter.previews.layout import day_path, list_days
from exporter.previews.records import PreviewHistoryError, _valid_decoded, parse_time_bound, parse_ts, validate_record

log = logging.getLogger("training_exporter.previews")

_READ_CHUNK = 1 << 16
_STEP = re.compile(rb'"step":\s*(-?\d+)')


@dataclass(frozen=True)
class PreviewFilter:
    """Which records a query returns: those that meet every condition given; a field left at None is "any".

    Args:
        regime: only records of this ``regime``.
        source: only records of this ``source_pool``.
        exact_match: only exact matches (True) or only misses (False).
        failure_mode: only records with this ``failure_mode``.
        step_min: only steps >= this.
        step_max: only steps <= this.
        since: only records at or after this time (inclusive).
        until: only records before this time (exclusive). For both bounds a
            bare date (``"2025-11-22"`` or a :class:`~datetime.date`) means its
            whole UTC day, and a datetime without a zone is UTC.

    Raises:
        ValueError: ``since`` or ``until`` is text that is not an ISO 8601 date or datetime.
    """

    regime: str | None = None
    source: str | None = None
    exact_match: bool | None = None
    failure_mode: str | None = None
    step_min: int | None = None
    step_max: int | None = None
    since: str | date | datetime | None = None
    until: str | date | datetime | None = None
    # The bounds as aware UTC datetimes, parsed once here so that a bad bound fails where it is given.
    _since: datetime | None = field(init=False, repr=False, compare=False, default=None)
    _until: datetime | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.since is not None:
            object.__setattr__(self, "_since", parse_time_bound(self.since))
        if self.until is not None:
            object.__setattr__(self, "_until", parse_time_bound(self.until, end=True))


@dataclass
class QueryStats:
    """What one query read. ``corrupt_lines`` counts the lines it parsed and skipped (bad JSON, wrong types,
    a damaged gzip tail); lines rejected by the cheap text pre-check are not parsed and not counted."""

    files: int = 0
    lines: int = 0
    corrupt_lines: int = 0
    matched: int = 0


class _Conditions:
    """A filter as the reader applies it: a cheap byte pre-check, then the exact test on the parsed record."""

    def __init__(self, where: PreviewFilter) -> None:
        self.fields: list[tuple[str, Any]] = [
            (name, value)
            for name, value in (("regime", where.regime), ("source_pool", where.source),
                                ("exact_match", where.exact_match), ("failure_mode", where.failure_mode))
            if value is not None
        ]
        # Each wanted value must appear in the line as JSON text, ASCII-escaped or not (both are valid
        # JSON for a non-ASCII string); a line without it cannot match, so it is not parsed at all.
        self.needles = [
            tuple({json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode()})
            for _, value in self.fields
        ]
        self.step_min, self.step_max = where.step_min, where.step_max
        self.since, self.until = where._since, where._until

    def maybe(self, line: bytes) -> bool:
        if not all(any(needle in line for needle in group) for group in self.needles):
            return False
        if self.step_min is None and self.step_max is None:
            return True
        # Every `"step": N` in the line, the record's own among them (text inside a string could
        # look alike, never hide it): only when none is in range can the record not match.
        steps = [int(n) for n in _STEP.findall(line)]
        return not steps or any(self._step_ok(n) for n in steps)

    def _step_ok(self, step: int) -> bool:
        return (self.step_min is None or step >= self.step_min) and (self.step_max is None or step <= self.step_max)

    def matches(self, record: Mapping[str, Any]) -> bool:
        for name, value in self.fields:
            found = record[name]
            if found != value or type(found) is not type(value):
                return False
        if not self._step_ok(record["step"]):
            return False
        if self.since is not None or self.until is not None:
            ts = parse_ts(record["ts"])
            if self.since is not None and ts < self.since:
                return False
            if self.until is not None and ts >= self.until:
                return False
        return True

    def wants_day(self, day: date) -> bool:
        # A day file holds what was appended that UTC day; a record's ts may be a little earlier
        # (taken before the write), so a day either side is kept.
        if self.since is not None and day < self.since.date() - timedelta(days=1):
            return False
        return not (self.until is not None and day > self.until.date() + timedelta(days=1))


# ----------------------------------------------------------------------------- day files


def _read_all(fd: int) -> bytes:
    with open(fd, "rb", closefd=False) as stream:
        return stream.read()


def _gunzip(raw: bytes) -> tuple[bytes, str | None]:
    """The decompressed bytes up to the first damage, and what the damage was (None when intact).

    Fed in chunks so that a damaged or cut file still yields what precedes the
    damage; several gzip members (a day appended to after it was compressed) follow each other.
    """
    parts: list[bytes] = []
    rest = raw
    while rest and rest.strip(b"\0"):
        unzip = zlib.decompressobj(wbits=31)
        position = 0
        try:
            while position < len(rest) and not unzip.eof:
                parts.append(unzip.decompress(rest[position:position + _READ_CHUNK]))
                position += _READ_CHUNK
        except zlib.error as exc:
            return b"".join(parts), f"zlib: {exc}"
        if not unzip.eof:
            return b"".join(parts), "the file ends inside the compressed stream"
        rest = unzip.unused_data + rest[position:]
    return b"".join(parts), None


def _load_day(directory: Path, day: date) -> list[tuple[Path, bytes, str | None]]:
    """The day's content in append order: its gzip (older lines) then its plain file.

    The gzip is opened while the plain file's shared lock is held, so a
    compression finishing meanwhile can't make a line appear twice or not at all.
    """
    plain_path, gz_path = day_path(directory, day), day_path(directory, day, compressed=True)
    plain_data: bytes | None = None
    gz_stream = None
    try:
        try:
            fd: int | None = os.open(plain_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                with contextlib.suppress(OSError):  # flock unsupported: read without it
                    fcntl.flock(fd, fcntl.LOCK_SH)
                if os.fstat(fd).st_nlink > 0:
                    plain_data = _read_all(fd)
                with contextlib.suppress(FileNotFoundError):
                    gz_stream = open(gz_path, "rb")
            finally:
                os.close(fd)
        else:
            # Also when the listing showed only a plain file: it may have been compressed since.
            with contextlib.suppress(FileNotFoundError):
                gz_stream = open(gz_path, "rb")
        parts: list[tuple[Path, bytes, str | None]] = []
        if gz_stream is not None:
            data, damage = _gunzip(gz_stream.read())
            parts.append((gz_path, data, damage))
        if plain_data is not None:
            parts.append((plain_path, plain_data, None))
        return parts
    except OSError as exc:
        raise PreviewHistoryError(f"cannot read {plain_path}: {exc}") from exc
    finally:
        if gz_stream is not None:
            gz_stream.close()


def _records(path: Path, data: bytes, damage: str | None, conditions: _Conditions, newest_first: bool,
             stats: QueryStats) -> Iterator[dict[str, Any]]:
    warned = False

    def corrupt(number: int, reason: str) -> None:
        nonlocal warned
        stats.corrupt_lines += 1
        if not warned:
            warned = True
            log.warning("preview history: skipping corrupt line %d of %s (%s); further corrupt lines in "
                        "this file are only counted", number, path, reason)

    lines = data.split(b"\n")
    if damage is not None:
        # The line cut by the damage is incomplete; the lines before it are whole.
        corrupt(len(lines), f"damaged gzip: {damage}")
        lines[-1] = b""
    numbers = range(len(lines) - 1, -1, -1) if newest_first else range(len(lines))
    for index in numbers:
        line = lines[index]
        if not line or line.isspace() or not conditions.maybe(line):
            continue
        stats.lines += 1
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            truncated = index == len(lines) - 1
            corrupt(index + 1, "truncated last line" if truncated else f"bad JSON: {exc}")
            continue
        if not _valid_decoded(record):
            corrupt(index + 1, "; ".join(validate_record(record)[:3]) or "wrong types")
            continue
        if conditions.matches(record):
            stats.matched += 1
            yield record


# ----------------------------------------------------------------------------- queries


def iter_query(directory: Path, where: PreviewFilter, *, newest_first: bool = True,
               stats: QueryStats | None = None) -> Generator[dict[str, Any], None, None]:
    """The records of the history in ``directory`` that match ``where``, lazily, day file by day file.

    Stop iterating and nothing more is read. Order is append order (oldest
    first) or its reverse. What was read goes into ``stats``.
    Raises :class:`PreviewHistoryError` when a file can't be read.
    """
    stats = stats if stats is not None else QueryStats()
    conditions = _Conditions(where)
    for day in sorted(list_days(directory), reverse=newest_first):
        if not conditions.wants_day(day):
            continue
        parts = _load_day(directory, day)
        for path, data, damage in (reversed(parts) if newest_first else parts):
            stats.files += 1
            yield from _records(path, data, damage, conditions, newest_first, stats)


def read_page(directory: Path, where: PreviewFilter, *, limit: int, offset: int, newest_first: bool,
              stats: QueryStats) -> list[dict[str, Any]]:
    """One page of :func:`iter_query`: ``offset`` matches skipped, then up to ``limit``.

    Reads only as many day files as the page needs; what was read is in ``stats``,
    also when reading fails. Raises ``ValueError`` for a negative ``limit`` or ``offset``.
    """
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
    found = iter_query(directory, where, newest_first=newest_first, stats=stats)
    try:
        return list(islice(found, offset, offset + limit))
    finally:
        found.close()
