"""Remove what no kept image needs from an object store (``mkcfs gc``).

Under the exclusive store lock (``mkcfs.store.lock``: no build runs meanwhile, and every image a
finished build wrote is already in place), ``collect``:

1. lists the kept images (the given files, the files of the given directories, and for a managed
   store every file of ``images/`` and every image a ``mkcfs mount`` run state names) and reads
   the objects each refers to; an image that cannot be read stops everything before anything is
   removed;
2. removes every object (``ab/`` + 62 hex digits, a regular file) that none of them refers to;
3. removes the temporary files of builds that died (``.tmp-*`` that nobody holds locked).

Nothing else is touched: entries that are not objects (``mkcfs fsck`` reports them), the
``ab/`` directories (a few hundred at most), ``.quarantine/`` and mkcomposefs 1.0.8's unlocked
``.tmpXXXXXX`` files (no way to tell a dead writer's from a live one's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from erofs.errors import ImageFormatError

from mkcfs.errors import CfsError
from mkcfs.inspect.objects import image_file_objects
from mkcfs.store import lock as store_lock
from mkcfs.store.fsck import scan_store
from mkcfs.store.images import ManagedStore, read_states
from mkcfs.store.layout import StoreLayout, image_files

__all__ = ["GcReport", "collect", "kept_image_paths"]


@dataclass
class GcReport:
    images: int = 0
    referenced: int = 0
    kept_objects: int = 0
    #: (relative path, size) of each object removed (or, in a dry run, to remove)
    removed: list[tuple[str, int]] = field(default_factory=list)
    temporaries_removed: int = 0
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def removed_bytes(self) -> int:
        return sum(size for _, size in self.removed)


def kept_image_paths(layout: StoreLayout, keep_dirs: list[str]) -> list[str]:
    """The images kept by directory: the files of each of ``keep_dirs`` (hidden names, the
    temporaries of image writers, excepted), a managed store's own images, and the images its
    ``mkcfs mount`` run states name (an image file mounted from outside the store keeps its
    objects while it may be mounted; a state that outlived its mount only keeps a few objects
    longer, until the next mount prunes it)."""
    images: list[str] = []
    for directory in keep_dirs:
        images += image_files(directory)
    images += layout.kept_images()
    if layout.images is not None:
        listed = set(images)
        for state in read_states(ManagedStore(layout.given)):
            if state.image not in listed and os.path.isfile(state.image):
                listed.add(state.image)
                images.append(state.image)
    return images


def collect(layout: StoreLayout, keep: list[str], keep_dirs: list[str], *,
            dry_run: bool = False, on_wait: Callable[[], None] | None = None) -> GcReport:
    """Collect the garbage of ``layout``'s object store; see the module doc. ``on_wait()`` is
    called once if running builds make it wait for the lock."""
    start = time.monotonic()
    root = os.fsencode(layout.objects)
    held = store_lock.exclusive(root, wait=False)
    if held is None:
        if on_wait is not None:
            on_wait()
        held = store_lock.exclusive(root)
    assert held is not None
    try:
        report = _collect(layout, root, keep, keep_dirs, dry_run)
    finally:
        held.release()
    report.seconds = time.monotonic() - start
    return report


def _collect(layout: StoreLayout, root: bytes, keep: list[str], keep_dirs: list[str],
             dry_run: bool) -> GcReport:
    # the kept images are listed and read only now, under the lock (see mkcfs.store.lock)
    listed = kept_image_paths(layout, keep_dirs)
    images = len(keep) + len(listed)
    referenced: set[bytes] = set()
    for number, image in enumerate(keep + listed):
        try:
            referenced |= image_file_objects(image)
        except FileNotFoundError:
            if number < len(keep):
                raise CfsError(f"kept image {image} does not exist; nothing removed") from None
            images -= 1   # removed from its directory since the listing: no longer kept
        except OSError as exc:
            raise CfsError(f"cannot read kept image {image}: {exc.strerror or exc}; "
                           "nothing removed") from None
        except ImageFormatError as exc:
            raise CfsError(f"kept image {image} is damaged: {exc}; nothing removed") from None
    report = GcReport(images=images, referenced=len(referenced), dry_run=dry_run)
    scan = scan_store(root)
    for rel, size in scan.objects:
        if rel in referenced:
            report.kept_objects += 1
            continue
        if not dry_run:
            try:
                os.unlink(os.path.join(root, rel))
            except FileNotFoundError:
                continue
        report.removed.append((os.fsdecode(rel), size))
    if not dry_run and scan.temporaries:
        from mkcfs.store.objects import ObjectStore

        report.temporaries_removed = ObjectStore(root, prepare=False).clean_stale_temps()
    return report
