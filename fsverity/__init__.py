"""fs-verity for composefs (SHA-256, 4 KiB blocks, no salt): the Merkle digest (``merkle``), the
on-disk/ioctl structures (``format``) and the kernel's ioctls (``kernel``). Imports nothing from
the other packages of the project."""

from .format import BLOCK_SIZE, DIGEST_SIZE
from .merkle import (
    FsVerityHasher,
    data_extents,
    digest_bytes,
    digest_file,
    digest_file_and_size,
    is_sparse,
    object_path,
    zero_hash,
)

__all__ = [
    "BLOCK_SIZE",
    "DIGEST_SIZE",
    "FsVerityHasher",
    "data_extents",
    "digest_bytes",
    "digest_file",
    "digest_file_and_size",
    "is_sparse",
    "object_path",
    "zero_hash",
]
