"""fs-verity for composefs (SHA-256, 4 KiB blocks, no salt): the Merkle digest (``merkle``), the
on-disk/ioctl structures (``format``; declared in ``structs``) and the kernel's ioctls
(``kernel``). Imports nothing from the other packages of the project.

Names are imported on first use: ``merkle`` needs ``hashlib`` (~10 ms to import, for OpenSSL),
which a command that computes no digest (``mkcomposefs --from-file`` without
``--print-digest``) never loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .format import BLOCK_SIZE, DIGEST_SIZE
    from .merkle import (
        FsVerityHasher,
        data_extents,
        digest_bytes,
        digest_file,
        digest_file_and_size,
        digest_padded,
        is_sparse,
        object_path,
        zero_hash,
    )

_EXPORTS = {
    "BLOCK_SIZE": "format", "DIGEST_SIZE": "format",
    "FsVerityHasher": "merkle", "data_extents": "merkle", "digest_bytes": "merkle",
    "digest_file": "merkle", "digest_file_and_size": "merkle", "digest_padded": "merkle",
    "is_sparse": "merkle",
    "object_path": "merkle", "zero_hash": "merkle",
}
__all__ = ["BLOCK_SIZE", "DIGEST_SIZE", "FsVerityHasher", "data_extents", "digest_bytes", "digest_file",
           "digest_file_and_size", "digest_padded", "is_sparse", "object_path", "zero_hash"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fsverity' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
