"""What every subcommand shares: exit codes, the one-line failure, and the value types of its flags.

A bad flag value becomes argparse's one-line error (exit 2); bad input found
after parsing ends through :func:`fail` with the same exit code.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

T = TypeVar("T")


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


def integer(minimum: int) -> Callable[[str], int]:
    """An integer flag value of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = integer(1)


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
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
