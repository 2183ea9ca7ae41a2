"""Build an image from a tree, and put it in place atomically.

``build_image`` is the Python API under ``mkcomposefs``: tree in, image bytes out, identical to
mkcomposefs 1.0.8 for the same tree and version options. The image is put in place by
``mkcfs.fsutil.write_atomically`` (temporary file beside the target, renamed when complete).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import NamedTuple, Protocol

from erofs.errors import LayoutError
from erofs.writer import build_image as _emit

from mkcfs.gcpause import gc_paused
from mkcfs.build.flatten import LateFiles, WriteError, flatten_choosing_version
from mkcfs.tree import Node

DEFAULT_MIN_VERSION = 0
DEFAULT_MAX_VERSION = 1


class BuiltImage(NamedTuple):
    """An image and the format version it was written with."""

    data: bytes | bytearray
    version: int

    def fsverity_digest(self) -> bytes:
        """The image's fs-verity digest (what ``--print-digest`` prints)."""
        from fsverity import digest_bytes  # only when asked: hashlib costs ~6 ms to import

        return digest_bytes(self.data)


def build_image(root: Node, *, min_version: int = DEFAULT_MIN_VERSION,
                max_version: int = DEFAULT_MAX_VERSION) -> BuiltImage:
    """Write ``root`` as a composefs image, choosing the version as mkcomposefs does."""
    return _build([root], min_version, max_version, consume=False)


def build_image_from(load_tree: Callable[[], Node | TreeInProgress], *,
                     min_version: int = DEFAULT_MIN_VERSION,
                     max_version: int = DEFAULT_MAX_VERSION,
                     dispose: Callable[[object], object] | None = None) -> BuiltImage:
    """Like ``build_image`` for a tree that ``load_tree()`` makes and nobody else keeps: the
    tree is taken apart while it is flattened (its memory is reused for the records) and gone
    before the image is laid out, which lowers the peak memory of a large build by about a
    third. ``load_tree()`` may also return a tree whose files are still being read (a
    ``TreeInProgress``): the tree is flattened meanwhile, and the image made once they are.
    ``dispose`` is given the inode records once the image is made, instead of dropping them
    (``mkcfs.cli.common.keep_to_exit``)."""
    # a walk or a parse makes many objects and no cycles: no collector passes over them, from
    # the first node to the freed records (turned back on with most of them already gone)
    with gc_paused():
        tree = load_tree()
        if isinstance(tree, Node):
            holder, pending = [tree], None
        else:
            holder, pending = [tree.root], tree
        del tree
        return _build(holder, min_version, max_version, consume=True, pending=pending,
                      dispose=dispose)


class TreeInProgress(Protocol):
    """A tree whose regular files larger than 0 bytes get their contents only in ``wait()``,
    which calls ``filled(nodes)`` with groups of them as they get them
    (``mkcfs.sources.walk.WalkInProgress``)."""

    root: Node
    #: whether the tree may hold ``HardLink`` entries (False: flatten looks for none)
    hard_links: bool

    def wait(self, filled: Callable[[list[Node]], object] | None = None) -> None: ...

    def abort(self) -> None: ...


def _build(holder: list[Node], min_version: int, max_version: int, *,
           consume: bool, pending: TreeInProgress | None = None,
           dispose: Callable[[object], object] | None = None) -> BuiltImage:
    root = holder.pop()
    late = None if pending is None else LateFiles()
    try:
        try:
            with gc_paused():
                records, version = flatten_choosing_version(
                    root, min_version, max_version, consume=consume, late=late,
                    hard_links=True if pending is None else pending.hard_links)
        except Exception:
            if pending is not None:   # an error of the source is reported first, as it is
                pending.wait()        # without a tree in progress
            raise
    except BaseException:
        if pending is not None:
            pending.abort()
        raise
    del root   # the records keep what the image needs; the tree can go now
    if pending is not None:
        assert late is not None
        pending.wait(late.fill)   # the records of each batch of files as it is read
        late.fill()               # and those of the files read otherwise
        del late
    try:
        with gc_paused():
            data = _emit(records, version)
    except LayoutError as exc:   # the input is more than the format holds: mkcomposefs's message
        raise WriteError(errno.EFBIG, str(exc)) from None
    if dispose is not None:
        dispose(records)
    return BuiltImage(data, version)
