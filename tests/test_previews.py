"""Preview history: schema, concurrent appends, rotation and retention, queries and the ``previews`` command.

Time is a fake clock passed to ``PreviewHistory`` (the one seam it has for
this); files, locks, gzip and processes are real.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import multiprocessing
import threading
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from exporter import cli
from exporter.previews import (
    PREVIEW_FIELDS,
    InvalidPreviewRecord,
    PreviewFilter,
    PreviewHistory,
    PreviewHistoryError,
    validate_record,
)
from exporter.previews.records import _valid_decoded

NOON = datetime(2025, 11, 22, 12, 0, tzinfo=timezone.utc)

# The example record of the original preview logger's schema, verbatim.
SEED_RECORD: dict[str, Any] = {
    "ts": "2025-11-22T14:30:00",
    "step": 15000,
    "checkpoint_id": "checkpoint-15000",
    "example_id": "syllo_001234",
    "dataset_id": "syllo_train_v3",
    "regime": "emoji_think",
    "source_pool": "fixed_eval",
    "prompt": "All men are mortal...",
    "golden": "Socrates is mortal",
    "model_answer": "Socrates is mortal",
    "exact_match": True,
    "normalized_match": True,
    "failure_mode": None,
    "ce": 0.15,
    "prompt_tokens": 45,
    "golden_tokens": 8,
    "model_tokens": 8,
    "generation_time_ms": 120,
    "contract_status": {"emoji_prefix": True, "stop_emoji": True},
}


class FakeClock:
    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when.timestamp()


def record(step: int, **changes: Any) -> dict[str, Any]:
    """A valid record without ``ts`` (append fills it in), varied by ``step``."""
    exact = step % 3 == 0
    row = {key: value for key, value in SEED_RECORD.items() if key != "ts"}
    row.update(
        step=step,
        checkpoint_id=f"checkpoint-{step}",
        example_id=f"ex_{step:05d}",
        regime=("emoji_think", "regime3")[step % 2],
        source_pool=("fixed_eval", "train", "failures")[step % 3],
        model_answer=row["golden"] if exact else f"wrong {step}",
        exact_match=exact,
        normalized_match=exact,
        failure_mode=None if exact else ("wrong_content", "truncated")[step % 2],
    )
    row.update(changes)
    return row


def lines_of(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# ----------------------------------------------------------------------------- schema


def test_the_seed_example_is_valid_and_its_fields_are_the_schema() -> None:
    assert validate_record(SEED_RECORD) == []
    assert list(SEED_RECORD) == list(PREVIEW_FIELDS)
    assert _valid_decoded(json.loads(json.dumps(SEED_RECORD)))
    failed = {**SEED_RECORD, "exact_match": False, "failure_mode": "wrong_content", "checkpoint_id": None,
              "ce": None, "generation_time_ms": 120.5, "contract_status": {}}
    assert validate_record(failed) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"step": "15000"}, "step"),
        ({"step": True}, "step"),
        ({"step": -1}, "step"),
        ({"ts": "yesterday"}, "ts"),
        ({"ts": 1732285800}, "ts"),
        ({"checkpoint_id": 15000}, "checkpoint_id"),
        ({"regime": None}, "regime"),
        ({"prompt": ["All men"]}, "prompt"),
        ({"exact_match": 1}, "exact_match"),
        ({"normalized_match": "true"}, "normalized_match"),
        ({"failure_mode": 3}, "failure_mode"),
        ({"ce": "0.15"}, "ce"),
        ({"prompt_tokens": 4.5}, "prompt_tokens"),
        ({"model_tokens": -2}, "model_tokens"),
        ({"generation_time_ms": -1}, "generation_time_ms"),
        ({"generation_time_ms": math.inf}, "generation_time_ms"),
        ({"contract_status": {"emoji_prefix": 1}}, "contract_status"),
        ({"contract_status": ["emoji_prefix"]}, "contract_status"),
        ({"domain": "logic"}, "domain"),
    ],
)
def test_validate_record_names_the_bad_field(change: dict[str, Any], field: str) -> None:
    bad = {**SEED_RECORD, **change}
    problems = validate_record(bad)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}: ")
    # The reader's fast path must agree with the full check wherever JSON can express the record.
    if all(not isinstance(value, float) or math.isfinite(value) for value in bad.values()):
        assert not _valid_decoded(json.loads(json.dumps(bad)))


def test_validate_record_lists_every_missing_field() -> None:
    problems = validate_record({"step": 1})
    assert sorted(problems) == sorted(f"{name}: missing" for name in PREVIEW_FIELDS if name != "step")
    assert validate_record(["not", "a", "mapping"]) == ["expected an object, got list"]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- writing


def test_append_writes_whole_records_in_schema_order(tmp_path: Path) -> None:
    clock = FakeClock(NOON.replace(hour=14, minute=30, second=5, microsecond=250_000))
    history = PreviewHistory(tmp_path / "logs" / "preview", clock=clock)
    assert not (tmp_path / "logs").exists()  # created on the first write, not before

    diverged = record(2, ce=math.nan, contract_status={"stop_emoji": False})
    given_ts = {**record(3), "ts": "2025-11-22T14:29:59.000Z"}
    assert history.append([record(1), diverged, given_ts]) == 3
    assert history.append([]) == 0

    path = tmp_path / "logs" / "preview" / "preview_history_2025-11-22.jsonl"
    assert names(path.parent) == [path.name]
    rows = lines_of(path)
    assert [list(row) for row in rows] == [list(PREVIEW_FIELDS)] * 3
    assert [row["ts"] for row in rows] == ["2025-11-22T14:30:05.250Z"] * 2 + ["2025-11-22T14:29:59.000Z"]
    assert rows[0] == {**record(1), "ts": "2025-11-22T14:30:05.250Z"}
    assert rows[1]["ce"] is None  # JSON has no NaN; a diverged model's CE is stored as null
    assert rows[1]["contract_status"] == {"stop_emoji": False}
    assert all(validate_record(row) == [] for row in rows)
    assert history.lines_written == 3


def test_an_invalid_record_fails_the_whole_batch_and_writes_nothing(tmp_path: Path) -> None:
    history = PreviewHistory(tmp_path, clock=FakeClock(NOON))
    with pytest.raises(InvalidPreviewRecord) as caught:
        history.append([record(1), {**record(2), "step": "two", "extra": 1}])
    assert caught.value.problems == ["record 1: step: expected int, got str", "record 1: extra: unknown field"]
    assert isinstance(caught.value, PreviewHistoryError)  # one type for the caller to count
    assert names(tmp_path) == []


def test_a_disk_error_is_a_preview_history_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "preview"
    not_a_directory.write_text("a file where the directory should be")
    history = PreviewHistory(not_a_directory, clock=FakeClock(NOON))
    with pytest.raises(PreviewHistoryError, match="cannot append to"):
        history.append([record(1)])


def _append_from_process(directory: str, writer: int, count: int, now: float) -> None:
    """One process, two threads, each appending ``count`` records in batches of 1..5, some lines ~70 kB."""
    history = PreviewHistory(directory, clock=lambda: now)

    def work(thread: int) -> None:
        step = 0
        while step < count:
            size = min(1 + step % 5, count - step)
            batch = []
            for i in range(step, step + size):
                prompt = "x" * (70_000 if i % 17 == 0 else 1_000 if i % 5 == 0 else 10)
                batch.append(record(i, example_id=f"w{writer}-t{thread}", prompt=prompt))
            history.append(batch)
            step += size

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_appends_from_processes_and_threads_give_whole_lines(tmp_path: Path) -> None:
    # Lines of up to 70 kB: a writer that split a line over several writes would interleave here.
    processes, count = 4, 150
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_append_from_process, args=(str(tmp_path), writer, count, NOON.timestamp()))
        for writer in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * processes

    raw = (tmp_path / "preview_history_2025-11-22.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(line) for line in raw.splitlines()]
    assert all(validate_record(row) == [] for row in rows)
    steps: dict[str, list[int]] = {}
    for row in rows:
        steps.setdefault(row["example_id"], []).append(row["step"])
    # Every writer's lines are all there, whole, and in the order it wrote them.
    assert steps == {f"w{w}-t{t}": list(range(count)) for w in range(processes) for t in range(2)}


# ----------------------------------------------------------------------------- rotation and retention


def test_daily_rotation_follows_the_utc_day_of_the_clock(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2025, 11, 22, 23, 59, 59, 500_000, tzinfo=timezone.utc))
    history = PreviewHistory(tmp_path, clock=clock)
    history.append([record(1), record(2)])
    clock.set(datetime(2025, 11, 23, 0, 0, 0, 500_000, tzinfo=timezone.utc))
    history.append([record(3)])
    # 01:30 at UTC+2 is still the 23rd in UTC.
    clock.set(datetime(2025, 11, 24, 1, 30, tzinfo=timezone(timedelta(hours=2))))
    history.append([record(4)])

    assert names(tmp_path) == [f"preview_history_2025-11-{day}.jsonl" for day in (22, 23)]
    first, second = (lines_of(tmp_path / name) for name in names(tmp_path))
    assert [(row["step"], row["ts"]) for row in first] == [(1, "2025-11-22T23:59:59.500Z"),
                                                           (2, "2025-11-22T23:59:59.500Z")]
    assert [(row["step"], row["ts"]) for row in second] == [(3, "2025-11-23T00:00:00.500Z"),
                                                            (4, "2025-11-23T23:30:00.000Z")]


def _seed_days(directory: Path, ages: range, today: date) -> dict[int, bytes]:
    """One plain day file per age (0 = today), written without retention; returns each file's bytes."""
    clock = FakeClock(NOON)
    writer = PreviewHistory(directory, compress_after_days=10_000, delete_after_days=10_000, clock=clock)
    content = {}
    for age in ages:
        day = today - timedelta(days=age)
        clock.set(datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc))
        writer.append([record(age), record(1000 + age)])
        content[age] = writer.path_for(day).read_bytes()
    return content


def test_maintain_gzips_after_7_days_and_deletes_after_30(tmp_path: Path) -> None:
    today = NOON.date()
    content = _seed_days(tmp_path, range(36), today)
    for path in tmp_path.iterdir():
        path.chmod(0o640)
    history = PreviewHistory(tmp_path, clock=FakeClock(NOON))
    history.maintain()

    for age in range(36):
        day = today - timedelta(days=age)
        plain, packed = history.path_for(day), history.path_for(day, compressed=True)
        state = (plain.exists(), packed.exists())
        if age <= 7:
            assert state == (True, False), age
            assert plain.read_bytes() == content[age]
        elif age <= 30:
            assert state == (False, True), age
            assert gzip.decompress(packed.read_bytes()) == content[age]
            assert packed.stat().st_mode & 0o777 == 0o640  # the day file's mode, not mkstemp's 0600
        else:
            assert state == (False, False), age
    assert len(names(tmp_path)) == 31  # no temporary left behind
    history.maintain()  # idempotent
    assert len(names(tmp_path)) == 31


def test_retention_is_configurable_and_append_maintains_once_a_day(tmp_path: Path) -> None:
    today = NOON.date()
    _seed_days(tmp_path, range(1, 8), today)
    clock = FakeClock(NOON)
    history = PreviewHistory(tmp_path, compress_after_days=2, delete_after_days=5, clock=clock)

    def state() -> dict[int, str]:
        out = {}
        for age in range(-1, 10):
            day = today - timedelta(days=age)
            kinds = [kind for kind, path in (("plain", history.path_for(day)),
                                             ("gz", history.path_for(day, compressed=True))) if path.exists()]
            if kinds:
                out[age] = "+".join(kinds)
        return out

    history.append([record(0)])  # the day's first append maintains
    assert state() == {0: "plain", 1: "plain", 2: "plain", 3: "gz", 4: "gz", 5: "gz"}

    _seed_days(tmp_path, range(9, 10), today)  # a day file that would be deleted ...
    history.append([record(1)])
    assert 9 in state()  # ... is not: maintenance ran already today

    clock.set(NOON + timedelta(days=1))  # tomorrow: ages shift by one
    history.append([record(2)])
    assert state() == {-1: "plain", 0: "plain", 1: "plain", 2: "gz", 3: "gz", 4: "gz"}
    with pytest.raises(ValueError, match="compress_after_days"):
        PreviewHistory(tmp_path, compress_after_days=0)


def test_compression_racing_appends_and_reads_neither_loses_nor_repeats_a_line(tmp_path: Path) -> None:
    # An appender with a clock 9 days behind keeps writing to a day file that a second
    # process-alike (its own instance, own descriptors) keeps compressing; a reader queries meanwhile.
    late = PreviewHistory(tmp_path, clock=FakeClock(NOON))
    keeper = PreviewHistory(tmp_path, clock=FakeClock(NOON + timedelta(days=9)))
    total = 300
    done = threading.Event()
    failures: list[BaseException] = []

    def append_all() -> None:
        try:
            for step in range(total):
                late.append([record(step)])
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=append_all)
    writer.start()
    reads = 0
    while not done.is_set() or reads < 3:
        keeper.maintain()
        steps = [row["step"] for row in keeper.query(limit=10 * total, newest_first=False)]
        assert steps == list(range(len(steps)))  # a prefix, in order, nothing twice
        reads += 1
    writer.join()
    assert failures == []
    keeper.maintain()
    assert names(tmp_path) == ["preview_history_2025-11-22.jsonl.gz"]
    assert [row["step"] for row in keeper.query(limit=10 * total, newest_first=False)] == list(range(total))
    assert keeper.last_query_stats.corrupt_lines == 0


# ----------------------------------------------------------------------------- queries


@pytest.fixture
def history(tmp_path: Path) -> Iterator[PreviewHistory]:
    """90 records over three days (steps 0-29, 30-59, 60-89); the oldest day gzipped."""
    clock = FakeClock(NOON - timedelta(days=2))
    store = PreviewHistory(tmp_path, compress_after_days=1, clock=clock)
    for day in range(3):
        clock.set(NOON - timedelta(days=2 - day))
        for first in range(0, 30, 10):
            step = 30 * day + first
            store.append([record(i) for i in range(step, step + 10)])
    store.maintain()
    assert names(tmp_path) == ["preview_history_2025-11-20.jsonl.gz", "preview_history_2025-11-21.jsonl",
                               "preview_history_2025-11-22.jsonl"]
    yield store


def test_query_orders_newest_first_across_plain_and_gzipped_days(history: PreviewHistory) -> None:
    assert [row["step"] for row in history.query(limit=1000)] == list(range(89, -1, -1))
    assert [row["step"] for row in history.query(limit=1000, newest_first=False)] == list(range(90))
    assert history.query(limit=1)[0] == {**record(89), "ts": "2025-11-22T12:00:00.000Z"}


def test_query_stops_reading_once_the_page_is_full(history: PreviewHistory) -> None:
    assert [row["step"] for row in history.query(limit=5)] == [89, 88, 87, 86, 85]
    assert history.last_query_stats.files == 1
    assert history.last_query_stats.lines == 5
    history.query(limit=5, offset=28)  # crosses into yesterday
    assert history.last_query_stats.files == 2
    history.query(limit=5, offset=58)  # and into the gzip of the day before
    assert history.last_query_stats.files == 3


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"regime": "regime3"}, lambda r: r["regime"] == "regime3"),
        ({"source": "failures"}, lambda r: r["source_pool"] == "failures"),
        ({"exact_match": True}, lambda r: r["exact_match"]),
        ({"exact_match": False, "failure_mode": "wrong_content"},
         lambda r: not r["exact_match"] and r["failure_mode"] == "wrong_content"),
        ({"step_min": 25, "step_max": 64}, lambda r: 25 <= r["step"] <= 64),
        ({"regime": "emoji_think", "source": "train", "step_min": 40}, lambda r: r["regime"] == "emoji_think"
         and r["source_pool"] == "train" and r["step"] >= 40),
        ({"regime": "no_such_regime"}, lambda r: False),
    ],
)
def test_query_filters_match_a_plain_filter_and_paginate(history: PreviewHistory, filters: dict[str, Any],
                                                         expected: Any) -> None:
    wanted = [step for step in range(89, -1, -1) if expected(record(step))]
    assert [row["step"] for row in history.query(PreviewFilter(**filters), limit=1000)] == wanted
    pages = [history.query(PreviewFilter(**filters), limit=7, offset=offset) for offset in range(0, len(wanted) + 7, 7)]
    assert [row["step"] for page in pages for row in page] == wanted
    assert all(len(page) == 7 for page in pages[: len(wanted) // 7])


def test_query_text_precheck_neither_misses_nor_lets_through(tmp_path: Path) -> None:
    history = PreviewHistory(tmp_path, clock=FakeClock(NOON))
    history.append([record(1, regime="régime_ü"),
                    record(2, prompt='say "wrong_content" and "régime_ü"', failure_mode=None)])
    # Another writer's style: ASCII escapes, compact separators.
    other = json.dumps({**record(3, regime="régime_ü"), "ts": "2025-11-22T12:00:00Z"}, separators=(",", ":"))
    assert "\\u00e9" in other
    with open(history.path_for(NOON.date()), "a", encoding="utf-8") as stream:
        stream.write(other + "\n")
    assert [row["step"] for row in history.query(PreviewFilter(regime="régime_ü"))] == [3, 1]
    assert [row["step"] for row in history.query(PreviewFilter(failure_mode="wrong_content"))] == []


def test_query_step_precheck_is_not_fooled_by_step_text_in_a_prompt(tmp_path: Path) -> None:
    history = PreviewHistory(tmp_path, clock=FakeClock(NOON))
    history.append([record(5, prompt='the log said "step": 999'),
                    record(50, prompt='the log said "step": 7'),
                    record(60, golden='"step":8')])
    # Compact separators, as another writer may use.
    other = json.dumps({**record(6), "ts": "2025-11-22T12:00:00Z"}, separators=(",", ":"))
    with open(history.path_for(NOON.date()), "a", encoding="utf-8") as stream:
        stream.write(other + "\n")
    assert [row["step"] for row in history.query(PreviewFilter(step_min=0, step_max=10))] == [6, 5]
    assert [row["step"] for row in history.query(PreviewFilter(step_min=40))] == [60, 50]
    assert history.query(PreviewFilter(step_min=1000)) == []


def test_query_time_range_by_date_and_datetime(history: PreviewHistory) -> None:
    def steps(**bounds: Any) -> list[int]:
        return sorted(row["step"] for row in history.query(PreviewFilter(**bounds), limit=1000))

    assert steps(since="2025-11-21", until="2025-11-21") == list(range(30, 60))  # a date is its whole day
    assert steps(since=date(2025, 11, 22)) == list(range(60, 90))
    assert steps(until="2025-11-21T12:00:00Z") == list(range(30))  # until is exclusive
    assert steps(since=datetime(2025, 11, 21, 12)) == list(range(30, 90))  # no zone: UTC
    assert steps(since="2025-11-23") == []
    assert next(history.iter_query(PreviewFilter(since="2025-11-22", regime="regime3")))["step"] == 89


def test_corrupt_lines_are_skipped_with_one_warning_per_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(NOON - timedelta(days=1))
    history = PreviewHistory(tmp_path, clock=clock)
    history.append([record(1)])
    clock.set(NOON)
    history.append([record(2), record(3)])
    yesterday, today = (tmp_path / name for name in names(tmp_path))
    wrong_type = json.dumps({**record(4), "ts": "2025-11-22T12:00:00Z", "step": "four"})
    with open(yesterday, "ab") as stream:
        stream.write(b'{"ts": "2025-11-21T12:00:00Z", "step": \n')
    with open(today, "ab") as stream:
        stream.write(b"[1, 2, 3]\n" + wrong_type.encode() + b"\n" + b"\xff\xfe not utf-8\n")
    history.append([record(5)])
    with open(today, "ab") as stream:
        stream.write(b'{"ts": "2025-11-22T12:00:00Z", "step": 6, "checkpoint_id": "chec')  # a writer died here

    with caplog.at_level(logging.WARNING, logger="training_exporter.previews"):
        rows = history.query(limit=100)
    assert [row["step"] for row in rows] == [5, 3, 2, 1]
    assert history.last_query_stats.corrupt_lines == 5
    warnings = [entry.getMessage() for entry in caplog.records if entry.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert str(today) in warnings[0] and "truncated last line" in warnings[0]
    assert str(yesterday) in warnings[1] and "bad JSON" in warnings[1]


def test_a_line_cut_by_a_dead_writer_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    history = PreviewHistory(tmp_path, clock=FakeClock(NOON))
    history.append([record(1)])
    path = tmp_path / "preview_history_2025-11-22.jsonl"
    with open(path, "ab") as stream:
        stream.write(b'{"ts": "2025-11-22T12:00:00Z", "st')
    history.append([record(2)])
    assert [row["step"] for row in history.query()] == [2, 1]
    assert history.last_query_stats.corrupt_lines == 1


def test_a_damaged_gzip_yields_the_lines_before_the_damage(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(NOON - timedelta(days=8))
    history = PreviewHistory(tmp_path, clock=clock)
    history.append([record(i, prompt=f"prompt {i} " * (i % 50)) for i in range(400)])
    clock.set(NOON)
    history.maintain()
    (packed,) = tmp_path.iterdir()
    assert packed.name.endswith(".jsonl.gz")
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING, logger="training_exporter.previews"):
        steps = [row["step"] for row in history.query(limit=1000, newest_first=False)]
    assert 0 < len(steps) < 400
    assert steps == list(range(len(steps)))
    assert history.last_query_stats.corrupt_lines == 1
    assert any("damaged gzip" in entry.getMessage() for entry in caplog.records)


# ----------------------------------------------------------------------------- the command


def previews(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["previews", *argv]) == 0
    return capsys.readouterr().out


@pytest.fixture
def history_dir(tmp_path: Path) -> Path:
    clock = FakeClock(NOON - timedelta(days=9))
    history = PreviewHistory(tmp_path / "preview", clock=clock)
    history.append([record(i) for i in range(10)])
    clock.set(NOON)
    messy = 'Line one, "quoted"\nline two\t' + "long " * 40
    history.append([record(i) for i in range(10, 19)] + [record(19, prompt=messy, model_answer="wrong, " * 10)])
    assert names(history.directory) == ["preview_history_2025-11-13.jsonl.gz", "preview_history_2025-11-22.jsonl"]
    return history.directory


def test_command_json_is_one_array_of_full_records(capsys: pytest.CaptureFixture[str], history_dir: Path) -> None:
    out = previews(capsys, "--dir", str(history_dir), "--format", "json", "--limit", "4", "--offset", "8")
    rows = json.loads(out)
    assert [row["step"] for row in rows] == [11, 10, 9, 8]
    assert rows[2] == {**record(9), "ts": "2025-11-13T12:00:00.000Z"}
    assert json.loads(previews(capsys, "--dir", str(history_dir), "--format", "json", "--regime", "none")) == []


def test_command_jsonl_filters(capsys: pytest.CaptureFixture[str], history_dir: Path) -> None:
    out = previews(capsys, "--dir", str(history_dir), "--format", "jsonl", "--exact-match", "false",
                   "--failure-mode", "truncated", "--step-max", "15", "--oldest-first")
    assert [json.loads(line)["step"] for line in out.splitlines()] == [1, 5, 7, 11, 13]
    out = previews(capsys, "--dir", str(history_dir), "--format", "jsonl", "--source", "train",
                   "--since", "2025-11-22")
    assert [json.loads(line)["step"] for line in out.splitlines()] == [19, 16, 13, 10]


def test_command_csv_has_every_field_in_full(capsys: pytest.CaptureFixture[str], history_dir: Path) -> None:
    out = previews(capsys, "--dir", str(history_dir), "--format", "csv", "--limit", "2")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == list(PREVIEW_FIELDS)
    assert [row["step"] for row in rows] == ["19", "18"]
    messy = rows[0]
    assert messy["prompt"] == 'Line one, "quoted"\nline two\t' + "long " * 40
    assert messy["model_answer"] == "wrong, " * 10
    assert (messy["exact_match"], messy["failure_mode"], messy["ce"]) == ("false", "truncated", "0.15")
    assert json.loads(messy["contract_status"]) == {"emoji_prefix": True, "stop_emoji": True}
    assert (rows[1]["exact_match"], rows[1]["failure_mode"]) == ("true", "")


def test_command_table_aligns_columns_and_cuts_long_texts(capsys: pytest.CaptureFixture[str],
                                                          history_dir: Path) -> None:
    out = previews(capsys, "--dir", str(history_dir), "--limit", "3")
    header, *rows = out.splitlines()
    assert header.split() == ["TIME", "(UTC)", "STEP", "REGIME", "SOURCE", "EM", "NORM", "FAILURE", "CE",
                              "EXAMPLE", "PROMPT", "GOLDEN", "ANSWER"]
    assert len(rows) == 3
    at = {name: header.index(name) for name in ("REGIME", "SOURCE", "EXAMPLE", "PROMPT")}
    for line, step in zip(rows, (19, 18, 17), strict=True):
        expected = record(step)
        assert line.startswith("2025-11-22 12:00:00")
        assert line[at["REGIME"]:].startswith(expected["regime"] + " ")
        assert line[at["SOURCE"]:].startswith(expected["source_pool"] + " ")
        assert line[at["EXAMPLE"]:].startswith(expected["example_id"] + " ")
    assert rows[0][at["PROMPT"]:].startswith('Line one, "quoted" line two long long')
    assert "…" in rows[0] and "\t" not in rows[0]
    assert rows[1][at["PROMPT"]:].startswith("All men are mortal...")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--exact-match", "maybe"], "argument --exact-match: expected true or false"),
        (["--limit", "0"], "argument --limit: must be >= 1"),
        (["--since", "last tuesday"], "argument --since: expected an ISO 8601 date"),
        (["--format", "xml"], "argument --format: invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--step-min", "5", "--step-max", "2"], "--step-min 5 is above --step-max 2"),
        (["--since", "2025-11-22", "--until", "2025-11-21"], "--since must be before --until"),
    ],
)
def test_command_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], history_dir: Path,
                                                  argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["previews", "--dir", str(history_dir), *argv])
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_command_missing_directory_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["previews", "--dir", str(tmp_path / "nowhere")])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"training-exporter: error: --dir {tmp_path / 'nowhere'}: no such directory\n"


def test_command_directory_defaults_to_the_training_setting(
        capsys: pytest.CaptureFixture[str], history_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINING_EXPORTER_HISTORY_DIR", str(history_dir))
    out = previews(capsys, "--format", "jsonl", "--limit", "1")
    assert [json.loads(line)["step"] for line in out.splitlines()] == [19]
