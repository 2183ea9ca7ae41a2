"""The fs-verity structures composefs relies on, declared once, with ``construct``.

Field names are the kernel's (``include/uapi/linux/fsverity.h`` and
``fs/verity/fsverity_private.h``), a doc string per field. Used at build and test time:
``tools/gen_packers.py`` derives the ``struct`` packers of ``fsverity/packers.py`` from these
declarations, and ``tests/erofs/test_format.py`` checks that they are current and give the same
bytes. The commands never import ``construct`` (see ``erofs/structs.py``).
"""

from __future__ import annotations

import construct as cs  # type: ignore[import-untyped]

__all__ = ["FsVerityDescriptor", "FsVerityEnableArg", "STRUCT_SIZES"]

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
