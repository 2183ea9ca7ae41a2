"""Rewriting an image for files whose contents alone changed.

An external file's contents reach a composefs image only through two of its xattrs:
``trusted.overlay.metacopy``, which carries the fs-verity digest, and
``trusted.overlay.redirect``, ``/`` and the object path (the digest in hex). Both values have a
fixed length, so when only some files' digests changed every inode stays where it was and the
new image is the old one with those two values rewritten: ``replace_digests``. A small file's
contents are its inline data, of the same length when its size stayed (``replace_contents``).
A new size or mtime is a field of the file's inode, which keeps its place and shape as long as
the layout would give it the same (``resize_inode``).

That holds only while neither the old nor the new digest of a file is used by any other file:
a value used by two inodes lives in the shared xattr table, whose contents and order depend on
which values are used twice. ``mkcfs.build.reuse`` proves that, and that the tree is otherwise
the old image's, before it calls ``replace_digests``; this module checks what it can see in the
bytes (each old value is found exactly once, as an inline metacopy entry followed by the
matching redirect entry) and changes nothing when a check fails.
"""

from __future__ import annotations

import re
from functools import lru_cache

from erofs.format import (EROFS_INODE_CHUNK_BASED, EROFS_INODE_FLAT_INLINE, INODE_COMPACT,
                          INODE_COMPACT_FIELDS, INODE_EXTENDED, INODE_EXTENDED_FIELDS,
                          chunk_params, xattr_prefix_split)
from erofs.layout import InlineEntries, fits_compact
from erofs.reader import Inode
from fsverity import object_path

from mkcfs.build.overlay import METACOPY, REDIRECT, metacopy_value, redirect_value

__all__ = ["replace_contents", "replace_digests", "resize_inode"]

_DIGEST_SIZE = 32


def _entry_parts(key: bytes, value_size: int) -> tuple[bytes, bytes]:
    """An inline xattr entry of ``key`` with a value of ``value_size`` bytes: the bytes before
    the value (header, name suffix) and the padding after it."""
    head, padding = InlineEntries(*xattr_prefix_split(key)).head(value_size)
    return head, bytes(padding)


@lru_cache(maxsize=1)
def _layout() -> tuple[re.Pattern[bytes], int, int, bytes, bytes]:
    """The metacopy entry's search pattern (its bytes before the digest; the digest is group
    1), the offsets of the digest and of the redirect entry in it, and the redirect entry's
    bytes before and after its value."""
    value_head = metacopy_value(bytes(_DIGEST_SIZE))[:-_DIGEST_SIZE]
    head, padding = _entry_parts(METACOPY, len(value_head) + _DIGEST_SIZE)
    before_digest = head + value_head
    pattern = re.compile(re.escape(before_digest) + b"(.{%d})" % _DIGEST_SIZE, re.DOTALL)
    redirect_size = len(redirect_value(object_path(bytes(_DIGEST_SIZE)).encode()))
    redirect_head, redirect_padding = _entry_parts(REDIRECT, redirect_size)
    return (pattern, len(before_digest), len(before_digest) + _DIGEST_SIZE + len(padding),
            redirect_head, redirect_padding)


def _redirect_entry(digest: bytes) -> bytes:
    _, _, _, head, padding = _layout()
    return head + redirect_value(object_path(digest).encode()) + padding


def replace_digests(image: bytearray, edits: list[tuple[bytes, bytes]]) -> bool:
    """Rewrite, for each ``(old, new)`` digest of ``edits``, the metacopy and redirect values
    of the one file of ``image`` whose digest is ``old`` so that they say ``new``; the caller
    has made sure that no other file has ``old`` or ``new`` (see the module docstring). False,
    and ``image`` unchanged, when an old digest is not found exactly once as an inline
    metacopy entry followed by its redirect entry."""
    pattern, digest_at, redirect_at, _, _ = _layout()
    wanted = {old for old, _ in edits}
    if len(wanted) != len(edits):
        return False
    found: dict[bytes, list[int]] = {}
    for match in pattern.finditer(image):
        digest = match.group(1)
        if digest in wanted:
            found.setdefault(digest, []).append(match.start())
    places = []
    for old, new in edits:
        starts = found.get(old, [])
        if len(starts) != 1 or len(new) != _DIGEST_SIZE:
            return False
        redirect = _redirect_entry(old)
        at = starts[0] + redirect_at
        if image[at:at + len(redirect)] != redirect:
            return False
        places.append((starts[0], at, new))
    for start, at, new in places:
        image[start + digest_at:start + digest_at + _DIGEST_SIZE] = new
        redirect = _redirect_entry(new)
        image[at:at + len(redirect)] = redirect
    return True


def replace_contents(image: bytearray, extents: list[tuple[int, int]], contents: bytes) -> bool:
    """Write ``contents`` over a file's data at ``extents`` (``(offset, length)`` pieces, as
    ``erofs.reader.Image.extents`` gives them); False, and ``image`` unchanged, when their
    lengths differ."""
    if sum(length for _, length in extents) != len(contents):
        return False
    done = 0
    for offset, length in extents:
        image[offset:offset + length] = contents[done:done + length]
        done += length
    return True


_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def resize_inode(image: bytearray, ino: Inode, build_time: tuple[int, int], size: int,
                 mtime: tuple[int, int]) -> bool:
    """Give the inode ``ino`` of ``image`` (``build_time``: the image's) a new ``size`` and
    ``mtime`` ``(s, ns)``, where ``erofs.layout`` would give the new inode the same place and
    shape: the build time stays (the old and the new mtime are both later than it, or the
    same), the inode stays compact or extended (``erofs.layout.fits_compact``), an external
    file stays of one chunk (its chunk bits, in ``i_u``, follow its size), and a file with
    inline data keeps its size. False, and ``image`` unchanged, otherwise."""
    old_mtime = (ino.mtime, ino.mtime_nsec)
    if mtime != old_mtime and not (old_mtime > build_time and mtime > build_time):
        return False
    if fits_compact(*mtime, ino.nlink, ino.uid, ino.gid, size, *build_time) == ino.extended:
        return False
    if ino.layout == EROFS_INODE_CHUNK_BASED:
        bits, count = chunk_params(size)
        if count != 1 or chunk_params(ino.size)[1] != 1:
            return False
        i_u = bits - 12
    elif ino.layout == EROFS_INODE_FLAT_INLINE and size == ino.size:
        i_u = ino.i_u
    else:
        return False
    packer, names = ((INODE_EXTENDED, list(INODE_EXTENDED_FIELDS)) if ino.extended
                     else (INODE_COMPACT, list(INODE_COMPACT_FIELDS)))
    fields = list(packer.unpack_from(image, ino.offset))
    fields[names.index("i_size")] = size
    fields[names.index("i_u")] = i_u
    if ino.extended:
        fields[names.index("i_mtime")] = mtime[0] & _U64
        fields[names.index("i_mtime_nsec")] = mtime[1] & _U32
    packer.pack_into(image, ino.offset, *fields)
    return True
