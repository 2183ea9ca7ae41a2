"""The backing objects an image refers to, and which of them a store is missing.

An external regular file of a composefs image names its data by a backing path relative to an
object store (``ab/cdef…``, from its ``trusted.overlay.redirect`` xattr) and usually carries the
fs-verity digest of that data (``trusted.overlay.metacopy``). ``composefs-info objects`` and
``missing-objects`` list those paths; store checks (fsck) and garbage collection (gc) need the
same list with the digests. This module is that list, for any caller:

* :func:`tree_objects` / :func:`image_objects`: ``(path, digest)`` of every external file of a
  tree or image, each inode once;
* :func:`image_file_objects`: the set of backing paths of an image file;
* :func:`collect_objects`: the union over several images, path -> digest;
* :func:`object_present` / :func:`missing_objects`: which paths none of one or more base
  directories holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from erofs.reader import Image

from mkcfs.tree import S_IFMT, S_IFREG, Node

__all__ = ["ObjectRef", "tree_objects", "image_objects", "image_file_objects", "collect_objects",
           "object_present",
           "missing_objects"]


class ObjectRef(NamedTuple):
    """One backing object named by an image."""

    #: the backing path relative to the store, as stored (e.g. ``b"ab/cdef…"``)
    path: bytes
    #: the fs-verity digest the image expects (32 bytes), or None when it stores none
    digest: bytes | None


def tree_objects(root: Node) -> Iterator[ObjectRef]:
    """Every regular file of the tree that has a backing path, each node once (hard links
    are not followed), in no particular order."""
    stack = [root]
    pop = stack.pop
    push = stack.extend
    while stack:
        node = pop()
        payload = node.payload
        if payload is not None and (node.mode & S_IFMT) == S_IFREG:
            yield ObjectRef(payload, node.digest)
        children = node.children
        if children:
            push(child for child in children.values() if isinstance(child, Node))


def image_objects(image: Image | bytes | bytearray | memoryview,
                  toplevel: Iterable[bytes] | None = None) -> Iterator[ObjectRef]:
    """:func:`tree_objects` of an image (``toplevel``: only below these root entries). A
    damaged image raises :class:`~erofs.errors.ImageFormatError`."""
    from mkcfs.inspect.unflatten import load_tree

    return tree_objects(load_tree(image, toplevel, share_xattrs=True))


def image_file_objects(path: str | bytes | os.PathLike) -> set[bytes]:
    """The distinct backing paths the image file at ``path`` refers to (what ``mkcfs fsck``
    checks and ``mkcfs gc`` keeps). ``OSError`` when it cannot be read, ``ImageFormatError``
    (an offset, not the file: callers name it) when it is damaged."""
    return {ref.path for ref in image_objects(Image.open(path))}


def collect_objects(refs: Iterable[ObjectRef]) -> dict[bytes, bytes | None]:
    """path -> digest over ``refs`` (several images' objects chained): each path once, with the
    first digest met for it."""
    objects: dict[bytes, bytes | None] = {}
    for ref in refs:
        if ref.path not in objects:
            objects[ref.path] = ref.digest
    return objects


def object_present(path: bytes, basedir: int | str | bytes | os.PathLike) -> bool:
    """Whether ``path`` (leading ``/`` ignored) exists under ``basedir`` (a directory file
    descriptor, or a path). An empty path names the base directory itself, as libcomposefs's
    ``fstatat(fd, "", AT_EMPTY_PATH)`` does."""
    rel = path.lstrip(b"/")
    try:
        if isinstance(basedir, int):
            if rel:
                os.stat(rel, dir_fd=basedir)
            else:
                os.fstat(basedir)
        else:
            os.stat(os.path.join(os.fsencode(basedir), rel) if rel else basedir)
    except (OSError, ValueError):
        return False
    return True


def missing_objects(paths: Iterable[bytes],
                    basedirs: Sequence[int | str | bytes | os.PathLike]) -> list[bytes]:
    """The sorted, de-duplicated ``paths`` that none of ``basedirs`` holds."""
    missing = set()
    for path in set(paths):
        if not any(object_present(path, base) for base in basedirs):
            missing.add(path)
    return sorted(missing)
