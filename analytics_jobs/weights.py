"""Tensors of a model or adapter in safetensors files, read a block of rows at a time.

Only the headers are read up front. Tensor data is read through
``safetensors.safe_open(..., framework="pt")`` one row block at a time, and the
file is opened anew for every block: with the default mmap backend the pages
a block touched stay mapped (and count in the resident set) for as long as the
file is open, so keeping a 16 GB shard open while streaming it would grow the
process to 16 GB. Reopening costs one header parse (well under a millisecond
for a model's few hundred names) and bounds memory by the block size, not by
the tensor, the file or the model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - very old safetensors
    SafetensorError = Exception  # type: ignore[assignment,misc]

SAFETENSORS_INDEX = "model.safetensors.index.json"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"

# Bytes per element of the safetensors dtype names (for read-throughput figures).
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}

# Row blocks read at a time hold at most this many elements (8 MiB of bf16):
# large enough that reopening the file and the per-block Python work are
# noise, small enough that memory stays a few tens of MB whatever the model.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


class WeightsError(Exception):
    """A weights file that cannot be used; ``reason`` is one of the bounded error reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 2)


def _read_error(path: Path, exc: BaseException) -> WeightsError:
    if isinstance(exc, SafetensorError):
        return WeightsError("corrupt_file", f"{path}: {exc}")
    if isinstance(exc, OSError):
        return WeightsError("read_error", f"{path}: {exc.strerror or exc}")
    return WeightsError("corrupt_file", f"{path}: {type(exc).__name__}: {exc}")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model given as a file or a directory (single, sharded or adapter).

    A directory with ``model.safetensors.index.json`` means the shards it
    lists; else ``adapter_model.safetensors``, ``model.safetensors``, or every
    ``*.safetensors`` file in it.
    """
    if path.is_file():
        return [path]
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError("corrupt_file", f"{index}: not a safetensors index ({exc})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise WeightsError("corrupt_file", f"{index}: shard(s) {', '.join(missing)} missing")
        return [path / s for s in shards]
    for single in (ADAPTER_FILE, MODEL_FILE):
        if (path / single).is_file():
            return [path / single]
    found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not found:
        raise WeightsError("unsupported", f"{path}: no .safetensors weights (only safetensors checkpoints are read)")
    return found


class WeightSet:
    """Name -> :class:`TensorRef` over one or more safetensors files; data is read on demand."""

    def __init__(self, tensors: dict[str, TensorRef], files: list[Path]) -> None:
        self.tensors = tensors
        self.files = files

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> WeightSet:
        files = weight_files(Path(path))
        tensors: dict[str, TensorRef] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        ref = TensorRef(name, file, tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
                        if name in tensors:
                            raise WeightsError("corrupt_file", f"{file}: tensor {name} also in {tensors[name].file}")
                        tensors[name] = ref
            except WeightsError:
                raise
            except Exception as exc:
                raise _read_error(file, exc) from None
        return cls(tensors, files)

    @property
    def is_adapter(self) -> bool:
        return any(f.name == ADAPTER_FILE for f in self.files)

    def blocks(
        self, ref: TensorRef, max_elements: int = DEFAULT_BLOCK_ELEMENTS, region: tuple[int, ...] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first_row, block)`` over dimension 0 of ``ref`` (or of its leading ``region``, same rank)."""
        shape = region if region is not None else ref.shape
        if not shape:
            yield 0, self._read(ref, ())
            return
        row = math.prod(shape[1:])
        step = max(1, max_elements // max(row, 1))
        trailing = tuple(slice(0, n) for n in shape[1:]) if region is not None else ()
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            yield start, self._read(ref, (slice(start, stop), *trailing))

    def read(self, ref: TensorRef) -> torch.Tensor:
        """The whole tensor (for the small LoRA factors and biases)."""
        return self._read(ref, None)

    @staticmethod
    def _read(ref: TensorRef, index: tuple[slice, ...] | None) -> torch.Tensor:
        try:
            with safe_open(str(ref.file), framework="pt") as f:
                if index is None or not index:
                    return f.get_tensor(ref.name)
                return f.get_slice(ref.name)[index if len(index) > 1 else index[0]]
        except Exception as exc:
            raise _read_error(ref.file, exc) from None
