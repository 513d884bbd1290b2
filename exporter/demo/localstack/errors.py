"""The one error of the local alerting chain that the person running it can fix."""

from __future__ import annotations

__all__ = ["LocalStackError"]


class LocalStackError(RuntimeError):
    """Something the person running it has to provide (a binary, the configuration, a package); one line."""
