"""Preview history: every scored preview as one JSON line, one file per UTC day.

Layout of the history directory (``logs/preview/`` by default)::

    preview_history_2025-11-22.jsonl       today and the last ``compress_after_days`` days
    preview_history_2025-11-10.jsonl.gz    older days, gzipped; deleted after ``delete_after_days``

A day's age is counted in whole UTC days from the clock's today: with the
defaults (7 and 30) a file stays plain while its age is 0..7, is gzipped at
age 8..30 and is deleted at age 31, so a history holds 31 days.

Each line is one record with the fields of :data:`PREVIEW_FIELDS`, in that
order (the schema of the original preview logger: ``ts``, ``step``, ids,
``regime``, ``source_pool``, the texts, match flags, ``failure_mode``, ``ce``,
token counts, ``generation_time_ms``, ``contract_status``). Prompts and answers
live here and never in a metric label.

Concurrency: :meth:`PreviewHistory.append` writes a whole batch with one
``os.write`` on an ``O_APPEND`` descriptor while holding an exclusive
``flock``; compression holds the same lock on the day file from before the
gzip is written until the plain file is removed, and readers take a shared
lock while they read a plain file. So lines from several threads or processes
never interleave, a reader never sees half a line, and no line is lost when a
writer waited on a file that was compressed meanwhile (it reopens the path).
``flock`` is advisory and may not work on some network file systems.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from itertools import islice
from pathlib import Path
from typing import Any

log = logging.getLogger("training_exporter.previews")

PREVIEW_FIELDS: tuple[str, ...] = (
    "ts",
    "step",
    "checkpoint_id",
    "example_id",
    "dataset_id",
    "regime",
    "source_pool",
    "prompt",
    "golden",
    "model_answer",
    "exact_match",
    "normalized_match",
    "failure_mode",
    "ce",
    "prompt_tokens",
    "golden_tokens",
    "model_tokens",
    "generation_time_ms",
    "contract_status",
)

FILE_PREFIX = "preview_history_"
_FILE_RE = re.compile(r"^preview_history_(\d{4}-\d{2}-\d{2})\.jsonl(\.gz)?$")
# Leftovers of a compression interrupted by a crash; removed by maintain().
_TMP_PREFIX = ".preview_history_"
_TMP_SUFFIX = ".tmp"
_READ_CHUNK = 1 << 16


class PreviewHistoryError(Exception):
    """The history could not be written or read (disk full, permissions, not a directory, ...)."""


class InvalidPreviewRecord(PreviewHistoryError, ValueError):
    """A record given to :meth:`PreviewHistory.append` does not match the schema; nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# ----------------------------------------------------------------------------- schema


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_ts(text: str) -> datetime:
    """An ISO 8601 timestamp as an aware UTC datetime; no zone means UTC (as the original logger wrote)."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def format_ts(seconds: float) -> str:
    """``2025-11-22T14:30:00.000Z``: UTC, millisecond precision, sortable as text."""
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _check_ts(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected an ISO 8601 string, got {type(value).__name__}"
    try:
        parse_ts(value)
    except ValueError:
        return f"not an ISO 8601 timestamp: {value[:40]!r}"
    return None


def _check_contract(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return f"expected an object of name -> bool, got {type(value).__name__}"
    for key, flag in value.items():
        if not isinstance(key, str) or not isinstance(flag, bool):
            return f"expected an object of name -> bool, got {key!r}: {type(flag).__name__}"
    return None


def _type_check(expected: str, test: Callable[[Any], bool], *, nullable: bool = False,
                minimum: float | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not test(value):
            return f"expected {expected}{' or null' if nullable else ''}, got {type(value).__name__}"
        if minimum is not None and not value >= minimum:  # `not >=` also rejects NaN
            return f"expected >= {minimum:g}, got {value!r}"
        return None

    return check


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "ts": _check_ts,
    "step": _type_check("int", _is_int, minimum=0),
    "checkpoint_id": _type_check("string", _is_str, nullable=True),
    "example_id": _type_check("string", _is_str),
    "dataset_id": _type_check("string", _is_str),
    "regime": _type_check("string", _is_str),
    "source_pool": _type_check("string", _is_str),
    "prompt": _type_check("string", _is_str),
    "golden": _type_check("string", _is_str),
    "model_answer": _type_check("string", _is_str),
    "exact_match": _type_check("bool", _is_bool),
    "normalized_match": _type_check("bool", _is_bool),
    "failure_mode": _type_check("string", _is_str, nullable=True),
    # A diverged model has a NaN cross-entropy: accepted here, written as null (JSON has no NaN).
    "ce": _type_check("number", _is_number, nullable=True),
    "prompt_tokens": _type_check("int", _is_int, minimum=0),
    "golden_tokens": _type_check("int", _is_int, minimum=0),
    "model_tokens": _type_check("int", _is_int, minimum=0),
    "generation_time_ms": _type_check("finite number", _is_finite_number, minimum=0),
    "contract_status": _check_contract,
}
assert tuple(_CHECKS) == PREVIEW_FIELDS


def validate_record(record: Mapping[str, Any]) -> list[str]:
    """The record's problems against the schema, one ``field: reason`` string each; empty when it is valid.

    Every field of :data:`PREVIEW_FIELDS` is required (``checkpoint_id``,
    ``failure_mode`` and ``ce`` may be null) and no other field is allowed.
    """
    if not isinstance(record, Mapping):
        return [f"expected an object, got {type(record).__name__}"]
    problems = []
    for name, check in _CHECKS.items():
        if name not in record:
            problems.append(f"{name}: missing")
            continue
        problem = check(record[name])
        if problem is not None:
            problems.append(f"{name}: {problem}")
    problems.extend(f"{name}: unknown field" for name in record if name not in _CHECKS)
    return problems


_FIELD_SET = frozenset(PREVIEW_FIELDS)
_STR_FIELDS = ("example_id", "dataset_id", "regime", "source_pool", "prompt", "golden", "model_answer")
_COUNT_FIELDS = ("step", "prompt_tokens", "golden_tokens", "model_tokens")


def _valid_decoded(record: Any) -> bool:
    """:func:`validate_record` for what ``json.loads`` returns, where types are exact: the same answer, faster
    (a query over a month of history checks every line it parses)."""
    if type(record) is not dict or record.keys() != _FIELD_SET:
        return False
    if _check_ts(record["ts"]) is not None:
        return False
    for name in _STR_FIELDS:
        if type(record[name]) is not str:
            return False
    for name in _COUNT_FIELDS:
        value = record[name]
        if type(value) is not int or value < 0:
            return False
    ce, elapsed, contract = record["ce"], record["generation_time_ms"], record["contract_status"]
    return (
        type(record["exact_match"]) is bool
        and type(record["normalized_match"]) is bool
        and (record["checkpoint_id"] is None or type(record["checkpoint_id"]) is str)
        and (record["failure_mode"] is None or type(record["failure_mode"]) is str)
        and (ce is None or type(ce) in (int, float))
        and type(elapsed) in (int, float) and 0 <= elapsed < math.inf
        and type(contract) is dict
        and all(type(key) is str and type(flag) is bool for key, flag in contract.items())
    )


def _normalise(record: Mapping[str, Any], ts: str) -> dict[str, Any]:
    """The record in schema order, with ``ts`` filled in and a non-finite ``ce`` as null."""
    row = {name: record[name] for name in PREVIEW_FIELDS if name in record}
    if row.get("ts") is None:
        row = {"ts": ts, **row}
    row.update((name, value) for name, value in record.items() if name not in row)
    ce = row.get("ce")
    if isinstance(ce, float) and not math.isfinite(ce):
        row["ce"] = None
    if isinstance(row.get("contract_status"), Mapping):
        row["contract_status"] = dict(row["contract_status"])
    return row


# ----------------------------------------------------------------------------- time bounds


def parse_time_bound(value: str | date | datetime, *, end: bool = False) -> datetime:
    """A ``since`` (``end=False``) or ``until`` (``end=True``) bound as an aware UTC datetime.

    A bare date means its whole UTC day: ``since`` starts at its midnight,
    ``until`` ends at the next midnight. Datetimes without a zone are UTC.
    Raises ``ValueError`` for text that is not an ISO 8601 date or datetime.
    """
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            value = date.fromisoformat(text)
        else:
            return parse_ts(text)
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    start = datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    return start + timedelta(days=1) if end else start


# ----------------------------------------------------------------------------- reading


@dataclass
class QueryStats:
    """What one query read. ``corrupt_lines`` counts the lines it parsed and skipped (bad JSON, wrong types,
    a damaged gzip tail); lines rejected by the cheap text pre-check are not parsed and not counted."""

    files: int = 0
    lines: int = 0
    corrupt_lines: int = 0
    matched: int = 0


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


_STEP = re.compile(rb'"step":\s*(-?\d+)')


class _Filter:
    """The query's conditions: a cheap byte pre-check, then the exact test on the parsed record."""

    def __init__(self, *, regime: str | None, source: str | None, exact_match: bool | None,
                 failure_mode: str | None, step_min: int | None, step_max: int | None,
                 since: datetime | None, until: datetime | None) -> None:
        self.fields: list[tuple[str, Any]] = [
            (name, value)
            for name, value in (("regime", regime), ("source_pool", source), ("exact_match", exact_match),
                                ("failure_mode", failure_mode))
            if value is not None
        ]
        # Each wanted value must appear in the line as JSON text, ASCII-escaped or not (both are valid
        # JSON for a non-ASCII string); a line without it cannot match, so it is not parsed at all.
        self.needles = [
            tuple({json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode()})
            for _, value in self.fields
        ]
        self.step_min, self.step_max = step_min, step_max
        self.since, self.until = since, until

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


# ----------------------------------------------------------------------------- the store


class PreviewHistory:
    """Append-only preview history in ``directory`` (created on the first write).

    ``clock`` returns seconds since the epoch; it picks the day file, fills a
    missing ``ts`` and dates retention (tests pass a fake one).
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
        return self.directory / f"{FILE_PREFIX}{day.isoformat()}.jsonl{'.gz' if compressed else ''}"

    def _today(self) -> date:
        return datetime.fromtimestamp(self._clock(), tz=timezone.utc).date()

    def days(self) -> dict[date, tuple[bool, bool]]:
        """Each day present in the directory -> (has a plain file, has a gzipped file)."""
        found: dict[date, tuple[bool, bool]] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise PreviewHistoryError(f"cannot list {self.directory}: {exc}") from exc
        for name in names:
            match = _FILE_RE.match(name)
            if match is None:
                continue
            try:
                day = date.fromisoformat(match.group(1))
            except ValueError:
                continue
            plain, gz = found.get(day, (False, False))
            found[day] = (True, gz) if match.group(2) is None else (plain, True)
        return found

    # ------------------------------------------------------------------ writing

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append the records to today's file as one write; returns the number of lines written.

        Raises :class:`InvalidPreviewRecord` (nothing written) when a record does
        not match the schema, :class:`PreviewHistoryError` when the disk refuses.
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
            row = _normalise(record, default_ts)
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
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                info = os.fstat(fd)
                if info.st_nlink == 0:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino != info.st_ino:
                        continue
                # A writer that died mid-line left a partial line: end it so ours stays whole.
                if info.st_size and os.pread(fd, 1, info.st_size - 1) != b"\n":
                    data = b"\n" + data
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
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
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
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
                        while chunk := previous.read(_READ_CHUNK):
                            out.write(chunk)
                    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as packed:
                        with open(fd, "rb", closefd=False) as plain:
                            while chunk := plain.read(_READ_CHUNK):
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

    # ------------------------------------------------------------------ reading

    def _load_day(self, day: date) -> list[tuple[Path, bytes, str | None]]:
        """The day's content in append order: its gzip (older lines) then its plain file.

        The gzip is opened while the plain file's shared lock is held, so a
        compression finishing meanwhile can't make a line appear twice or not at all.
        """
        plain_path, gz_path = self.path_for(day), self.path_for(day, compressed=True)
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

    def iter_query(
        self,
        *,
        regime: str | None = None,
        source: str | None = None,
        exact_match: bool | None = None,
        failure_mode: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
        since: str | date | datetime | None = None,
        until: str | date | datetime | None = None,
        newest_first: bool = True,
        stats: QueryStats | None = None,
    ) -> Generator[dict[str, Any], None, None]:
        """Matching records, lazily, day file by day file; stop iterating and nothing more is read.

        ``source`` matches ``source_pool``; ``step_min``/``step_max`` are inclusive;
        ``since`` is inclusive and ``until`` exclusive (a bare date means its whole
        UTC day). Order is append order (oldest first) or its reverse. Corrupt
        lines are skipped, counted in ``stats`` and logged once per file.
        Raises :class:`PreviewHistoryError` when a file can't be read.
        """
        stats = stats if stats is not None else QueryStats()
        conditions = _Filter(
            regime=regime, source=source, exact_match=exact_match, failure_mode=failure_mode,
            step_min=step_min, step_max=step_max,
            since=None if since is None else parse_time_bound(since),
            until=None if until is None else parse_time_bound(until, end=True),
        )
        days = sorted(self.days(), reverse=newest_first)
        for day in days:
            if not conditions.wants_day(day):
                continue
            parts = self._load_day(day)
            for path, data, damage in (reversed(parts) if newest_first else parts):
                stats.files += 1
                yield from self._records(path, data, damage, conditions, newest_first, stats)

    @staticmethod
    def _records(path: Path, data: bytes, damage: str | None, conditions: _Filter, newest_first: bool,
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

    def query(
        self,
        *,
        regime: str | None = None,
        source: str | None = None,
        exact_match: bool | None = None,
        failure_mode: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
        since: str | date | datetime | None = None,
        until: str | date | datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        """One page of :meth:`iter_query` (``offset`` matches skipped, then up to ``limit``).

        Reads only as many day files as the page needs. What was read, corrupt
        lines included, is in ``last_query_stats``.
        """
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
        stats = QueryStats()
        found = self.iter_query(
            regime=regime, source=source, exact_match=exact_match, failure_mode=failure_mode,
            step_min=step_min, step_max=step_max, since=since, until=until,
            newest_first=newest_first, stats=stats,
        )
        try:
            page = list(islice(found, offset, offset + limit))
        finally:
            found.close()
            self.last_query_stats = stats
        return page
