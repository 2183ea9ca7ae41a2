"""A bounds-checked reader of composefs EROFS images.

``Image`` parses the composefs header and the EROFS superblock, then gives access to inodes
(``inode(nid)``), their xattrs (``xattrs(inode)``), directory entries (``dirents(inode)``) and file
data (``data(inode, limit)``). It reads what ``mkcomposefs`` writes and what libcomposefs's own
reader (``lcfs_load_node_from_image`` in composefs 1.0.8) accepts, and refuses anything else with
:class:`~erofs.errors.ImageFormatError` carrying the byte offset of the problem.

Robustness rules, for damaged or hostile images:

* every offset and length taken from the image is checked against the image size before it is
  used; nothing is allocated from a size field before the bytes it describes are known to exist;
* each call does work proportional to the bytes it returns (directory and xattr bodies are
  bounded by the image); whole-tree walks bound their total work with :class:`WorkBudget`
  (each inode is visited once by the walker, and the dirents and bytes it copies are charged
  against limits proportional to the image size, so overlapping extents or shared blocks cannot
  multiply the work);
* only :class:`ImageFormatError` is raised for malformed input.

The reader performs no composefs policy (overlay xattrs, whiteouts, hard links): that mapping is
``mkcfs.inspect.unflatten``.
"""

from __future__ import annotations

import mmap
import os
import struct
from operator import le as _le
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from .errors import ImageFormatError
from .format import (
    COMPOSEFS_HEADER,
    DIRENT,
    EROFS_BLKSIZ,
    EROFS_BLKSIZ_BITS,
    EROFS_INODE_FLAT_INLINE,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    INODE_COMPACT,
    INODE_EXTENDED,
    LCFS_EROFS_MAGIC,
    LCFS_EROFS_VERSION,
    SUPER_BLOCK,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
    XATTR_INDEX_PREFIX,
)
from .format import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG  # file type bits

__all__ = ["Image", "Inode", "XattrEntry", "WorkBudget", "ImageFormatError", "Header",
           "read_header", "read_superblock", "xattr_key", "HEADER_AREA_SIZE", "S_IFMT", "S_IFDIR",
           "S_IFREG", "S_IFLNK", "S_IFCHR", "S_IFBLK"]


_COMPACT_SIZE = INODE_COMPACT.size      # 32
_EXTENDED_SIZE = INODE_EXTENDED.size    # 64
_DIRENT_SIZE = DIRENT.size              # 12
_XATTR_ENTRY_SIZE = XATTR_ENTRY.size    # 4
_IBODY_HEADER_SIZE = XATTR_IBODY_HEADER.size  # 12
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SIGN64 = 1 << 63
_WRAP64 = 1 << 64
#: libcomposefs refuses inline file content above this size.
INLINE_CONTENT_MAX = 5000
#: libcomposefs refuses symlink targets of this length or more.
PATH_MAX = 4096
#: The smallest image libcomposefs accepts.
MIN_IMAGE_SIZE = EROFS_BLKSIZ


class Inode(NamedTuple):
    """One decoded inode. ``mtime`` is signed (compact inodes take the superblock's build time).

    ``xattr_offset``/``xattr_size`` locate the xattr body (size 0 when there is none); the
    inline (tail-packed) data starts right after it, at ``tail_offset``. A tuple, so that hot
    loops unpack it in one step."""

    nid: int
    #: byte offset of the inode in the image
    offset: int
    #: 64-byte extended inode (else 32-byte compact)
    extended: bool
    #: EROFS_INODE_* data layout (bits 1-3 of i_format)
    layout: int
    mode: int
    nlink: int
    size: int
    #: raw_blkaddr, rdev or chunk format, by file type and layout
    i_u: int
    #: the stored inode number (mkcomposefs: breadth-first index)
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    xattr_icount: int
    xattr_offset: int
    xattr_size: int

    @property
    def tail_offset(self) -> int:
        return self.xattr_offset + self.xattr_size

    @property
    def file_type(self) -> int:
        return self.mode & S_IFMT

    @property
    def rdev(self) -> int:
        """The device number of a character or block device (``i_u``), else 0."""
        t = self.mode & S_IFMT
        return self.i_u if t == S_IFCHR or t == S_IFBLK else 0

    @property
    def tailpacked(self) -> bool:
        return self.layout == EROFS_INODE_FLAT_INLINE

    def __repr__(self) -> str:
        return (f"Inode(nid={self.nid}, mode={self.mode:o}, size={self.size}, "
                f"layout={self.layout}, xattr_size={self.xattr_size})")


_new_inode = tuple.__new__
#: :class:`Inode`'s fields as a plain tuple (see ``Image.inode_decoder``)
InodeFields = tuple[int, int, bool, int, int, int, int, int, int, int, int, int, int, int, int, int]


def xattr_key(name_index: int, suffix: bytes, offset: int) -> bytes:
    """The full xattr name: the prefix ``name_index`` stands for, then ``suffix``. An unknown
    index raises :class:`ImageFormatError` at ``offset``."""
    prefix = XATTR_INDEX_PREFIX.get(name_index)
    if prefix is None:
        raise ImageFormatError(offset, f"unknown xattr name index {name_index}")
    return prefix + suffix


class XattrEntry:
    """One stored xattr: ``name_index`` (prefix), the name ``suffix`` and the ``value``.

    ``value_end`` is the image offset just past the value (libcomposefs's redirect parsing looks
    at the bytes that follow it); ``shared`` tells whether it came from the shared table."""

    __slots__ = ("name_index", "suffix", "value", "value_end", "shared")

    def __init__(self, name_index: int, suffix: bytes, value: bytes, value_end: int,
                 shared: bool) -> None:
        self.name_index = name_index
        self.suffix = suffix
        self.value = value
        self.value_end = value_end
        self.shared = shared

    @property
    def key(self) -> bytes:
        """The full key (prefix + suffix); raises ImageFormatError for an unknown prefix index."""
        return xattr_key(self.name_index, self.suffix, self.value_end)

    def __repr__(self) -> str:
        return f"XattrEntry({self.name_index}, {self.suffix!r}, {self.value!r})"


class WorkBudget:
    """Limits for one whole-tree walk, proportional to the image size.

    In an image mkcomposefs writes, every dirent (12 bytes + a name) and every byte of inline data,
    symlink target or inline xattr lives in its own place, so a walk that visits each inode once
    never needs more than ``image size / 12`` dirents or ``image size`` copied bytes. Hostile
    images that point many inodes at the same blocks hit these limits instead of multiplying the
    work and memory."""

    __slots__ = ("dirents_left", "bytes_left")

    def __init__(self, image_size: int) -> None:
        self.dirents_left = image_size // _DIRENT_SIZE + 16
        self.bytes_left = 2 * image_size + 65536

    def dirents(self, n: int, offset: int) -> None:
        self.dirents_left -= n
        if self.dirents_left < 0:
            raise ImageFormatError(offset, "more directory entries than the image can hold "
                                           "(directories share blocks)")

    def bytes(self, n: int, offset: int) -> None:
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise ImageFormatError(offset, "more inline data than the image can hold "
                                           "(inodes overlap)")


#: unpackers of 0..255 shared xattr ids
_ID_STRUCTS = [struct.Struct(f"<{n}I") for n in range(256)]
_unpack_compact = INODE_COMPACT.unpack_from
_unpack_extended = INODE_EXTENDED.unpack_from
_unpack_xattr_entry = XATTR_ENTRY.unpack_from

#: struct unpackers of n-dirent tables, by n (at most 4096 / 12 of them)
_DIRENT_TABLES: dict[int, struct.Struct] = {}


def _signed64(value: int) -> int:
    return value - _WRAP64 if value >= _SIGN64 else value


class Header(NamedTuple):
    """What the 32-byte composefs header says (magic and header version already checked)."""

    #: LCFS_EROFS_FLAGS_* (bit 0: some inode has a POSIX ACL)
    flags: int
    #: the composefs format version (0 or 1 as mkcomposefs writes it; unsigned here)
    composefs_version: int


#: the bytes an image starts with: composefs header, padding, EROFS superblock
HEADER_AREA_SIZE = EROFS_SUPER_OFFSET + SUPER_BLOCK.size


def read_header(data: bytes | bytearray | memoryview | mmap.mmap) -> Header:
    """The composefs header at the start of ``data``: the one check every tool makes (present,
    composefs magic, header version 1), raising :class:`ImageFormatError` otherwise."""
    if len(data) < COMPOSEFS_HEADER.size:
        raise ImageFormatError(len(data), f"not a composefs image (only {len(data)} bytes, "
                                          "too short for its header)")
    header = COMPOSEFS_HEADER.unpack_from(data, 0)
    if header["magic"] != LCFS_EROFS_MAGIC:
        raise ImageFormatError(0, f"not a composefs image (magic {header['magic']:#010x})")
    if header["version"] != LCFS_EROFS_VERSION:
        raise ImageFormatError(4, f"unsupported composefs header version {header['version']}")
    return Header(header["flags"], header["composefs_version"])


def read_superblock(data: bytes | bytearray | memoryview | mmap.mmap) -> dict[str, Any]:
    """The EROFS superblock's fields by name (``ErofsSuperBlock``), after checking that it is
    present and carries the EROFS magic."""
    if len(data) < HEADER_AREA_SIZE:
        raise ImageFormatError(len(data), f"not a composefs image (only {len(data)} bytes, "
                                          "too short for its superblock)")
    fields = SUPER_BLOCK.unpack_from(data, EROFS_SUPER_OFFSET)
    if fields["magic"] != EROFS_SUPER_MAGIC_V1:
        raise ImageFormatError(EROFS_SUPER_OFFSET,
                               f"bad EROFS superblock magic {fields['magic']:#010x}")
    return fields


class Image:
    """A composefs image in memory (``bytes``, ``bytearray``, ``memoryview`` or ``mmap``).

    Header and superblock fields are attributes: ``version`` (the composefs format version from
    the header), ``flags``, ``root_nid``, ``inos``, ``blocks``, ``blkszbits``, ``build_time``
    (signed), ``build_time_nsec``, ``meta_base`` and ``xattr_base`` (byte offsets of the inode
    table and of the shared xattr area)."""

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        self.data = data
        size = len(data)
        self.size = size
        if size < MIN_IMAGE_SIZE:
            raise ImageFormatError(size, f"image too small ({size} bytes, at least "
                                         f"{MIN_IMAGE_SIZE} needed)")
        header = read_header(data)
        self.flags = header.flags
        self.version = header.composefs_version
        sb = read_superblock(data)
        self.feature_compat = sb["feature_compat"]
        self.feature_incompat = sb["feature_incompat"]
        self.blkszbits = sb["blkszbits"]
        self.root_nid = sb["root_nid"]
        self.inos = sb["inos"]
        self.blocks = sb["blocks"]
        self.build_time = _signed64(sb["build_time"])
        self.build_time_nsec = sb["build_time_nsec"]
        meta_blkaddr = sb["meta_blkaddr"]
        xattr_blkaddr = sb["xattr_blkaddr"]
        # libcomposefs assumes 4096-byte blocks whatever blkszbits says; so do we.
        self.meta_base = meta_blkaddr << EROFS_BLKSIZ_BITS
        self.xattr_base = xattr_blkaddr << EROFS_BLKSIZ_BITS
        if self.meta_base >= size:
            raise ImageFormatError(EROFS_SUPER_OFFSET + 40,
                                   f"meta_blkaddr {meta_blkaddr} is beyond the image end")
        if self.xattr_base >= size:
            raise ImageFormatError(EROFS_SUPER_OFFSET + 44,
                                   f"xattr_blkaddr {xattr_blkaddr} is beyond the image end")
        self._shared: dict[int, XattrEntry] = {}
        # distinct shared entries may overlap; bound what caching them can cost
        self._shared_bytes_left = 2 * size + 65536

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | bytes | os.PathLike) -> Image:
        """Read the image file at ``path`` (the whole file is read; memory = its size)."""
        with open(path, "rb") as f:
            return cls(f.read())

    # --- inodes ------------------------------------------------------------------------------

    def inode(self, nid: int) -> Inode:
        """Decode the inode ``nid``; its header and xattr body must lie inside the image."""
        return _new_inode(Inode, self.inode_fields(nid))

    def inode_fields(self, nid: int) -> InodeFields:
        """:meth:`inode` as a plain tuple, in the order of :class:`Inode`'s fields."""
        return self.inode_decoder()(nid)

    def inode_decoder(self) -> Callable[[int], InodeFields]:
        """A function ``nid -> InodeFields``: :meth:`inode_fields` for hot loops, with the
        image's constants bound once (a plain tuple unpacks several times faster than a named
        one, and closure variables load faster than attributes)."""
        data = self.data
        size = self.size
        meta_base = self.meta_base
        build_time = self.build_time
        build_time_nsec = self.build_time_nsec
        unpack_compact = _unpack_compact
        unpack_extended = _unpack_extended

        def decode(nid: int) -> InodeFields:
            offset = meta_base + nid * 32
            if nid < 0 or offset + _COMPACT_SIZE > size:
                raise ImageFormatError(offset, f"inode nid {nid} is beyond the image end")
            if data[offset] & 1:
                if offset + _EXTENDED_SIZE > size:
                    raise ImageFormatError(offset, f"extended inode nid {nid} is cut off by the "
                                                   "image end")
                (i_format, icount, mode, _r, isize, i_u, ino, uid, gid, mtime, mtime_nsec,
                 nlink, _r2) = unpack_extended(data, offset)
                if mtime >= _SIGN64:
                    mtime -= _WRAP64
                xoff = offset + _EXTENDED_SIZE
                xsize = 4 * icount + 8 if icount else 0
                if xoff + xsize > size:
                    raise ImageFormatError(offset + 2, f"xattr body of inode nid {nid} "
                                                       f"({xsize} bytes) runs past the image end")
                return (nid, offset, True, (i_format >> 1) & 7, mode, nlink, isize, i_u, ino,
                        uid, gid, mtime, mtime_nsec, icount, xoff, xsize)
            (i_format, icount, mode, nlink, isize, _r, i_u, ino, uid, gid,
             _r2) = unpack_compact(data, offset)
            xoff = offset + _COMPACT_SIZE
            xsize = 4 * icount + 8 if icount else 0
            if xoff + xsize > size:
                raise ImageFormatError(offset + 2, f"xattr body of inode nid {nid} ({xsize} "
                                                   "bytes) runs past the image end")
            return (nid, offset, False, (i_format >> 1) & 7, mode, nlink, isize, i_u, ino, uid,
                    gid, build_time, build_time_nsec, icount, xoff, xsize)

        return decode

    # --- xattrs ------------------------------------------------------------------------------

    def xattr_body(self, ino: Inode
                   ) -> tuple[Sequence[tuple[int, bytes, int, int]], tuple[int, ...]]:
        """The inode's xattr body, undecoded values: the inline entries in stored order as
        ``(name_index, suffix, value_start, value_end)`` (image offsets of the value), and the
        ids of the shared ones (see :meth:`shared_xattr`) in stored order.

        Each entry is checked to lie inside the body, as libcomposefs reads it: it stops when
        fewer than 5 bytes are left (``pos + 4 < end``)."""
        return self.xattr_body_at(ino.xattr_offset, ino.xattr_size)

    def xattr_body_at(self, start: int, xattr_size: int
                      ) -> tuple[Sequence[tuple[int, bytes, int, int]], tuple[int, ...]]:
        """:meth:`xattr_body` of the ``xattr_size``-byte body at ``start`` (an inode's
        ``xattr_offset`` and ``xattr_size``)."""
        if not xattr_size:
            return (), ()
        end = start + xattr_size
        if start < 0 or end > self.size:
            raise ImageFormatError(start, f"xattr body of {xattr_size} bytes runs past the "
                                          "image end")
        data = self.data
        shared_count = data[start + 4]
        pos = start + _IBODY_HEADER_SIZE + 4 * shared_count
        if pos > end:
            raise ImageFormatError(start + 4, f"{shared_count} shared xattr ids do not fit in "
                                              f"a {xattr_size}-byte xattr body")
        ids = (_ID_STRUCTS[shared_count].unpack_from(data, start + _IBODY_HEADER_SIZE)
               if shared_count else ())
        if pos + _XATTR_ENTRY_SIZE >= end:
            return (), ids
        inline: list[tuple[int, bytes, int, int]] = []
        append = inline.append
        unpack_entry = _unpack_xattr_entry
        while pos + _XATTR_ENTRY_SIZE < end:
            name_len, name_index, value_size = unpack_entry(data, pos)
            value_start = pos + _XATTR_ENTRY_SIZE + name_len
            value_end = value_start + value_size
            if value_end > end:
                raise ImageFormatError(pos, f"xattr entry ({name_len}-byte name, {value_size}-byte "
                                            "value) runs past the end of the xattr body")
            append((name_index, data[pos + _XATTR_ENTRY_SIZE:value_start], value_start,
                    value_end))
            pos = (value_end + 3) & ~3
        return inline, ids

    def xattrs(self, ino: Inode) -> list[XattrEntry]:
        """The inode's xattrs in the order libcomposefs's reader applies them: the inline entries
        in stored order, then the shared ones in the order of their ids."""
        inline, shared_ids = self.xattr_body(ino)
        data = self.data
        result = [XattrEntry(index, bytes(suffix), bytes(data[start:end]), end, False)
                  for index, suffix, start, end in inline]
        shared = self._shared
        for xid in shared_ids:
            result.append(shared.get(xid) or self.shared_xattr(xid))
        return result

    def shared_xattr(self, xid: int) -> XattrEntry:
        """The shared xattr with id ``xid`` (at ``xattr_base + 4 * xid``); cached."""
        entry = self._shared.get(xid)
        if entry is not None:
            return entry
        name_index, suffix, value_start, value_end = self.shared_xattr_at(xid)
        self._shared_bytes_left -= value_end - value_start + len(suffix) + _XATTR_ENTRY_SIZE
        if self._shared_bytes_left < 0:
            raise ImageFormatError(self.xattr_base + 4 * xid,
                                   "shared xattrs overlap more than the image can hold")
        entry = XattrEntry(name_index, suffix, self.data[value_start:value_end], value_end, True)
        self._shared[xid] = entry
        return entry

    def shared_xattr_at(self, xid: int) -> tuple[int, bytes, int, int]:
        """The shared xattr with id ``xid`` as an inline entry of :meth:`xattr_body_at`:
        ``(name_index, suffix, value_start, value_end)``; not cached."""
        pos = self.xattr_base + 4 * xid
        if pos + _XATTR_ENTRY_SIZE > self.size:
            raise ImageFormatError(pos, f"shared xattr id {xid} is beyond the image end")
        data = self.data
        name_len, name_index, value_size = _unpack_xattr_entry(data, pos)
        value_start = pos + _XATTR_ENTRY_SIZE + name_len
        value_end = value_start + value_size
        if value_end > self.size:
            raise ImageFormatError(pos, f"shared xattr id {xid} runs past the image end")
        return name_index, data[pos + _XATTR_ENTRY_SIZE:value_start], value_start, value_end

    # --- data --------------------------------------------------------------------------------

    def extents(self, ino: Inode) -> list[tuple[int, int]]:
        """Where the inode's ``size`` bytes of data are, as ``(offset, length)`` pieces: whole
        blocks from ``i_u`` (the last one partial unless tail-packed), then the inline tail for
        ``FLAT_INLINE``. Every piece is checked to lie inside the image. Chunk-based and other
        layouts are read as ``FLAT_PLAIN`` (what libcomposefs does for directories and
        symlinks); callers decide whether a layout is acceptable."""
        return self.extents_of(ino.nid, ino.offset, ino.layout, ino.size, ino.i_u,
                               ino.tail_offset)

    def extents_of(self, nid: int, offset: int, layout: int, size: int, i_u: int,
                   tail_offset: int) -> list[tuple[int, int]]:
        """:meth:`extents` from the raw inode fields (``offset`` is the inode's, for errors)."""
        if size == 0:
            return []
        n_blocks = (size + EROFS_BLKSIZ - 1) >> EROFS_BLKSIZ_BITS
        if layout == EROFS_INODE_FLAT_INLINE:
            n_oob = n_blocks - 1
            tail = size - (n_oob << EROFS_BLKSIZ_BITS)
        else:
            n_oob = n_blocks
            tail = 0
        pieces: list[tuple[int, int]] = []
        if n_oob:
            start = i_u << EROFS_BLKSIZ_BITS
            oob_bytes = size - tail
            if start + oob_bytes > self.size:
                raise ImageFormatError(offset + 16, f"data of inode nid {nid} (block {i_u}, "
                                                    f"{oob_bytes} bytes) runs past the image end")
            if n_oob == 1:
                pieces.append((start, oob_bytes))
            else:
                for k in range(0, oob_bytes, EROFS_BLKSIZ):
                    pieces.append((start + k, min(EROFS_BLKSIZ, oob_bytes - k)))
        if tail:
            if tail_offset + tail > self.size:
                raise ImageFormatError(offset + 8, f"inline data of inode nid {nid} "
                                                   f"({tail} bytes) runs past the image end")
            pieces.append((tail_offset, tail))
        return pieces

    def data_of(self, nid: int, offset: int, layout: int, size: int, i_u: int,
                tail_offset: int) -> bytes:
        """The ``size`` bytes of data :meth:`extents_of` locates, joined (the caller has
        checked ``size``). Data that is all inline (a tail-packed inode of at most one block)
        is one slice."""
        if layout == EROFS_INODE_FLAT_INLINE and 0 < size <= EROFS_BLKSIZ:
            end = tail_offset + size
            if end > self.size:
                raise ImageFormatError(offset + 8, f"inline data of inode nid {nid} "
                                                   f"({size} bytes) runs past the image end")
            return self.data[tail_offset:end]
        data = self.data
        return b"".join([data[o:o + n] for o, n in self.extents_of(nid, offset, layout, size,
                                                                    i_u, tail_offset)])

    def data_bytes(self, ino: Inode, limit: int) -> bytes:
        """The inode's data (size must be at most ``limit``; checked before reading)."""
        if ino.size > limit:
            raise ImageFormatError(ino.offset + 8, f"inode nid {ino.nid} has size {ino.size}, "
                                                   f"more than {limit}")
        data = self.data
        return b"".join(bytes(data[off:off + n]) for off, n in self.extents(ino))

    # --- directories -------------------------------------------------------------------------

    def lookup(self, names: Sequence[bytes]) -> Inode | None:
        """The inode at the path ``names`` (one name per level) below the root, or None when
        an entry is missing or a name on the way is not a directory (nothing is followed)."""
        ino = self.inode(self.root_nid)
        for name in names:
            if ino.mode & S_IFMT != S_IFDIR:
                return None
            for offset, length in self.extents(ino):
                found, nids, _ = self.dirent_columns(offset, length)
                if name in found:
                    ino = self.inode(nids[found.index(name)])
                    break
            else:
                return None
        return ino

    def dirents(self, ino: Inode) -> Iterator[tuple[bytes, int, int]]:
        """``(name, nid, file_type)`` for every entry of a directory (``.`` and ``..`` included), in
        stored order, block by block, then the inline tail."""
        for offset, length in self.extents(ino):
            yield from self.dirent_block(offset, length)

    def dirent_block(self, offset: int, length: int) -> list[tuple[bytes, int, int]]:
        """Decode one directory block (or inline tail) of ``length`` bytes at ``offset`` into
        ``(name, nid, file_type)`` tuples."""
        names, nids, types = self.dirent_columns(offset, length)
        return list(zip(names, nids, types))

    def dirent_columns(self, offset: int, length: int
                       ) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...]]:
        """Decode one directory block as three sequences: names, nids and file types.

        The first dirent's ``nameoff`` gives the number of dirents; name offsets must not
        decrease and must stay inside the block; the last name ends at the first NUL or at the
        end of the block (the kernel's rules)."""
        if length == 0:
            return [], (), ()
        data = self.data
        if length < _DIRENT_SIZE or length > EROFS_BLKSIZ:
            raise ImageFormatError(offset, f"directory block of {length} bytes")
        nameoff0 = data[offset + 8] | (data[offset + 9] << 8)
        if nameoff0 % _DIRENT_SIZE or nameoff0 > length:
            raise ImageFormatError(offset + 8, f"bad first name offset {nameoff0} in a "
                                               f"{length}-byte directory block")
        n = nameoff0 // _DIRENT_SIZE
        if n == 0:
            return [], (), ()
        unpacker = _DIRENT_TABLES.get(n)
        if unpacker is None:
            unpacker = _DIRENT_TABLES[n] = struct.Struct("<" + "QHBx" * n)
        raw = unpacker.unpack_from(data, offset)
        nids = raw[0::3]
        nameoffs = raw[1::3]
        if nameoffs[-1] > length or (n > 1 and not all(map(_le, nameoffs, nameoffs[1:]))):
            bad = next((i for i in range(1, n) if nameoffs[i] < nameoffs[i - 1]
                        or nameoffs[i] > length), n - 1)
            raise ImageFormatError(offset + bad * _DIRENT_SIZE + 8,
                                   f"bad name offset {nameoffs[bad]} in a {length}-byte "
                                   "directory block")
        block = data[offset:offset + length]
        ends = list(nameoffs[1:])
        nul = block.find(b"\0", nameoffs[-1])
        ends.append(length if nul < 0 else nul)
        names = list(map(block.__getitem__, map(slice, nameoffs, ends)))
        return names, nids, raw[2::3]
