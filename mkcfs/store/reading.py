"""Reading source files exactly: the data the image refers to is the data that was read.

A source file must have exactly the size ``lstat`` reported when the walk found it: one that
grows, shrinks or vanishes while it is read is an error naming the path (``WalkError``), never
a wrong digest. ``hash_fd`` reads a file once, hashes it with the one fs-verity implementation
(``fsverity``) and can hand the same data to a sink (a store object being written). A sparse
file is read region by region (``SEEK_DATA``/``SEEK_HOLE``): holes are hashed as fixed zero
hashes and reach the sink as holes.
"""

from __future__ import annotations

import os
from typing import Protocol

from fsverity import FsVerityHasher, data_extents, digest_padded, is_sparse

from mkcfs.errors import WalkError, walk_error

__all__ = ["BUFFER_SIZE", "INLINE_MAX", "Cancelled", "Sink", "digest_fitting", "hash_fd", "open_source",
           "read_inline", "file_changed", "Snapshot", "snapshot"]

#: regular files up to this size are inlined (``LCFS_RECOMMENDED_INLINE_CONTENT_MAX``).
INLINE_MAX = 64
#: read buffer of each worker thread (a file up to this size is read and hashed in one go).
BUFFER_SIZE = 1 << 20

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK


class Cancelled(WalkError):
    """The build was stopped (another file failed, or the user interrupted it)."""


class CancelFlag(Protocol):
    """``threading.Event`` or ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...


class Sink(Protocol):
    """Where ``hash_fd`` hands the data it reads (``mkcfs.fsutil.LockedTemp``)."""

    def write(self, data: memoryview) -> None: ...

    def skip(self, length: int) -> None: ...


#: what must not change while a file is copied: (size, mtime, ctime), in ns
Snapshot = tuple[int, int, int]


def snapshot(fd: int) -> Snapshot:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_changed(path: bytes) -> WalkError:
    """The error for a source that changed while it was copied to the store."""
    return walk_error("error computing digest of", path,
                      "file changed while being copied to the store")


def open_source(path: bytes) -> int:
    """Open a source file for reading; never follows a symlink, never blocks on a FIFO
    (both would mean the file changed since it was ``lstat``ed)."""
    try:
        return os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise walk_error("error computing digest of", path, exc) from None


def _changed(path: bytes, size: int, got: int) -> WalkError:
    return walk_error("error computing digest of", path,
                      f"file changed size while being read ({size} bytes expected, "
                      f"{'more' if got > size else got} read)")


def read_inline(path: bytes, size: int) -> bytes:
    """The whole content of a small file, which must have exactly ``size`` bytes."""
    fd = open_source(path)
    try:
        data = b""
        while True:
            chunk = os.read(fd, size + 1 - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) > size or len(chunk) < size + 1:
                break
    except OSError as exc:
        raise walk_error("error computing digest of", path, exc) from None
    finally:
        os.close(fd)
    if len(data) != size:
        raise _changed(path, size, len(data))
    return data


def _read_whole(fd: int, size: int, path: bytes, view: memoryview) -> None:
    """Read all of ``fd`` (freshly opened), which must be exactly ``size`` bytes, into
    ``view``, which is larger: a read that returns less than asked for is the end, and the
    spare room shows a file that grew."""
    readv = os.readv
    total = 0
    while True:
        try:
            n = readv(fd, (view[total:],))
        except OSError as exc:
            raise walk_error("error computing digest of", path, exc) from None
        if not n:
            break
        total += n
        if total >= size:
            break
    if total != size:
        raise _changed(path, size, total)


def digest_fitting(path: bytes, size: int, view: memoryview) -> bytes:
    """The fs-verity digest of the file at ``path``, which must have exactly ``size`` bytes,
    fewer than ``view`` holds: ``hash_fd`` for the many small files of a tree, without its
    detours (read in one go, hashed in place)."""
    fd = open_source(path)
    try:
        _read_whole(fd, size, path, view)
    finally:
        os.close(fd)
    return digest_padded(view, size)


def hash_fd(fd: int, size: int, path: bytes, view: memoryview, sink: Sink | None = None,
            cancel: CancelFlag | None = None) -> bytes:
    """The fs-verity digest of ``fd`` (freshly opened: read from offset 0) to EOF, which must
    be exactly ``size`` bytes. The data read is also passed to ``sink``, holes as
    ``sink.skip``; the sink's errors are the caller's (e.g. a store write error). ``cancel``,
    when set, stops the read of a big file between two chunks (``Cancelled``)."""
    total = 0
    if 0 < size < len(view):
        _read_whole(fd, size, path, view)
        if sink is not None:
            sink.write(view[:size])
        return digest_padded(view, size)   # (the buffer is a whole number of blocks)
    hasher = FsVerityHasher()
    try:
        if size and is_sparse(os.fstat(fd)):
            total = _hash_regions(fd, size, path, view, hasher, sink, cancel)
        else:
            total = _hash_stream(fd, size, path, view, hasher, sink, cancel)
    except OSError as exc:
        if isinstance(exc, WalkError):
            raise
        raise walk_error("error computing digest of", path, exc) from None
    if total != size:
        raise _changed(path, size, total)
    return hasher.digest()


def _hash_stream(fd: int, size: int, path: bytes, view: memoryview, hasher: FsVerityHasher,
                 sink: Sink | None, cancel: CancelFlag | None) -> int:
    readv = os.readv
    buflen = len(view)
    update = hasher.update
    bufs = (view,)
    total = 0
    while True:
        n = readv(fd, bufs)
        if not n:
            break
        chunk = view[:n]
        update(chunk)
        if sink is not None:
            sink.write(chunk)
        total += n
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        if total >= size and (n < buflen or total > size):
            # a short read of a regular file is its end; more than expected is a change
            break
    return total


def _hash_regions(fd: int, size: int, path: bytes, view: memoryview, hasher: FsVerityHasher,
                  sink: Sink | None, cancel: CancelFlag | None) -> int:
    """Read only the data regions of a sparse file; returns the size seen (``size`` + 1 when
    the file grew, less when it shrank)."""
    preadv = os.preadv
    update = hasher.update
    pos = 0
    for start, length in data_extents(fd, 0, size):
        if start > pos:
            hasher.update_zeros(start - pos)
            if sink is not None:
                sink.skip(start - pos)
            pos = start
        end = start + length
        while pos < end:
            n = preadv(fd, (view[:min(len(view), end - pos)],), pos)
            if not n:
                return pos   # shrank
            chunk = view[:n]
            update(chunk)
            if sink is not None:
                sink.write(chunk)
            pos += n
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
    if size > pos:
        hasher.update_zeros(size - pos)
        if sink is not None:
            sink.skip(size - pos)
    now = os.fstat(fd).st_size
    if now > size or os.pread(fd, 1, size):
        return size + 1
    return min(now, size)
