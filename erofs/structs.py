"""The on-disk structures of a composefs EROFS image, declared once, with ``construct``.

A doc string per field; kernel field names from ``fs/erofs/erofs_fs.h`` and libcomposefs's
``lcfs-erofs.h``. These declarations are the format's one definition, used at build and test
time: ``tools/gen_packers.py`` derives ``erofs/packers.py`` (the ``struct`` packers the writer
and reader use) from them, ``erofs/debug.py`` parses images with them, and
``tests/erofs/test_format.py`` checks that the packers are current and give the same bytes.
The commands never import this module: importing ``construct`` costs ~40 ms and ~10 MB of
memory per process (it pulls in ``pdb``, ``pickle``, ``inspect`` and ``hashlib``), several
times the work of building or printing a small image.
"""

from __future__ import annotations

import construct as cs  # type: ignore[import-untyped]

__all__ = ["ComposefsHeader", "ErofsSuperBlock", "ErofsInodeCompact", "ErofsInodeExtended",
           "ErofsXattrIbodyHeader", "ErofsXattrEntry", "ErofsDirent", "STRUCT_SIZES",
           "check_layout"]


ComposefsHeader = cs.Struct(
    "magic" / cs.Int32ul * "LCFS_EROFS_MAGIC 0xd078629a",
    "version" / cs.Int32ul * "header/EROFS layout version LCFS_EROFS_VERSION, always 1",
    "flags" / cs.Int32ul * "LCFS_EROFS_FLAGS_*: bit 0 HAS_ACL",
    "composefs_version" / cs.Int32ul * "format version chosen by --min/--max-version (0 or 1)",
    "unused" / cs.Bytes(16) * "reserved, zeros",
)

ErofsSuperBlock = cs.Struct(
    "magic" / cs.Int32ul * "EROFS_SUPER_MAGIC_V1 0xe0f5e1e2",
    "checksum" / cs.Int32ul * "crc32c of the superblock block if SB_CHKSUM; 0 here",
    "feature_compat" / cs.Int32ul * "EROFS_FEATURE_COMPAT_*: MTIME | XATTR_FILTER",
    "blkszbits" / cs.Int8ul * "log2 of the block size: 12",
    "sb_extslots" / cs.Int8ul * "superblock extension slots: 0",
    "root_nid" / cs.Int16ul * "nid of the root directory inode",
    "inos" / cs.Int64ul * "total number of inodes",
    "build_time" / cs.Int64ul * "mtime seconds used by compact inodes (minimum over the tree)",
    "build_time_nsec" / cs.Int32ul * "mtime nanoseconds used by compact inodes",
    "blocks" / cs.Int32ul * "image size in blocks",
    "meta_blkaddr" / cs.Int32ul * "start block of the inode table: 0 (nid = byte offset / 32)",
    "xattr_blkaddr" / cs.Int32ul * "block holding the start of the shared xattr area",
    "uuid" / cs.Bytes(16) * "128-bit volume uuid: zeros",
    "volume_name" / cs.Bytes(16) * "volume name: zeros",
    "feature_incompat" / cs.Int32ul * "EROFS_FEATURE_INCOMPAT_*: 0 as mkcomposefs writes it",
    "available_compr_algs" / cs.Int16ul * "u1: compression algorithms (or lz4_max_distance): 0",
    "extra_devices" / cs.Int16ul * "number of extra devices: 0",
    "devt_slotoff" / cs.Int16ul * "start offset of the device table: 0",
    "dirblkbits" / cs.Int8ul * "directory block size bits beyond blkszbits: 0",
    "xattr_prefix_count" / cs.Int8ul * "number of long xattr name prefixes: 0",
    "xattr_prefix_start" / cs.Int32ul * "start of the long prefix table: 0",
    "packed_nid" / cs.Int64ul * "nid of the special packed inode: 0",
    "xattr_filter_reserved" / cs.Int8ul * "reserved for the xattr name filter: 0",
    "reserved2" / cs.Bytes(23) * "reserved, zeros",
)

ErofsInodeCompact = cs.Struct(
    "i_format" / cs.Int16ul * "bit 0 version (0 = compact), bits 1-3 datalayout",
    "i_xattr_icount" / cs.Int16ul * "xattr body size: 12 + 4 * (icount - 1) bytes, 0 = none",
    "i_mode" / cs.Int16ul * "file type and permission bits",
    "i_nlink" / cs.Int16ul * "hard link count",
    "i_size" / cs.Int32ul * "file size (directory: dirent bytes)",
    "i_reserved" / cs.Int32ul * "reserved: 0",
    "i_u" / cs.Int32ul * "raw_blkaddr / rdev / chunk_info (format = chunkbits - 12)",
    "i_ino" / cs.Int32ul * "inode number for 32-bit stat (BFS index here)",
    "i_uid" / cs.Int16ul * "owner uid",
    "i_gid" / cs.Int16ul * "owner gid",
    "i_reserved2" / cs.Int32ul * "reserved: 0",
)

ErofsInodeExtended = cs.Struct(
    "i_format" / cs.Int16ul * "bit 0 version (1 = extended), bits 1-3 datalayout",
    "i_xattr_icount" / cs.Int16ul * "xattr body size: 12 + 4 * (icount - 1) bytes, 0 = none",
    "i_mode" / cs.Int16ul * "file type and permission bits",
    "i_reserved" / cs.Int16ul * "reserved: 0",
    "i_size" / cs.Int64ul * "file size (directory: dirent bytes)",
    "i_u" / cs.Int32ul * "raw_blkaddr / rdev / chunk_info (format = chunkbits - 12)",
    "i_ino" / cs.Int32ul * "inode number for 32-bit stat (BFS index here)",
    "i_uid" / cs.Int32ul * "owner uid",
    "i_gid" / cs.Int32ul * "owner gid",
    "i_mtime" / cs.Int64ul * "mtime seconds (two's complement if negative)",
    "i_mtime_nsec" / cs.Int32ul * "mtime nanoseconds",
    "i_nlink" / cs.Int32ul * "hard link count",
    "i_reserved2" / cs.Bytes(16) * "reserved, zeros",
)

ErofsXattrIbodyHeader = cs.Struct(
    "h_name_filter" / cs.Int32ul
    * "bloom filter: bit (xxh32(suffix, seed + index) & 31) clear = may be present",
    "h_shared_count" / cs.Int8ul * "number of shared xattr ids that follow the header",
    "h_reserved2" / cs.Bytes(7) * "reserved, zeros",
)

ErofsXattrEntry = cs.Struct(
    "e_name_len" / cs.Int8ul * "length of the name suffix (prefix given by e_name_index)",
    "e_name_index" / cs.Int8ul * "EROFS_XATTR_INDEX_*: which prefix the suffix follows",
    "e_value_size" / cs.Int16ul * "value length; name and value follow, padded to 4 bytes",
)

ErofsDirent = cs.Struct(
    "nid" / cs.Int64ul * "node number of the target inode",
    "nameoff" / cs.Int16ul * "offset of the name from the start of the block (or inline chunk)",
    "file_type" / cs.Int8ul * "EROFS_FT_* of the target",
    "reserved" / cs.Int8ul * "reserved: 0",
)

#: C struct name -> (declaration, expected size), the sizes the kernel header asserts; in the
#: order ``erofs/packers.py`` lists them.
STRUCT_SIZES: dict[str, tuple[cs.Struct, int]] = {
    "composefs_header": (ComposefsHeader, 32),
    "erofs_super_block": (ErofsSuperBlock, 128),
    "erofs_inode_compact": (ErofsInodeCompact, 32),
    "erofs_inode_extended": (ErofsInodeExtended, 64),
    "erofs_xattr_ibody_header": (ErofsXattrIbodyHeader, 12),
    "erofs_xattr_entry": (ErofsXattrEntry, 4),
    "erofs_dirent": (ErofsDirent, 12),
}


def check_layout() -> None:
    """Assert every structure has the size the kernel and libcomposefs expect."""
    for name, (declaration, size) in STRUCT_SIZES.items():
        if declaration.sizeof() != size:
            raise AssertionError(f"{name}: size {declaration.sizeof()} != {size}")
