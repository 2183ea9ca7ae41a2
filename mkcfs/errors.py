"""The project's error kinds. The CLI catches these once and prints one line.

Each also subclasses the matching built-in so callers of the Python API can catch either.
"""

from __future__ import annotations

import os
from typing import TypeVar


class CfsError(Exception):
    """Base of every error this package raises on purpose."""


_E = TypeVar("_E", bound=Exception)


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


class StoreError(CfsError, OSError):
    """The object store cannot be used or filled; the message names the store or the object's
    source path."""


def path_error(kind: type[_E], what: str, path: bytes | str, exc: OSError | str) -> _E:
    """``kind("<what> <path>: <reason>")`` from an OSError (keeping its errno) or a reason text."""
    reason = exc if isinstance(exc, str) else (exc.strerror or str(exc))
    err = kind(f"{what} {os.fsdecode(path)}: {reason}")
    if not isinstance(exc, str):
        err.errno = exc.errno   # type: ignore[attr-defined]
    return err


def walk_error(what: str, path: bytes | str, exc: OSError | str) -> WalkError:
    """``WalkError("<what> <path>: <reason>")``: a source tree that cannot be read."""
    return path_error(WalkError, what, path, exc)
