"""Status documents on disk: each file replaced atomically, histories bounded.

Readers (a dashboard, a remote fetch) may read at any moment, so every file is
written to a temporary file in the same directory and renamed over the old
one (``os.replace`` is atomic within a filesystem): a reader sees the old
document or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

LAYER_DRIFT = "layer_drift.json"
PARAMETER_STABILITY = "parameter_stability.json"
DEFAULT_HISTORY = 100


def history_name(name: str) -> str:
    return name.removesuffix(".json") + "_history.json"


def write_json(path: Path, document: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_history(path: Path) -> list[Any]:
    """The entries of a history file; a missing or unreadable one starts afresh."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def _key(document: dict[str, Any]) -> tuple[Any, Any]:
    return (document.get("current_checkpoint", document.get("checkpoint")),
            document.get("current_step", document.get("step")))


def publish(status_dir: Path, name: str, document: dict[str, Any], history: int = DEFAULT_HISTORY) -> None:
    """Write ``document`` as ``name`` and append it to ``<name>_history.json`` (oldest first, at most
    ``history`` entries; an entry for the same checkpoint is replaced, so a restart does not repeat it)."""
    write_json(status_dir / name, document)
    path = status_dir / history_name(name)
    entries = [e for e in read_history(path) if not (isinstance(e, dict) and _key(e) == _key(document))]
    entries.append(document)
    write_json(path, entries[-history:])
