"""fs-verity digest computation (SHA-256, 4 KiB blocks, no salt) for composefs."""

from .merkle import (
    BLOCK_SIZE,
    DIGEST_SIZE,
    FsVerityHasher,
    digest_bytes,
    digest_file,
    digest_file_and_size,
    object_path,
)

__all__ = [
    "BLOCK_SIZE",
    "DIGEST_SIZE",
    "FsVerityHasher",
    "digest_bytes",
    "digest_file",
    "digest_file_and_size",
    "object_path",
]
