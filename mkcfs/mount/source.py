"""What ``mkcfs mount SOURCE`` mounts: SOURCE resolved to a composefs image file.

* A composefs image file (recognised by its header) is mounted as it is, its file data taken
  from the store's object store (or from ``-o basedir=``).
* Anything else is an OCI image reference (``OCI_DIR:REF`` as LXC passes it, ``oci:``,
  ``oci-archive:``, ``docker-archive:``; see ``mkcfs.sources``). Its image is built into the
  managed store once, under a name derived from the manifest digest and the build options
  (``mkcfs.store.images``); later mounts of the same image find it there without building.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from erofs.format import LCFS_EROFS_MAGIC

from mkcfs.mount.options import MountError
from mkcfs.store.images import DEFAULT_BUILD, BuildOptions, ManagedStore, image_name


class SourceError(MountError):
    """A SOURCE that cannot be mounted; one line naming it."""


@dataclass(frozen=True)
class ResolvedImage:
    """The image file to mount and where its file data lives."""

    path: str
    objects: str
    built: bool = False         # whether this call built it
    from_store: bool = True     # built into the store (False: a composefs image file given)


def is_composefs_image(path: str) -> bool:
    """Whether ``path`` is a regular file that starts with the composefs header magic."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int.from_bytes(head, "little") == LCFS_EROFS_MAGIC


#: ``build(objects_dir) -> image bytes``: fills the object store directory, returns the image
Builder = Callable[[str], bytes | bytearray]
#: ``(source) -> (manifest digest, build)``: how an OCI reference becomes an image; finding the
#: digest must be cheap (it runs on every mount), the build runs only when the store lacks it.
OciResolver = Callable[[str], tuple[str, Builder]]


def _default_oci_resolver(source: str) -> tuple[str, Builder]:
    raise SourceError(errno.ENOENT, f"{source}: not a composefs image, and OCI sources "
                                    "are not available in this version")


def resolve(source: str, store: ManagedStore, *, options: BuildOptions = DEFAULT_BUILD,
            oci: OciResolver | None = None) -> ResolvedImage:
    """SOURCE as an image file (built into ``store`` first when it is an OCI reference)."""
    if is_composefs_image(source):
        return ResolvedImage(os.path.abspath(source), store.objects, from_store=False)
    digest, build = (oci or _default_oci_resolver)(source)
    path, built = store.ensure_image(image_name(digest, options), build)
    return ResolvedImage(path, store.objects, built=built)
