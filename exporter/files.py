"""Reading the small files a user hands the exporters (config files, web configuration), safely.

A config file is read in full before anything starts, so a hostile or mistaken path must fail fast with
one line: ``/dev/zero`` or a FIFO (never ends), a 50 MB file (PyYAML's pure-Python loader takes minutes and
gigabytes on it), a file in another encoding (a ``UnicodeDecodeError`` traceback). :func:`read_text` refuses
anything that is not a regular file, reads at most ``max_bytes`` plus one byte, and decodes strict UTF-8;
:func:`load_yaml` parses with libyaml's C loader where PyYAML was built with it, and :func:`check_expansion`
bounds what its aliases expand to.

Files the exporters append lines to (the preview history) are opened by :func:`open_append`, which refuses a
symlink (``O_NOFOLLOW``) or anything but a regular file, and written by :func:`append_whole`, which leaves the
file as it was when the disk refuses part of a line (it truncates back to the size before).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml

# Far above any real settings file (the shipped ones are a few KiB), far below what hurts.
MAX_CONFIG_BYTES = 1 << 20

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class FileProblem(ValueError):
    """A file that cannot be used; ``str()`` is one line naming the file and what is wrong."""


def read_text(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``, of at most ``max_bytes`` bytes.

    Args:
        path: the file.
        what: how the error names the file, e.g. ``"config file"``.
        max_bytes: the largest size accepted.

    Raises:
        FileProblem: not a regular file, unreadable, larger than ``max_bytes`` or not UTF-8.
    """
    name = f"{what} {str(path)!r}"
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FileProblem(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise FileProblem(f"cannot read {name}: {kind}")
        if st.st_size > max_bytes:
            raise FileProblem(f"{name} is {st.st_size} bytes, more than the {max_bytes} accepted")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 16, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # grew while being read
            raise FileProblem(f"{name} is more than the {max_bytes} bytes accepted")
    except OSError as exc:
        raise FileProblem(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FileProblem(f"{name} is not UTF-8 text (byte {exc.start}, line {line})") from None


def load_yaml(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The parsed YAML of ``path`` (``None`` for an empty file), read as :func:`read_text` reads it.

    Raises:
        FileProblem: as :func:`read_text`, or the text is not YAML (the line is named).
    """
    text = read_text(path, what, max_bytes)
    try:
        return yaml.load(text, Loader=_Loader)  # a safe loader, C or Python
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FileProblem(f"{what} {str(Path(path))!r} is not valid YAML{where}") from None


def check_expansion(data: Any, name: str, max_values: int = MAX_CONFIG_BYTES, max_depth: int = 64) -> None:
    """Refuse parsed YAML that aliases blow up: more than ``max_values`` values or ``max_depth`` levels.

    An alias is a reference, not a copy, so the parsed document is small; whatever walks it pays for every
    expansion. Ten levels of ten aliases in a 1 KiB file are 10^10 values; an alias of its own parent is
    endless. Without aliases a document holds fewer values than it has bytes, so the default ``max_values``
    only refuses what aliases expanded.

    Args:
        data: the parsed document.
        name: how the error names the file, e.g. ``"config file '/etc/x.yml'"``.
        max_values: the most values (mapping keys, mapping and list entries) visited, aliases expanded.
        max_depth: the deepest nesting of mappings and lists accepted.

    Raises:
        FileProblem: the document is larger or deeper than that.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    visited = 0
    while stack:
        node, depth = stack.pop()
        visited += 1
        if visited > max_values:
            raise FileProblem(f"{name} expands to more than {max_values} values (YAML aliases?)")
        if isinstance(node, dict):
            children: list[Any] = [*node.keys(), *node.values()]
        elif isinstance(node, list):
            children = node
        else:
            continue
        if children and depth >= max_depth:
            raise FileProblem(f"{name} nests more than {max_depth} levels deep (a recursive YAML alias?)")
        stack.extend((child, depth + 1) for child in children)


# ---------------------------------------------------------------------------- appending lines

APPEND_FLAGS = (os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                | getattr(os, "O_NONBLOCK", 0))


def open_append(path: str | os.PathLike[str], what: str, mode: int = 0o644) -> int:
    """A descriptor appending to the regular file ``path`` (created with ``mode``), never through a symlink.

    Read access too, so that the caller can look at the last byte. ``O_NOFOLLOW`` applies to the last part of
    the path only: a symlinked directory above it is the user's choice, a symlinked file in it is not (it
    sent appends outside the directory). ``O_NONBLOCK``: a FIFO must not hang the open; it is refused.

    Raises:
        FileProblem: ``path`` is a symbolic link or not a regular file (nothing was written).
        OSError: the file cannot be opened or created.
    """
    name = f"{what} {str(path)!r}"
    try:
        fd = os.open(path, APPEND_FLAGS, mode)
    except OSError as exc:
        # ELOOP: the last part is a symlink; ENXIO: a socket (or a FIFO opened for writing only).
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            kind = "a symbolic link" if os.path.islink(path) else "not a regular file"
            raise FileProblem(f"refusing to append to {name}: {kind}") from None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise FileProblem(f"refusing to append to {name}: {kind}")
    return fd


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` to the end of the open file ``fd`` in full, or leave the file as it was.

    Short writes are continued; when a write fails (a full disk, a file size limit, a quota), the file is
    truncated back to its size before, so no partial line stays behind. The caller keeps other appenders
    out meanwhile (``flock``) if there are any.

    Raises:
        OSError: the write failed; the file has its previous size again (unless truncating failed too).
    """
    size = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # the original error is the one to report; a reader skips the partial line
        raise


def append_line(path: str | os.PathLike[str], data: bytes, what: str = "file", mode: int = 0o644) -> None:
    """Append the whole ``data`` (ending in a newline) to the regular file ``path``, or nothing.

    :func:`open_append` then :func:`append_whole`, with no lock: for a file with one appender. Where there
    are several, each holds an ``flock`` around :func:`append_whole` (truncating back must not cut another's
    line), as :mod:`exporter.previews.history` does.

    Raises:
        FileProblem: ``path`` is a symbolic link or not a regular file.
        OSError: the file cannot be opened, or the write failed (the file is as it was).
    """
    fd = open_append(path, what, mode)
    try:
        append_whole(fd, data)
    finally:
        os.close(fd)


def dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the directory ``path`` cannot be used or created, where that shows now: the path, or the nearest
    part of it that exists, is not a directory (a regular file, a dangling symlink). ``None`` otherwise;
    permissions and a full disk show only when it is written, and are handled there.

    Example:
        >>> dir_problem("/dev/null/logs")
        "'/dev/null/logs' has '/dev/null' in its path, which is not a directory"
    """
    target = Path(path)
    for part in (target, *target.parents):
        try:
            mode = os.stat(part).st_mode
        except FileNotFoundError:
            if not os.path.islink(part):
                continue  # to be created: look at its parent
            mode = 0  # a dangling symlink: mkdir fails on it
        except NotADirectoryError:
            continue  # a parent is a file: found when the loop reaches it
        except OSError:
            return None  # no permission to look: left to the write, which says so
        if stat.S_ISDIR(mode):
            return None
        what = "a symlink to nothing" if mode == 0 else "not a directory"
        if part == target:
            return f"{str(target)!r} is {what}"
        return f"{str(target)!r} has {str(part)!r} in its path, which is {what}"
    return None
