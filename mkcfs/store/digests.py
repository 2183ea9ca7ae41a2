"""File contents for a directory build: inline data and fs-verity digests, in parallel.

mkcomposefs stores a regular file of 1..64 bytes inline in the image, and refers to a larger one
by the fs-verity digest of its data (payload = the object path ``ab/cdef…``). ``DigestPool`` does
that work for the walker: files are queued as the walk finds them, in batches (at most 128 files
or 8 MiB), which worker processes (``concurrent.futures.ProcessPoolExecutor``; threads where
processes are not available) read with one large preallocated buffer each, while the walk goes
on. Why processes and not threads: see ``DigestPool``.

With a digest store (``mkcfs.store.objects.ObjectStore``) a worker hashes and stores a file in one pass.

A file must have exactly the size ``lstat`` reported: one that grows, shrinks or vanishes while it
is read is an error naming the path (``WalkError``), never a wrong digest.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import (BrokenExecutor, Executor, Future, ProcessPoolExecutor,
                                ThreadPoolExecutor)
from functools import partial
from operator import methodcaller
from typing import TYPE_CHECKING
from collections.abc import Callable

import fsverity
from fsverity import FsVerityHasher, object_path

from mkcfs.errors import WalkError
from mkcfs.tree import Node

if TYPE_CHECKING:  # pragma: no cover
    from mkcfs.progress import Progress
    from mkcfs.store.objects import ObjectStore

__all__ = ["INLINE_MAX", "BUFFER_SIZE", "DigestPool", "hash_fd", "open_source", "read_inline",
           "digest_path", "digest_buffer", "walk_error", "Cancelled"]

#: regular files up to this size are inlined (``LCFS_RECOMMENDED_INLINE_CONTENT_MAX``).
INLINE_MAX = 64
#: read buffer of each worker thread.
BUFFER_SIZE = 1 << 20
#: a batch handed to one worker holds at most this many files or bytes.
_BATCH_FILES = 256
_BATCH_BYTES = 8 << 20

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK

_local = threading.local()


def _buffer() -> memoryview:
    """This thread's read buffer (allocated once per thread)."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(BUFFER_SIZE))
    return view


def walk_error(what: str, path: bytes | str, exc: OSError | str) -> WalkError:
    """``WalkError("<what> <path>: <reason>")`` from an OSError (or a reason text)."""
    reason = exc if isinstance(exc, str) else (exc.strerror or str(exc))
    shown = os.fsdecode(path)
    err = WalkError(f"{what} {shown}: {reason}")
    if not isinstance(exc, str):
        err.errno = exc.errno
    return err


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


class Cancelled(WalkError):
    """The build was stopped (another file failed, or the user interrupted it)."""


_sha256 = hashlib.sha256
_get_digest = methodcaller("digest")
_BLOCK = fsverity.BLOCK_SIZE
_ZERO_BLOCK = bytes(_BLOCK)
_DESC_HEAD = bytes((1, 1, 12, 0, 0, 0, 0, 0))   # version 1, SHA-256, 4 KiB blocks, no salt
_DESC_TAIL = bytes(fsverity.DIGEST_SIZE + 32 + 144)   # root hash padding, salt, reserved


def _block_hashes(view: memoryview, n: int) -> bytes:
    """SHA-256 of each 4 KiB block of ``view[:n]``, the last one zero-padded."""
    full = n // _BLOCK
    end = full * _BLOCK
    hashes = b"".join(map(_get_digest, map(_sha256, map(view.__getitem__, map(
        slice, range(0, end, _BLOCK), range(_BLOCK, end + _BLOCK, _BLOCK))))))
    if n > end:
        h = _sha256(view[end:n])
        h.update(_ZERO_BLOCK[n - end:])
        hashes += h.digest()
    return hashes


def digest_buffer(view: memoryview, n: int) -> bytes:
    """The fs-verity digest of ``view[:n]`` (``n`` > 0) in one go: the same value as
    ``fsverity.digest_bytes``, without the streaming hasher's per-call overhead, which matters
    for the many small files of a tree (a file of up to one buffer is read in one piece)."""
    level = _block_hashes(view, n)
    while len(level) > fsverity.DIGEST_SIZE:      # one hash left: the root
        level = _block_hashes(memoryview(level), len(level))
    return _sha256(_DESC_HEAD + n.to_bytes(8, "little") + level + _DESC_TAIL).digest()


def hash_fd(fd: int, size: int, path: bytes, view: memoryview,
            sink: Callable[[memoryview], object] | None = None,
            cancel=None) -> bytes:
    """The fs-verity digest of ``fd`` read from its current position to EOF, which must be
    exactly ``size`` bytes later. The data read is also passed to ``sink`` (e.g. a writer).
    ``cancel``, when set, stops the read of a big file between two chunks (``Cancelled``)."""
    readv = os.readv
    buflen = len(view)
    total = 0
    if 0 < size < buflen:
        # the whole file fits: read it (a read that returns less than asked for is the end;
        # the spare room shows a file that grew), then hash it in one go
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
        if sink is not None:
            sink(view[:size])   # its errors are the caller's (e.g. a store write error)
        return digest_buffer(view, size)
    hasher = FsVerityHasher()
    update = hasher.update
    bufs = (view,)
    while True:
        try:
            n = readv(fd, bufs)
        except OSError as exc:
            raise walk_error("error computing digest of", path, exc) from None
        if not n:
            break
        chunk = view[:n]
        update(chunk)
        if sink is not None:
            sink(chunk)
        total += n
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        if total >= size and (n < buflen or total > size):
            # a short read of a regular file is its end; more than expected is a change
            break
    if total != size:
        raise _changed(path, size, total)
    return hasher.digest()


def digest_path(path: bytes, size: int, view: memoryview | None = None,
                cancel=None) -> bytes:
    """The fs-verity digest of the file at ``path``, which must have ``size`` bytes."""
    fd = open_source(path)
    try:
        return hash_fd(fd, size, path, _buffer() if view is None else view, cancel=cancel)
    finally:
        os.close(fd)


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


# -- the work of one batch (in a worker process or thread) -----------------------------------------

_worker_state: tuple[ObjectStore | None, object] | None = None   # (store, cancel) of a process


def _init_worker(parent: int, store_path: bytes | None, cancel: object) -> None:
    """Initializer of a worker process: its own view of the store; the parent handles Ctrl-C;
    die with the parent (a killed build must not leave workers running)."""
    global _worker_state
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:   # the parent died before the line above
        os._exit(1)
    store = None
    if store_path is not None:
        from mkcfs.store.objects import ObjectStore
        store = ObjectStore(store_path, prepare=False)
    _worker_state = (store, cancel)


def _run_in_worker(batch: list[tuple[bytes, int]]) -> list[bytes | tuple[bytes, bytes]]:
    assert _worker_state is not None
    return run_batch(batch, *_worker_state)


def run_batch(batch: list[tuple[bytes, int]], store: ObjectStore | None,
              cancel) -> list[bytes | tuple[bytes, bytes]]:
    """For each ``(path, size)``: the content (size <= 64) or ``(digest, object path)``,
    storing the file in ``store`` if given. Stops with ``Cancelled`` once ``cancel`` is set."""
    view = _buffer()
    out: list[bytes | tuple[bytes, bytes]] = []
    append = out.append
    is_set = cancel.is_set
    try:
        for path, size in batch:
            if is_set():
                raise Cancelled("cancelled")
            if size <= INLINE_MAX:
                append(read_inline(path, size))
                continue
            big = cancel if size > BUFFER_SIZE else None
            if store is not None:
                digest = store.add_file(path, size, view, big, defer=True)
            else:
                digest = digest_path(path, size, view, big)
            append((digest, object_path(digest).encode()))
        if store is not None:
            store.flush()     # the batch's new objects: durable, then named
    except BaseException:
        if store is not None:
            store.discard_pending()
        raise
    return out


def _processes_usable() -> bool:
    """Fork worker processes only from a process that runs no other thread (the CLI): a fork
    copies the locks other threads hold (in OpenSSL, in stdio...), and a fork server or spawn
    would import the caller's ``__main__`` again."""
    return (sys.platform.startswith("linux") and threading.active_count() == 1
            and os.environ.get("MKCFS_DIGEST_THREADS") is None)


class DigestPool:
    """Fills ``content`` (files of 1..64 bytes) or ``digest`` + ``payload`` (larger files) of
    regular-file nodes with ``workers`` workers, storing files in ``store`` if given.

    Workers are processes by default: hashlib releases the GIL for every 4 KiB block it hashes,
    so hashing threads hand the GIL back and forth with each other and with the walker hundreds
    of thousands of times (measured: two threads used one core and ran slower than one), while
    processes scale with the cores. They are forked before anything else starts, and die with
    the parent. Threads are used where forking is not safe or possible (the caller runs other
    threads; ``processes=False``; the environment variable ``MKCFS_DIGEST_THREADS`` is set).

    Use ``add()`` for each file as it is found, ``alias()`` for a node that is another path to a
    file already added (it gets the same results), then ``finish()``; ``abort()`` on failure.
    ``failed`` turns true as soon as a worker hit an error, so the walk can stop early."""

    def __init__(self, workers: int, store: ObjectStore | None = None,
                 progress: Progress | None = None, processes: bool | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        #: a ``Progress`` to count hashed files on (may be set after construction)
        self.progress = progress
        self._batch: list[tuple[bytes, int]] = []
        self._batch_nodes: list[Node] = []
        self._batch_bytes = 0
        self._pending: list[tuple[Future, list[Node]]] = []
        self._aliases: list[tuple[Node, Node]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._executor: Executor | None = None
        if processes is None:
            processes = _processes_usable()
        if processes:
            try:
                self._start_processes(workers, store)
            except (OSError, ImportError, ValueError, BrokenExecutor):   # no /dev/shm, ...
                self._executor = None
        if self._executor is None:
            self._cancel = threading.Event()
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="mkcfs-digest")
            self._submit = partial(self._executor.submit, run_batch, store=store,
                                   cancel=self._cancel)
        self.processes = isinstance(self._executor, ProcessPoolExecutor)

    def _start_processes(self, workers: int, store: ObjectStore | None) -> None:
        context = multiprocessing.get_context("fork")
        cancel = context.Event()
        executor = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker,
            initargs=(os.getpid(), None if store is None else store.path, cancel))
        try:
            # start the workers now, while this process is small and has no other threads
            executor.submit(int).result()
        except BaseException:
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        self._cancel = cancel
        self._executor = executor
        self._submit = partial(executor.submit, _run_in_worker)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def add(self, path: bytes, node: Node) -> None:
        """Queue the regular file ``node`` (``node.size`` > 0) found at ``path``."""
        size = node.size
        self._batch.append((path, size))
        self._batch_nodes.append(node)
        self._batch_bytes += size
        if len(self._batch) >= _BATCH_FILES or self._batch_bytes >= _BATCH_BYTES:
            self._flush()

    def alias(self, node: Node, primary: Node) -> None:
        """``node`` is the same file as the already added ``primary``: copy its results."""
        self._aliases.append((node, primary))

    def _flush(self) -> None:
        if self._batch:
            future = self._submit(self._batch)
            future.add_done_callback(partial(self._done, len(self._batch), self._batch_bytes))
            self._pending.append((future, self._batch_nodes))
            self._batch = []
            self._batch_nodes = []
            self._batch_bytes = 0

    def _done(self, files: int, nbytes: int, future: Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._fail(exc)
        elif self.progress is not None:
            self.progress.add_files(files, nbytes)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, BrokenExecutor):
            exc = WalkError(f"error computing digests: a worker process died ({exc})")
        with self._lock:
            if self._error is None or (isinstance(self._error, Cancelled)
                                       and not isinstance(exc, Cancelled)):
                self._error = exc
        self._cancel.set()

    def finish(self) -> None:
        """Wait for every queued file; raise the first error; fill in the nodes."""
        self._flush()
        try:
            for future, nodes in self._pending:
                try:
                    results = future.result()
                except BaseException as exc:
                    self._fail(exc)
                    break
                for node, result in zip(nodes, results):
                    if type(result) is tuple:
                        node.digest, node.payload = result
                    else:
                        node.content = result
        finally:
            self._shutdown()
        if self._error is not None:
            raise self._error
        for node, primary in self._aliases:
            node.content = primary.content
            node.digest = primary.digest
            node.payload = primary.payload

    def abort(self) -> None:
        """Stop: drop queued work, let running batches end at their current file."""
        self._fail(Cancelled("cancelled"))
        self._shutdown()

    def _shutdown(self) -> None:
        if not self._closed and self._executor is not None:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)
