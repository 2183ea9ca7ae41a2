"""fs-verity file digests as used by composefs.

Implements the fs-verity Merkle tree and descriptor digest with the fixed
parameters composefs uses (see ``composefs-format.md`` section 1): SHA-256,
4096-byte Merkle tree blocks, no salt.  The result is identical to
``fsverity digest`` (fsverity-utils) and the kernel's ``FS_IOC_MEASURE_VERITY``.

The streaming design follows fsverity-utils ``lib/compute_digest.c``: one
pending buffer per tree level; whenever a level's buffer holds a full block,
the block is hashed and its 32-byte hash is appended to the level above.
Memory use is therefore proportional to the number of tree levels (plus the
size of the chunk handed to a single :meth:`FsVerityHasher.update` call),
never to the size of the file.
"""

from __future__ import annotations

import hashlib
import os
from operator import methodcaller

__all__ = [
    "BLOCK_SIZE",
    "DIGEST_SIZE",
    "FsVerityHasher",
    "digest_bytes",
    "digest_file",
    "digest_file_and_size",
    "object_path",
]

BLOCK_SIZE = 4096
"""Merkle tree block size in bytes (log2 = 12)."""

DIGEST_SIZE = 32
"""Size of a SHA-256 hash and of the fs-verity digest, in bytes."""

_HASHES_PER_BLOCK = BLOCK_SIZE // DIGEST_SIZE  # 128
_ZERO_BLOCK = bytes(BLOCK_SIZE)

# Descriptor header: version 1, hash algorithm 1 (SHA-256), log2(block) 12,
# salt size 0, 4 reserved bytes.  Followed by data_size (LE u64), the root
# hash padded to 64 bytes, a 32-byte salt field and 144 reserved bytes.
_DESC_HEAD = bytes((1, 1, 12, 0, 0, 0, 0, 0))
_DESC_TAIL = bytes(64 - DIGEST_SIZE + 32 + 144)

_sha256 = hashlib.sha256
_get_digest = methodcaller("digest")


def _hash_blocks(view: memoryview, nblocks: int) -> bytes:
    """Return the concatenated SHA-256 hashes of the first *nblocks* blocks of *view*.

    This is the hot loop.  It runs entirely in C iterators (no Python-level
    bytecode per block): one memoryview slice, one hashlib object and one
    32-byte ``bytes`` per 4 KiB block.  hashlib releases the GIL while hashing
    buffers of 2 KiB or more, so other threads can run concurrently.
    """
    end = nblocks * BLOCK_SIZE
    starts = range(0, end, BLOCK_SIZE)
    stops = range(BLOCK_SIZE, end + BLOCK_SIZE, BLOCK_SIZE)
    return b"".join(
        map(_get_digest, map(_sha256, map(view.__getitem__, map(slice, starts, stops))))
    )


def _descriptor_digest(root_hash: bytes, data_size: int) -> bytes:
    """SHA-256 of the 256-byte fs-verity descriptor for *root_hash* and *data_size*."""
    desc = _DESC_HEAD + data_size.to_bytes(8, "little") + root_hash + _DESC_TAIL
    return _sha256(desc).digest()


class FsVerityHasher:
    """Streaming fs-verity (SHA-256, 4 KiB blocks, no salt) digest calculator.

    Feed data with :meth:`update` in chunks of any size, then call
    :meth:`digest` (or :meth:`hexdigest`) once.

    With ``empty_as_zero_block=True`` an empty input is treated the way the
    libcomposefs userspace code does it (root hash = SHA-256 of one zero
    block), which is what ``composefs-info measure-file`` prints.  The default
    is the kernel / fsverity-utils definition (all-zero root hash).  The flag
    only affects empty input.
    """

    __slots__ = ("_levels", "_counts", "_size", "_empty_as_zero_block", "_result")

    def __init__(self, *, empty_as_zero_block: bool = False) -> None:
        # _levels[0] holds a partial data block; _levels[k] (k >= 1) holds the
        # hashes of level k-1 blocks that do not yet fill a block.
        self._levels: list[bytearray] = [bytearray()]
        # _counts[k] = number of complete blocks hashed at level k so far.
        self._counts: list[int] = [0]
        self._size = 0
        self._empty_as_zero_block = empty_as_zero_block
        self._result: bytes | None = None

    @property
    def size(self) -> int:
        """Number of data bytes consumed so far."""
        return self._size

    def _push(self, level: int, hashes: bytes) -> None:
        """Append block hashes to tree *level* (>= 1), hashing full blocks upward."""
        while hashes:
            if level == len(self._levels):
                self._levels.append(bytearray())
                self._counts.append(0)
            buf = self._levels[level]
            buf += hashes
            nfull = len(buf) // BLOCK_SIZE
            if not nfull:
                return
            with memoryview(buf) as view:
                hashes = _hash_blocks(view, nfull)
            del buf[: nfull * BLOCK_SIZE]
            self._counts[level] += nfull
            level += 1

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed more file data (any length, including zero)."""
        if self._result is not None:
            raise ValueError("update() called after digest()")
        with memoryview(data) as mv:
            view = mv.cast("B") if (mv.ndim != 1 or mv.format not in ("B", "b", "c")) else mv
            n = view.nbytes
            if not n:
                return
            self._size += n
            pending = self._levels[0]
            pos = 0
            if pending:
                take = min(BLOCK_SIZE - len(pending), n)
                pending += view[:take]
                pos = take
                if len(pending) < BLOCK_SIZE:
                    return
                first = _sha256(pending).digest()
                pending.clear()
                self._counts[0] += 1
                self._push(1, first)
            nfull = (n - pos) // BLOCK_SIZE
            if nfull:
                end = pos + nfull * BLOCK_SIZE
                hashes = _hash_blocks(view[pos:end], nfull)
                self._counts[0] += nfull
                pos = end
                self._push(1, hashes)
            if pos < n:
                pending += view[pos:]

    def _root_hash(self) -> bytes:
        if self._size == 0:
            return _sha256(_ZERO_BLOCK).digest() if self._empty_as_zero_block else bytes(DIGEST_SIZE)
        levels, counts = self._levels, self._counts
        level = 0
        while True:
            buf = levels[level]
            if buf:
                # Zero-pad the partial block of this level and hash it.
                buf += bytes(BLOCK_SIZE - len(buf))
                h = _sha256(buf).digest()
                buf.clear()
                counts[level] += 1
                self._push(level + 1, h)
            if counts[level] == 1:
                # A single block at this level: its hash is the root and is
                # the only hash stored one level up.
                root = bytes(levels[level + 1])
                assert len(root) == DIGEST_SIZE
                return root
            level += 1

    def digest(self) -> bytes:
        """Return the 32-byte fs-verity digest of all data fed so far (finalizes)."""
        if self._result is None:
            self._result = _descriptor_digest(self._root_hash(), self._size)
            self._levels = []
        return self._result

    def hexdigest(self) -> str:
        """Return :meth:`digest` as 64 lowercase hex characters."""
        return self.digest().hex()


def digest_bytes(data: bytes | bytearray | memoryview, *, empty_as_zero_block: bool = False) -> bytes:
    """Return the fs-verity digest of an in-memory byte string."""
    h = FsVerityHasher(empty_as_zero_block=empty_as_zero_block)
    h.update(data)
    return h.digest()


def digest_file_and_size(
    path_or_fd: str | bytes | os.PathLike[str] | os.PathLike[bytes] | int,
    *,
    buffer_size: int = 1 << 20,
    empty_as_zero_block: bool = False,
) -> tuple[bytes, int]:
    """Return ``(fs-verity digest, number of bytes read)`` for a file.

    *path_or_fd* is a path, or an open file descriptor; a descriptor is read
    from its current position to EOF and is not closed.  Data is read into one
    preallocated buffer of *buffer_size* bytes (rounded up to a whole number
    of blocks).
    """
    if buffer_size <= 0:
        raise ValueError("buffer_size must be positive")
    buffer_size = -(-buffer_size // BLOCK_SIZE) * BLOCK_SIZE
    buf = bytearray(buffer_size)
    hasher = FsVerityHasher(empty_as_zero_block=empty_as_zero_block)
    update = hasher.update
    if isinstance(path_or_fd, int):
        f = open(path_or_fd, "rb", buffering=0, closefd=False)
    else:
        f = open(path_or_fd, "rb", buffering=0)
    with f, memoryview(buf) as view:
        readinto = f.readinto
        while True:
            n = readinto(view)
            if not n:
                break
            update(view[:n])
    return hasher.digest(), hasher.size


def digest_file(
    path_or_fd: str | bytes | os.PathLike[str] | os.PathLike[bytes] | int,
    *,
    buffer_size: int = 1 << 20,
    empty_as_zero_block: bool = False,
) -> bytes:
    """Return the fs-verity digest of a file (path or open fd, see :func:`digest_file_and_size`)."""
    return digest_file_and_size(
        path_or_fd, buffer_size=buffer_size, empty_as_zero_block=empty_as_zero_block
    )[0]


def object_path(digest: bytes) -> str:
    """Return the composefs object path for *digest*: ``"ab/cdef…"`` (2 + "/" + 62 hex chars)."""
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
    h = digest.hex()
    return f"{h[:2]}/{h[2:]}"
