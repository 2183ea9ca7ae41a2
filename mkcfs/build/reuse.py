"""Reusing the image of the last build when nothing it was made of changed.

A rebuild of an unchanged tree into the same image file should cost the walk that proves it
unchanged, not a second build of the same bytes. The digest cache (``mkcfs.store.cache``)
remembers, per source tree, the key of the last image built from it and that image's fs-verity
digest. ``image_key`` is the key: a SHA-256 of

* the tree as the walk saw it (``mkcfs.sources.walk``, ``WalkInProgress.tree_key``): every
  entry's name, mode, owner, device number, size, mtime, xattrs, symlink target, inline content
  and file digest (from the digest cache or read), and the walk's options;
* the format version options;
* the code that turns a tree into an image (``code_fingerprint``: each module's path, size and
  mtime, so an upgrade or an edit of mkcfs changes it).

The same key means the same input to the same code, hence the same image bytes; the image file
is still read and its fs-verity digest compared (``holds_image``), so a file changed, truncated
or replaced since is built again. Only then is the build skipped: the image is left as it is
(its mtime set to now, as a rewrite would) and its digest printed if asked.
"""

from __future__ import annotations

import os
import stat
from functools import lru_cache
from hashlib import sha256
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mkcfs.store.cache import DigestCache

__all__ = ["code_fingerprint", "holds_image", "image_key", "kept_image"]

#: the packages whose code decides an image's bytes
_PACKAGES = ("erofs", "fsverity", "mkcfs")


@lru_cache(maxsize=1)
def code_fingerprint() -> bytes:
    """A SHA-256 of the path, size and mtime of every module of the packages that make images
    (``_PACKAGES``, as installed or checked out)."""
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found: list[bytes] = []
    for package in _PACKAGES:
        for directory, subdirectories, names in os.walk(os.path.join(top, package)):
            if "__pycache__" in subdirectories:
                subdirectories.remove("__pycache__")
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    st = os.stat(path)
                    found.append(os.fsencode(os.path.relpath(path, top))
                                 + b"\0%d\0%d" % (st.st_size, st.st_mtime_ns))
    found.sort()
    return sha256(b"\n".join(found)).digest()


def image_key(tree_key: bytes, min_version: int, max_version: int) -> bytes:
    """The key of the image built from the tree with ``tree_key`` with these options."""
    return sha256(b"mkcfs image\0%d\0%d\0" % (min_version, max_version) + tree_key
                  + code_fingerprint()).digest()


def holds_image(path: str | bytes, digest: bytes) -> bool:
    """Whether ``path`` is a regular file whose fs-verity digest is ``digest``."""
    from fsverity import digest_file

    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            return digest_file(f.fileno()) == digest
    except OSError:
        return False


def kept_image(cache: DigestCache, key: bytes, image_path: str | bytes | None) -> bytes | None:
    """The fs-verity digest of the image the last build made from this tree when ``key`` is
    that build's (``cache.image_memo``) and ``image_path`` (None: no file, as with
    ``--print-digest-only``) still holds that image, which is then kept as it is, its mtime
    set as a rewrite would set it; else None (build it)."""
    memo = cache.image_memo
    if memo is None or memo[0] != key:
        return None
    if image_path is not None:
        if not holds_image(image_path, memo[1]):
            return None
        try:
            os.utime(image_path)
        except OSError:
            return None
    return memo[1]
