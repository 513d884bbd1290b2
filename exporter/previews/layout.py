"""Where the preview history lives: one file per UTC day, plain or gzipped, in one directory.

Shared by the store that writes and rotates the files and by the reader that
queries them, so that both agree on the names without importing each other.
"""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path

from exporter.previews.records import PreviewHistoryError

FILE_PREFIX = "preview_history_"
_FILE_RE = re.compile(r"^preview_history_(\d{4}-\d{2}-\d{2})\.jsonl(\.gz)?$")


def day_path(directory: Path, day: date, *, compressed: bool = False) -> Path:
    """``DIRECTORY/preview_history_YYYY-MM-DD.jsonl``, with ``.gz`` when ``compressed``."""
    return directory / f"{FILE_PREFIX}{day.isoformat()}.jsonl{'.gz' if compressed else ''}"


def list_days(directory: Path) -> dict[date, tuple[bool, bool]]:
    """Each day present in ``directory`` -> (has a plain file, has a gzipped file); empty when it does not exist.

    Raises:
        PreviewHistoryError: the directory exists but cannot be listed.
    """
    found: dict[date, tuple[bool, bool]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise PreviewHistoryError(f"cannot list {directory}: {exc}") from exc
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
