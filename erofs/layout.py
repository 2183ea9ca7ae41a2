"""Pure layout planner: flat inode records -> an ``ImagePlan`` (no bytes are written here).

The records come in BFS order (record 0 is the root) with their final xattrs, already sorted, and
directory entries already sorted. The planner decides, exactly as libcomposefs 1.0.8 does:
compact or extended inodes, the shared xattr table, per-inode xattr bodies, directory block
splits, inline tails versus data blocks, the tail padding rule, nids, and the data block numbers.

**Placement** (per record, in order, from byte 1152): the inode starts at the next multiple of
32 (its nid is that offset / 32), followed by its xattr body and its inline tail. The tail (the
last partial block of a file or directory, up to 2048 bytes; an external file's chunk indexes)
must not cross a block boundary: when it would, zero padding is put *before the inode* so that
the tail starts just after the boundary (the inode and xattrs may cross blocks). A symlink whose
inode, xattrs and target would cross a block starts at the next block instead, and one whose
total reaches 4096 bytes moves its target to a data block.

**External files** are chunk based: the chunk size is the file size rounded up to a power of two
(at least 4096, at most 2^43), and at most 1024 chunk indexes are allowed (``File too large``
beyond, about 2^53 bytes). Files above about 8.9e15 bytes (more than 1017 chunks) take the
"does not fit" branch of the tail rule and get a full data block of 0xFF indexes instead of an
inline map, exactly as mkcomposefs 1.0.8 writes them (fsck.erofs from erofs-utils 1.5 cannot
decode that layout).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import chain

from .errors import LayoutError
from .format import (
    EROFS_BLKSIZ,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_MAX_INLINE_TAIL,
    EROFS_SLOTSIZE,
    EROFS_SUPER_OFFSET,
    LCFS_MAX_NONINLINE_CHUNKS,
    LCFS_MAX_SHARED_XATTRS,
    SUPER_BLOCK,
    XATTR_ENTRY,
    round_up,
    xattr_filter_bit,
    xattr_prefix_split,
)
from .format import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG  # file type bits

#: where the inode table starts: right after the superblock.
INODES_START = EROFS_SUPER_OFFSET + SUPER_BLOCK.size
_ACL_KEYS = (b"system.posix_acl_access", b"system.posix_acl_default")
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


class InodeRecord:
    """One inode as the writer sees it, after all composefs policy has been applied.

    ``size`` is the node's stored size (for chr/blk/fifo/socket the source's SIZE, which only the
    compact test reads). ``xattrs`` is a list of ``(key, value)`` sorted by key. ``dirents`` (for
    directories) lists ``(name, record index)`` sorted by name, ``.`` and ``..`` included.
    ``data`` is a symlink target or inline file content. ``external`` marks a regular file whose
    data lives outside the image (chunk-based, described by overlay xattrs).

    The planner never changes a record: its results are ``InodePlan`` objects, one per record.
    """

    __slots__ = ("mode", "nlink", "uid", "gid", "rdev", "size", "mtime_sec", "mtime_nsec",
                 "xattrs", "dirents", "data", "external")

    def __init__(self, mode: int, nlink: int, uid: int, gid: int, rdev: int, size: int,
                 mtime_sec: int, mtime_nsec: int, xattrs: list[tuple[bytes, bytes]],
                 dirents: list[tuple[bytes, int]] | None = None, data: bytes | None = None,
                 external: bool = False) -> None:
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = size
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        self.xattrs = xattrs
        self.dirents = dirents
        self.data = data
        self.external = external


_pack_entry_header = XATTR_ENTRY.pack
#: zero bytes that pad an entry of (suffix + value) length n to 4 bytes: _PADDING[n & 3]
_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")


class XattrEntryInfo:
    """One shared (key, value) pair: its encoded entry (header, name suffix, value, zero padding
    to 4 bytes), its offset in the shared table, and (set by the writer) its encoded id."""

    __slots__ = ("raw", "shared_offset", "ref")

    def __init__(self, index: int, suffix: bytes, value: bytes, shared_offset: int) -> None:
        self.raw = (_pack_entry_header(len(suffix), index, len(value)) + suffix + value
                    + _PADDING[(len(suffix) + len(value)) & 3])
        self.shared_offset = shared_offset
        self.ref = b""


@dataclass(slots=True)
class InodePlan:
    """Where and how one ``InodeRecord`` is stored: the planner's result for it."""

    #: node number: byte offset of the inode / 32
    nid: int
    #: 32-byte compact inode (mtime = build time, small ids) or 64-byte extended
    compact: bool
    #: EROFS_INODE_FLAT_PLAIN, _FLAT_INLINE or _CHUNK_BASED
    datalayout: int
    #: the inode's i_size field
    i_size: int
    #: the inode's i_u field: first data block, rdev, or chunk format
    i_u: int
    #: zero bytes between the end of the previous inode and this one
    pad: int
    #: size of the xattr body (0: none): ibody header, 4-byte shared ids, inline entries
    xattr_size: int
    #: shared xattrs referenced by id, in the record's key order
    shared: list[XattrEntryInfo]
    #: the other xattrs, stored in the body as (key, value)
    inline: list[tuple[bytes, bytes]]
    #: stored (inverted) xattr name bloom filter
    name_filter: int
    #: bytes stored inline right after the inode and its xattr body
    tail: int
    #: data blocks of the inode, starting at block ``first_block``
    n_blocks: int
    first_block: int
    #: a directory's dirent index ranges per block; the last is the inline tail when ``tail`` > 0
    dir_chunks: list[tuple[int, int]]
    #: log2 of the chunk size of an external file (0 for anything else)
    chunkbits: int


@dataclass(slots=True)
class ImagePlan:
    """Everything the writer needs to emit an image."""

    records: list[InodeRecord]
    #: placement of ``records[i]`` is ``inodes[i]``
    inodes: list[InodePlan]
    key_info: dict[bytes, tuple[int, bytes, int]]   # xattr key -> (name index, suffix, filter mask)
    shared_table: list[XattrEntryInfo]
    shared_size: int
    inodes_end: int
    data_start: int
    n_data_blocks: int
    build_time: int
    build_time_nsec: int
    has_acl: bool

    @property
    def image_size(self) -> int:
        return self.data_start + self.n_data_blocks * EROFS_BLKSIZ


_NO_CHUNKS: list[tuple[int, int]] = []
#: an InodePlan's ``shared`` / ``inline`` when it has none (shared, never changed)
_NO_SHARED: list[XattrEntryInfo] = []
_NO_INLINE: list[tuple[bytes, bytes]] = []


def dirent_split(dirents: list[tuple[bytes, int]]) -> tuple[list[tuple[int, int]], int]:
    """Split sorted dirents into full-block index ranges plus an inline tail.

    Returns ``(chunks, tail_bytes)``: ``chunks`` lists ``(start, end)`` ranges, one per data block,
    and the last range is the inline tail when ``tail_bytes`` > 0."""
    chunks: list[tuple[int, int]] = []
    block_size = 0
    first = 0
    for i, (name, _) in enumerate(dirents):
        length = 12 + len(name)
        if block_size + length > EROFS_BLKSIZ:
            chunks.append((first, i))
            block_size = 0
            first = i
        block_size += length
    chunks.append((first, len(dirents)))
    if block_size > EROFS_MAX_INLINE_TAIL:
        return chunks, 0
    return chunks, block_size


def _min_mtime(records: list[InodeRecord]) -> tuple[int, int]:
    best = (records[0].mtime_sec, records[0].mtime_nsec)
    for rec in records:
        if rec.mtime_sec <= best[0]:
            cand = (rec.mtime_sec, rec.mtime_nsec)
            if cand < best:
                best = cand
    return best


def plan_image(records: list[InodeRecord]) -> ImagePlan:
    """Lay out ``records`` (BFS order, root first) exactly as mkcomposefs 1.0.8 would."""
    # --- shared xattrs: count identical (key, value) pairs over all inodes ---------------------
    # (Counter counts in C: half the time of a Python loop, which the 2M-entry build felt)
    counts = Counter(chain.from_iterable([rec.xattrs for rec in records]))
    shared_pairs = sorted((p for p, n in counts.items() if n > 1),
                          key=lambda p: (p[0], len(p[1]), p[1]), reverse=True)
    del counts
    key_info: dict[bytes, tuple[int, bytes, int]] = {}   # key -> (index, suffix, filter mask)
    has_acl = False

    def split_key(key: bytes) -> tuple[int, bytes, int]:
        nonlocal has_acl
        index, suffix = xattr_prefix_split(key)
        info = key_info[key] = (index, suffix, 1 << xattr_filter_bit(index, suffix))
        if key in _ACL_KEYS:
            has_acl = True
        return info

    shared_infos: dict[tuple[bytes, bytes], XattrEntryInfo] = {}
    shared_table = []
    offset = 0
    for pair in shared_pairs:
        index, suffix, _ = key_info.get(pair[0]) or split_key(pair[0])
        info = shared_infos[pair] = XattrEntryInfo(index, suffix, pair[1], offset)
        offset += len(info.raw)
        shared_table.append(info)
    shared_size = offset
    get_key_info = key_info.get
    get_shared = shared_infos.get

    build_time, build_time_nsec = _min_mtime(records)

    # --- per-inode placement -----------------------------------------------------------------
    pos = INODES_START
    n_data_blocks = 0
    inodes: list[InodePlan] = []
    add_inode = inodes.append
    for rec in records:
        ftype = rec.mode & S_IFMT
        dir_chunks: list[tuple[int, int]] = _NO_CHUNKS
        chunkbits = 0
        # (n_blocks, tail)
        if ftype == S_IFDIR:
            assert rec.dirents is not None
            dir_chunks, tail = dirent_split(rec.dirents)
            n_blocks = len(dir_chunks) - (1 if tail else 0)
            size = n_blocks * EROFS_BLKSIZ + tail
        elif ftype == S_IFLNK:
            assert rec.data is not None
            n_blocks, tail = 0, len(rec.data)
            size = rec.size
        elif ftype == S_IFREG and rec.size > 0:
            if rec.external:
                chunkbits = (rec.size - 1).bit_length()
                if chunkbits <= 12:
                    chunkbits, chunk_count = 12, 1
                else:
                    if chunkbits > 43:
                        chunkbits = 43
                    chunk_count = ((rec.size - 1) >> chunkbits) + 1
                if chunk_count > LCFS_MAX_NONINLINE_CHUNKS:
                    raise LayoutError("File too large")
                n_blocks, tail = 0, 4 * chunk_count
            else:
                n_blocks, tail = divmod(rec.size, EROFS_BLKSIZ)
                if tail > EROFS_MAX_INLINE_TAIL:
                    n_blocks += 1
                    tail = 0
            size = rec.size
        else:
            n_blocks, tail = 0, 0
            size = rec.size

        compact = (rec.mtime_sec == build_time and rec.mtime_nsec == build_time_nsec
                   and rec.nlink <= _U16 and rec.uid <= _U16 and rec.gid <= _U16
                   and size <= _U32)
        isz = 32 if compact else 64

        # xattr body
        shared: list[XattrEntryInfo] = _NO_SHARED
        inline: list[tuple[bytes, bytes]] = _NO_INLINE
        name_filter = 0
        xsize = 0
        xattrs = rec.xattrs
        if xattrs:
            inline = xattrs
            inline_size = 0
            for i, pair in enumerate(xattrs):
                ki = get_key_info(pair[0]) or split_key(pair[0])
                name_filter |= ki[2]
                shared_info = get_shared(pair) if shared_infos else None
                if shared_info is not None and len(shared) < LCFS_MAX_SHARED_XATTRS:
                    if shared is _NO_SHARED:   # the first shared one: the pairs before it
                        shared = []            # are inline (until now ``inline`` is the
                        inline = xattrs[:i]    # record's own list, not a copy)
                    shared.append(shared_info)
                else:
                    if inline is not xattrs:
                        inline.append(pair)
                    inline_size += (7 + len(ki[1]) + len(pair[1])) & ~3
            xsize = 12 + 4 * len(shared) + inline_size
            name_filter = _U32 & ~name_filter

        # placement
        p = (pos + 31) & ~31
        if ftype == S_IFLNK:
            total = isz + xsize + tail
            if total >= EROFS_BLKSIZ:
                n_blocks += 1
                tail = 0
            crosses = p // EROFS_BLKSIZ != (p + total - 1) // EROFS_BLKSIZ
            extra = (round_up(p, EROFS_BLKSIZ) - p) if crosses else 0
        else:
            remainder = EROFS_BLKSIZ - ((p + isz + xsize) % EROFS_BLKSIZ)
            extra = 0
            if remainder < tail:
                extra = round_up(remainder, EROFS_SLOTSIZE)
                remainder = EROFS_BLKSIZ - ((p + isz + xsize + extra) % EROFS_BLKSIZ)
                if tail > remainder:
                    n_blocks += 1
                    tail = 0
                    extra = round_up(p, EROFS_BLKSIZ) - p
        start = p + extra

        # datalayout, i_size
        datalayout = EROFS_INODE_FLAT_INLINE if tail > 0 else EROFS_INODE_FLAT_PLAIN
        if ftype == S_IFDIR:
            i_size = size
        elif ftype == S_IFREG:
            i_size = rec.size
            if rec.size > 0 and rec.external:
                datalayout = EROFS_INODE_CHUNK_BASED
        elif ftype == S_IFLNK:
            i_size = tail if n_blocks == 0 else rec.size
        else:
            i_size = 0

        add_inode(InodePlan(start >> 5, compact, datalayout, i_size, 0, start - pos, xsize, shared,
                            inline, name_filter, tail, n_blocks, 0, dir_chunks, chunkbits))
        n_data_blocks += n_blocks
        pos = start + isz + xsize + tail

    inodes_end = round_up(pos, EROFS_SLOTSIZE)
    data_start = round_up(inodes_end + shared_size, EROFS_BLKSIZ)

    # --- data blocks in BFS order, i_u ---------------------------------------------------------
    block = data_start // EROFS_BLKSIZ
    for rec, ino in zip(records, inodes):
        ftype = rec.mode & S_IFMT
        if ftype == S_IFCHR or ftype == S_IFBLK:
            ino.i_u = rec.rdev & _U32
        elif ftype == S_IFDIR or ftype == S_IFREG or ftype == S_IFLNK:
            if ino.n_blocks:
                ino.first_block = block
                ino.i_u = block & _U32
                block += ino.n_blocks
            if ino.datalayout == EROFS_INODE_CHUNK_BASED:
                ino.i_u = (ino.i_u & 0xFFFF0000) | (ino.chunkbits - 12)

    return ImagePlan(records=records, inodes=inodes, key_info=key_info, shared_table=shared_table,
                     shared_size=shared_size, inodes_end=inodes_end, data_start=data_start,
                     n_data_blocks=n_data_blocks, build_time=build_time,
                     build_time_nsec=build_time_nsec, has_acl=has_acl)
