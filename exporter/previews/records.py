"""One preview record: its fields, their validation, and the timestamps it uses.

A record has the fields of :data:`PREVIEW_FIELDS`, in that order: ``ts``,
``step``, the checkpoint, example and dataset ids, ``regime``, ``source_pool``,
the prompt, golden and model answer texts, the two match flags,
``failure_mode``, ``ce``, the three token counts, ``generation_time_ms`` and
``contract_status``. Prompts and answers live here and never in a metric label.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta, timezone
from typing import Any

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


class PreviewHistoryError(Exception):
    """The history could not be written or read (disk full, permissions, not a directory, ...)."""


class InvalidPreviewRecord(PreviewHistoryError, ValueError):
    """A record given to :meth:`PreviewHistory.append` does not match the schema; nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# ----------------------------------------------------------------------------- timestamps


def parse_ts(text: str) -> datetime:
    """An ISO 8601 timestamp as an aware UTC datetime; no zone means UTC (records may carry ``2025-11-22T14:30:00``)."""
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


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    (a query over a month of history checks every line it parses). For the reader in this package only."""
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


def normalise_record(record: Mapping[str, Any], ts: str) -> dict[str, Any]:
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
