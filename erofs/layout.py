"""The inode table of an image: each record is placed and packed in one pass, as mkcomposefs 1.0.8
places it.

The records come in BFS order (record 0 is the root) with their final xattrs, already sorted, and
directory entries already sorted. The rules, exactly those of libcomposefs 1.0.8: compact or
extended inodes, the shared xattr table, per-inode xattr bodies, directory block splits, inline
tails versus data blocks, the tail padding rule, nids, and the data block numbers.

**Shared xattrs** (``plan_xattrs``, before any inode is placed): every (key, value) pair used by
more than one inode goes to the shared table, sorted by key, value length and value, descending;
an inode references at most 128 of them, the rest of its xattrs are stored in its own body.

**Placement** (``lay_out_inodes``, per record, in order, from byte 1152): the inode starts at the
next multiple of 32 (its nid is that offset / 32), followed by its xattr body and its inline tail.
The tail (the last partial block of a file or directory, up to 2048 bytes; an external file's
chunk indexes) must not cross a block boundary: when it would, zero padding is put *before the
inode* so that the tail starts just after the boundary (the inode and xattrs may cross blocks). A
symlink whose inode, xattrs and target would cross a block starts at the next block instead, and
one whose total reaches 4096 bytes moves its target to a data block. Data blocks are numbered in
record order after the inode table and the shared xattr table.

The pass writes each inode, its xattr body and its inline tail as soon as its offset is known and
keeps per inode only its nid and dirent file type. What depends on later inodes is noted in the
``InodeTable`` for the writer (``erofs.writer``): directory contents (they need the children's
nids), the block numbers in ``i_u`` and the shared xattr ids (both depend on where the inode table
ends).

**External files** are chunk based: the chunk size is the file size rounded up to a power of two
(at least 4096, at most 2^43), and at most 1024 chunk indexes are allowed (``File too large``
beyond, about 2^53 bytes). Files above about 8.9e15 bytes (more than 1017 chunks) take the
"does not fit" branch of the tail rule and get a full data block of 0xFF indexes instead of an
inline map, exactly as mkcomposefs 1.0.8 writes them (fsck.erofs from erofs-utils 1.5 cannot
decode that layout).
"""

from __future__ import annotations

import struct
from sys import getrefcount
from array import array
from collections import Counter
from bisect import bisect_right
from collections.abc import Callable
from functools import partial
from itertools import accumulate, chain, groupby
from operator import attrgetter, itemgetter

from .errors import LayoutError
from .format import (
    EROFS_BLKSIZ,
    EROFS_FT_BLKDEV,
    EROFS_FT_CHRDEV,
    EROFS_FT_DIR,
    EROFS_FT_FIFO,
    EROFS_FT_REG_FILE,
    EROFS_FT_SOCK,
    EROFS_FT_SYMLINK,
    EROFS_FT_UNKNOWN,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_MAX_INLINE_TAIL,
    EROFS_SUPER_OFFSET,
    INODE_COMPACT,
    INODE_COMPACT_FIELDS,
    INODE_EXTENDED,
    INODE_EXTENDED_FIELDS,
    LCFS_MAX_NONINLINE_CHUNKS,
    LCFS_MAX_SHARED_XATTRS,
    SUPER_BLOCK,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
    xattr_filter_bit,
    xattr_prefix_split,
)
from .format import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK  # file type bits

#: where the inode table starts: right after the superblock.
INODES_START = EROFS_SUPER_OFFSET + SUPER_BLOCK.size
_ACL_KEYS = (b"system.posix_acl_access", b"system.posix_acl_default")
#: references to an xattrs list held by one record only, while the layout looks at it: the
#: record's, the loop's and ``getrefcount``'s own
_OWN_LIST_REFS = 3
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


class InodeRecord:
    """One inode as the writer sees it, after all composefs policy has been applied.

    ``size`` is the node's stored size (for chr/blk/fifo/socket the source's SIZE, which only the
    compact test reads). ``xattrs`` is a list of ``(key, value)`` sorted by key. ``dirents`` (for
    directories) lists ``(name, record index)`` sorted by name, ``.`` and ``..`` included.
    ``data`` is a symlink target or inline file content. ``external`` marks a regular file whose
    data lives outside the image (chunk-based, described by overlay xattrs).

    The layout never changes a record.
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


class InlineEntries(dict[int, Callable[[bytes], bytes]]):
    """The inline entries of one xattr key, by value size: a packer ``value -> entry`` (entry
    header, name suffix, value, zero padding to 4 bytes), made once per size."""

    __slots__ = ("name_index", "suffix")

    def __init__(self, name_index: int, suffix: bytes) -> None:
        super().__init__()
        self.name_index = name_index
        self.suffix = suffix

    def new(self, value_size: int) -> Callable[[bytes], bytes]:
        """The packer for values of ``value_size`` bytes (remembered)."""
        head, padding = self.head(value_size)
        layout = struct.Struct(f"<{len(head)}s{value_size}s{padding}x")
        pack = self[value_size] = partial(layout.pack, head)
        return pack

    def head(self, value_size: int) -> tuple[bytes, int]:
        """An entry's bytes before a value of ``value_size`` bytes (header and name suffix),
        and the zero bytes after it."""
        head = _pack_entry_header(len(self.suffix), self.name_index, value_size) + self.suffix
        return head, -(len(head) + value_size) & 3


class InodePackers(dict[int, Callable[..., None]]):
    """``pack_into`` of an inode struct followed by ``n`` more bytes (its xattr body, and an
    external file's chunk index), by ``n``: the inode and what follows it in one call."""

    __slots__ = ("inode_format",)

    def __init__(self, inode: struct.Struct) -> None:
        super().__init__()
        self.inode_format = inode.format

    def new(self, n: int) -> Callable[..., None]:
        """The packer for ``n`` bytes after the inode (remembered)."""
        pack = self[n] = struct.Struct(f"{self.inode_format}{n}s").pack_into
        return pack


class XattrPlan:
    """The xattr decisions taken over all records before any inode is placed: the shared table
    and, per key seen so far, ``(filter mask, inline entries)``."""

    __slots__ = ("key_info", "shared", "table", "size", "has_acl")

    def __init__(self) -> None:
        self.key_info: dict[bytes, tuple[int, InlineEntries]] = {}
        #: (key, value) -> its 4-byte id relative to the table's start (the writer adds the
        #: table's position in its block: the kernel resolves an id as
        #: ``xattr_blkaddr * 4096 + id * 4``)
        self.shared: dict[tuple[bytes, bytes], bytes] = {}
        #: the shared entries in table order, encoded as inline ones are (header, name suffix,
        #: value, zero padding to 4 bytes)
        self.table: list[bytes] = []
        #: bytes of the shared table
        self.size = 0
        #: some inode has a POSIX ACL (the header's HAS_ACL flag): set as keys are first seen,
        #: so final once ``lay_out_inodes`` has seen every record
        self.has_acl = False

    def split_key(self, key: bytes) -> tuple[int, InlineEntries]:
        """``(filter mask, inline entries)`` of ``key``, remembered in ``key_info``."""
        index, suffix = xattr_prefix_split(key)
        info = self.key_info[key] = (1 << xattr_filter_bit(index, suffix),
                                     InlineEntries(index, suffix))
        if key in _ACL_KEYS:
            self.has_acl = True
        return info


def plan_xattrs(records: list[InodeRecord]) -> XattrPlan:
    """The shared xattr table of ``records``: each (key, value) pair used more than once."""
    plan = XattrPlan()
    # (Counter counts in C: half the time of a Python loop, which the 2M-entry build felt)
    counts = Counter(chain.from_iterable(map(attrgetter("xattrs"), records)))
    shared_pairs = [p for p, n in counts.items() if n > 1]
    del counts
    key_info = plan.key_info
    shared = plan.shared
    table = plan.table
    offset = 0
    # the table's order, (key, value length, value) descending, group by group: pairs sorted
    # as tuples (in C, no key function) are in that order within each key whose values have
    # one length (an external file's metacopy or redirect), others are sorted again; then each
    # group of one key and value length is packed with one packer, its ids one step apart
    shared_pairs.sort(reverse=True)
    for key, group in groupby(shared_pairs, _key_of):
        pairs = list(group)
        if len(set(map(len, map(_value_of, pairs)))) > 1:
            pairs.sort(key=_length_and_value, reverse=True)
        entries = (key_info.get(key) or plan.split_key(key))[1]
        for size, same_size in groupby(pairs, _value_length):
            run = list(same_size)
            pack = entries.get(size) or entries.new(size)
            raws = list(map(pack, map(_value_of, run)))
            step = len(raws[0])
            shared.update(zip(run, map(_u32_bytes, range(offset >> 2, (offset + step * len(run))
                                                         >> 2, step >> 2))))
            offset += step * len(run)
            table += raws
    plan.size = offset
    return plan


_key_of = itemgetter(0)
_value_of = itemgetter(1)
_u32_bytes = struct.Struct("<I").pack


def _value_length(pair: tuple[bytes, bytes]) -> int:
    return len(pair[1])


def _length_and_value(pair: tuple[bytes, bytes]) -> tuple[int, bytes]:
    return len(pair[1]), pair[1]


def dirent_split(dirents: list[tuple[bytes, int]]) -> tuple[list[tuple[int, int]], int]:
    """Split sorted dirents into full-block index ranges plus an inline tail.

    Returns ``(chunks, tail_bytes)``: ``chunks`` lists ``(start, end)`` ranges, one per data block,
    and the last range is the inline tail when ``tail_bytes`` > 0. Each block takes as many
    dirents (12 bytes plus the name) as fit in 4096 bytes."""
    # ends[i]: bytes of dirents 0..i together; a block from ``first`` takes the dirents whose
    # end is within 4096 bytes of the end of the previous block
    ends = list(accumulate(map(_plus_dirent, map(len, map(_name_of, dirents)))))
    n = len(dirents)
    chunks: list[tuple[int, int]] = []
    first = 0
    used = 0
    while True:
        end = bisect_right(ends, used + EROFS_BLKSIZ, first)
        if end >= n:
            break
        chunks.append((first, end))
        first = end
        used = ends[end - 1]
    chunks.append((first, n))
    block_size = ends[-1] - used if n else 0
    if block_size > EROFS_MAX_INLINE_TAIL:
        return chunks, 0
    return chunks, block_size


_name_of = itemgetter(0)
_plus_dirent = (12).__add__


#: where ``i_u`` is in a compact and in an extended inode
I_U_COMPACT = INODE_COMPACT_FIELDS["i_u"]
I_U_EXTENDED = INODE_EXTENDED_FIELDS["i_u"]
#: dirent file type by ``mode >> 12``
_FILE_TYPES = [{S_IFREG: EROFS_FT_REG_FILE, S_IFDIR: EROFS_FT_DIR, S_IFCHR: EROFS_FT_CHRDEV,
                S_IFBLK: EROFS_FT_BLKDEV, S_IFIFO: EROFS_FT_FIFO, S_IFSOCK: EROFS_FT_SOCK,
                S_IFLNK: EROFS_FT_SYMLINK}.get(t << 12, EROFS_FT_UNKNOWN) for t in range(16)]
_FF = b"\xff" * (4 * LCFS_MAX_NONINLINE_CHUNKS)
#: the largest file of one chunk (chunkbits is at most 43)
_MAX_SINGLE_CHUNK = 1 << 43
#: ``i_format`` of a chunk-based compact and extended inode
_CHUNK_BASED_COMPACT = EROFS_INODE_CHUNK_BASED << 1
_CHUNK_BASED_EXTENDED = (EROFS_INODE_CHUNK_BASED << 1) | 1
_ZEROS = bytes(1 << 20)


def extend_with_zeros(buffer: bytearray, n: int) -> None:
    """Append ``n`` zero bytes to ``buffer`` a MiB at a time (no temporary of size ``n``: the
    image buffer is the largest object of a build)."""
    while n > len(_ZEROS):
        buffer += _ZEROS
        n -= len(_ZEROS)
    buffer += _ZEROS[:n]


class InodeTable:
    """The packed inode table and what the writer must still fill in.

    ``data`` holds the image from offset 0 up to ``end`` (the end of the last inode's tail);
    header, superblock and everything after ``end`` are still zeros, and ``data`` may be longer.
    Blocks are numbered from 0 = the first data block (the writer adds the data area's start).
    """

    __slots__ = ("data", "end", "nids", "file_types", "build_time", "build_time_nsec",
                 "n_blocks", "dirs", "dir_chunks", "blocks", "block_addrs", "shared_refs")

    def __init__(self) -> None:
        self.data = bytearray()
        self.end = INODES_START
        #: nid of each record
        self.nids = array("Q")
        #: dirent file type (``EROFS_FT_*``) of each record
        self.file_types = bytearray()
        #: mtime of the compact inodes (the oldest of all), in the superblock
        self.build_time = 0
        self.build_time_nsec = 0
        #: data blocks of all inodes
        self.n_blocks = 0
        #: per directory, 4 numbers: its record index, the offset of its inline tail (-1: none),
        #: the tail's size, its first data block (-1: none)
        self.dirs = array("q")
        #: the dirent index ranges (``dirent_split``) of the directories larger than a block
        self.dir_chunks: dict[int, list[tuple[int, int]]] = {}
        #: the other inodes with data blocks: (first block, number of blocks, bytes of the first
        #: block or None for a block of 0xFF chunk indexes); mkcomposefs writes only the first
        self.blocks: list[tuple[int, int, bytes | None]] = []
        #: inodes with data blocks: (offset of ``i_u``, first block, chunk format or -1)
        self.block_addrs: list[tuple[int, int, int]] = []
        #: where the 4-byte shared xattr ids are (written relative to the shared table), as
        #: offsets / 4 (the ids are 4-aligned)
        self.shared_refs = array("Q")


def fits_compact(mtime_sec: int, mtime_nsec: int, nlink: int, uid: int, gid: int, size: int,
                 build_time: int, build_time_nsec: int) -> bool:
    """Whether an inode is compact (32 bytes) rather than extended: its mtime is the image's
    build time (the oldest mtime), nlink, uid and gid fit 16 bits and its size 32 (the rule
    of ``lay_out_inodes``, which spells it out on its path for external files)."""
    return (mtime_sec == build_time and mtime_nsec == build_time_nsec and nlink <= _U16
            and uid <= _U16 and gid <= _U16 and size <= _U32)


def _pair_header(xattrs: XattrPlan, key0: bytes, key1: bytes
                 ) -> tuple[bytes, InlineEntries, InlineEntries]:
    """The body header (no shared refs) of two inline xattrs with these keys, and the inline
    entries of each key."""
    mask0, entries0 = xattrs.key_info.get(key0) or xattrs.split_key(key0)
    mask1, entries1 = xattrs.key_info.get(key1) or xattrs.split_key(key1)
    return XATTR_IBODY_HEADER.pack(_U32 & ~(mask0 | mask1), 0, b""), entries0, entries1


def _pair_shape(xattrs: XattrPlan, shape_key: tuple[bytes, bytes, int, int]
                ) -> tuple[bytes, Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """The body header (no shared refs) and the inline entry packers of two xattrs with
    these keys and value sizes."""
    key0, key1, size0, size1 = shape_key
    header, entries0, entries1 = _pair_header(xattrs, key0, key1)
    return (header, entries0.get(size0) or entries0.new(size0),
            entries1.get(size1) or entries1.new(size1))


#: an external file's inode with two inline xattrs and one chunk index, packed in one call:
#: ``(pack_into, body header, entry head 0, entry head 1, xattr body size)`` by
#: ``(compact, key 0, key 1, value size 0, value size 1)``
_FusedPacker = tuple[Callable[..., None], bytes, bytes, bytes, int]


def _fused_external(xattrs: XattrPlan, compact: bool,
                    shape_key: tuple[bytes, bytes, int, int]) -> _FusedPacker:
    """The one-call packer of an external file's inode (compact or extended), its body of two
    inline xattrs with these keys and value sizes, and its 0xFF chunk index."""
    key0, key1, size0, size1 = shape_key
    header, entries0, entries1 = _pair_header(xattrs, key0, key1)
    head0, pad0 = entries0.head(size0)
    head1, pad1 = entries1.head(size1)
    inode = INODE_COMPACT if compact else INODE_EXTENDED
    layout = struct.Struct(f"{inode.format}{len(header)}s{len(head0)}s{size0}s{pad0}x"
                           f"{len(head1)}s{size1}s{pad1}x4s")
    body_size = len(header) + len(head0) + size0 + pad0 + len(head1) + size1 + pad1
    return layout.pack_into, header, head0, head1, body_size


def lay_out_inodes(records: list[InodeRecord], xattrs: XattrPlan) -> InodeTable:
    """Place and pack ``records`` (BFS order, root first) exactly as mkcomposefs 1.0.8 would."""
    table = InodeTable()
    build_time, build_time_nsec = min(map(attrgetter("mtime_sec", "mtime_nsec"), records))
    table.build_time, table.build_time_nsec = build_time, build_time_nsec
    out = bytearray(INODES_START + 160 * len(records) + EROFS_BLKSIZ)   # grows when needed
    capacity = len(out)
    add_nid = table.nids.append
    add_file_type = table.file_types.append
    add_dir = table.dirs.extend
    add_block = table.blocks.append
    dir_chunks = table.dir_chunks
    add_block_addr = table.block_addrs.append
    add_shared_refs = table.shared_refs.extend
    add_shared_ref = table.shared_refs.append
    file_types = _FILE_TYPES
    pack_compact = INODE_COMPACT.pack_into
    pack_extended = INODE_EXTENDED.pack_into
    pack_ihdr = XATTR_IBODY_HEADER.pack
    get_key_info = xattrs.key_info.get
    split_key = xattrs.split_key
    get_shared = xattrs.shared.get if xattrs.shared else None
    names_of = _name_of
    ff = _FF
    ff4 = _FF[:4]

    pos = INODES_START
    block = 0                 # next data block
    # id(xattrs list) -> (its body, its number of shared refs, the body followed by one 0xFF
    # chunk index), for lists held by several records
    bodies: dict[int, tuple[bytes, int, bytes | None]] = {}
    compact_with = InodePackers(INODE_COMPACT)
    extended_with = InodePackers(INODE_EXTENDED)
    body_ff: bytes | None = None
    known_body = bodies.get
    # (key, key, value size, value size) -> (xattr body header, packer, packer)
    shapes: dict[tuple[bytes, bytes, int, int], tuple[bytes, Callable[[bytes], bytes],
                                                       Callable[[bytes], bytes]]] = {}
    get_shape = shapes.get
    # (compact, key, key, value size, value size) -> _fused_external
    fused: dict[tuple[bool, bytes, bytes, int, int], _FusedPacker] = {}
    get_fused = fused.get
    def add_ref_words(q: int, n_refs: int) -> None:
        """Note where the ``n_refs`` shared xattr ids of the body at ``q`` are (after its
        12-byte header), for the writer."""
        ref_word = (q + 12) >> 2
        add_shared_ref(ref_word)
        if n_refs == 2:
            add_shared_ref(ref_word + 1)
        elif n_refs > 2:
            add_shared_refs(range(ref_word + 1, ref_word + n_refs))

    body = b""
    n_refs = 0
    for index, rec in enumerate(records):
        mode = rec.mode
        ftype = mode & S_IFMT
        size = rec.size
        if rec.external and ftype == S_IFREG and 0 < size <= _MAX_SINGLE_CHUNK:
            # an external file of one chunk: its 4-byte chunk index, 4-aligned, never crosses
            # a block, so no tail rule applies; the two common cases in one call each
            rec_xattrs = rec.xattrs
            known = known_body(id(rec_xattrs))
            if known is not None or (len(rec_xattrs) == 2 and (get_shared is None or (
                    get_shared(rec_xattrs[0]) is None and get_shared(rec_xattrs[1]) is None))):
                # (``fits_compact``, spelled out: this path takes most records)
                compact = (rec.mtime_sec == build_time and rec.mtime_nsec == build_time_nsec
                           and rec.nlink <= _U16 and rec.uid <= _U16 and rec.gid <= _U16
                           and size <= _U32)
                if known is not None:
                    # an xattr list several records hold (files with the same contents): its
                    # body, with the chunk index, is known
                    body, n_refs, body_ff = known
                    assert body_ff is not None
                    xsize, tail_size = len(body), len(body_ff)
                else:
                    # two xattrs of its own stored inline (its metacopy and redirect)
                    (key0, value0), (key1, value1) = rec_xattrs
                    fused_key = (compact, key0, key1, len(value0), len(value1))
                    pack_fused, header, head0, head1, xsize = get_fused(fused_key) or \
                        fused.setdefault(fused_key,
                                         _fused_external(xattrs, compact, fused_key[1:]))
                    n_refs = 0
                    tail_size = xsize + 4
                p = (pos + 31) & ~31
                q = p + 32 if compact else p + 64
                pos = q + tail_size
                if pos > capacity:
                    extend_with_zeros(out, max(capacity >> 1, pos - capacity))
                    capacity = len(out)
                chunkbits = (size - 1).bit_length()
                i_u = chunkbits - 12 if chunkbits > 12 else 0
                # (four calls that differ in what follows the inode's fields, and not a call
                # with *arguments: that took the layout of the 2M dump 10% longer)
                if known is not None:
                    packers = compact_with if compact else extended_with
                    pack_with = packers.get(tail_size) or packers.new(tail_size)
                    if compact:
                        pack_with(out, p, _CHUNK_BASED_COMPACT, (xsize - 8) >> 2, mode & _U16,
                                  rec.nlink, size, 0, i_u, index, rec.uid, rec.gid, 0, body_ff)
                    else:
                        pack_with(out, p, _CHUNK_BASED_EXTENDED, (xsize - 8) >> 2, mode & _U16,
                                  0, size, i_u, index, rec.uid & _U32, rec.gid & _U32,
                                  rec.mtime_sec & _U64, rec.mtime_nsec & _U32, rec.nlink & _U32,
                                  b"", body_ff)
                elif compact:
                    pack_fused(out, p, _CHUNK_BASED_COMPACT, (xsize - 8) >> 2, mode & _U16,
                               rec.nlink, size, 0, i_u, index, rec.uid, rec.gid, 0,
                               header, head0, value0, head1, value1, ff4)
                else:
                    pack_fused(out, p, _CHUNK_BASED_EXTENDED, (xsize - 8) >> 2, mode & _U16, 0,
                               size, i_u, index, rec.uid & _U32, rec.gid & _U32,
                               rec.mtime_sec & _U64, rec.mtime_nsec & _U32, rec.nlink & _U32,
                               b"", header, head0, value0, head1, value1, ff4)
                if n_refs:
                    add_ref_words(q, n_refs)
                add_nid(p >> 5)
                add_file_type(EROFS_FT_REG_FILE)
                continue
        # --- data: (n_blocks, tail), i_size, i_u, data layout -------------------------------------
        n_blocks = 0
        i_u = 0
        if ftype == S_IFREG:
            i_size = size
            if size <= 0:
                tail = 0
                datalayout = EROFS_INODE_FLAT_PLAIN
            elif rec.external:
                chunkbits = (size - 1).bit_length()
                if chunkbits <= 12:
                    chunkbits, chunk_count = 12, 1
                else:
                    if chunkbits > 43:
                        chunkbits = 43
                    chunk_count = ((size - 1) >> chunkbits) + 1
                if chunk_count > LCFS_MAX_NONINLINE_CHUNKS:
                    raise LayoutError("File too large")
                tail = 4 * chunk_count
                datalayout = EROFS_INODE_CHUNK_BASED
                i_u = chunkbits - 12
            else:
                n_blocks, tail = divmod(size, EROFS_BLKSIZ)
                if tail > EROFS_MAX_INLINE_TAIL:
                    n_blocks += 1
                    tail = 0
                datalayout = EROFS_INODE_FLAT_INLINE if tail else EROFS_INODE_FLAT_PLAIN
        elif ftype == S_IFDIR:
            dirents = rec.dirents
            assert dirents is not None
            tail = 12 * len(dirents) + sum(map(len, map(names_of, dirents)))
            if tail > EROFS_BLKSIZ:
                chunks, tail = dirent_split(dirents)
                n_blocks = len(chunks) - (1 if tail else 0)
                dir_chunks[index] = chunks
            elif tail > EROFS_MAX_INLINE_TAIL:
                n_blocks, tail = 1, 0
            size = i_size = n_blocks * EROFS_BLKSIZ + tail
            datalayout = EROFS_INODE_FLAT_INLINE if tail else EROFS_INODE_FLAT_PLAIN
        elif ftype == S_IFLNK:
            assert rec.data is not None
            tail = len(rec.data)
            datalayout = EROFS_INODE_FLAT_PLAIN   # decided once placed
            i_size = 0
        else:
            tail = 0
            datalayout = EROFS_INODE_FLAT_PLAIN
            i_size = 0
            if ftype == S_IFCHR or ftype == S_IFBLK:
                i_u = rec.rdev & _U32

        compact = fits_compact(rec.mtime_sec, rec.mtime_nsec, rec.nlink, rec.uid, rec.gid, size,
                               build_time, build_time_nsec)

        # --- xattr body ----------------------------------------------------------------------
        rec_xattrs = rec.xattrs
        if rec_xattrs:
            known = known_body(id(rec_xattrs))
            if known is not None:
                body, n_refs, body_ff = known
            elif len(rec_xattrs) == 2 and (get_shared is None or (
                    get_shared(rec_xattrs[0]) is None and get_shared(rec_xattrs[1]) is None)):
                # two xattrs stored inline (an external file's metacopy and redirect): their
                # header and packers by keys and value sizes
                (key0, value0), (key1, value1) = rec_xattrs
                shape_key = (key0, key1, len(value0), len(value1))
                shape = get_shape(shape_key)
                if shape is None:
                    shape = shapes[shape_key] = _pair_shape(xattrs, shape_key)
                body = shape[0] + shape[1](value0) + shape[2](value1)
                n_refs = 0
            else:
                name_filter = 0
                refs: list[bytes] = []
                parts: list[bytes] = [b""]
                for pair in rec_xattrs:
                    mask, entries = get_key_info(pair[0]) or split_key(pair[0])
                    name_filter |= mask
                    ref = get_shared(pair) if get_shared is not None else None
                    if ref is not None and len(refs) < LCFS_MAX_SHARED_XATTRS:
                        refs.append(ref)
                    else:
                        value = pair[1]
                        pack = entries.get(len(value)) or entries.new(len(value))
                        parts.append(pack(value))
                n_refs = len(refs)
                parts[0] = pack_ihdr(_U32 & ~name_filter, n_refs, b"")
                if n_refs:
                    parts[1:1] = refs
                body = b"".join(parts)
            if known is None:
                body_ff = None
                # a list that other records hold too (the records keep it, and so its id,
                # alive): its body is remembered; a record's own list is not (no memory spent)
                if getrefcount(rec_xattrs) > _OWN_LIST_REFS:
                    body_ff = body + ff4
                    bodies[id(rec_xattrs)] = (body, n_refs, body_ff)
            xsize = len(body)
            head = (32 if compact else 64) + xsize
        else:
            xsize = 0
            head = 32 if compact else 64

        # --- placement -----------------------------------------------------------------------
        p = (pos + 31) & ~31
        if ftype == S_IFLNK:
            total = head + tail
            if total >= EROFS_BLKSIZ:
                n_blocks = 1
                tail = 0
                i_size = rec.size
            else:
                i_size = tail
                if tail:
                    datalayout = EROFS_INODE_FLAT_INLINE
            if p // EROFS_BLKSIZ != (p + total - 1) // EROFS_BLKSIZ:
                p = (p + EROFS_BLKSIZ - 1) & ~(EROFS_BLKSIZ - 1)
        elif tail:
            remainder = EROFS_BLKSIZ - ((p + head) % EROFS_BLKSIZ)
            if remainder < tail:
                extra = (remainder + 31) & ~31
                remainder = EROFS_BLKSIZ - ((p + head + extra) % EROFS_BLKSIZ)
                if tail > remainder:
                    n_blocks += 1
                    tail = 0
                    p = (p + EROFS_BLKSIZ - 1) & ~(EROFS_BLKSIZ - 1)
                    if datalayout == EROFS_INODE_FLAT_INLINE:
                        datalayout = EROFS_INODE_FLAT_PLAIN
                else:
                    p += extra
        pos = p + head + tail
        if pos > capacity:
            extend_with_zeros(out, max(capacity >> 1, pos - capacity))
            capacity = len(out)

        # --- the inode, and its xattr body (and chunk index) in the same call ------------------
        icount = (xsize - 8) >> 2 if xsize else 0
        if xsize:
            if tail == 4 and datalayout == EROFS_INODE_CHUNK_BASED:
                blob = body_ff or body + ff4
                tail_written = True
            else:
                blob = body
                tail_written = False
            if compact:
                packers = compact_with
                q = p + 32
            else:
                packers = extended_with
                q = p + 64
            pack_with = packers.get(len(blob)) or packers.new(len(blob))
            if compact:
                pack_with(out, p, datalayout << 1, icount, mode & _U16, rec.nlink, i_size, 0,
                          i_u, index, rec.uid, rec.gid, 0, blob)
            else:
                pack_with(out, p, (datalayout << 1) | 1, icount, mode & _U16, 0, i_size & _U64,
                          i_u, index, rec.uid & _U32, rec.gid & _U32, rec.mtime_sec & _U64,
                          rec.mtime_nsec & _U32, rec.nlink & _U32, b"", blob)
        else:
            tail_written = False
            if compact:
                pack_compact(out, p, datalayout << 1, 0, mode & _U16, rec.nlink, i_size, 0, i_u,
                             index, rec.uid, rec.gid, 0)
                q = p + 32
            else:
                pack_extended(out, p, (datalayout << 1) | 1, 0, mode & _U16, 0, i_size & _U64,
                              i_u, index, rec.uid & _U32, rec.gid & _U32, rec.mtime_sec & _U64,
                              rec.mtime_nsec & _U32, rec.nlink & _U32, b"")
                q = p + 64
        if n_blocks:
            add_block_addr((q - 32 + I_U_COMPACT if compact else q - 64 + I_U_EXTENDED, block,
                            i_u if datalayout == EROFS_INODE_CHUNK_BASED else -1))
            if ftype != S_IFDIR:
                add_block((block, n_blocks, None if datalayout == EROFS_INODE_CHUNK_BASED
                           else rec.data[:EROFS_BLKSIZ]))  # type: ignore[index]
            block += n_blocks
        if xsize:
            if n_refs:
                add_ref_words(q, n_refs)
            q += xsize
        if ftype == S_IFDIR:
            add_dir((index, q if tail else -1, tail, block - n_blocks if n_blocks else -1))
        elif tail and not tail_written:
            if datalayout == EROFS_INODE_CHUNK_BASED:
                out[q:q + tail] = ff4 if tail == 4 else ff[:tail]
            else:
                data = rec.data
                assert data is not None
                out[q:q + tail] = data if len(data) == tail else data[len(data) - tail:]
        add_nid(p >> 5)
        add_file_type(file_types[ftype >> 12])

    table.data = out
    table.end = pos
    table.n_blocks = block
    return table
