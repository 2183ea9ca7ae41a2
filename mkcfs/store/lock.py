"""The store lock: builds share it, ``mkcfs gc`` (and ``mkcfs fsck --repair``) take it alone.

The lock is an ``flock(2)`` on the object-store directory itself (for a managed store,
``STORE/objects``), opened read-only. Locking the directory adds no file to a layout that
mkcomposefs 1.0.8 and other tools share (a ``.lock`` file would be one more thing for them, and
for ``fsck``, to explain, and removing it while the store is in use would let two processes lock
two different files).

Protocol
--------
* **Writers** (everything that adds objects or makes an image that refers to them: ``ObjectStore``,
  the ``mkcomposefs`` CLI, the OCI source, ``mkcfs mount``) hold ``shared(store)`` from before
  they first look up or add an object until the image that refers to those objects has been
  renamed into its final place (or they failed). ``ObjectStore`` takes it as soon as the store
  directory exists (when opened, or when it creates the directory for its first object) and
  holds it until ``close()``; a build holds it longer than its ``ObjectStore`` lives:
  ``retain_shared(store)`` around the walk *and* the image write (the ``mkcomposefs`` CLI,
  ``ManagedStore.ensure_image``). A missing store is created by the build's own process, not
  by a worker (``DigestPool`` before the first batch that may store an object; the walk before
  it fills a store that lies inside the source tree), so the lock it takes then is retained:
  no worker process is ever the only holder of the lock for objects the image will need.
* **Removers** (``mkcfs gc``, ``mkcfs fsck --repair``) hold ``exclusive(store)`` while they decide
  what to remove and remove it; ``gc`` lists and reads its kept images *after* taking the lock.
* Nothing else removes or renames objects. (Plain ``mkcfs fsck`` holds the shared lock: it only
  reads, and gc must not remove objects it is reading.)

Proof that a finished image never loses an object to gc
-------------------------------------------------------
Take a writer W whose image I is kept by gc run G (I is in a kept place: ``--keep``/``--keep-dir``,
or ``images/`` of a managed store). ``flock`` never grants a shared and an exclusive lock on one
file at once, so W's hold [w0, w1] and G's hold [g0, g1] are disjoint:

1. w1 < g0: I was renamed into place before w1, so G, which lists and reads its kept images after
   g0, sees I and keeps every object I refers to.
2. g1 < w0: every object I refers to was added by W, or found present by W, after w0 > g1, so G
   is over before W relied on it. A later run G' falls under case 1 or 2 again.

Within [w0, w1] no remover runs, so an object W found present stays present; a process killed at
any moment loses its locks with its descriptors (the kernel releases them), so a killed build can
neither block gc forever nor leave gc thinking a build runs. Images written to standard output
or not into a kept place are outside the proof: they are protected only while their writer runs.

Where ``flock`` is not supported (``ENOLCK``, ``EOPNOTSUPP``), writers go on without the lock
(as before there was one), and removers refuse to run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator

from mkcfs.errors import CfsError

__all__ = ["StoreLock", "shared", "exclusive", "retain_shared", "LockUnavailable"]

#: flock errors that mean "no locks here" (EBADF: NFS emulates flock with POSIX locks, which
#: a directory opened read-only cannot take)
_UNSUPPORTED = frozenset((errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF))
_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class LockUnavailable(CfsError):
    """The store's filesystem has no ``flock``: removing objects cannot be made safe."""


class StoreLock:
    """A held store lock (or, for a writer on a filesystem without locks, none). Release it with
    ``release()`` or by leaving its ``with`` block; a process that dies releases it too."""

    __slots__ = ("path", "_fd")

    def __init__(self, path: bytes, fd: int) -> None:
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)   # closing the last descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _open(store: str | bytes) -> tuple[bytes, int]:
    path = os.fsencode(store)
    return path, os.open(path, _OPEN_FLAGS)


def shared(store: str | bytes) -> StoreLock:
    """Take the writers' (shared) lock of the object store directory ``store`` (which must
    exist), waiting while a remover holds it. Without ``flock`` support: an unheld lock."""
    path, fd = _open(store)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _UNSUPPORTED:
            return StoreLock(path, -1)
        raise
    _retain(path, fd)
    return StoreLock(path, fd)


#: store path -> duplicated descriptors of the shared locks taken on it inside ``retain_shared``
_retained: dict[bytes, list[int]] = {}
_retained_lock = threading.Lock()


def _key(store: str | bytes) -> bytes:
    return os.path.abspath(os.fsencode(store))


@contextlib.contextmanager
def retain_shared(store: str | bytes) -> Iterator[None]:
    """Hold the shared lock of ``store`` for the whole block: taken at once when the directory
    exists; otherwise (a build creates it with its first object) every shared lock this process
    takes on it inside the block is kept until the block ends, whoever took it (the lock of a
    duplicated descriptor lives as long as any copy)."""
    key = _key(store)
    with _retained_lock:
        if key in _retained:   # nested: the outer block keeps everything
            outer = True
        else:
            outer = False
            _retained[key] = []
    try:
        if not outer and os.path.isdir(key):
            shared(key).release()   # the duplicate kept by the registry holds the lock
        yield
    finally:
        if not outer:
            with _retained_lock:
                fds = _retained.pop(key)
            for fd in fds:
                os.close(fd)


def _retain(path: bytes, fd: int) -> None:
    if _retained:
        key = _key(path)
        with _retained_lock:
            if key in _retained:
                _retained[key].append(os.dup(fd))


def exclusive(store: str | bytes, wait: bool = True) -> StoreLock | None:
    """Take the removers' (exclusive) lock of ``store``, waiting for running builds to end
    (or, with ``wait=False``, returning ``None`` when one runs). Raises ``LockUnavailable``
    where ``flock`` is not supported."""
    path, fd = _open(store)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EWOULDBLOCK:
            return None
        if exc.errno in _UNSUPPORTED:
            raise LockUnavailable(f"{os.fsdecode(path)}: the filesystem does not support "
                                  "flock; objects cannot be removed safely") from None
        raise
    return StoreLock(path, fd)
