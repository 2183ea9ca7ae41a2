"""``ImagePlan`` -> image bytes, using only the fast ``struct`` packers.

The whole image is preallocated as a zeroed ``bytearray`` (every padding is zeros), and each
section is packed at the offset the plan gave it; the writer checks that each section ends where
the plan said, so a planner/emitter disagreement is an ``InternalError``, not a bad image.
"""

from __future__ import annotations

from .errors import InternalError
from .format import (
    COMPOSEFS_HEADER,
    DIRENT,
    EROFS_BLKSIZ,
    EROFS_BLKSIZ_BITS,
    EROFS_FEATURE_COMPAT_MTIME,
    EROFS_FEATURE_COMPAT_XATTR_FILTER,
    EROFS_FT_BLKDEV,
    EROFS_FT_CHRDEV,
    EROFS_FT_DIR,
    EROFS_FT_FIFO,
    EROFS_FT_REG_FILE,
    EROFS_FT_SOCK,
    EROFS_FT_SYMLINK,
    EROFS_FT_UNKNOWN,
    EROFS_INODE_CHUNK_BASED,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    INODE_COMPACT,
    INODE_EXTENDED,
    LCFS_EROFS_FLAGS_HAS_ACL,
    LCFS_EROFS_MAGIC,
    LCFS_EROFS_VERSION,
    SUPER_BLOCK,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
)
from .format import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK  # file type bits
from .layout import INODES_START, ImagePlan, InodeRecord, plan_image

_FILE_TYPES = {
    S_IFREG: EROFS_FT_REG_FILE,
    S_IFDIR: EROFS_FT_DIR,
    S_IFCHR: EROFS_FT_CHRDEV,
    S_IFBLK: EROFS_FT_BLKDEV,
    S_IFIFO: EROFS_FT_FIFO,
    S_IFSOCK: EROFS_FT_SOCK,
    S_IFLNK: EROFS_FT_SYMLINK,
}
_U64 = (1 << 64) - 1
_U32 = 0xFFFFFFFF
_U16 = 0xFFFF


def _pack_dirents(out: bytearray, offset: int, dirents: list[tuple[bytes, int]], start: int,
                  end: int, nids: list[int], ftypes: list[int]) -> int:
    """Write dirents ``start:end`` as one chunk at ``offset``; return the end of the names."""
    nameoff = 12 * (end - start)
    pack_into = DIRENT.pack_into
    p = offset
    names = []
    for i in range(start, end):
        name, target = dirents[i]
        pack_into(out, p, nids[target], nameoff, ftypes[target], 0)
        nameoff += len(name)
        p += 12
        names.append(name)
    joined = b"".join(names)
    out[p:p + len(joined)] = joined
    return p + len(joined)


def emit_image(plan: ImagePlan, version: int) -> bytearray:
    """The complete image for ``plan`` with ``composefs_version`` = ``version``."""
    records = plan.records
    inodes = plan.inodes
    out = bytearray(plan.image_size)

    COMPOSEFS_HEADER.pack_into(out, 0, magic=LCFS_EROFS_MAGIC, version=LCFS_EROFS_VERSION,
                               flags=LCFS_EROFS_FLAGS_HAS_ACL if plan.has_acl else 0,
                               composefs_version=version)
    SUPER_BLOCK.pack_into(
        out, EROFS_SUPER_OFFSET,
        magic=EROFS_SUPER_MAGIC_V1,
        feature_compat=EROFS_FEATURE_COMPAT_MTIME | EROFS_FEATURE_COMPAT_XATTR_FILTER,
        blkszbits=EROFS_BLKSIZ_BITS, root_nid=inodes[0].nid, inos=len(records),
        build_time=plan.build_time & _U64, build_time_nsec=plan.build_time_nsec & _U32,
        blocks=plan.image_size // EROFS_BLKSIZ, meta_blkaddr=0,
        xattr_blkaddr=plan.inodes_end // EROFS_BLKSIZ)

    nids = [ino.nid for ino in inodes]
    ftypes = [_FILE_TYPES.get(r.mode & S_IFMT, EROFS_FT_UNKNOWN) for r in records]
    shared_base = plan.inodes_end % EROFS_BLKSIZ
    for info in plan.shared_table:
        # the id the kernel resolves as xattr_blkaddr * 4096 + id * 4
        info.ref = ((shared_base + info.shared_offset) >> 2).to_bytes(4, "little")
    pack_compact = INODE_COMPACT.pack_into
    pack_extended = INODE_EXTENDED.pack_into
    pack_ihdr = XATTR_IBODY_HEADER.pack_into
    pack_entry = XATTR_ENTRY.pack_into
    key_info = plan.key_info

    pos = INODES_START
    for number, (rec, ino) in enumerate(zip(records, inodes)):
        p = pos + ino.pad
        if p & 31:
            raise InternalError(f"inode {number} not slot aligned")
        fmt = ino.datalayout << 1
        icount = (ino.xattr_size - 12) // 4 + 1 if ino.xattr_size else 0
        if ino.compact:
            pack_compact(out, p, fmt, icount, rec.mode & _U16, rec.nlink & _U16,
                         ino.i_size & _U32, 0, ino.i_u, number, rec.uid & _U16,
                         rec.gid & _U16, 0)
            p += 32
        else:
            pack_extended(out, p, fmt | 1, icount, rec.mode & _U16, 0, ino.i_size & _U64,
                          ino.i_u, number, rec.uid & _U32, rec.gid & _U32,
                          rec.mtime_sec & _U64, rec.mtime_nsec & _U32, rec.nlink & _U32, b"")
            p += 64
        if ino.xattr_size:
            pack_ihdr(out, p, ino.name_filter, len(ino.shared), b"")
            p += 12
            shared = ino.shared
            if shared:
                refs = shared[0].ref if len(shared) == 1 else b"".join(i.ref for i in shared)
                out[p:p + len(refs)] = refs
                p += len(refs)
            for key, value in ino.inline:
                index, suffix, _ = key_info[key]
                pack_entry(out, p, len(suffix), index, len(value))
                p += 4
                out[p:p + len(suffix)] = suffix
                p += len(suffix)
                out[p:p + len(value)] = value
                p = (p + len(value) + 3) & ~3
        if ino.tail:
            ftype = rec.mode & S_IFMT
            if ftype == S_IFDIR:
                start, end = ino.dir_chunks[-1]
                p = _pack_dirents(out, p, rec.dirents, start, end, nids, ftypes)  # type: ignore[arg-type]
            elif rec.external:
                out[p:p + ino.tail] = b"\xff" * ino.tail
                p += ino.tail
            else:
                data = rec.data
                assert data is not None
                out[p:p + ino.tail] = data[len(data) - ino.tail:]
                p += ino.tail
        pos = p

    if (pos + 31) & ~31 != plan.inodes_end:
        raise InternalError(f"inode table ends at {pos}, planned {plan.inodes_end}")
    p = plan.inodes_end
    for info in plan.shared_table:
        raw = info.raw
        out[p:p + len(raw)] = raw
        p += len(raw)
    if p != plan.inodes_end + plan.shared_size:
        raise InternalError("shared xattr table size mismatch")

    block_end = plan.data_start
    for rec, ino in zip(records, inodes):
        if not ino.n_blocks:
            continue
        offset = ino.first_block * EROFS_BLKSIZ
        if offset != block_end:
            raise InternalError(f"data block {ino.first_block} out of order")
        ftype = rec.mode & S_IFMT
        if ftype == S_IFDIR:
            for b in range(ino.n_blocks):
                start, end = ino.dir_chunks[b]
                _pack_dirents(out, offset + b * EROFS_BLKSIZ, rec.dirents, start, end,  # type: ignore[arg-type]
                              nids, ftypes)
        elif ftype == S_IFREG and ino.datalayout == EROFS_INODE_CHUNK_BASED:
            out[offset:offset + EROFS_BLKSIZ] = b"\xff" * EROFS_BLKSIZ
        else:
            data = rec.data
            assert data is not None
            first = data[:EROFS_BLKSIZ]  # mkcomposefs writes only the first block
            out[offset:offset + len(first)] = first
        block_end = offset + ino.n_blocks * EROFS_BLKSIZ
    if block_end != len(out):
        raise InternalError("data area size mismatch")
    return out


def build_image(records: list[InodeRecord], version: int) -> bytearray:
    """Plan and emit an image for ``records`` (BFS order, root first)."""
    return emit_image(plan_image(records), version)
