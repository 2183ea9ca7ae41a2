"""Records -> image bytes: the inode table from ``erofs.layout``, then what it left to fill in.

``lay_out_inodes`` packs every inode, xattr body and inline tail in one pass. This module adds
the composefs header, the superblock and the shared xattr table, makes the shared xattr ids and
the block numbers absolute (both depend on where the inode table ends), and writes the
directories (their dirents need every child's nid) and the data blocks. The writer checks that
each directory ends where the layout placed it and that the data blocks follow each other, so a
layout/writer disagreement is an ``InternalError``, not a bad image.
"""

from __future__ import annotations

import struct
import sys
from array import array
from itertools import accumulate, chain, repeat
from operator import itemgetter

from .errors import InternalError
from .format import (
    COMPOSEFS_HEADER,
    DIRENT,
    EROFS_BLKSIZ,
    EROFS_BLKSIZ_BITS,
    EROFS_FEATURE_COMPAT_MTIME,
    EROFS_FEATURE_COMPAT_XATTR_FILTER,
    EROFS_SLOTSIZE,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    LCFS_EROFS_FLAGS_HAS_ACL,
    LCFS_EROFS_MAGIC,
    LCFS_EROFS_VERSION,
    SUPER_BLOCK,
    round_up,
)
from .layout import (
    InodeRecord,
    InodeTable,
    XattrPlan,
    extend_with_zeros,
    lay_out_inodes,
    plan_xattrs,
)

_U64 = (1 << 64) - 1
_U32 = 0xFFFFFFFF
#: a 32-bit field patched in place (``i_u``, a shared xattr id)
_U32_FIELD = struct.Struct("<I")
_FF_BLOCK = b"\xff" * EROFS_BLKSIZ

#: struct packers of n consecutive dirents, by n (all derived from ``DIRENT``)
_DIRENT_FIELDS = DIRENT.format[1:]
_dirent_packers: dict[int, struct.Struct] = {}


def _pack_dirents(out: bytearray, offset: int, dirents: list[tuple[bytes, int]], nids: array,
                  file_types: bytearray) -> int:
    """Write ``dirents`` as one chunk (headers, then names) at ``offset``; return its end."""
    n = len(dirents)
    if not n:
        return offset
    packer = _dirent_packers.get(n)
    if packer is None:
        packer = _dirent_packers[n] = struct.Struct("<" + _DIRENT_FIELDS * n)
    names, targets = zip(*dirents)
    if n > 1:
        pick = itemgetter(*targets)   # one C call per table: faster than map(__getitem__)
        target_nids, target_types = pick(nids), pick(file_types)
    else:
        target_nids, target_types = (nids[targets[0]],), (file_types[targets[0]],)
    packer.pack_into(out, offset, *chain.from_iterable(zip(
        target_nids, accumulate(map(len, names), initial=12 * n), target_types, repeat(0))))
    joined = b"".join(names)
    p = offset + 12 * n
    out[p:p + len(joined)] = joined
    return p + len(joined)


def emit_image(records: list[InodeRecord], table: InodeTable, xattrs: XattrPlan, version: int
               ) -> bytearray:
    """The complete image: ``table`` (laid out from ``records`` with ``xattrs``) finished, with
    ``composefs_version`` = ``version``."""
    out = table.data
    table.data = bytearray()    # the image owns the buffer now
    inodes_end = round_up(table.end, EROFS_SLOTSIZE)
    data_start = round_up(inodes_end + xattrs.size, EROFS_BLKSIZ)
    image_size = data_start + table.n_blocks * EROFS_BLKSIZ
    if len(out) < image_size:
        extend_with_zeros(out, image_size - len(out))
    else:
        del out[image_size:]

    COMPOSEFS_HEADER.pack_into(out, 0, magic=LCFS_EROFS_MAGIC, version=LCFS_EROFS_VERSION,
                               flags=LCFS_EROFS_FLAGS_HAS_ACL if xattrs.has_acl else 0,
                               composefs_version=version)
    nids = table.nids
    SUPER_BLOCK.pack_into(
        out, EROFS_SUPER_OFFSET,
        magic=EROFS_SUPER_MAGIC_V1,
        feature_compat=EROFS_FEATURE_COMPAT_MTIME | EROFS_FEATURE_COMPAT_XATTR_FILTER,
        blkszbits=EROFS_BLKSIZ_BITS, root_nid=nids[0], inos=len(records),
        build_time=table.build_time & _U64, build_time_nsec=table.build_time_nsec & _U32,
        blocks=image_size // EROFS_BLKSIZ, meta_blkaddr=0,
        xattr_blkaddr=inodes_end // EROFS_BLKSIZ)

    # --- shared xattr table, and the ids that point into it ----------------------------------
    shared = b"".join(xattrs.table)
    if len(shared) != xattrs.size:
        raise InternalError("shared xattr table size mismatch")
    out[inodes_end:inodes_end + len(shared)] = shared
    base = (inodes_end % EROFS_BLKSIZ) >> 2
    unpack_u32 = _U32_FIELD.unpack_from
    pack_u32 = _U32_FIELD.pack_into
    if base:
        if sys.byteorder == "little":       # the image's byte order: add in place
            words = memoryview(out).cast("I")
            for word in table.shared_refs:
                words[word] += base
            words.release()
        else:
            for word in table.shared_refs:
                pack_u32(out, 4 * word, unpack_u32(out, 4 * word)[0] + base)

    # --- block numbers and data blocks ---------------------------------------------------------
    first_block = data_start // EROFS_BLKSIZ
    for offset, block, chunk_format in table.block_addrs:
        address = (first_block + block) & _U32
        if chunk_format >= 0:
            address = (address & 0xFFFF0000) | chunk_format
        pack_u32(out, offset, address)
    blocks_written = 0
    for block, n_blocks, data in table.blocks:
        offset = data_start + block * EROFS_BLKSIZ
        blocks_written += n_blocks
        if block + n_blocks > table.n_blocks:
            raise InternalError(f"data block {block} is past the data area")
        if data is None:
            data = _FF_BLOCK
        out[offset:offset + len(data)] = data

    # --- directories ---------------------------------------------------------------------------
    file_types = table.file_types
    dirs = table.dirs
    for i in range(0, len(dirs), 4):
        index, tail_at, tail, block = dirs[i:i + 4]
        dirents = records[index].dirents
        assert dirents is not None
        if block >= 0:
            chunks = list(table.dir_chunks.get(index) or [(0, len(dirents))])
            if tail_at >= 0:
                last = chunks.pop()
            for start, end in chunks:
                offset = data_start + block * EROFS_BLKSIZ
                if _pack_dirents(out, offset, dirents[start:end], nids, file_types) \
                        > offset + EROFS_BLKSIZ:
                    raise InternalError(f"directory {index}: block {block} overflows")
                block += 1
                blocks_written += 1
            if tail_at >= 0:
                dirents = dirents[last[0]:last[1]]
        if tail_at >= 0:
            if _pack_dirents(out, tail_at, dirents, nids, file_types) != tail_at + tail:
                raise InternalError(f"directory {index}: inline dirents do not end where placed")
    if blocks_written != table.n_blocks:
        raise InternalError(f"{blocks_written} data blocks written, {table.n_blocks} placed")
    return out


def build_image(records: list[InodeRecord], version: int) -> bytearray:
    """The image of ``records`` (BFS order, root first) with ``composefs_version`` = ``version``."""
    xattrs = plan_xattrs(records)
    return emit_image(records, lay_out_inodes(records, xattrs), xattrs, version)
