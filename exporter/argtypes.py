"""What every subcommand shares: exit codes, the one-line failure, and the value types of its flags.

A bad flag value becomes argparse's one-line error (exit 2); bad input found
after parsing ends through :func:`fail` with the same exit code.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

T = TypeVar("T")

# The longest wait a flag may ask for: a year. Far beyond any interval or timeout worth setting, far below
# what overflows the platform's timeouts (``threading.TIMEOUT_MAX``, a ``time_t`` of nanoseconds: 292 years);
# 1e300 ended in an OverflowError traceback from the socket or the event it reached.
MAX_SECONDS = 365 * 86400.0


def fail(message: str) -> NoReturn:
    """End the command with ``training-exporter: error: MESSAGE`` on stderr and exit code 2.

    Raises:
        SystemExit: always, with :data:`EXIT_BAD_INPUT`.
    """
    sys.stderr.write(f"training-exporter: error: {message}\n")
    raise SystemExit(EXIT_BAD_INPUT)


def checked(parse: Callable[[str], T], message: str | None = None) -> Callable[[str], T]:
    """A flag type from a parser that raises ``ValueError``: the error's text (or ``message``) becomes argparse's.

    Args:
        parse: turns the flag's text into its value; raises ``ValueError`` on bad text.
        message: the error to show instead of the ``ValueError``'s own; ``{text!r}`` is
            replaced by the flag's text.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--ratio", type=checked(float))
        >>> parser.parse_args(["--ratio", "0.5"]).ratio
        0.5
    """

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                message.replace("{text!r}", repr(text)) if message is not None else str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def integer(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str], int]:
    """An integer flag value of at least ``minimum`` and, if given, at most ``maximum``.

    Args:
        minimum: the smallest value accepted.
        maximum: the largest value accepted; ``None``: no bound.
        why: said after the upper bound when a value is above it, e.g. ``"the CPUs of this machine"``.

    Example:
        >>> integer(0, 10)("7")
        7
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            reason = f" ({why})" if why else ""
            shown = str(value) if len(str(value)) <= 40 else f"a {len(str(value))}-digit number"
            raise argparse.ArgumentTypeError(f"must be <= {maximum}{reason}, got {shown}")
        return value

    parse.__name__ = "integer"
    return parse


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a scheduler or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


positive_int = integer(1)


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0 and at most :data:`MAX_SECONDS` (a year)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text[:40]!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS:.0f} seconds (a year), got {text[:40]!r}")
    return value


def non_negative_number(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value
