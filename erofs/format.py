"""On-disk structures of a composefs EROFS image, declared once.

Every structure is declared with ``construct`` (a doc string per field, kernel field names from
``fs/erofs/erofs_fs.h`` and libcomposefs's ``lcfs-erofs.h``). Hot loops must not call construct per
record, so ``derive_packer`` (``fsverity/cstruct.py``) turns each flat declaration into a
``struct.Struct`` with the same layout; ``tests/erofs/test_format.py`` checks that both give the same bytes.

Layout of an image as mkcomposefs writes it::

    0       composefs header (32 bytes), zeros up to 1024
    1024    EROFS superblock (128 bytes)
    1152    inode table: 32-byte slots, nid = offset / 32; each inode is followed by its
            xattr body (ibody header, shared ids, inline entries) and its inline tail
    ...     shared xattr table (packed entries), zeros up to the next 4096 boundary
    ...     data blocks (directory blocks, inline-file blocks, long symlinks), 4096 each
"""

from __future__ import annotations

import mmap
import re
import stat
import struct
from typing import Any

import construct as cs

from fsverity.cstruct import derive_format, derive_packer  # noqa: F401  (re-exported)

# --- constants -------------------------------------------------------------------------------

#: The file type bits of ``i_mode`` (POSIX's, so those of the ``stat`` module): the one place the
#: project takes them from (``mkcfs.tree`` re-exports them for the tree model).
S_IFMT = 0o170000
S_IFDIR = stat.S_IFDIR
S_IFREG = stat.S_IFREG
S_IFLNK = stat.S_IFLNK
S_IFCHR = stat.S_IFCHR
S_IFBLK = stat.S_IFBLK
S_IFIFO = stat.S_IFIFO
S_IFSOCK = stat.S_IFSOCK

#: composefs header magic (``LCFS_EROFS_MAGIC``) and header version (``LCFS_EROFS_VERSION``).
LCFS_EROFS_MAGIC = 0xD078629A
LCFS_EROFS_VERSION = 1
#: header flag: some inode has a POSIX ACL xattr.
LCFS_EROFS_FLAGS_HAS_ACL = 1

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x1
EROFS_FEATURE_COMPAT_MTIME = 0x2
EROFS_FEATURE_COMPAT_XATTR_FILTER = 0x4

EROFS_BLKSIZ_BITS = 12
EROFS_BLKSIZ = 1 << EROFS_BLKSIZ_BITS
#: inode table granularity: nid = byte offset / 32 (meta_blkaddr is 0).
EROFS_SLOTSIZE = 32
EROFS_ISLOT_BITS = 5

EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_COMPRESSION_LEGACY = 1
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_FLAT_COMPRESSION = 3
EROFS_INODE_CHUNK_BASED = 4
EROFS_I_VERSION_BIT = 0
EROFS_I_DATALAYOUT_BIT = 1
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x001F
EROFS_CHUNK_FORMAT_INDEXES = 0x0020
EROFS_NULL_ADDR = 0xFFFFFFFF

#: dirent file types (``EROFS_FT_*``).
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7

#: xattr name indexes (``EROFS_XATTR_INDEX_*``).
EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_LUSTRE = 5
EROFS_XATTR_INDEX_SECURITY = 6
#: The prefixes mkcomposefs abbreviates, in the order a key is matched against them (first match
#: wins; no match keeps the whole key as the suffix with index 0). It never uses ``lustre.``.
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", EROFS_XATTR_INDEX_USER),
    (b"system.posix_acl_access", EROFS_XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT),
    (b"trusted.", EROFS_XATTR_INDEX_TRUSTED),
    (b"security.", EROFS_XATTR_INDEX_SECURITY),
)
#: What a reader expands each name index to (the kernel's table, lustre included).
XATTR_INDEX_PREFIX: dict[int, bytes] = {
    0: b"",
    EROFS_XATTR_INDEX_USER: b"user.",
    EROFS_XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    EROFS_XATTR_INDEX_TRUSTED: b"trusted.",
    EROFS_XATTR_INDEX_LUSTRE: b"lustre.",
    EROFS_XATTR_INDEX_SECURITY: b"security.",
}
#: seed of the xattr name bloom filter (``EROFS_XATTR_FILTER_SEED``), plus the name index.
EROFS_XATTR_FILTER_SEED = 0x25BBE08F
EROFS_XATTR_FILTER_BITS = 32
#: at most this many shared xattr references per inode (libcomposefs limit).
LCFS_MAX_SHARED_XATTRS = 128

#: external files are described by a chunk map of at most this many entries (libcomposefs).
LCFS_MAX_NONINLINE_CHUNKS = 1024
#: directory tails and inline file tails larger than this become a full block instead.
EROFS_MAX_INLINE_TAIL = EROFS_BLKSIZ // 2


# --- declarations ----------------------------------------------------------------------------

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

#: struct name -> (declaration, expected size), the sizes the kernel header asserts.
STRUCT_SIZES: dict[str, tuple[cs.Struct, int]] = {
    "composefs_header": (ComposefsHeader, 32),
    "erofs_super_block": (ErofsSuperBlock, 128),
    "erofs_inode_compact": (ErofsInodeCompact, 32),
    "erofs_inode_extended": (ErofsInodeExtended, 64),
    "erofs_xattr_ibody_header": (ErofsXattrIbodyHeader, 12),
    "erofs_xattr_entry": (ErofsXattrEntry, 4),
    "erofs_dirent": (ErofsDirent, 12),
}


# --- fast packers ----------------------------------------------------------------------------

def check_layout() -> None:
    """Assert every structure has the size the kernel and libcomposefs expect."""
    for name, (declaration, size) in STRUCT_SIZES.items():
        if declaration.sizeof() != size or derive_packer(declaration).size != size:
            raise AssertionError(f"{name}: size {declaration.sizeof()} != {size}")


class NamedPacker:
    """A derived packer addressed by field name, for structures written or read once per image
    (header, superblock): no reader has to count 24 positional values. Fields not given pack
    as zero; ``unpack_from`` gives a dict keyed by the declared field names."""

    __slots__ = ("declaration", "packer", "names", "size", "_zero")

    def __init__(self, declaration: cs.Struct) -> None:
        self.declaration = declaration
        self.packer = derive_packer(declaration)
        self.size = self.packer.size
        self.names: tuple[str, ...] = tuple(sub.name for sub in declaration.subcons)
        self._zero = {name: (b"" if fmt.endswith("s") else 0) for name, fmt in
                      zip(self.names, _field_formats(declaration))}

    def pack_into(self, buffer: bytearray, offset: int, **fields: int | bytes) -> None:
        unknown = set(fields) - set(self._zero)
        if unknown:
            raise TypeError(f"{sorted(unknown)} are not fields of this structure")
        zero = self._zero
        self.packer.pack_into(buffer, offset, *(fields.get(n, zero[n]) for n in self.names))

    def pack(self, **fields: int | bytes) -> bytes:
        out = bytearray(self.size)
        self.pack_into(out, 0, **fields)
        return bytes(out)

    def unpack_from(self, buffer: bytes | bytearray | memoryview | mmap.mmap, offset: int = 0
                    ) -> dict[str, Any]:
        return dict(zip(self.names, self.packer.unpack_from(buffer, offset)))


def _field_formats(declaration: cs.Struct) -> list[str]:
    """The ``struct`` code of each field (see ``derive_format``)."""
    fmt = derive_format(declaration)[1:]
    return re.findall(r"\d*[a-zA-Z]", fmt)


#: header and superblock: written and read once per image, by field name
COMPOSEFS_HEADER = NamedPacker(ComposefsHeader)
SUPER_BLOCK = NamedPacker(ErofsSuperBlock)
INODE_COMPACT = derive_packer(ErofsInodeCompact)
INODE_EXTENDED = derive_packer(ErofsInodeExtended)
XATTR_IBODY_HEADER = derive_packer(ErofsXattrIbodyHeader)
XATTR_ENTRY = derive_packer(ErofsXattrEntry)
DIRENT = derive_packer(ErofsDirent)
check_layout()


# --- small pure helpers shared by writer and reader --------------------------------------------

def round_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of ``align`` (a power of two)."""
    return (value + align - 1) & ~(align - 1)


def xattr_prefix_split(key: bytes) -> tuple[int, bytes]:
    """Split a full xattr key into ``(e_name_index, suffix)`` by the first matching prefix."""
    for prefix, index in XATTR_PREFIXES:
        if key.startswith(prefix):
            return index, key[len(prefix):]
    return 0, key


_PRIME32_1 = 2654435761
_PRIME32_2 = 2246822519
_PRIME32_3 = 3266489917
_PRIME32_4 = 668265263
_PRIME32_5 = 374761393
_M32 = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def xxh32(data: bytes, seed: int) -> int:
    """32-bit xxHash (as the kernel's lib/xxhash.c), used by the xattr name filter."""
    n = len(data)
    i = 0
    if n >= 16:
        v1 = (seed + _PRIME32_1 + _PRIME32_2) & _M32
        v2 = (seed + _PRIME32_2) & _M32
        v3 = seed & _M32
        v4 = (seed - _PRIME32_1) & _M32
        limit = n - 16
        while i <= limit:
            a, b, c, d = struct.unpack_from("<IIII", data, i)
            v1 = (_rotl32((v1 + a * _PRIME32_2) & _M32, 13) * _PRIME32_1) & _M32
            v2 = (_rotl32((v2 + b * _PRIME32_2) & _M32, 13) * _PRIME32_1) & _M32
            v3 = (_rotl32((v3 + c * _PRIME32_2) & _M32, 13) * _PRIME32_1) & _M32
            v4 = (_rotl32((v4 + d * _PRIME32_2) & _M32, 13) * _PRIME32_1) & _M32
            i += 16
        h = (_rotl32(v1, 1) + _rotl32(v2, 7) + _rotl32(v3, 12) + _rotl32(v4, 18)) & _M32
    else:
        h = (seed + _PRIME32_5) & _M32
    h = (h + n) & _M32
    while i + 4 <= n:
        (k,) = struct.unpack_from("<I", data, i)
        h = (_rotl32((h + k * _PRIME32_3) & _M32, 17) * _PRIME32_4) & _M32
        i += 4
    while i < n:
        h = (_rotl32((h + data[i] * _PRIME32_5) & _M32, 11) * _PRIME32_1) & _M32
        i += 1
    h ^= h >> 15
    h = (h * _PRIME32_2) & _M32
    h ^= h >> 13
    h = (h * _PRIME32_3) & _M32
    h ^= h >> 16
    return h


def xattr_filter_bit(index: int, suffix: bytes) -> int:
    """The name-filter bit an xattr sets (clears, in the stored inverted filter)."""
    return xxh32(suffix, EROFS_XATTR_FILTER_SEED + index) & (EROFS_XATTR_FILTER_BITS - 1)


def chunk_params(size: int) -> tuple[int, int]:
    """``(chunkbits, chunk_count)`` of an external file of ``size`` > 0 bytes."""
    chunkbits = (size - 1).bit_length() if size > 1 else 1
    chunkbits = min(max(chunkbits, EROFS_BLKSIZ_BITS), EROFS_BLKSIZ_BITS + 31)
    chunk_size = 1 << chunkbits
    return chunkbits, (size + chunk_size - 1) // chunk_size
