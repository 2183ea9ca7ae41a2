"""Build an image from a tree, and put it in place atomically.

``build_image`` is the Python API under ``mkcomposefs``: tree in, image bytes out, identical to
mkcomposefs 1.0.8 for the same tree and version options. ``write_atomically`` writes bytes to a
temporary file beside the target and renames it into place only when complete, so the target
holds the old file, or the complete new one, never a partial image.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from typing import Callable

from erofs.errors import InternalError
from erofs.layout import LayoutError
from erofs.writer import build_image as _emit

from mkcfs.errors import BuildInputError
from mkcfs.gcpause import gc_paused
from mkcfs.build.flatten import WriteError, choose_version, flatten
from mkcfs.tree import Node

DEFAULT_MIN_VERSION = 0
DEFAULT_MAX_VERSION = 1


@dataclass(frozen=True, slots=True)
class BuiltImage:
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
    return _build([root], min_version, max_version)


def build_image_from(load_tree: Callable[[], Node], *, min_version: int = DEFAULT_MIN_VERSION,
                     max_version: int = DEFAULT_MAX_VERSION) -> BuiltImage:
    """Like ``build_image`` for a tree that ``load_tree()`` makes and nobody else keeps: the
    tree is released as soon as it is flattened, before the image is laid out, which lowers
    the peak memory of a large build by about a third."""
    return _build([load_tree()], min_version, max_version)


def _build(holder: list[Node], min_version: int, max_version: int) -> BuiltImage:
    root = holder.pop()
    version = choose_version(root, min_version, max_version)
    try:
        with gc_paused():
            records = flatten(root, version)
            del root   # the records keep what the image needs; the tree can go now
            data = _emit(records, version)
    except LayoutError as exc:
        raise WriteError(errno.EFBIG, str(exc)) from None
    except InternalError as exc:  # pragma: no cover - a bug, reported as such
        raise BuildInputError(f"internal error (please report): {exc}") from None
    return BuiltImage(data, version)


def _temp_prefix(path: str) -> tuple[str, str]:
    directory = os.path.dirname(os.path.abspath(path))
    return directory, "." + os.path.basename(path) + "."


def remove_stale_temporaries(path: str) -> int:
    """Remove the ``.NAME.*.tmp`` files a killed writer of ``path`` left behind.

    A writer holds an ``flock`` on its temporary file until it is renamed, so a temporary file
    that can be locked belongs to nobody alive. Returns how many were removed."""
    directory, prefix = _temp_prefix(path)
    removed = 0
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return 0
    for name in names:
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), os.lstat(full)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(full)
                removed += 1
        except OSError:
            pass   # locked by a live writer, or already gone
        finally:
            os.close(fd)
    return removed


def write_atomically(path: str, data: bytes | bytearray, mode: int = 0o666,
                     durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + rename.

    The file gets ``mode & ~umask`` like a plain ``open(O_CREAT)``. On any failure the temporary
    file is removed and ``path`` is left as it was. A killed process leaves at most an unlocked
    ``.NAME.*.tmp`` file beside the target (never a partial image under its name), which the next
    write to the same path removes. With ``durable`` the data is fsync'ed before the rename
    (survives a power cut, costs ~10 ms/MB here); mkcomposefs 1.0.8 never syncs, and neither
    does the CLI by default."""
    import tempfile  # ~3 ms of imports, needed only here

    remove_stale_temporaries(path)
    directory, prefix = _temp_prefix(path)
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)   # a cleaner removed it in the instant before we locked it
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
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)
