"""The fs-verity structures composefs relies on, declared once.

Field names are the kernel's (``include/uapi/linux/fsverity.h`` and ``fs/verity/fsverity_private.h``).
composefs uses fixed parameters: SHA-256 (``FS_VERITY_HASH_ALG_SHA256``), 4096-byte Merkle tree
blocks, no salt, no signature. The fs-verity digest of a file is the SHA-256 of its 256-byte
``fsverity_descriptor``; ``FS_IOC_ENABLE_VERITY`` takes an ``fsverity_enable_arg``.
``DESCRIPTOR`` and ``ENABLE_ARG`` are ``struct`` packers derived from the declarations
(``tests/fsverity/test_format.py`` checks both give the same bytes).
"""

from __future__ import annotations

import construct as cs  # type: ignore[import-untyped]

from .cstruct import derive_packer

__all__ = ["FsVerityDescriptor", "FsVerityEnableArg", "DESCRIPTOR", "ENABLE_ARG",
           "FS_VERITY_HASH_ALG_SHA256", "LOG_BLOCK_SIZE", "BLOCK_SIZE", "DIGEST_SIZE",
           "MAX_DIGEST_SIZE", "descriptor", "enable_arg"]

#: ``FS_VERITY_HASH_ALG_SHA256``: the only hash algorithm composefs uses.
FS_VERITY_HASH_ALG_SHA256 = 1
#: log2 of the Merkle tree block size composefs uses.
LOG_BLOCK_SIZE = 12
#: Merkle tree block size in bytes.
BLOCK_SIZE = 1 << LOG_BLOCK_SIZE
#: size of a SHA-256 hash, and so of a composefs fs-verity digest, in bytes.
DIGEST_SIZE = 32
#: ``FS_VERITY_MAX_DIGEST_SIZE``: room for a digest in the kernel's structures.
MAX_DIGEST_SIZE = 64

FsVerityDescriptor = cs.Struct(
    "version" / cs.Int8ul * "descriptor format version: 1",
    "hash_algorithm" / cs.Int8ul * "Merkle tree hash algorithm: FS_VERITY_HASH_ALG_SHA256 = 1",
    "log_blocksize" / cs.Int8ul * "log2 of the Merkle tree block size: 12",
    "salt_size" / cs.Int8ul * "size of the salt in bytes: 0 (no salt)",
    "sig_size" / cs.Int32ul * "reserved, must be 0 (signature size in old kernels)",
    "data_size" / cs.Int64ul * "size of the file's data in bytes (__le64)",
    "root_hash" / cs.Bytes(64) * "Merkle tree root hash, zero padded to 64 bytes",
    "salt" / cs.Bytes(32) * "salt prepended to each hashed block, zero padded: zeros",
    "reserved" / cs.Bytes(144) * "reserved, must be zeros",
)

FsVerityEnableArg = cs.Struct(
    "version" / cs.Int32ul * "argument format version: 1",
    "hash_algorithm" / cs.Int32ul * "FS_VERITY_HASH_ALG_SHA256 = 1",
    "block_size" / cs.Int32ul * "Merkle tree block size in bytes: 4096",
    "salt_size" / cs.Int32ul * "size of the salt: 0",
    "salt_ptr" / cs.Int64ul * "user address of the salt: 0 (none)",
    "sig_size" / cs.Int32ul * "size of the builtin signature: 0",
    "reserved1" / cs.Int32ul * "reserved, must be 0 (__reserved1)",
    "sig_ptr" / cs.Int64ul * "user address of the signature: 0 (none)",
    "reserved2" / cs.Bytes(88) * "reserved, must be zeros (__reserved2: 11 x __u64)",
)

#: struct name -> (declaration, size the kernel's structure has).
STRUCT_SIZES: dict[str, tuple[cs.Struct, int]] = {
    "fsverity_descriptor": (FsVerityDescriptor, 256),
    "fsverity_enable_arg": (FsVerityEnableArg, 128),
}

DESCRIPTOR = derive_packer(FsVerityDescriptor)
ENABLE_ARG = derive_packer(FsVerityEnableArg)


def descriptor(data_size: int, root_hash: bytes) -> bytes:
    """The 256-byte descriptor of a file of ``data_size`` bytes with Merkle root ``root_hash``
    (composefs parameters); its SHA-256 is the file's fs-verity digest."""
    return DESCRIPTOR.pack(1, FS_VERITY_HASH_ALG_SHA256, LOG_BLOCK_SIZE, 0, 0, data_size,
                           root_hash, b"", b"")


def enable_arg() -> bytes:
    """``struct fsverity_enable_arg`` for composefs objects: version 1, SHA-256, 4096-byte
    blocks, no salt, no signature."""
    return ENABLE_ARG.pack(1, FS_VERITY_HASH_ALG_SHA256, BLOCK_SIZE, 0, 0, 0, 0, 0, b"")
