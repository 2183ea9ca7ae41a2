"""On-disk format of a composefs EROFS image: constants, the ``struct`` packers, small helpers.

The structures are declared once, with ``construct`` (a doc string per field), in
``erofs/structs.py``; ``tools/gen_packers.py`` derives from those declarations the ``struct``
packers of ``erofs/packers.py`` (generated, not edited) that this module names for the writer and
the reader. ``tests/erofs/test_format.py`` checks that the generated module is current and that
packers and declarations give the same bytes. Run time never imports ``construct``: it costs more
than the build of a small image (see ``erofs/structs.py``).

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
import stat
import struct
from typing import Any

from . import packers

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


# --- packers ----------------------------------------------------------------------------------

class NamedPacker:
    """A packer addressed by field name, for structures written or read once per image (header,
    superblock): no reader has to count 24 positional values. Fields not given pack as zero;
    ``unpack_from`` gives a dict keyed by the declared field names."""

    __slots__ = ("name", "packer", "names", "size", "_zero")

    def __init__(self, name: str, packer: struct.Struct, fields: dict[str, int]) -> None:
        self.name = name
        self.packer = packer
        self.size = packer.size
        self.names: tuple[str, ...] = tuple(fields)
        # zeros for integers, NUL strings for byte fields (packing b"" there writes the same)
        self._zero = dict(zip(self.names, packer.unpack(bytes(packer.size))))

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


#: header and superblock: written and read once per image, by field name
COMPOSEFS_HEADER = NamedPacker("composefs_header", packers.COMPOSEFS_HEADER,
                               packers.COMPOSEFS_HEADER_FIELDS)
SUPER_BLOCK = NamedPacker("erofs_super_block", packers.EROFS_SUPER_BLOCK,
                          packers.EROFS_SUPER_BLOCK_FIELDS)
#: the per-record structures: positional packers, fields in declaration order
INODE_COMPACT = packers.EROFS_INODE_COMPACT
INODE_EXTENDED = packers.EROFS_INODE_EXTENDED
XATTR_IBODY_HEADER = packers.EROFS_XATTR_IBODY_HEADER
XATTR_ENTRY = packers.EROFS_XATTR_ENTRY
DIRENT = packers.EROFS_DIRENT
#: field name -> byte offset, of the inodes (for fields patched in place)
INODE_COMPACT_FIELDS = packers.EROFS_INODE_COMPACT_FIELDS
INODE_EXTENDED_FIELDS = packers.EROFS_INODE_EXTENDED_FIELDS


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
