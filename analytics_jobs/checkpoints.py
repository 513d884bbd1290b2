"""The Trainer's ``checkpoint-N`` folders and whether each is completely written.

``Trainer._save_checkpoint`` (transformers 5.x) writes, in this order: the
model (``save_model``: ``model.safetensors`` or its shards and index, or
peft's ``adapter_model.safetensors`` + ``adapter_config.json``), then the
optimizer, scheduler, scaler and RNG states, and ``trainer_state.json`` last.
So a checkpoint is complete once ``trainer_state.json`` parses as JSON (it is
written in place, so a torn write fails to parse) and its weights files are
all there; until then it is being written (or was abandoned) and is skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from analytics_jobs.weights import ADAPTER_FILE, MODEL_FILE, SAFETENSORS_INDEX

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def name(self) -> str:
        return self.path.name


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """``checkpoint-N`` folders of ``directory``, oldest step first (empty if the folder is missing)."""
    found = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = _CHECKPOINT.match(entry.name)
        if m and entry.is_dir():
            found.append(Checkpoint(entry, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def not_ready(checkpoint: Path) -> tuple[str, str] | None:
    """None when ``checkpoint`` can be analysed, else ``(reason, why)``: reason ``incomplete`` while it is
    being written, ``unsupported`` when it is complete without safetensors weights (``.bin`` files)."""
    state = checkpoint / TRAINER_STATE
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return "incomplete", f"no {TRAINER_STATE} yet"
    except (OSError, ValueError):
        return "incomplete", f"{TRAINER_STATE} is not complete JSON yet"
    index = checkpoint / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "incomplete", f"{SAFETENSORS_INDEX} is not complete JSON yet"
        absent = sorted(s for s in shards if not (checkpoint / str(s)).is_file())
        return ("incomplete", f"shard(s) {', '.join(absent)} missing") if absent else None
    if (checkpoint / ADAPTER_FILE).is_file() or (checkpoint / MODEL_FILE).is_file():
        return None
    if any(checkpoint.glob("*.safetensors")):
        return None
    return "unsupported", "no .safetensors weights (save with safe_serialization=True)"


def signature(checkpoint: Path) -> tuple[tuple[str, int, int], ...]:
    """Size and mtime of the files that matter, to tell a rewritten checkpoint from the one already tried."""
    out = []
    for path in sorted(checkpoint.glob("*")):
        if path.suffix in (".safetensors", ".json"):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(out)
