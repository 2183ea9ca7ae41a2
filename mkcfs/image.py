"""Build an image from a tree, and put it in place atomically.

``build_image`` is the Python API under ``mkcomposefs``: tree in, image bytes out, identical to
mkcomposefs 1.0.8 for the same tree and version options. ``write_atomically`` writes bytes to a
temporary file beside the target and renames it into place only when complete, so the target
holds the old file, or the complete new one, never a partial image.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass

from erofs.errors import InternalError
from erofs.layout import LayoutError
from erofs.writer import build_image as _emit
from fsverity import digest_bytes

from .errors import BuildInputError
from .gcpause import gc_paused
from .flatten import WriteError, choose_version, flatten
from .tree import Node

DEFAULT_MIN_VERSION = 0
DEFAULT_MAX_VERSION = 1


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """An image and the format version it was written with."""

    data: bytes | bytearray
    version: int

    def fsverity_digest(self) -> bytes:
        """The image's fs-verity digest (what ``--print-digest`` prints)."""
        return digest_bytes(self.data)


def build_image(root: Node, *, min_version: int = DEFAULT_MIN_VERSION,
                max_version: int = DEFAULT_MAX_VERSION) -> BuiltImage:
    """Write ``root`` as a composefs image, choosing the version as mkcomposefs does."""
    version = choose_version(root, min_version, max_version)
    try:
        with gc_paused():
            data = _emit(flatten(root, version), version)
    except LayoutError as exc:
        raise WriteError(errno.EFBIG, str(exc)) from None
    except InternalError as exc:  # pragma: no cover - a bug, reported as such
        raise BuildInputError(f"internal error (please report): {exc}") from None
    return BuiltImage(data, version)


def write_atomically(path: str, data: bytes | bytearray, mode: int = 0o666,
                     durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + rename.

    The file gets ``mode & ~umask`` like a plain ``open(O_CREAT)``. On any failure the temporary
    file is removed and ``path`` is left as it was. A killed process leaves at most a
    ``.NAME.*.tmp`` file beside the target, never a partial image under its name. With
    ``durable`` the data is fsync'ed before the rename (survives a power cut, costs ~10 ms/MB
    here); mkcomposefs 1.0.8 never syncs, and neither does the CLI by default."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, mode & ~umask)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
