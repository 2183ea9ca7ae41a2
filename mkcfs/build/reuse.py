"""Reusing the image of the last build when nothing it was made of changed, or only some
files' contents.

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

When some files' contents changed and nothing else did (``patched_image``), the last image is
rewritten instead of built: the walk gives the key the tree would have if those files still
had what the cache recorded for their inodes (digest, size, mtime) and, for inline files, the
contents the last image holds (``WalkInProgress.previous_tree``). When that is the last
image's key, the last image was made from this tree but for those files, and
``mkcfs.build.patch`` writes their new values into a copy of it, provided no other file of the
tree has an old or a new digest (then every such value is an inline xattr of its one file and
the shared xattr table stays as it was) and every inode keeps its place and shape
(``resize_inode``). The result is the image a full build makes, byte for byte; any doubt
builds it in full.
"""

from __future__ import annotations

import os
import stat
from functools import lru_cache
from hashlib import sha256
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from erofs.reader import Inode
    from mkcfs.build.image import BuiltImage
    from mkcfs.sources.walk import WalkInProgress
    from mkcfs.store.cache import DigestCache
    from mkcfs.tree import Node

__all__ = ["code_fingerprint", "holds_image", "image_key", "kept_image", "patched_image"]

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


def _digest_counts(root: Node, digests: set[bytes]) -> dict[bytes, int]:
    """How many files of the tree below ``root`` have each of ``digests`` (those with none
    are left out)."""
    counts: dict[bytes, int] = {}
    stack = [root]
    while stack:
        children = stack.pop().children
        assert children is not None
        for node in children.values():
            if node.children is not None:   # type: ignore[union-attr]
                stack.append(node)   # type: ignore[arg-type]
            else:
                digest = node.digest   # type: ignore[union-attr]
                if digest is not None and digest in digests:
                    counts[digest] = counts.get(digest, 0) + 1
    return counts


def patched_image(walk: WalkInProgress, min_version: int, max_version: int,
                  image_path: str | bytes | None) -> BuiltImage | None:
    """The image of the tree ``walk`` found (after ``wait(for_reuse=True)``), made from the
    last image (see the module docstring); None (build it) unless the last image was built
    from the same tree but for some files' contents, ``image_path`` still holds it, and no
    file but the changed ones has an old or a new digest of theirs."""
    from erofs.errors import ImageFormatError
    from erofs.reader import S_IFMT, S_IFREG, Image
    from fsverity import digest_bytes

    from mkcfs.build.image import BuiltImage
    from mkcfs.build.patch import replace_contents, replace_digests, resize_inode
    from mkcfs.store.reading import INLINE_MAX

    cache = walk.cache
    memo = cache.image_memo if cache is not None else None
    if memo is None or image_path is None or not walk.changes:
        return None
    # first what the tree alone tells (a file whose contents another file has, before or
    # after: in the benchmark's 1% of /usr, ~100 of them), then the image file
    edits = walk.digest_edits()
    olds = {old for old, _ in edits}
    news = {new for _, new in edits}
    if len(olds) != len(edits) or len(news) != len(edits) or olds & news:
        return None
    if edits:
        counts = _digest_counts(walk.root, olds | news)
        if any(counts.get(old) for old in olds) or any(counts.get(new) != 1 for new in news):
            return None
    try:
        with open(image_path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = f.read()
    except OSError:
        return None
    if digest_bytes(data) != memo[1]:
        return None
    inline_files: dict[tuple[bytes, ...], Inode] = {}

    def old_content(names: list[bytes]) -> bytes | None:
        ino = reader.lookup(names)
        if ino is None or ino.mode & S_IFMT != S_IFREG or not 0 < ino.size <= INLINE_MAX:
            return None
        inline_files[tuple(names)] = ino
        return reader.data_bytes(ino, INLINE_MAX)

    try:   # the last image, as its digest shows: one a build of mkcfs wrote
        reader = Image(data)
        previous = walk.previous_tree(old_content)
    except ImageFormatError:   # pragma: no cover - then an older mkcfs wrote it badly
        return None
    if (previous is None or image_key(previous.key, min_version, max_version) != memo[0]
            or previous.edits != edits):
        return None
    image = bytearray(data)
    del data
    if edits and not replace_digests(image, edits):
        return None
    for names, contents in previous.inline_edits:
        if not replace_contents(image, reader.extents(inline_files[tuple(names)]), contents):
            return None
    build_time = (reader.build_time, reader.build_time_nsec)
    try:
        for edit in previous.inode_edits:
            ino = inline_files.get(tuple(edit.names)) or reader.lookup(edit.names)
            if (ino is None or ino.mode & S_IFMT != S_IFREG
                    or (ino.size, (ino.mtime, ino.mtime_nsec)) != (edit.old_size, edit.old_mtime)
                    or not resize_inode(image, ino, build_time, edit.size, edit.mtime)):
                return None
    except ImageFormatError:   # pragma: no cover - see above
        return None
    return BuiltImage(image, reader.version)
