"""File-system helpers shared by everything that writes files a user keeps.

One protocol for every such file (images, store objects, and the caches and indexes to come):

* ``LockedTemp`` creates a new file under a temporary name in the target's directory and
  ``flock``\\ s it at once; the data is written, the file completed (mode, optional ``fsync``) and
  then renamed to its final name (``commit``), or removed (``discard``). The lock is held for as
  long as the temporary name exists, so a process killed at any moment (even by SIGKILL) leaves
  at most an *unlocked* temporary file.
* ``remove_stale_temporaries`` removes the temporary files that match a name rule and that
  nobody holds a lock on: those of dead writers. A locked one belongs to a live writer and is
  never touched.
* ``write_atomically`` is both for a whole file held in memory.
* ``write_fd`` writes a buffer to a descriptor in calls of at most ``WRITE_CHUNK`` bytes.

``makedirs`` is ``mkdir -p`` that reports which directories it created (so a failed run can
remove exactly those).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

__all__ = ["LockedTemp", "WRITE_CHUNK", "current_umask", "makedirs", "remove_created_dirs",
           "remove_stale_temporaries", "temporaries_of", "write_atomically", "write_fd"]

#: the most bytes one ``write`` call is given. Into ext4's page cache here, calls of 1 MiB and
#: more were now and then several times slower than the same bytes in calls of 512 KiB or less
#: (a 281 MB image: 70-90 ms in 256 KiB calls every time, 80-725 ms in one call; memfd and
#: tmpfs showed no difference): ``tools/bench_write.py``
WRITE_CHUNK = 256 << 10

_NEW_FLAGS = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_OPEN_STALE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def makedirs(path: bytes, mode: int = 0o755) -> list[bytes]:
    """``mkdir -p path`` with ``mode`` (minus the umask) at every level it creates. Returns the
    directories created, outermost first. ``NotADirectoryError`` if a component is not a
    directory."""
    created: list[bytes] = []
    missing: list[bytes] = []
    current = path
    while True:
        try:
            st = os.stat(current)
            break
        except FileNotFoundError:
            missing.append(current)
            parent = os.path.dirname(current.rstrip(b"/")) or b"."
            if parent == current:
                raise
            current = parent
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), current)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
            created.append(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         directory) from None
    return created


def remove_created_dirs(created: list[bytes]) -> None:
    """Remove the directories ``makedirs`` created (innermost first), each only if empty."""
    for directory in reversed(created):
        try:
            os.rmdir(directory)
        except OSError:
            pass   # not empty (another writer uses it now) or already gone


class LockedTemp:
    """A new file ``DIRECTORY/PREFIX<random>SUFFIX``, locked (``flock``) until it is committed
    under its final name or discarded.

    The file is created read-only (mode 0600) and locked at once through that descriptor
    (``lock_fd``, which stays open until the end: it holds the lock and serves the calls that
    need a file with no writer open, such as enabling fs-verity); the writer (``fd``) is opened
    by name only once the lock is held. A cleaner that took the new file for a stale one in the
    instant before the lock can only have removed it (seen as nlink 0: a new name is drawn);
    once the file is locked no cleaner touches it. ``lock=False`` is for filesystems without
    ``flock`` (the file is then unprotected against cleaners, which cannot lock it either)."""

    __slots__ = ("name", "fd", "lock_fd")

    def __init__(self, directory: bytes, prefix: bytes, suffix: bytes = b"",
                 lock: bool = True) -> None:
        while True:
            name = b"%s/%s%s%s" % (directory, prefix, os.urandom(8).hex().encode(), suffix)
            try:
                lock_fd = os.open(name, _NEW_FLAGS, 0o600)
            except FileExistsError:   # 64 random bits met again: draw new ones
                continue
            fd = -1
            try:
                if lock:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)
                    if os.fstat(lock_fd).st_nlink == 0:
                        os.close(lock_fd)   # removed by a cleaner before we locked it
                        continue
                fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                try:
                    os.unlink(name)
                except OSError:
                    pass
                os.close(lock_fd)
                raise
            self.name, self.fd, self.lock_fd = name, fd, lock_fd
            return

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append all of ``data`` (``write_fd``)."""
        write_fd(self.fd, data)

    def skip(self, length: int) -> None:
        """Leave a hole of ``length`` bytes (the file is extended: a hole at the end counts)."""
        os.ftruncate(self.fd, os.lseek(self.fd, length, os.SEEK_CUR))

    def finish(self, mode: int, sync: bool) -> None:
        """Complete the data: set ``mode``, ``fsync`` if asked, close the writer. The file keeps
        its temporary name and its lock."""
        os.fchmod(self.fd, mode)
        if sync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def commit(self, final: bytes | str) -> None:
        """Rename the file to ``final`` (replacing what is there) and release the lock. Call
        ``finish`` first."""
        if self.fd >= 0:
            raise ValueError("commit() before finish()")
        os.rename(self.name, final)
        os.close(self.lock_fd)
        self.lock_fd = -1

    def discard(self) -> None:
        """Remove the file (if not committed) and release everything. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.lock_fd >= 0:
            try:
                os.unlink(self.name)
            except OSError:
                pass
            os.close(self.lock_fd)   # the lock goes last
            self.lock_fd = -1


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``): setting it to 0
    for an instant to read it would give a file another thread creates meanwhile mode 0666
    (the image and the digest cache are written at the same time). Without ``/proc`` it is
    set and restored at once."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_fd(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to the descriptor ``fd``: ``os.write`` of at most ``WRITE_CHUNK``
    bytes at a time until done."""
    view = memoryview(data).cast("B")
    write = os.write
    while view:
        view = view[write(fd, view[:WRITE_CHUNK]):]


def remove_stale_temporaries(directory: bytes | str, prefix: bytes | str,
                             suffix: bytes | str = b"") -> int:
    """Remove the files ``DIRECTORY/PREFIX*SUFFIX`` that no process holds a lock on (those
    ``LockedTemp`` files whose writer died). Returns how many were removed; an unreadable
    directory removes none."""
    directory, prefix, suffix = os.fsencode(directory), os.fsencode(prefix), os.fsencode(suffix)
    try:
        names = [e.name for e in os.scandir(directory)
                 if e.name.startswith(prefix) and e.name.endswith(suffix)
                 and len(e.name) > len(prefix) + len(suffix)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        path = b"%s/%s" % (directory, name)
        try:
            fd = os.open(path, _OPEN_STALE_FLAGS)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), os.lstat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(path)
                removed += 1
        except OSError:
            pass   # locked by a live writer (or locks unsupported), or already gone
        finally:
            os.close(fd)
    return removed


def temporaries_of(path: str | bytes) -> tuple[bytes, bytes, bytes]:
    """``(directory, prefix, suffix)`` of the temporary files ``write_atomically(path)`` uses:
    ``.NAME.<random>.tmp`` beside ``path`` (for ``remove_stale_temporaries``)."""
    target = os.path.abspath(os.fsencode(path))
    return os.path.dirname(target), b"." + os.path.basename(target) + b".", b".tmp"


def write_atomically(path: str | bytes, data: bytes | bytearray | memoryview,
                     mode: int = 0o666, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a locked temporary file in the same directory + rename.

    The file gets ``mode & ~umask`` like a plain ``open(O_CREAT)``. On any failure the temporary
    file is removed and ``path`` is left as it was. A killed process leaves at most an unlocked
    ``.NAME.<random>.tmp`` file beside the target (never a partial file under its name), which
    the next write to the same path removes. With ``durable`` the data is fsync'ed before the
    rename (survives a power cut; costs ~10 ms/MB here); mkcomposefs 1.0.8 never syncs, and
    neither does the CLI by default."""
    target = os.fsencode(path)
    directory, prefix, suffix = temporaries_of(target)
    remove_stale_temporaries(directory, prefix, suffix)
    temp = LockedTemp(directory, prefix, suffix)
    try:
        temp.write(data)
        temp.finish(mode & ~current_umask(), durable)
        temp.commit(target)
    except BaseException:
        temp.discard()
        raise
