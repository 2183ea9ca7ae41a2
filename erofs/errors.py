"""Errors of the erofs package: malformed images and internal planner/emitter mismatches."""

from __future__ import annotations


class ImageFormatError(ValueError):
    """A malformed or hostile image. ``offset`` is the byte offset where the problem was found."""

    def __init__(self, offset: int, what: str) -> None:
        self.offset = offset
        self.what = what
        super().__init__(f"offset {offset:#x}: {what}")


class InternalError(AssertionError):
    """The writer disagrees with its own plan: a bug, never the user's input."""
