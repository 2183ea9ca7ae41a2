"""The fs-verity structures composefs relies on: parameters, packers, the two structures it builds.

Field names are the kernel's (``include/uapi/linux/fsverity.h`` and ``fs/verity/fsverity_private.h``).
composefs uses fixed parameters: SHA-256 (``FS_VERITY_HASH_ALG_SHA256``), 4096-byte Merkle tree
blocks, no salt, no signature. The fs-verity digest of a file is the SHA-256 of its 256-byte
``fsverity_descriptor``; ``FS_IOC_ENABLE_VERITY`` takes an ``fsverity_enable_arg``.
Both are declared once, with ``construct``, in ``fsverity/structs.py``; ``DESCRIPTOR`` and
``ENABLE_ARG`` are the ``struct`` packers generated from those declarations
(``fsverity/packers.py``; ``tests/fsverity/test_format.py`` checks both give the same bytes).
"""

from __future__ import annotations

from . import packers

__all__ = ["DESCRIPTOR", "ENABLE_ARG",
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

#: the generated packers (fields in the declarations' order)
DESCRIPTOR = packers.FSVERITY_DESCRIPTOR
ENABLE_ARG = packers.FSVERITY_ENABLE_ARG


def descriptor(data_size: int, root_hash: bytes) -> bytes:
    """The 256-byte descriptor of a file of ``data_size`` bytes with Merkle root ``root_hash``
    (composefs parameters); its SHA-256 is the file's fs-verity digest."""
    return DESCRIPTOR.pack(1, FS_VERITY_HASH_ALG_SHA256, LOG_BLOCK_SIZE, 0, 0, data_size,
                           root_hash, b"", b"")


def enable_arg() -> bytes:
    """``struct fsverity_enable_arg`` for composefs objects: version 1, SHA-256, 4096-byte
    blocks, no salt, no signature."""
    return ENABLE_ARG.pack(1, FS_VERITY_HASH_ALG_SHA256, BLOCK_SIZE, 0, 0, 0, 0, 0, b"")
