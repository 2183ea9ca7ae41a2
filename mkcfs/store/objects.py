"""The composefs object store (``mkcomposefs --digest-store=PATH``).

An object is a copy of a file's data at ``PATH/ab/cdef…``, named by its fs-verity digest
(``fsverity.object_path``), mode 0644 whatever the umask; the ``ab`` directories are created with
mode 0755 (minus the umask). An existing object is left alone and not checked.

Safety
------
* **An object appears under its name only complete.** It is written to a temporary file in the
  store root (``PATH/.tmp-<pid>-<random>``), fsync'ed, then renamed to its name. A concurrent
  build that stores the same object renames an identical file over it, which is harmless, so two
  builds can fill one store at once.
* **The content is the hashed content.** A new object is normally written while the source is
  read and hashed (one read of the source, and the object is by construction the data that was
  hashed). When most objects already exist (rebuilding into a filled store), or the filesystem
  can reflink (the first copy of a run finds out), the file is hashed first and only copied when
  missing (``FICLONE``, else ``copy_file_range``, else read/write); the source's size, mtime and
  ctime are then checked not to have changed between the hash and the copy.
* The store directory is created (``mkdir -p``, 0755 minus umask) and checked when it is opened,
  before any work, so an unusable store fails a build at once (mkcomposefs 1.0.8 creates it only
  when it copies the first object, after the whole walk).
* **Crash safety.** Each temporary file is ``flock``ed by the process writing it for as long as it
  exists. A process killed at any moment (even with SIGKILL) leaves at most temporary files with
  no lock; ``ObjectStore()`` removes those when the store is opened next. A temporary file that is
  locked belongs to a live build and is never touched. (mkcomposefs 1.0.8's own ``.tmpXXXXXX``
  files carry no lock and are left alone.)
* fs-verity is enabled on new objects (``FS_IOC_ENABLE_VERITY``) before they get their name where
  the kernel and filesystem support it; the first "not supported" answer stops further tries.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading

from collections.abc import Iterable

from fsverity import FsVerityHasher, object_path

from mkcfs.store.digests import BUFFER_SIZE, digest_buffer, hash_fd, open_source, walk_error
from mkcfs.errors import WalkError

__all__ = ["ObjectStore", "TEMP_PREFIX", "OBJECT_MODE", "FICLONE", "FS_IOC_ENABLE_VERITY"]

#: ``_IOW(0x94, 9, int)``: clone (reflink) the whole of the source file into the target.
FICLONE = 0x40049409
#: ``_IOW('f', 133, struct fsverity_enable_arg)``.
FS_IOC_ENABLE_VERITY = 0x40806685
#: ``struct fsverity_enable_arg``: version 1, SHA-256, 4096-byte blocks, no salt, no signature.
_VERITY_ARG = struct.pack("<IIIIQIIQ88x", 1, 1, 4096, 0, 0, 0, 0, 0)
#: errors of the ioctl that mean "never available here" (stop trying for this run).
_VERITY_UNSUPPORTED = frozenset((errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL))

TEMP_PREFIX = b".tmp-"
OBJECT_MODE = 0o644
DIR_MODE = 0o755
_NEW_TEMP_FLAGS = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_COPY_CHUNK = 1 << 30


#: deferred objects made durable together (each holds one descriptor until then)
_GROUP = 128


def _syncfs(fd: int) -> None:
    """``syncfs(2)``: write back everything of the filesystem holding ``fd``."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syncfs.argtypes = [ctypes.c_int]
            _libc = libc
        except (OSError, AttributeError, ImportError):  # pragma: no cover - not glibc/musl
            _libc = False
    if not _libc:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _libc.syncfs(fd) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc = None


def _store_error(path: bytes, exc: OSError | str) -> WalkError:
    return walk_error("cannot fill store", path, exc)


def _mkdirs(path: bytes) -> None:
    """``mkdir -p`` with mode 0755 (minus umask) at every level; ENOTDIR if a component is a
    file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path.rstrip(b"/"))
        if parent and parent != path:
            _mkdirs(parent)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)


class _Temp:
    """A new temporary file in the store root, locked until committed or discarded.

    It is created read-only and ``flock``ed at once through that descriptor (which later also
    enables fs-verity, once the writer is closed); the writer is opened by name only after the
    lock is held. A cleaner that took the new file for a stale one in the instant before the
    lock can only have removed it (seen as nlink 0: we start again); once the file is locked
    no cleaner touches it."""

    __slots__ = ("name", "wfd", "rfd")

    def __init__(self, root: bytes, lock: bool) -> None:
        while True:
            name = b"%s/%s%d-%s" % (root, TEMP_PREFIX, os.getpid(), os.urandom(8).hex().encode())
            try:
                rfd = os.open(name, _NEW_TEMP_FLAGS, 0o600)
            except FileExistsError:   # 64 random bits met again: draw new ones
                continue
            wfd = -1
            try:
                if lock:
                    fcntl.flock(rfd, fcntl.LOCK_EX)
                    if os.fstat(rfd).st_nlink == 0:
                        os.close(rfd)   # removed by a cleaner before we locked it
                        continue
                wfd = os.open(name, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except BaseException:
                if wfd >= 0:
                    os.close(wfd)
                try:
                    os.unlink(name)
                except OSError:
                    pass
                os.close(rfd)
                raise
            self.name, self.wfd, self.rfd = name, wfd, rfd
            return

    def write(self, data: memoryview) -> None:
        fd = self.wfd
        while data:
            data = data[os.write(fd, data):]

    def finish(self, store: ObjectStore, sync: bool) -> None:
        """Complete the data: mode 0644, fsync (unless the caller syncs a group later), close
        the writer, enable fs-verity. The file keeps its temporary name and its lock."""
        os.fchmod(self.wfd, OBJECT_MODE)
        if sync:
            os.fsync(self.wfd)
        os.close(self.wfd)
        self.wfd = -1
        store._enable_verity(self.rfd)

    def place(self, final: bytes) -> None:
        """Give the finished (and durable) file its object name; release the lock."""
        os.rename(self.name, final)
        os.close(self.rfd)
        self.rfd = -1

    def discard(self) -> None:
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1
        if self.rfd >= 0:
            try:
                os.unlink(self.name)
            except OSError:
                pass
            os.close(self.rfd)   # the lock goes last
            self.rfd = -1


class ObjectStore:
    """An object store directory, created if missing. Opening it checks that it is a writable
    directory and removes the temporary files that killed builds left behind (``prepare=False``
    skips all that, for a second view of a store already opened). Safe to use from several
    threads and processes at once."""

    def __init__(self, path: str | bytes, prepare: bool = True) -> None:
        self.path = os.fsencode(path)
        self.root = self.path.rstrip(b"/") or b"/"
        self._dirs: set[bytes] = set()
        self._dirs_lock = threading.Lock()
        self._lock_temps = True
        self._verity = True
        self._copy_range = True
        self._reflink: bool | None = None   # unknown until a copy tried it
        self._hit_score = 0.0
        self._local = threading.local()   # per thread: deferred objects waiting for a flush
        if not prepare:   # another view of a store already opened (a worker process)
            return
        try:
            _mkdirs(self.root)
        except OSError as exc:
            raise _store_error(self.path, exc) from None
        self.clean_stale_temps()
        # fail now, not after the walk, when the store is not writable
        try:
            try:
                probe = _Temp(self.root, True)
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._lock_temps = False
                probe = _Temp(self.root, False)
            probe.discard()
        except OSError as exc:
            raise _store_error(self.path, exc) from None

    # -- lookup -------------------------------------------------------------------------------

    def object_file(self, digest: bytes) -> bytes:
        """The path of the object for ``digest`` (whether it exists or not)."""
        return b"%s/%s" % (self.root, object_path(digest).encode())

    def __contains__(self, digest: bytes) -> bool:
        try:
            os.lstat(self.object_file(digest))
            return True
        except FileNotFoundError:
            return False

    def _target(self, digest: bytes) -> tuple[bytes, bool]:
        """``(object path, exists)``, creating the ``ab`` directory when needed."""
        rel = object_path(digest).encode()
        sub = rel[:2]
        if sub not in self._dirs:
            directory = b"%s/%s" % (self.root, sub)
            try:
                _mkdirs(directory)
            except OSError as exc:
                raise _store_error(directory, exc) from None
            with self._dirs_lock:
                self._dirs.add(sub)
        final = b"%s/%s" % (self.root, rel)
        try:
            os.lstat(final)
            exists = True
        except FileNotFoundError:
            exists = False
        except OSError as exc:
            raise _store_error(final, exc) from None
        # remember how often objects already exist: when most do, hash before copying
        self._hit_score = self._hit_score * 0.875 + (1.0 if exists else 0.0)
        return final, exists

    # -- adding files -------------------------------------------------------------------------

    def add_file(self, src: bytes, size: int, view: memoryview,
                 cancel: threading.Event | None = None, defer: bool = False) -> bytes:
        """Hash the regular file ``src`` (``size`` bytes) and make sure its object exists.
        Returns the fs-verity digest. ``view`` is the caller's read buffer.

        With ``defer``, a new object is completed but gets its name only at the next
        ``flush()`` of this thread, which makes a whole group durable with one ``syncfs``
        instead of one ``fsync`` per object (a store is typically filled with tens of thousands
        of small objects, and the fsyncs were most of the time of a build)."""
        fd = open_source(src)
        try:
            if self._reflink is None or self._reflink or self._hit_score > 4.0:
                return self._hash_then_copy(fd, src, size, view, cancel, defer)
            return self._copy_while_hashing(fd, src, size, view, cancel, defer)
        finally:
            os.close(fd)

    def add_stream(self, chunks: Iterable[bytes | memoryview], size: int, name: str,
                   defer: bool = False) -> bytes:
        """Store data that arrives in ``chunks`` (e.g. a tar member) and return its fs-verity
        digest. ``size`` is the exact length; ``name`` names the data in errors.

        Data of up to one buffer (``BUFFER_SIZE``) is hashed first and written only when its
        object is missing; larger data is written to a locked temporary while it is hashed
        (``FsVerityHasher``), and the temporary is dropped when the object already exists.
        ``defer`` as for ``add_file`` (then ``flush()``, or ``discard_pending()`` on error)."""
        if size <= BUFFER_SIZE:
            parts = [bytes(chunk) for chunk in chunks]
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if len(data) != size:
                raise walk_error("cannot store", name.encode(),
                                 f"{len(data)} bytes instead of {size}")
            digest = digest_buffer(memoryview(data), size) if size else FsVerityHasher().digest()
            final, exists = self._target(digest)
            if not exists:
                temp = self._new_temp()
                try:
                    try:
                        temp.write(memoryview(data))
                    except OSError as exc:
                        raise _store_error(temp.name, exc) from None
                    self._commit(temp, final, defer)
                except BaseException:
                    temp.discard()
                    raise
            return digest
        stream_temp: _Temp | None = self._new_temp()
        assert stream_temp is not None
        try:
            hasher = FsVerityHasher()
            update = hasher.update
            write = stream_temp.write
            for chunk in chunks:
                update(chunk)
                try:
                    write(memoryview(chunk))
                except OSError as exc:
                    raise _store_error(stream_temp.name, exc) from None
            if hasher.size != size:
                raise walk_error("cannot store", name.encode(),
                                 f"{hasher.size} bytes instead of {size}")
            digest = hasher.digest()
            final, exists = self._target(digest)
            if not exists:
                self._commit(stream_temp, final, defer)
                stream_temp = None
        finally:
            if stream_temp is not None:
                stream_temp.discard()
        return digest

    def _pending(self) -> list[tuple[_Temp, bytes]]:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        return pending

    def _commit(self, temp: _Temp, final: bytes, defer: bool) -> None:
        """``temp`` is complete: name it ``final`` now (fsync first), or at the next flush."""
        try:
            temp.finish(self, sync=not defer)
            if not defer:
                temp.place(final)
                return
        except OSError as exc:
            raise _store_error(final, exc) from None
        pending = self._pending()
        pending.append((temp, final))
        if len(pending) >= _GROUP:
            self.flush()

    def flush(self) -> None:
        """Make this thread's deferred objects durable (one ``syncfs``) and name them."""
        pending = self._pending()
        if not pending:
            return
        try:
            try:
                _syncfs(pending[0][0].rfd)
            except OSError:
                for temp, _ in pending:
                    os.fsync(temp.rfd)
            while pending:
                temp, final = pending[0]
                try:
                    temp.place(final)
                except OSError as exc:
                    raise _store_error(final, exc) from None
                pending.pop(0)
        finally:
            self.discard_pending()

    def discard_pending(self) -> None:
        """Drop this thread's deferred objects (after an error): their files are removed."""
        pending = self._pending()
        while pending:
            pending.pop()[0].discard()

    def _new_temp(self) -> _Temp:
        try:
            return _Temp(self.root, self._lock_temps)
        except OSError as exc:
            raise _store_error(self.path, exc) from None

    def _copy_while_hashing(self, fd: int, src: bytes, size: int, view: memoryview,
                            cancel: threading.Event | None, defer: bool) -> bytes:
        temp = self._new_temp()
        try:
            try:
                digest = hash_fd(fd, size, src, view, temp.write, cancel)
            except OSError as exc:
                if isinstance(exc, WalkError):
                    raise
                raise _store_error(temp.name, exc) from None   # a write error
            final, exists = self._target(digest)
            if not exists:
                self._commit(temp, final, defer)
                temp = None
        finally:
            if temp is not None:
                temp.discard()
        return digest

    def _hash_then_copy(self, fd: int, src: bytes, size: int, view: memoryview,
                        cancel: threading.Event | None, defer: bool) -> bytes:
        before = os.fstat(fd)
        digest = hash_fd(fd, size, src, view, None, cancel)
        final, exists = self._target(digest)
        if exists:
            return digest
        temp = self._new_temp()
        try:
            try:
                self._copy(fd, temp, size, view)
                after = os.fstat(fd)
                written = os.fstat(temp.wfd).st_size
            except OSError as exc:
                raise _store_error(final, exc) from None
            if ((after.st_size, after.st_mtime_ns, after.st_ctime_ns)
                    != (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
                    or written != size):
                raise walk_error("error computing digest of", src,
                                 "file changed while being copied to the store")
            self._commit(temp, final, defer)
            temp = None
        finally:
            if temp is not None:
                temp.discard()
        return digest

    def _copy(self, src_fd: int, temp: _Temp, size: int, view: memoryview) -> None:
        """Copy all of ``src_fd`` into ``temp``: reflink, else copy_file_range, else read/write."""
        dst_fd = temp.wfd
        if self._reflink is not False:
            try:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
                self._reflink = True
                return
            except OSError:
                self._reflink = False
        done = 0
        if self._copy_range and size:
            try:
                while done < size:
                    n = os.copy_file_range(src_fd, dst_fd, min(size - done, _COPY_CHUNK),
                                           done, done)
                    if n == 0:
                        break
                    done += n
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EXDEV):
                    self._copy_range = False
                elif exc.errno not in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL, errno.EBADF):
                    raise
            if done == size:
                return
        # plain copy of whatever is left
        readv = os.readv
        bufs = (view,)
        os.lseek(src_fd, done, os.SEEK_SET)
        os.lseek(dst_fd, done, os.SEEK_SET)
        while True:
            n = readv(src_fd, bufs)
            if not n:
                break
            temp.write(view[:n])

    def _enable_verity(self, fd: int) -> None:
        if not self._verity:
            return
        try:
            fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, _VERITY_ARG)
        except OSError as exc:
            if exc.errno in _VERITY_UNSUPPORTED:
                self._verity = False

    # -- crash recovery -----------------------------------------------------------------------

    def clean_stale_temps(self) -> int:
        """Remove the temporary files of builds that no longer run (not locked). Returns how
        many were removed."""
        removed = 0
        try:
            entries = [e.name for e in os.scandir(self.root) if e.name.startswith(TEMP_PREFIX)]
        except OSError as exc:
            raise _store_error(self.path, exc) from None
        for name in entries:
            path = b"%s/%s" % (self.root, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)   # locked by a live build (or locks unsupported): leave it
                continue
            try:
                st = os.fstat(fd)
                now = os.lstat(path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    os.unlink(path)
                    removed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return removed
