"""File contents for a directory build: inline data and fs-verity digests, in parallel.

mkcomposefs stores a regular file of 1..64 bytes inline in the image, and refers to a larger one
by the fs-verity digest of its data (payload = the object path ``ab/cdef…``). ``DigestPool`` does
that work for the walker: files are queued as the walk finds them, in batches (at most 1024 files
or 8 MiB), which worker processes (``concurrent.futures.ProcessPoolExecutor``; threads where
processes are not available) read with one large preallocated buffer each, while the walk goes
on. Why processes and not threads: see ``DigestPool``.

With a digest store (``mkcfs.store.objects.ObjectStore``) a worker hashes and stores a file in one pass.

Files are read by ``mkcfs.store.reading`` (exact sizes, holes skipped) and hashed by ``fsverity``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from concurrent.futures import (BrokenExecutor, Executor, Future, ProcessPoolExecutor,
                                ThreadPoolExecutor)
from functools import partial
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from fsverity import object_path

from mkcfs.errors import WalkError
from mkcfs.forksafe import die_with_parent, processes_usable
from mkcfs.store.objects import ObjectStore
from mkcfs.store.reading import (BUFFER_SIZE, INLINE_MAX, Cancelled, CancelFlag, digest_fitting,
                                 hash_fd, open_source, read_inline)
from mkcfs.tree import Node

if TYPE_CHECKING:  # pragma: no cover
    from mkcfs.progress import Progress

__all__ = ["INLINE_MAX", "BUFFER_SIZE", "DigestPool", "digest_path", "run_batch", "run_batch_in_worker",
           "fill_nodes", "copy_results", "cancelled_in_worker", "store_in_worker"]

#: a batch handed to one worker holds at most this many files or bytes; the first ones hold
#: at most ``_FIRST_BATCH_FILES`` files, twice as many each time up to ``_BATCH_FILES``: the
#: workers start early, and each hand-over (a wake-up of the executor's threads, which take the
#: walk's GIL: ~0.5 ms of its wall time each) is paid for fewer, larger batches
_FIRST_BATCH_FILES = 64
_BATCH_FILES = 1024
_BATCH_BYTES = 8 << 20

#: a batch looks at its cancel flag before every 16th file (and a big file between its
#: chunks): a look at a process-shared flag costs as much as hashing a small file's descriptor
_CANCEL_EVERY_MASK = 15

_local = threading.local()
T = TypeVar("T")
R = TypeVar("R")


class _Event(CancelFlag, Protocol):
    """``threading.Event`` (thread workers) or ``multiprocessing.Event`` (process workers)."""

    def set(self) -> None: ...


def _buffer() -> memoryview:
    """This thread's read buffer (allocated once per thread)."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(BUFFER_SIZE))
    return view


def digest_path(path: bytes, size: int, view: memoryview | None = None,
                cancel: CancelFlag | None = None) -> bytes:
    """The fs-verity digest of the file at ``path``, which must have ``size`` bytes."""
    fd = open_source(path)
    try:
        return hash_fd(fd, size, path, _buffer() if view is None else view, cancel=cancel)
    finally:
        os.close(fd)


# -- the work of one batch (in a worker process or thread) -----------------------------------------

_worker_state: tuple[ObjectStore | None, CancelFlag] | None = None   # (store, cancel) of a process


def _init_worker(parent: int, store_path: bytes | None, cancel: CancelFlag) -> None:
    """Initializer of a worker process: its own view of the store; the parent handles Ctrl-C;
    die with the parent (a killed build must not leave workers running)."""
    global _worker_state
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    store = None
    if store_path is not None:
        store = ObjectStore(store_path, prepare=False)
    _worker_state = (store, cancel)


def run_batch_in_worker(batch: list[tuple[bytes, int]]) -> list[bytes | tuple[bytes, bytes]]:
    """``run_batch`` in a worker process, with that worker's store and cancel flag: the pool's
    own batches, and code that a ``DigestPool.call`` runs there."""
    assert _worker_state is not None
    return run_batch(batch, *_worker_state)


def cancelled_in_worker() -> bool:
    """In a worker process: whether the build was stopped (``DigestPool.abort``)."""
    return _worker_state is not None and _worker_state[1].is_set()


def store_in_worker() -> ObjectStore | None:
    """In a worker process: its view of the store being filled, if any."""
    return None if _worker_state is None else _worker_state[0]


def fill_nodes(nodes: list[Node], results: list[bytes | tuple[bytes, bytes]]) -> None:
    """Put ``run_batch``'s results into the nodes of its files: ``content``, or ``digest`` and
    ``payload``."""
    for node, result in zip(nodes, results):
        if isinstance(result, tuple):
            node.digest, node.payload = result
        else:
            node.content = result


def copy_results(aliases: list[tuple[Node, Node]]) -> None:
    """Give each ``(node, primary)`` pair's node the results ``fill_nodes`` put in its primary
    (another path to the same file)."""
    for node, primary in aliases:
        node.content, node.digest, node.payload = primary.content, primary.digest, primary.payload


def run_batch(batch: list[tuple[bytes, int]], store: ObjectStore | None,
              cancel: CancelFlag) -> list[bytes | tuple[bytes, bytes]]:
    """For each ``(path, size)``: the content (size <= 64) or ``(digest, object path)``,
    storing the file in ``store`` if given. Stops with ``Cancelled`` once ``cancel`` is set."""
    view = _buffer()
    fits = len(view)
    out: list[bytes | tuple[bytes, bytes]] = []
    append = out.append
    is_set = cancel.is_set
    try:
        for i, (path, size) in enumerate(batch):
            if not i & _CANCEL_EVERY_MASK and is_set():
                raise Cancelled("cancelled")
            if size <= INLINE_MAX:
                append(read_inline(path, size))
                continue
            if store is not None:
                digest = store.add_file(path, size, view, cancel if size > BUFFER_SIZE else None,
                                        defer=True)
            elif size < fits:
                digest = digest_fitting(path, size, view)
            else:
                digest = digest_path(path, size, view, cancel)
            append((digest, object_path(digest).encode()))
        if store is not None:
            store.flush()     # the batch's new objects: durable, then named
    except BaseException:
        if store is not None:
            store.discard_pending()
            store.remove_empty_dirs()   # the ab/ directories made for objects now dropped
        raise
    return out


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
        self._batch_files = min(_FIRST_BATCH_FILES, _BATCH_FILES)
        self._pending: list[tuple[Future, list[Node]]] = []
        self._aliases: list[tuple[Node, Node]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._executor: Executor | None = None
        self._cancel: _Event
        self._submit: Callable[[list[tuple[bytes, int]]], Future]
        #: the store whose directory this process creates (and locks: mkcfs.store.lock) before
        #: the first batch that may store an object goes to a worker
        self._store_to_prepare = store
        self._prepared: ObjectStore | None = None
        if processes is None:
            processes = processes_usable()
        if processes:
            try:
                self._start_processes(workers, store)
            except (OSError, ImportError, ValueError, BrokenExecutor):   # no /dev/shm, ...
                self._executor = None
        if self._executor is None:
            self._cancel = threading.Event()
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="mkcfs-digest")
            self._submit = partial(self._executor.submit, run_batch,  # type: ignore[call-arg]
                                   store=store, cancel=self._cancel)
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
        self._submit = partial(executor.submit, run_batch_in_worker)  # type: ignore[call-arg]

    def call(self, function: Callable[[T], R], argument: T) -> Future[R]:
        """Run ``function(argument)`` in a worker process (only when ``processes``): a
        module-level function, which finds the state it shares with this process in what the
        fork copied (``run_batch_in_worker`` reads files there)."""
        assert self.processes and self._executor is not None
        return self._executor.submit(function, argument)

    def prepare_store(self) -> None:
        """Create (and lock) the store directory now, if not done yet: before work given to
        ``call`` may store objects."""
        if self._store_to_prepare is not None:
            self._store_to_prepare.prepare_root()
            self._prepared, self._store_to_prepare = self._store_to_prepare, None

    @property
    def failed(self) -> bool:
        return self._error is not None

    def add(self, path: bytes, node: Node) -> None:
        """Queue the regular file ``node`` (``node.size`` > 0) found at ``path``."""
        size = node.size
        self._batch.append((path, size))
        self._batch_nodes.append(node)
        self._batch_bytes += size
        if len(self._batch) >= self._batch_files or self._batch_bytes >= _BATCH_BYTES:
            self._flush()
            self._batch_files = min(2 * self._batch_files, _BATCH_FILES)

    def alias(self, node: Node, primary: Node) -> None:
        """``node`` is the same file as the already added ``primary``: copy its results."""
        self._aliases.append((node, primary))

    def _flush(self) -> None:
        if self._store_to_prepare is not None and any(size > INLINE_MAX for _, size in self._batch):
            self.prepare_store()
        if self._batch:
            try:
                future = self._submit(self._batch)
            except BrokenExecutor as exc:   # a worker died since the last batch
                self._fail(exc)
                raise self._error from None  # type: ignore[misc]
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

    def finish(self, filled: Callable[[list[Node]], object] | None = None) -> None:
        """Wait for every queued file; raise the first error; fill in the nodes. ``filled``,
        if given, is called with each batch of nodes as soon as they are filled, while the
        later batches are still being read (the nodes given to ``alias`` are filled last, and
        not passed to it)."""
        self._flush()
        pending = self._pending
        try:
            for i, (future, nodes) in enumerate(pending):
                try:
                    results = future.result()
                except BaseException as exc:
                    self._fail(exc)
                    break
                fill_nodes(nodes, results)
                if filled is not None:
                    pending[i] = None   # type: ignore[call-overload]  # the nodes: theirs now
                    filled(nodes)
        finally:
            self._shutdown()
            # the results are in the nodes: free them now (the futures' callbacks refer back
            # to this pool, a cycle that lives until the collector runs, after the build)
            self._pending = []
        if self._error is not None:
            raise self._error
        self._prepared = self._store_to_prepare = None   # the caller closes the store
        copy_results(self._aliases)
        self._aliases = []

    def abort(self) -> None:
        """Stop: drop queued work, let running batches end at their current file."""
        self._fail(Cancelled("cancelled"))
        self._shutdown()
        if self._prepared is not None:   # the store directory it created, if still empty
            self._prepared.remove_empty_dirs()
        self._prepared = self._store_to_prepare = None

    def _shutdown(self) -> None:
        if not self._closed and self._executor is not None:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)
