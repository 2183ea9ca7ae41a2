"""The composefs object store (``mkcomposefs --digest-store=PATH``).

An object is a copy of a file's data at ``PATH/ab/cdef…``, named by its fs-verity digest
(``fsverity.object_path``), mode 0644 whatever the umask; the ``ab`` directories are created with
mode 0755 (minus the umask). An existing object is left alone and not checked.

This module depends only on ``fsverity`` (digests, the kernel's ioctls), ``mkcfs.fsutil`` (the
temporary-file protocol) and ``mkcfs.store.reading`` (exact reads of source files); the hashing
workers (``mkcfs.store.digests``) use it, never the other way round.

Safety
------
* **An object appears under its name only complete.** It is written to a temporary file in the
  store root (``PATH/.tmp-<pid>-<random>``, a ``mkcfs.fsutil.LockedTemp``), fsync'ed, then
  renamed to its name. A concurrent build that stores the same object renames an identical file
  over it, which is harmless, so two builds can fill one store at once.
* **The content is the hashed content.** A new object is normally written while the source is
  read and hashed (one read of the source, and the object is by construction the data that was
  hashed). When most objects already exist (rebuilding into a filled store), the filesystem can
  reflink (the first copy of a run finds out), or the source is sparse, the file is hashed first
  and only copied when missing (``FICLONE``, else ``copy_file_range``, else read/write; only the
  data regions of a sparse file, so the copy keeps its holes). On every path the source's size,
  mtime and ctime are checked not to have changed between the start of the read and the end of
  the copy: a source that changed is refused, naming its path.
* The store directory is checked when it is opened, before any work, so an unusable store fails
  a build at once, but nothing is created then: the directory (``mkdir -p``, 0755 minus umask)
  appears with the first object, as with mkcomposefs 1.0.8 (a store inside the source tree must
  not change what the walk sees; ``mkcfs.sources.walk`` fills such a store after the walk). A
  failed build removes the directories it created that are still empty
  (``remove_empty_dirs``).
* Errors name the store and the object's source path (``StoreError``), never a temporary file.
* **Crash safety.** Each temporary file is ``flock``ed by the process writing it for as long as it
  exists. A process killed at any moment (even with SIGKILL) leaves at most temporary files with
  no lock; ``ObjectStore()`` removes those when the store is opened next. A temporary file that is
  locked belongs to a live build and is never touched. (mkcomposefs 1.0.8's own ``.tmpXXXXXX``
  files carry no lock and are left alone.)
* **gc safety.** An opened store holds the shared store lock (``mkcfs.store.lock``) until
  ``close()``, so ``mkcfs gc`` cannot remove objects while this build looks them up and adds
  them; a caller that writes an image referring to them holds its own ``shared()`` lock until
  the image is in place.
* fs-verity is enabled on new objects (``fsverity.kernel.enable_verity``) before they get their
  name where the kernel and filesystem support it; the first "not available" answer stops further
  tries, and any other failure only leaves that object without fs-verity.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from typing import Any

from collections.abc import Iterable

from fsverity import FsVerityHasher, data_extents, digest_bytes, is_sparse, object_path
from fsverity.kernel import enable_verity

from mkcfs.errors import StoreError, WalkError, path_error, walk_error
from mkcfs.fsutil import LockedTemp, makedirs, remove_created_dirs, remove_stale_temporaries
from mkcfs.store.reading import (BUFFER_SIZE, CancelFlag, Snapshot, file_changed, hash_fd,
                                 open_source, snapshot)
from mkcfs.store import lock as store_lock

__all__ = ["ObjectStore", "TEMP_PREFIX", "OBJECT_MODE", "FICLONE"]

#: ``_IOW(0x94, 9, int)``: clone (reflink) the whole of the source file into the target.
FICLONE = 0x40049409

TEMP_PREFIX = b".tmp-"
OBJECT_MODE = 0o644
DIR_MODE = 0o755
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


_libc: Any = None


class ObjectStore:
    """An object store directory. Opening it checks that it can be used -- an existing store
    must be a writable directory, a missing one must be creatable (its nearest existing ancestor
    is a writable directory) -- and removes the temporary files that killed builds left behind
    (``prepare=False`` skips all that, for a second view of a store already opened). The
    directory itself is created only when the first object is stored, as mkcomposefs 1.0.8
    does, so a build that stores nothing leaves no empty store behind. Safe to use from several
    threads and processes at once."""

    def __init__(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
                 prepare: bool = True) -> None:
        self.path = os.fsencode(path)
        self.root = self.path.rstrip(b"/") or b"/"
        self._dirs: set[bytes] = set()
        self._lock = threading.Lock()
        self._root_ready = False
        #: directories this view created (removed again, if empty, by ``remove_empty_dirs``)
        self._created: list[bytes] = []
        self._lock_temps = True
        self._verity = True
        self._copy_range = True
        self._reflink: bool | None = None   # unknown until a copy tried it
        self._hit_score = 0.0
        self._local = threading.local()   # per thread: deferred objects waiting for a flush
        self._store_lock: store_lock.StoreLock | None = None
        if prepare:
            self._check_usable()

    # -- errors -------------------------------------------------------------------------------

    def _error(self, exc: OSError | str, source: bytes | str | None = None) -> StoreError:
        """``cannot fill store STORE[ with SOURCE]: reason``: names the store and the source
        of the object (never a temporary file, which is gone by the time anyone reads this)."""
        if source is None:
            return path_error(StoreError, "cannot fill store", self.path, exc)
        return path_error(StoreError, f"cannot fill store {os.fsdecode(self.path)} with", source,
                          exc)

    def _check_usable(self) -> None:
        """Fail now, not after the walk, when the store cannot be used; nothing is created
        or written (a store inside the source tree must not change what the walk sees)."""
        probe = os.path.abspath(self.root)
        while True:
            try:
                st = os.stat(probe)
                break
            except FileNotFoundError:
                parent = os.path.dirname(probe)
                if not parent or parent == probe:
                    raise self._error(os.strerror(errno.ENOENT)) from None
                probe = parent
            except OSError as exc:
                raise self._error(exc) from None
        if not stat.S_ISDIR(st.st_mode):
            raise self._error(os.strerror(errno.ENOTDIR))
        if not os.access(probe, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            readonly = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
            raise self._error(os.strerror(errno.EROFS if readonly else errno.EACCES))
        if probe == os.path.abspath(self.root):
            self._root_ready = True
            self._hold_store_lock()
            self.clean_stale_temps()

    def _makedirs(self, directory: bytes, source: bytes | str | None) -> None:
        try:
            created = makedirs(directory, DIR_MODE)
        except OSError as exc:
            raise self._error(exc, source) from None
        if created:
            with self._lock:
                self._created.extend(created)

    def _ensure_root(self, source: bytes | str | None) -> None:
        if not self._root_ready:
            self._makedirs(self.root, source)
            self._root_ready = True
            self._hold_store_lock()

    def prepare_root(self) -> None:
        """Create the store directory now (and take the store lock), before workers fill it."""
        self._ensure_root(None)

    def _hold_store_lock(self) -> None:
        """Builds share the store lock while they add objects (``mkcfs.store.lock``): taken
        once the store directory exists, kept until ``close()``."""
        if self._store_lock is None:
            try:
                self._store_lock = store_lock.shared(self.root)
            except OSError as exc:
                raise self._error(exc) from None

    def remove_empty_dirs(self) -> None:
        """After a failed build: remove the directories this view created (``ab/``, the store
        itself) that are still empty. Only those, and only if empty."""
        with self._lock:
            created, self._created = self._created, []
            for sub in {os.path.basename(d) for d in created}:
                self._dirs.discard(sub)
            if self.root in created:
                self._root_ready = False
        remove_created_dirs(sorted(created, key=len))

    def close(self) -> None:
        """Release the store lock this view holds (also released when it is collected)."""
        if self._store_lock is not None:
            self._store_lock.release()

    # -- lookup -------------------------------------------------------------------------------

    def object_file(self, digest: bytes) -> bytes:
        """The path of the object for ``digest`` (whether it exists or not)."""
        return b"%s/%s" % (self.root, object_path(digest).encode())

    def __contains__(self, digest: bytes) -> bool:
        try:
            os.lstat(self.object_file(digest))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _target(self, digest: bytes, source: bytes | str) -> tuple[bytes, bool]:
        """``(object path, exists)``, creating the ``ab`` directory (and the store) when
        needed."""
        rel = object_path(digest).encode()
        sub = rel[:2]
        if sub not in self._dirs:
            self._ensure_root(source)
            self._makedirs(b"%s/%s" % (self.root, sub), source)
            with self._lock:
                self._dirs.add(sub)
        final = b"%s/%s" % (self.root, rel)
        try:
            os.lstat(final)
            exists = True
        except FileNotFoundError:
            exists = False
        except OSError as exc:
            raise self._error(exc, source) from None
        # remember how often objects already exist: when most do, hash before copying
        self._hit_score = self._hit_score * 0.875 + (1.0 if exists else 0.0)
        return final, exists

    # -- adding files -------------------------------------------------------------------------

    def add_file(self, src: bytes, size: int, view: memoryview,
                 cancel: CancelFlag | None = None, defer: bool = False) -> bytes:
        """Hash the regular file ``src`` (``size`` bytes) and make sure its object exists.
        Returns the fs-verity digest. ``view`` is the caller's read buffer.

        With ``defer``, a new object is completed but gets its name only at the next
        ``flush()`` of this thread, which makes a whole group durable with one ``syncfs``
        instead of one ``fsync`` per object (a store is typically filled with tens of thousands
        of small objects, and the fsyncs were most of the time of a build)."""
        fd = open_source(src)
        try:
            try:
                before = snapshot(fd)
                sparse = size > len(view) and is_sparse(os.fstat(fd))
            except OSError as exc:
                raise path_error(WalkError, "error computing digest of", src, exc) from None
            if sparse or self._reflink is None or self._reflink or self._hit_score > 4.0:
                return self._hash_then_copy(fd, src, size, view, before, cancel, defer, sparse)
            return self._copy_while_hashing(fd, src, size, view, before, cancel, defer)
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
            digest = digest_bytes(data)
            final, exists = self._target(digest, name)
            if not exists:
                temp = self._new_temp(name)
                try:
                    try:
                        temp.write(memoryview(data))
                    except OSError as exc:
                        raise self._error(exc, name) from None
                    self._commit(temp, final, defer, name)
                except BaseException:
                    temp.discard()
                    raise
            return digest
        temp = self._new_temp(name)
        try:
            hasher = FsVerityHasher()
            update = hasher.update
            write = temp.write
            for chunk in chunks:
                update(chunk)
                try:
                    write(memoryview(chunk))
                except OSError as exc:
                    raise self._error(exc, name) from None
            if hasher.size != size:
                raise walk_error("cannot store", name.encode(),
                                 f"{hasher.size} bytes instead of {size}")
        except BaseException:
            temp.discard()
            raise
        digest = hasher.digest()
        self._name_or_drop(temp, digest, name, defer)
        return digest

    def _pending(self) -> list[tuple[LockedTemp, bytes, bytes | str]]:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        return pending

    def _new_temp(self, source: bytes | str) -> LockedTemp:
        """A new locked temporary file in the store root, for the object of ``source``."""
        self._ensure_root(source)
        prefix = b"%s%d-" % (TEMP_PREFIX, os.getpid())
        try:
            try:
                return LockedTemp(self.root, prefix, lock=self._lock_temps)
            except OSError as exc:
                if not self._lock_temps or exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP,
                                                             errno.ENOSYS):
                    raise
            self._lock_temps = False   # no flock on this filesystem: unlocked temporaries
            return LockedTemp(self.root, prefix, lock=False)
        except OSError as exc:
            raise self._error(exc, source) from None

    def _commit(self, temp: LockedTemp, final: bytes, defer: bool, source: bytes | str) -> None:
        """``temp`` holds the complete object ``final``: mode 0644, fs-verity, then the name
        now (fsync first), or at this thread's next ``flush`` (see ``add_file``)."""
        try:
            temp.finish(OBJECT_MODE, sync=not defer)
            self._enable_verity(temp.lock_fd)
            if not defer:
                self._place(temp, final)
                return
        except OSError as exc:
            raise self._error(exc, source) from None
        pending = self._pending()
        pending.append((temp, final, source))
        if len(pending) >= _GROUP:
            self.flush()

    def _name_or_drop(self, temp: LockedTemp, digest: bytes, source: bytes | str,
                      defer: bool) -> None:
        """``temp`` holds the complete data of ``digest``, written while it was hashed: commit
        it as that object, or drop it when the object exists already (a concurrent build, or
        an earlier file of this one, stored it). ``temp`` is discarded on any error."""
        try:
            final, exists = self._target(digest, source)
            if not exists:
                self._commit(temp, final, defer, source)
                return
        except BaseException:
            temp.discard()
            raise
        temp.discard()

    def _place(self, temp: LockedTemp, final: bytes) -> None:
        """Rename ``temp`` to ``final``; if a failed build removed the (empty) ``ab``
        directory meanwhile, create it again."""
        try:
            temp.commit(final)
        except FileNotFoundError:
            if not os.path.exists(temp.name):
                raise
            self._makedirs(os.path.dirname(final), None)
            temp.commit(final)

    def flush(self) -> None:
        """Make this thread's deferred objects durable (one ``syncfs``) and name them."""
        pending = self._pending()
        if not pending:
            return
        try:
            try:
                _syncfs(pending[0][0].lock_fd)
            except OSError:
                for temp, _, source in pending:
                    try:
                        os.fsync(temp.lock_fd)
                    except OSError as exc:
                        raise self._error(exc, source) from None
            while pending:
                temp, final, source = pending[0]
                try:
                    self._place(temp, final)
                except OSError as exc:
                    raise self._error(exc, source) from None
                pending.pop(0)
        finally:
            self.discard_pending()

    def discard_pending(self) -> None:
        """Drop this thread's deferred objects (after an error): their files are removed."""
        pending = self._pending()
        while pending:
            pending.pop()[0].discard()

    def _copy_while_hashing(self, fd: int, src: bytes, size: int, view: memoryview,
                            before: Snapshot, cancel: CancelFlag | None, defer: bool) -> bytes:
        temp = self._new_temp(src)
        try:
            try:
                digest = hash_fd(fd, size, src, view, temp, cancel)
                after = snapshot(fd)
            except OSError as exc:
                if isinstance(exc, WalkError):
                    raise
                raise self._error(exc, src) from None   # a write error
            if after != before:
                raise file_changed(src)
        except BaseException:
            temp.discard()
            raise
        self._name_or_drop(temp, digest, src, defer)
        return digest

    def _hash_then_copy(self, fd: int, src: bytes, size: int, view: memoryview,
                        before: Snapshot, cancel: CancelFlag | None, defer: bool,
                        sparse: bool) -> bytes:
        digest = hash_fd(fd, size, src, view, None, cancel)
        final, exists = self._target(digest, src)
        if exists:
            try:
                after = snapshot(fd)
            except OSError as exc:
                raise path_error(WalkError, "error computing digest of", src, exc) from None
            if after != before:
                raise file_changed(src)
            return digest
        temp = self._new_temp(src)
        try:
            try:
                self._copy(fd, temp, size, view, sparse)
                after = snapshot(fd)
                written = os.fstat(temp.fd).st_size
            except OSError as exc:
                raise self._error(exc, src) from None
            if after != before or written != size:
                raise file_changed(src)
            self._commit(temp, final, defer, src)
        except BaseException:
            temp.discard()
            raise
        return digest

    def _copy(self, src_fd: int, temp: LockedTemp, size: int, view: memoryview,
              sparse: bool) -> None:
        """Copy all of ``src_fd`` into ``temp``: reflink, else copy_file_range, else read/write
        (a sparse source: only its data regions, then the size)."""
        dst_fd = temp.fd
        if self._reflink is not False:
            try:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
                self._reflink = True
                return
            except OSError:
                self._reflink = False
        if not sparse:
            self._copy_range_of(src_fd, dst_fd, 0, size, view)
            return
        for start, length in data_extents(src_fd, 0, size):
            self._copy_range_of(src_fd, dst_fd, start, length, view)
        os.ftruncate(dst_fd, size)

    def _copy_range_of(self, src_fd: int, dst_fd: int, start: int, length: int,
                       view: memoryview) -> None:
        """Copy bytes ``start`` to ``start + length`` (or to EOF if that comes first) to the
        same offsets: copy_file_range, else pread/pwrite."""
        done = start
        end = start + length
        if self._copy_range and length:
            try:
                while done < end:
                    n = os.copy_file_range(src_fd, dst_fd, min(end - done, _COPY_CHUNK),
                                           done, done)
                    if n == 0:
                        break
                    done += n
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EXDEV):
                    self._copy_range = False
                elif exc.errno not in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL, errno.EBADF):
                    raise
            if done >= end:
                return
        while done < end:
            n = os.preadv(src_fd, (view[:min(len(view), end - done)],), done)
            if not n:
                break   # the source ended early: the caller's size check catches it
            chunk, offset = view[:n], done
            while chunk:
                written = os.pwrite(dst_fd, chunk, offset)
                chunk, offset = chunk[written:], offset + written
            done += n

    def _enable_verity(self, fd: int) -> None:
        if not self._verity:
            return
        try:
            if not enable_verity(fd):
                self._verity = False   # not available here: stop trying
        except OSError:
            pass   # this object stays without fs-verity; it is still a valid object

    # -- crash recovery -----------------------------------------------------------------------

    def clean_stale_temps(self) -> int:
        """Remove the temporary files of builds that no longer run (not locked). Returns how
        many were removed (none when the store does not exist yet)."""
        return remove_stale_temporaries(self.root, TEMP_PREFIX)
