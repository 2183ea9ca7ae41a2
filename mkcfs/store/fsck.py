"""Check an object store (``mkcfs fsck``): every object's content, nothing stray, nothing missing.

* **Content**: every object ``ab/cdef…`` is read and its fs-verity digest compared with its name
  (worker processes: hashlib takes the GIL back for every 4 KiB block, so threads do not scale;
  threads where forking is not safe, see ``mkcfs.store.digests``).
* **Nothing stray**: the object-store directory holds only ``ab/`` directories of objects (two
  lowercase hex digits / 62 lowercase hex digits, regular files), the temporary files of builds
  (``.tmp-*`` of ours, ``.tmpXXXXXX`` of mkcomposefs 1.0.8), the digest cache of directory
  builds (``.mkcfs-digest-cache``, ``mkcfs.store.cache``) and ``.quarantine/``.
* **Nothing missing**: every object the given images (by default the images a managed store
  keeps) refer to is present.

Each problem is reported once, as a ``Problem``. ``repair=True`` moves what was proven bad (an
object whose content does not match its name, an entry that is not an object) into
``.quarantine/<time>-<pid>/`` inside the object store, keeping its relative path, so the next
build that needs such an object stores it again; nothing is ever deleted. Plain checks hold the
shared store lock (gc does not remove objects under the reader); repairs the exclusive one
(``mkcfs.store.lock``).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from erofs.errors import ImageFormatError
from fsverity import object_path

from mkcfs.inspect.objects import image_file_objects
from mkcfs.store import lock as store_lock
from mkcfs.store.cache import STORE_CACHE_NAME
from mkcfs.forksafe import processes_usable
from mkcfs.store.digests import digest_path
from mkcfs.store.reading import Cancelled
from mkcfs.store.layout import QUARANTINE_NAME, StoreLayout

__all__ = ["Problem", "FsckReport", "fsck", "OBJECT_NAME", "is_object_dir_name",
           "is_temporary_name", "scan_store"]

#: the name of an object inside its ``ab`` directory: the other 62 hex digits of the digest
OBJECT_NAME = re.compile(rb"[0-9a-f]{62}")
_DIR_NAME = re.compile(rb"[0-9a-f]{2}")
#: files per batch handed to one worker
_BATCH_FILES = 64
_BATCH_BYTES = 32 << 20


def is_object_dir_name(name: bytes) -> bool:
    return _DIR_NAME.fullmatch(name) is not None


def is_temporary_name(name: bytes) -> bool:
    """A build's temporary file in the store root: ours (``.tmp-PID-RANDOM``, locked while its
    writer lives) or mkcomposefs 1.0.8's (``.tmpXXXXXX``)."""
    return name.startswith(b".tmp")


_CACHE = STORE_CACHE_NAME.encode()


def _is_cache_name(name: bytes) -> bool:
    """The digest cache a build keeps in the store (``mkcfs.store.cache``), or the
    ``.NAME.*.tmp`` file it is rewritten through."""
    return name == _CACHE or (name.startswith(b"." + _CACHE + b".") and name.endswith(b".tmp"))


@dataclass(frozen=True)
class Problem:
    """``kind``: ``corrupt`` (content does not match the name), ``misnamed`` (content is an
    object an image needs, under another name), ``unreadable``, ``stray`` (not an object),
    ``missing`` (an image needs it), ``bad-image`` (a given image cannot be read).
    ``path``: relative to the object store (an image path for ``bad-image``)."""

    kind: str
    path: str
    detail: str

    def line(self) -> str:
        return f"{self.kind} {self.path}: {self.detail}"


@dataclass
class FsckReport:
    objects: int = 0
    bytes: int = 0
    temporaries: int = 0
    images: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    #: (relative path, where it was moved) for each entry ``repair`` moved
    moved: list[tuple[str, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


@dataclass
class StoreScan:
    """What a directory scan of an object store found: ``objects`` as ``(relative path,
    size)``, entries that are not objects (with the reason), and temporaries."""

    objects: list[tuple[bytes, int]] = field(default_factory=list)
    strays: list[tuple[bytes, str]] = field(default_factory=list)
    temporaries: list[bytes] = field(default_factory=list)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def scan_store(objects_dir: str | bytes) -> StoreScan:
    """Sort the entries of the object store ``objects_dir`` into objects, strays and
    temporaries (no content is read). Errors listing the top directory raise ``OSError``."""
    root = os.fsencode(objects_dir)
    scan = StoreScan()
    with os.scandir(root) as it:
        top = sorted(it, key=lambda e: e.name)
    for entry in top:
        name = os.fsencode(entry.name)
        mode = entry.stat(follow_symlinks=False).st_mode
        if is_object_dir_name(name) and stat.S_ISDIR(mode):
            _scan_object_dir(root, name, scan)
        elif is_temporary_name(name) and stat.S_ISREG(mode):
            scan.temporaries.append(name)
        elif name == QUARANTINE_NAME.encode() and stat.S_ISDIR(mode):
            continue
        elif _is_cache_name(name) and stat.S_ISREG(mode):
            continue   # the digest cache of directory builds, or its temporary file
        else:
            scan.strays.append((name, f"not an object directory ({_kind(mode)})"))
    return scan


def _scan_object_dir(root: bytes, sub: bytes, scan: StoreScan) -> None:
    try:
        with os.scandir(os.path.join(root, sub)) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        scan.strays.append((sub, f"cannot be listed: {exc.strerror or exc}"))
        return
    for entry in entries:
        name = os.fsencode(entry.name)
        rel = sub + b"/" + name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue   # gone since the listing
        if not stat.S_ISREG(st.st_mode):
            scan.strays.append((rel, f"not an object ({_kind(st.st_mode)})"))
        elif OBJECT_NAME.fullmatch(name) is None:
            scan.strays.append((rel, "not an object name"))
        else:
            scan.objects.append((rel, st.st_size))


# -- hashing (in worker processes) ---------------------------------------------------------------

def _hash_batch(root: bytes, batch: list[tuple[bytes, int]]) -> list[tuple[bytes, str]]:
    """``(digest, "")`` or ``(b"", error text)`` for each ``(relative path, size)``."""
    out: list[tuple[bytes, str]] = []
    for rel, size in batch:
        try:
            out.append((digest_path(root + b"/" + rel, size), ""))
        except Cancelled:
            raise
        except OSError as exc:
            reason = str(exc).rpartition(": ")[2] if exc.strerror is None else exc.strerror
            out.append((b"", reason))
    return out


def _executor(workers: int) -> Executor:
    """Worker processes, all forked now (while this process runs no other thread: call it
    first), or threads where forking is not safe (``processes_usable``)."""
    if processes_usable():
        import multiprocessing

        try:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            # one process is forked per submit that finds no idle worker: fork them all now
            for warm in [pool.submit(int) for _ in range(workers)]:
                warm.result()
            return pool
        except (OSError, ValueError):   # pragma: no cover - no /dev/shm
            pass
    return ThreadPoolExecutor(workers, thread_name_prefix="mkcfs-fsck")


def _batches(items: list[tuple[bytes, int]]) -> Iterable[list[tuple[bytes, int]]]:
    batch: list[tuple[bytes, int]] = []
    size = 0
    for item in items:
        batch.append(item)
        size += item[1]
        if len(batch) >= _BATCH_FILES or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _report_batch(on_progress: Callable[[int, int], None], files: int, nbytes: int,
                  _future: Future) -> None:
    on_progress(files, nbytes)


def check_objects(root: bytes, objects: list[tuple[bytes, int]], pool: Executor,
                  on_progress: Callable[[int, int], None] | None = None
                  ) -> tuple[list[Problem], dict[bytes, bytes]]:
    """Hash every object (on ``pool``) and report those whose content does not match their
    name or that cannot be read; also returns, for each of the former, the name its content
    should have -> its path. ``on_progress(files, bytes)`` after each batch."""
    problems: list[Problem] = []
    holds: dict[bytes, bytes] = {}
    if not objects:
        return problems, holds
    pending: list[tuple[Future, list[tuple[bytes, int]]]] = []
    for batch in _batches(objects):
        future = pool.submit(_hash_batch, root, batch)
        if on_progress is not None:
            future.add_done_callback(partial(_report_batch, on_progress, len(batch),
                                             sum(size for _, size in batch)))
        pending.append((future, batch))
    for future, batch in pending:
        for (rel, _size), (digest, error) in zip(batch, future.result()):
            shown = os.fsdecode(rel)
            if error:
                problems.append(Problem("unreadable", shown, error))
            elif (name := object_path(digest).encode()) != rel:
                problems.append(Problem("corrupt", shown,
                                        f"content has digest {digest.hex()}"))
                holds.setdefault(name, rel)
    return problems, holds


# -- the whole check -----------------------------------------------------------------------------

def fsck(layout: StoreLayout, images: list[str] | None = None, *, repair: bool = False,
         workers: int = 1, on_progress: Callable[[int, int], None] | None = None,
         on_scanned: Callable[[int, int], None] | None = None) -> FsckReport:
    """Check the store ``layout``; ``images`` (default: the images a managed store keeps) must
    have all their objects. ``on_scanned(objects, bytes)`` once the listing is done."""
    start = time.monotonic()
    root = os.fsencode(layout.objects)
    pool = _executor(workers)   # first: the callbacks may start a progress thread
    try:
        held = store_lock.exclusive(root) if repair else store_lock.shared(root)
        try:
            report = _check(layout, root, images, pool, on_progress, on_scanned)
            if repair:
                _repair(root, report)
        finally:
            assert held is not None
            held.release()
    finally:
        pool.shutdown(cancel_futures=True)
    report.seconds = time.monotonic() - start
    return report


def _check(layout: StoreLayout, root: bytes, images: list[str] | None, pool: Executor,
           on_progress: Callable[[int, int], None] | None,
           on_scanned: Callable[[int, int], None] | None) -> FsckReport:
    report = FsckReport()
    scan = scan_store(root)
    report.objects = len(scan.objects)
    report.bytes = sum(size for _, size in scan.objects)
    report.temporaries = len(scan.temporaries)
    if on_scanned is not None:
        on_scanned(report.objects, report.bytes)
    problems = [Problem("stray", os.fsdecode(rel), why) for rel, why in scan.strays]
    bad, holds = check_objects(root, scan.objects, pool, on_progress)
    problems += bad
    present = {rel for rel, _ in scan.objects}
    needed_by: dict[bytes, str] = {}
    if images is None:
        images = layout.kept_images()
    report.images = len(images)
    for image in images:
        try:
            refs = image_file_objects(image)
        except (OSError, ImageFormatError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(Problem("bad-image", image, f"cannot be read: {reason}"))
            continue
        for ref in refs:
            if ref not in present:
                needed_by.setdefault(ref, image)
    for ref in sorted(needed_by):
        shown = os.fsdecode(ref)
        if ref in holds:   # one fault, one line: the needed object sits under a wrong name
            misnamed = os.fsdecode(holds[ref])
            problems = [p for p in problems if p.path != misnamed]
            problems.append(Problem("misnamed", misnamed,
                                    f"holds {shown} (needed by {needed_by[ref]})"))
            continue
        problems.append(Problem("missing", shown, f"needed by {needed_by[ref]}"))
    order = {"bad-image": 0, "stray": 1, "unreadable": 2, "corrupt": 3, "misnamed": 4,
             "missing": 5}
    report.problems = sorted(problems, key=lambda p: (order[p.kind], p.path))
    return report


def _repair(root: bytes, report: FsckReport) -> None:
    """Move corrupt objects and stray entries into a new quarantine directory."""
    bad = [p for p in report.problems if p.kind in ("corrupt", "misnamed", "stray")]
    if not bad:
        return
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    quarantine = os.path.join(root, QUARANTINE_NAME.encode(), f"{stamp}-{os.getpid()}".encode())
    for problem in bad:
        rel = os.fsencode(problem.path)
        target = os.path.join(quarantine, rel)
        os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
        os.rename(os.path.join(root, rel), target)
        report.moved.append((problem.path, os.fsdecode(os.path.relpath(target, root))))
