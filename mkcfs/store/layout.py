"""What a STORE argument names: a plain object store, or a managed mkcfs store.

* A **plain object store** is what ``mkcomposefs --digest-store=DIR`` fills: ``DIR/ab/cdef…``
  (plus ``.lock``, the store lock, and ``.tmp-*`` files of running builds).
* A **managed store** is a directory with ``objects/`` (a plain object store) and ``images/``
  (the images the store keeps, written by ``mkcfs mount``). ``mkcfs fsck`` and ``mkcfs gc`` use
  ``images/*`` as the images to check and keep when none are given.

A plain object store never has an entry called ``objects`` (its directories are two hex digits),
so the presence of ``objects/`` tells the two apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mkcfs.errors import CfsError

__all__ = ["StoreLayout", "resolve_store", "QUARANTINE_NAME", "OBJECTS_NAME", "IMAGES_NAME"]

OBJECTS_NAME = "objects"
IMAGES_NAME = "images"
#: where ``mkcfs fsck --repair`` moves bad objects, inside the object store
QUARANTINE_NAME = ".quarantine"


@dataclass(frozen=True)
class StoreLayout:
    """``objects``: the object-store directory; ``images``: the kept-images directory of a
    managed store (``None`` for a plain object store)."""

    given: str
    objects: str
    images: str | None

    def kept_images(self) -> list[str]:
        """The image files of a managed store (``images/*`` except hidden temporaries), sorted;
        empty for a plain store."""
        if self.images is None:
            return []
        return image_files(self.images)


def image_files(directory: str) -> list[str]:
    """The files of ``directory`` that are images to keep: every entry but hidden names (the
    ``.NAME.*.tmp`` files of image writers), sorted. Errors name the directory."""
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except OSError as exc:
        raise CfsError(f"cannot list {directory}: {exc.strerror or exc}") from None
    return [os.path.join(directory, n) for n in names]


def resolve_store(path: str) -> StoreLayout:
    """The layout of the existing store ``path``; errors are one line naming it."""
    if not os.path.isdir(path):
        raise CfsError(f"{path}: not a directory" if os.path.exists(path)
                       else f"{path}: no such store")
    objects = os.path.join(path, OBJECTS_NAME)
    if os.path.isdir(objects):
        images = os.path.join(path, IMAGES_NAME)
        return StoreLayout(path, objects, images if os.path.isdir(images) else None)
    return StoreLayout(path, path, None)
