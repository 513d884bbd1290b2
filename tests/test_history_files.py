"""The preview history's day files against a hostile directory and a disk that refuses: real files, real limits.

A symlink planted as a day file must not send lines outside the directory; a FIFO or a directory in its place
must not hang or crash the writer; an append that the disk refuses part of must leave the file exactly as it
was. The full disk is a real one for the process: ``RLIMIT_FSIZE`` in a child process, where a write that
crosses the limit is cut short and the next one fails with ``EFBIG`` (Python ignores ``SIGXFSZ``), the same
partial write a full disk makes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from exporter.files import FileProblem, append_line
from exporter.previews import PreviewHistory, PreviewHistoryError

NOON = datetime(2025, 11, 22, 12, 0, tzinfo=timezone.utc).timestamp()
REPO = Path(__file__).resolve().parents[1]


def record(step: int, answer: str = "2") -> dict[str, Any]:
    """A valid preview record (``ts`` is filled in by the append)."""
    return {"step": step, "checkpoint_id": None, "example_id": f"ex_{step}", "dataset_id": "d", "regime": "r",
            "source_pool": "fixed_eval", "prompt": "1+1=", "golden": "2", "model_answer": answer,
            "exact_match": answer == "2", "normalized_match": answer == "2", "failure_mode": None, "ce": 0.1,
            "prompt_tokens": 4, "golden_tokens": 1, "model_tokens": len(answer), "generation_time_ms": 1.0,
            "contract_status": {}}


def history(directory: Path, now: float = NOON) -> PreviewHistory:
    return PreviewHistory(directory, clock=lambda: now)


def day_file(directory: Path) -> Path:
    return directory / "preview_history_2025-11-22.jsonl"


# --------------------------------------------------------------------------- symlinks and special files


def test_a_symlinked_day_file_is_refused_and_nothing_is_written_outside(tmp_path: Path) -> None:
    inside, outside = tmp_path / "preview", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_bytes(b"keep me\n")
    day_file(inside).symlink_to(target)
    store = history(inside)
    with pytest.raises(PreviewHistoryError, match="symbolic link"):
        store.append([record(1)])
    assert target.read_bytes() == b"keep me\n"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert store.lines_written == 0
    # A dangling one is not followed to create its target either.
    target.unlink()
    with pytest.raises(PreviewHistoryError, match="symbolic link"):
        store.append([record(2)])
    assert list(outside.iterdir()) == []


def test_a_fifo_or_a_directory_in_place_of_the_day_file_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(day_file(tmp_path))
    # A FIFO with no reader would block an ordinary open for writing for good.
    with pytest.raises(PreviewHistoryError, match="not a regular file"):
        history(tmp_path).append([record(1)])
    day_file(tmp_path).unlink()
    day_file(tmp_path).mkdir()
    with pytest.raises(PreviewHistoryError):
        history(tmp_path).append([record(1)])


def test_an_old_symlinked_day_file_is_not_copied_into_the_history(tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not a preview\n")
    inside = tmp_path / "preview"
    inside.mkdir()
    (inside / "preview_history_2025-11-01.jsonl").symlink_to(outside)  # 21 days old: due for gzip
    store = history(inside)
    store.append([record(1)])  # the day's first append runs the maintenance
    assert store.maintain_errors == 1
    assert not (inside / "preview_history_2025-11-01.jsonl.gz").exists()
    assert outside.read_text() == "not a preview\n"


def test_append_line_refuses_a_symlink_and_appends_to_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"a\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FileProblem, match="symbolic link"):
        append_line(tmp_path / "link", b"b\n")
    append_line(tmp_path / "real", b"b\n")
    append_line(tmp_path / "new", b"c\n")
    assert (tmp_path / "real").read_bytes() == b"a\nb\n"
    assert (tmp_path / "new").read_bytes() == b"c\n"
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- a disk that refuses part of a write

# Run in a child: RLIMIT_FSIZE applies to the whole process. The soft limit is lowered, the hard one kept, so
# the child can lift it again and show that the next append is whole.
_FULL_DISK = textwrap.dedent("""
    import json, os, resource, sys
    from datetime import datetime, timezone
    from exporter.files import append_line
    from exporter.previews import PreviewHistory, PreviewHistoryError
    from test_history_files import record

    directory, headroom = sys.argv[1], int(sys.argv[2])
    noon = datetime(2025, 11, 22, 12, 0, tzinfo=timezone.utc).timestamp()
    store = PreviewHistory(directory, clock=lambda: noon)
    row = lambda step: record(step, answer="3" * 200)
    store.append([row(1), row(2)])
    path = os.path.join(directory, "preview_history_2025-11-22.jsonl")
    before = open(path, "rb").read()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + headroom, hard))
    out = {}
    try:
        store.append([row(3), row(4), row(5)])
        out["history"] = "written"
    except PreviewHistoryError as exc:
        out["history"] = str(exc)
    out["history_unchanged"] = open(path, "rb").read() == before
    plain = os.path.join(directory, "plain.log")
    open(plain, "wb").write(b"first\\n")
    try:
        append_line(plain, b"x" * (headroom + len(before)))
        out["plain"] = "written"
    except OSError as exc:
        out["plain"] = exc.strerror
    out["plain_unchanged"] = open(plain, "rb").read() == b"first\\n"
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    store.append([row(6)])
    out["lines"] = [json.loads(line)["step"] for line in open(path, "rb").read().splitlines()]
    print(json.dumps(out))
""")


def test_an_append_the_disk_refuses_part_of_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    # 100 bytes of headroom, a batch of three lines of about 400 bytes: the first write is cut short at the
    # limit (a partial line, as on a full disk) and the next fails with EFBIG.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path), "100"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["history"].startswith("cannot append to") and "File too large" in out["history"], out
    assert out["history_unchanged"] is True
    assert out["plain"] == "File too large" and out["plain_unchanged"] is True
    # Nothing of the refused batch stayed behind, and the next append is whole.
    assert out["lines"] == [1, 2, 6]


# --------------------------------------------------------------------------- through the fixed evaluation


def test_the_evaluation_counts_a_refused_history_logs_it_once_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from exporter.config import ExporterConfig
    from exporter.core import TrainingMonitor
    from exporter.demo.task import CharTokenizer, build_model
    from exporter.evaluation import EvalExample

    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"")
    directory = tmp_path / "out" / "logs" / "preview"
    directory.mkdir(parents=True)
    today = datetime.now(timezone.utc).date().isoformat()
    (directory / f"preview_history_{today}.jsonl").symlink_to(outside)

    tok = CharTokenizer()
    model = build_model(tok, seed=0)
    mon = TrainingMonitor(ExporterConfig(gpu=False, host=False, eval_interval=10), run_id="refused",
                          output_dir=tmp_path / "out")
    mon.set_evaluation([EvalExample("12+34=", "46")], tok)
    with caplog.at_level(logging.WARNING, logger="training_exporter"):
        assert mon.maybe_evaluate(model, 10)
        assert mon.evaluator is not None and mon.evaluator.wait()
        assert mon.maybe_evaluate(model, 20)
        mon.end(linger=False)  # waits for the scoring
    assert mon.registry.get_sample_value("training_exporter_collector_errors_total",
                                         {"run_id": "refused", "collector": "previews"}) == 2
    # The evaluation itself went on: both are exported.
    assert mon.registry.get_sample_value("training_eval_last_step", {"run_id": "refused"}) == 20
    logged = [r for r in caplog.records if "previews" in r.getMessage()]
    assert len(logged) == 1 and "symbolic link" in logged[0].getMessage()
    assert outside.read_bytes() == b""
