"""The managed store: file data and built images side by side, each image built once.

Layout of a store directory (default ``/var/lib/mkcfs``)::

    STORE/objects/ab/cdef…       the object store (``ObjectStore``): file data by fs-verity digest
    STORE/images/NAME.cfs        built composefs images (mode 0644)
    STORE/images/.NAME.lock      per-image build lock (flock; an empty file, never trusted)
    STORE/mounts/KEY.json        run state of the mounts made by ``mkcfs mount`` (see
                                 ``mkcfs.mount.helper``)

An image's ``NAME`` is the sha256 of what determines its bytes: the manifest digest of the
source image, the build options and ``IMAGE_FORMAT`` (bumped whenever the writer's output for the
same input changes). So the second mount of an image only has to compute its name and find the
file: no build, no lock.

Building (``ensure_image``) is crash-safe and done once:

* the build runs under an exclusive ``flock`` of ``images/.NAME.lock``, so of two processes that
  want the same image at once one builds and the other waits, then finds the image;
* the build holds the store lock (``mkcfs.store.lock``, shared) until its image is in place, so
  ``mkcfs gc`` (which keeps ``images/*``) never removes the objects of a finished image;
* objects reach their names only complete and durable (``ObjectStore``), and the image is
  written to a temporary file, fsync'ed and renamed into place only after all its objects are
  durable: a build killed at any moment (SIGKILL included) leaves no image under its name, only
  unlocked temporary files, which the next build removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from mkcfs.errors import StoreError as _StoreError
from mkcfs.store.layout import IMAGES_NAME, OBJECTS_NAME

#: where ``mkcfs mount`` keeps objects and images unless told otherwise
DEFAULT_STORE = "/var/lib/mkcfs"
#: version of "what an image built from the same input looks like"; part of every image name
IMAGE_FORMAT = 1
IMAGE_SUFFIX = ".cfs"
DIR_MODE = 0o755
IMAGE_MODE = 0o644


class StoreError(_StoreError):
    """The project's ``StoreError`` (a store that cannot be used), made from ``errno`` and a
    one-line message naming the path."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class BuildOptions:
    """The build options that change an image's bytes (all part of its name)."""

    min_version: int = 0
    max_version: int = 1


DEFAULT_BUILD = BuildOptions()


def image_name(manifest_digest: str, options: BuildOptions = DEFAULT_BUILD) -> str:
    """The file name (``HEX.cfs``) of the image built from ``manifest_digest`` with ``options``."""
    key = json.dumps({"format": IMAGE_FORMAT, "manifest": manifest_digest,
                      "options": asdict(options)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest() + IMAGE_SUFFIX


@dataclass(frozen=True)
class MountState:
    """What ``STORE/mounts/KEY.json`` records about one mount made by ``mkcfs mount`` (written
    before the mount, removed by ``mkcfs umount``, pruned once the mount is gone)."""

    mountpoint: str
    image: str
    objects: str
    persist: str | None
    mntns: int
    pid: int


class ManagedStore:
    """A store directory (see the module docstring). Nothing is created until needed."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.objects = os.path.join(self.root, OBJECTS_NAME)
        self.images = os.path.join(self.root, IMAGES_NAME)
        self.mounts = os.path.join(self.root, "mounts")

    def image_path(self, name: str) -> str:
        return os.path.join(self.images, name)

    def make_dirs(self, *paths: str) -> None:
        """``mkdir -p`` of the store and of ``paths`` in it, one-line error naming the path."""
        for path in (self.root, *paths):
            try:
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)
            except OSError as exc:
                raise StoreError(exc.errno or errno.EIO,
                                 f"store {path}: {exc.strerror or exc}") from None
            if not os.path.isdir(path):
                raise StoreError(errno.ENOTDIR, f"store {path}: Not a directory")

    def ensure_image(self, name: str,
                     build: Callable[[str], bytes | bytearray]) -> tuple[str, bool]:
        """The path of image ``name``, built first with ``build(objects_dir)`` if it is missing.

        Returns ``(path, built)``. ``build`` fills the object store directory it is given
        (through ``ObjectStore``, which names objects only complete and durable) and returns
        the image bytes; it runs at most once per image however many processes ask at once."""
        path = self.image_path(name)
        if os.path.isfile(path):
            return path, False
        self.make_dirs(self.images, self.objects)
        with self._build_lock(name):
            if os.path.isfile(path):      # built by the process we waited for
                return path, False
            # the store lock, shared, from the first object until the image is in place: a
            # concurrent `mkcfs gc` keeps images/* and cannot remove this build's objects
            from mkcfs.store import lock as store_lock
            with store_lock.shared(self.objects):
                data = build(self.objects)
                # the import is here: write_atomically is the project's temp + rename protocol
                from mkcfs.fsutil import write_atomically
                try:
                    write_atomically(path, data, mode=IMAGE_MODE, durable=True)
                except OSError as exc:
                    raise StoreError(exc.errno or errno.EIO,
                                     f"cannot write image {path}: {exc.strerror or exc}") from None
        return path, True

    @contextlib.contextmanager
    def _build_lock(self, name: str) -> Iterator[None]:
        lock_path = os.path.join(self.images, f".{name}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO,
                             f"cannot lock {lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def read_states(store: ManagedStore) -> list[MountState]:
    """Every run-state file of ``store`` (unreadable ones skipped): what may be mounted."""
    states = []
    try:
        names = sorted(n for n in os.listdir(store.mounts) if n.endswith(".json"))
    except OSError:
        return []
    for name in names:
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(os.path.join(store.mounts, name), encoding="utf-8") as f:
                states.append(MountState(**json.load(f)))
    return states
