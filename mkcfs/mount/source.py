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
#: ``(source, options) -> (manifest digest, build)``: how an OCI reference becomes an image;
#: finding the digest must be cheap (it runs on every mount), the build runs only when the store
#: lacks the image.
OciResolver = Callable[[str, BuildOptions], tuple[str, Builder]]


def oci_resolver(source: str, options: BuildOptions) -> tuple[str, Builder]:
    """An OCI reference (``OCI_DIR:REF`` as LXC passes it, or ``oci:``, ``oci-archive:``,
    ``docker-archive:``) as (manifest digest, builder), reading only the index and the
    manifest. A bare ``OCI_DIR:REF`` that starts like a transport (a relative directory called
    ``oci``) is taken as the transport: write ``./oci:REF``."""
    from mkcfs.sources.oci import OciOptions, build_oci_image, image_digest
    from mkcfs.sources.transport import TRANSPORTS, parse_source

    transport = source.partition(":")[0]
    # a bare OCI_DIR:REF is LXC's form; "oci:x" is a transport even if a directory "oci:x" exists
    parsed = parse_source(source if transport in TRANSPORTS else "oci:" + source)
    if parsed.transport == "tar":
        raise SourceError(errno.EINVAL, f"{source}: plain layer files have no image digest to "
                                        "name the image by; give an OCI image")
    digest = image_digest(parsed)
    if digest is None:     # pragma: no cover - every transport but tar: has one
        raise SourceError(errno.EINVAL, f"{source}: the image has no digest")

    def build(objects: str) -> bytes | bytearray:
        return build_oci_image(parsed, OciOptions(digest_store=objects),
                               min_version=options.min_version,
                               max_version=options.max_version).data

    return digest, build


def resolve(source: str, store: ManagedStore, *, options: BuildOptions = DEFAULT_BUILD,
            oci: OciResolver | None = None) -> ResolvedImage:
    """SOURCE as an image file (built into ``store`` first when it is an OCI reference)."""
    if is_composefs_image(source):
        return ResolvedImage(os.path.abspath(source), store.objects, from_store=False)
    digest, build = (oci or oci_resolver)(source, options)
    path, built = store.ensure_image(image_name(digest, options), build)
    return ResolvedImage(path, store.objects, built=built)
