"""Generated from ``erofs/structs.py`` by ``tools/gen_packers.py``: do not edit.

The ``struct`` packers of the structures declared there (fields in declaration order) and
each structure's field offsets. After changing a declaration, regenerate with
``python3 tools/gen_packers.py``; ``tests/erofs/test_format.py`` fails while this file is
stale."""

import struct


#: struct composefs_header (32 bytes)
COMPOSEFS_HEADER = struct.Struct("<LLLL16s")
COMPOSEFS_HEADER_FIELDS = {
    "magic": 0,
    "version": 4,
    "flags": 8,
    "composefs_version": 12,
    "unused": 16,
}

#: struct erofs_super_block (128 bytes)
EROFS_SUPER_BLOCK = struct.Struct("<LLLBBHQQLLLL16s16sLHHHBBLQB23s")
EROFS_SUPER_BLOCK_FIELDS = {
    "magic": 0,
    "checksum": 4,
    "feature_compat": 8,
    "blkszbits": 12,
    "sb_extslots": 13,
    "root_nid": 14,
    "inos": 16,
    "build_time": 24,
    "build_time_nsec": 32,
    "blocks": 36,
    "meta_blkaddr": 40,
    "xattr_blkaddr": 44,
    "uuid": 48,
    "volume_name": 64,
    "feature_incompat": 80,
    "available_compr_algs": 84,
    "extra_devices": 86,
    "devt_slotoff": 88,
    "dirblkbits": 90,
    "xattr_prefix_count": 91,
    "xattr_prefix_start": 92,
    "packed_nid": 96,
    "xattr_filter_reserved": 104,
    "reserved2": 105,
}

#: struct erofs_inode_compact (32 bytes)
EROFS_INODE_COMPACT = struct.Struct("<HHHHLLLLHHL")
EROFS_INODE_COMPACT_FIELDS = {
    "i_format": 0,
    "i_xattr_icount": 2,
    "i_mode": 4,
    "i_nlink": 6,
    "i_size": 8,
    "i_reserved": 12,
    "i_u": 16,
    "i_ino": 20,
    "i_uid": 24,
    "i_gid": 26,
    "i_reserved2": 28,
}

#: struct erofs_inode_extended (64 bytes)
EROFS_INODE_EXTENDED = struct.Struct("<HHHHQLLLLQLL16s")
EROFS_INODE_EXTENDED_FIELDS = {
    "i_format": 0,
    "i_xattr_icount": 2,
    "i_mode": 4,
    "i_reserved": 6,
    "i_size": 8,
    "i_u": 16,
    "i_ino": 20,
    "i_uid": 24,
    "i_gid": 28,
    "i_mtime": 32,
    "i_mtime_nsec": 40,
    "i_nlink": 44,
    "i_reserved2": 48,
}

#: struct erofs_xattr_ibody_header (12 bytes)
EROFS_XATTR_IBODY_HEADER = struct.Struct("<LB7s")
EROFS_XATTR_IBODY_HEADER_FIELDS = {
    "h_name_filter": 0,
    "h_shared_count": 4,
    "h_reserved2": 5,
}

#: struct erofs_xattr_entry (4 bytes)
EROFS_XATTR_ENTRY = struct.Struct("<BBH")
EROFS_XATTR_ENTRY_FIELDS = {
    "e_name_len": 0,
    "e_name_index": 1,
    "e_value_size": 2,
}

#: struct erofs_dirent (12 bytes)
EROFS_DIRENT = struct.Struct("<QHBB")
EROFS_DIRENT_FIELDS = {
    "nid": 0,
    "nameoff": 8,
    "file_type": 10,
    "reserved": 11,
}
