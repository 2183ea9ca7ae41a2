"""The project's error kinds. The CLI catches these once and prints one line.

Each also subclasses the matching built-in so callers of the Python API can catch either.
"""

from __future__ import annotations


class CfsError(Exception):
    """Base of every error this package raises on purpose."""


class BuildInputError(CfsError, ValueError):
    """Bad input to a build: a malformed dumpfile line, a bad option, an impossible tree."""


class DumpfileError(BuildInputError):
    """A dumpfile that cannot be parsed. ``line`` is 1-based (0 when not tied to a line)."""

    def __init__(self, message: str, line: int = 0, source: str = "") -> None:
        self.message = message
        self.line = line
        self.source = source
        where = f"{source or 'dumpfile'}:{line}: " if line else (f"{source}: " if source else "")
        super().__init__(where + message)


class WalkError(CfsError, OSError):
    """A filesystem error while reading a source tree; the message names the path."""


class InternalError(CfsError, AssertionError):
    """A plan/emit mismatch: a bug in this package, never the user's fault."""
