"""Errors of the erofs package: malformed images, trees the format cannot hold, and internal
planner/emitter mismatches. (``erofs`` imports nothing from ``mkcfs``, so these stand alone;
``mkcfs.cli.common`` reports each kind as one line.)"""

from __future__ import annotations


class ImageFormatError(ValueError):
    """A malformed or hostile image. ``offset`` is the byte offset where the problem was found."""

    def __init__(self, offset: int, what: str) -> None:
        self.offset = offset
        self.what = what
        super().__init__(f"offset {offset:#x}: {what}")


class LayoutError(ValueError):
    """The records cannot be laid out (e.g. a file too large for the chunk map): the input asks
    for more than the format can hold."""


class InternalError(AssertionError):
    """The writer disagrees with its own plan: a bug, never the user's input. Front ends
    report it as "internal error (please report)", not as bad input."""
