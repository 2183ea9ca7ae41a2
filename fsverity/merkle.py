"""fs-verity file digests as used by composefs.

The project's one implementation of the fs-verity Merkle tree and descriptor
digest, with the fixed parameters composefs uses: SHA-256, 4096-byte Merkle
tree blocks, no salt (the descriptor is ``fsverity/format.py``'s).  The result
is identical to ``fsverity digest`` (fsverity-utils) and the kernel's
``FS_IOC_MEASURE_VERITY``.

Two entry points share the block hashing: :func:`digest_bytes` hashes a
buffer level by level in one go (the fast path for the many small files of a
tree: a file up to one read buffer is hashed that way), and
:class:`FsVerityHasher` streams data of any size.

**The digest.** The data is cut into 4096-byte blocks, the last one zero-padded; while a level
has more than one block, the SHA-256 of each block is taken and the 32-byte hashes, joined and
zero-padded to whole blocks, form the next level; the root hash is the SHA-256 of the single
block left (so a file of at most 4096 bytes has the hash of its padded data as root). The file's
digest is the SHA-256 of the 256-byte ``fsverity_descriptor`` (version 1, algorithm 1, log2 block
size 12, no salt, the data size and the root hash; ``fsverity/format.py``). For an empty file
the kernel and ``fsverity digest`` use an all-zero root hash, while libcomposefs's userspace
code hashes one zero block (``composefs-info measure-file`` prints that: see
``empty_as_zero_block``); an image never contains either. The object path of a digest is its
hex form split after two characters (``ab/cdef…``, :func:`object_path`).

Holes cost no hashing: an all-zero data block has a fixed hash, and so has
every all-zero subtree of the Merkle tree (``zero_hash(level)``), so
:meth:`FsVerityHasher.update_zeros` adds any run of zeros in time
proportional to the tree height, and :func:`digest_file` reads only the data
regions of a sparse file (``SEEK_DATA``/``SEEK_HOLE``, see :func:`data_extents`).

The streaming design follows fsverity-utils ``lib/compute_digest.c``: one
pending buffer per tree level; whenever a level's buffer holds a full block,
the block is hashed and its 32-byte hash is appended to the level above.
Memory use is therefore proportional to the number of tree levels (plus the
size of the chunk handed to a single :meth:`FsVerityHasher.update` call),
never to the size of the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from operator import methodcaller

from .format import (BLOCK_SIZE, DESCRIPTOR, DIGEST_SIZE, FS_VERITY_HASH_ALG_SHA256,
                     LOG_BLOCK_SIZE, descriptor)

__all__ = [
    "BLOCK_SIZE",
    "DIGEST_SIZE",
    "FsVerityHasher",
    "data_extents",
    "digest_bytes",
    "digest_file",
    "digest_file_and_size",
    "digest_padded",
    "is_sparse",
    "object_path",
    "zero_hash",
]

_HASHES_PER_BLOCK = BLOCK_SIZE // DIGEST_SIZE  # 128
_ZERO_BLOCK = bytes(BLOCK_SIZE)

_sha256 = hashlib.sha256
_get_digest = methodcaller("digest")
_pack_descriptor = DESCRIPTOR.pack

#: ``_zero_hashes[k]``: hash of a level-k block whose data below is all zeros.
_zero_hashes: list[bytes] = [_sha256(_ZERO_BLOCK).digest()]


def zero_hash(level: int) -> bytes:
    """The hash of a tree block at ``level`` (0 = data) covering only zeros: level 0 is the
    SHA-256 of a zero data block, level k+1 that of a block of 128 level-k zero hashes."""
    while len(_zero_hashes) <= level:
        _zero_hashes.append(_sha256(_zero_hashes[-1] * _HASHES_PER_BLOCK).digest())
    return _zero_hashes[level]


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


def _level_hashes(view: memoryview, n: int) -> bytes:
    """SHA-256 of each 4 KiB block of ``view[:n]``, the last one zero-padded."""
    end = n - n % BLOCK_SIZE
    hashes = b"".join(map(_get_digest, map(_sha256, map(view.__getitem__, map(
        slice, range(0, end, BLOCK_SIZE), range(BLOCK_SIZE, end + BLOCK_SIZE, BLOCK_SIZE))))))
    if n > end:
        h = _sha256(view[end:n])
        h.update(_ZERO_BLOCK[n - end:])
        hashes += h.digest()
    return hashes


def _descriptor_digest(root_hash: bytes, data_size: int) -> bytes:
    """SHA-256 of the 256-byte fs-verity descriptor for *root_hash* and *data_size*."""
    return _sha256(descriptor(data_size, root_hash)).digest()


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
                pos = min(BLOCK_SIZE - len(pending), n)
                if not self._fill_pending(view[:pos]):
                    return
            nfull = (n - pos) // BLOCK_SIZE
            if nfull:
                end = pos + nfull * BLOCK_SIZE
                hashes = _hash_blocks(view[pos:end], nfull)
                self._counts[0] += nfull
                pos = end
                self._push(1, hashes)
            if pos < n:
                pending += view[pos:]

    def _fill_pending(self, chunk: bytes | memoryview) -> bool:
        """Append ``chunk`` (at most what the partial data block lacks) to that block and hash
        the block once it is full. Returns whether it was (the partial block is then empty)."""
        pending = self._levels[0]
        pending += chunk
        if len(pending) < BLOCK_SIZE:
            return False
        first = _sha256(pending).digest()
        pending.clear()
        self._counts[0] += 1
        self._push(1, first)
        return True

    def update_zeros(self, n: int) -> None:
        """Feed ``n`` zero bytes (a hole) without hashing them: whole zero blocks and whole
        zero subtrees take their fixed hashes (``zero_hash``)."""
        if self._result is not None:
            raise ValueError("update_zeros() called after digest()")
        if n <= 0:
            return
        self._size += n
        pending = self._levels[0]
        if pending:
            take = min(BLOCK_SIZE - len(pending), n)
            n -= take
            if not self._fill_pending(bytes(take)):
                return
        full, rest = divmod(n, BLOCK_SIZE)
        if full:
            self._counts[0] += full
            self._push_zeros(1, full)
        if rest:
            pending += bytes(rest)

    def _push_zeros(self, level: int, count: int) -> None:
        """Append ``count`` zero hashes of the level below to tree *level* (>= 1)."""
        if level == len(self._levels):
            self._levels.append(bytearray())
            self._counts.append(0)
        z = zero_hash(level - 1)
        buf = self._levels[level]
        if buf:   # complete the partial block of this level first
            take = min((BLOCK_SIZE - len(buf)) // DIGEST_SIZE, count)
            buf += z * take
            count -= take
            if len(buf) < BLOCK_SIZE:
                return
            h = _sha256(buf).digest()
            buf.clear()
            self._counts[level] += 1
            self._push(level + 1, h)
        full, rest = divmod(count, _HASHES_PER_BLOCK)
        if full:   # whole zero blocks of this level: zero hashes one level up
            self._counts[level] += full
            self._push_zeros(level + 1, full)
        if rest:
            buf += z * rest

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
    """Return the fs-verity digest of an in-memory byte string, hashed level by level in one
    go (no streaming state: the fast path for small files)."""
    view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
    n = len(view)
    if not n:
        root = _sha256(_ZERO_BLOCK).digest() if empty_as_zero_block else bytes(DIGEST_SIZE)
        return _descriptor_digest(root, 0)
    return _digest_of_level0(_level_hashes(view, n), n)


def _digest_of_level0(level: bytes, n: int) -> bytes:
    """The fs-verity digest of ``n`` bytes (n > 0) whose data blocks hash to ``level``: the
    tree's upper levels, then the descriptor."""
    while len(level) > DIGEST_SIZE:      # one hash left: the root
        level = _level_hashes(memoryview(level), len(level))
    return _sha256(_pack_descriptor(1, FS_VERITY_HASH_ALG_SHA256, LOG_BLOCK_SIZE, 0, 0, n, level,
                                    b"", b"")).digest()


def digest_padded(buffer: memoryview, n: int) -> bytes:
    """The fs-verity digest of ``buffer[:n]`` (n > 0), hashed in place: ``buffer`` (format
    ``B``) should have room for ``n`` rounded up to whole blocks, and the bytes after ``n`` up
    to there are overwritten with zeros (the padding of the last block). What ``digest_bytes``
    does, without hashing the partial last block apart: the fast path for files read into a
    buffer."""
    end = -(-n // BLOCK_SIZE) * BLOCK_SIZE
    if end > len(buffer):   # no room for the padding
        return digest_bytes(buffer[:n])
    if end > n:
        buffer[n:end] = _ZERO_BLOCK[:end - n]
    if end == BLOCK_SIZE:
        level = _sha256(buffer[:BLOCK_SIZE]).digest()
    else:
        level = _hash_blocks(buffer, end // BLOCK_SIZE)
    return _digest_of_level0(level, n)


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each data region of ``fd`` between ``start`` and ``end``, in
    order; what lies between them is a hole (reads as zeros). Where the filesystem cannot tell
    (no ``SEEK_DATA``), the whole range is one data region."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:   # nothing but a hole up to the end of the file
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                yield pos, end - pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def is_sparse(st: os.stat_result) -> bool:
    """Whether a file's allocated blocks cover less than its size: it has holes worth looking
    for with ``data_extents`` (a filesystem that reports no ``st_blocks`` makes every file look
    sparse, which only costs a ``SEEK_DATA`` call or two)."""
    return st.st_blocks * 512 + BLOCK_SIZE < st.st_size


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
        fd = f.fileno()
        st = os.fstat(fd)
        if is_sparse(st):   # read only the data regions; holes are zero hashes
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            for start, length in data_extents(fd, pos, st.st_size):
                hasher.update_zeros(start - pos)
                os.lseek(fd, start, os.SEEK_SET)
                pos = start
                while pos < start + length:
                    n = readinto(view[:min(len(view), start + length - pos)])
                    if not n:
                        break
                    update(view[:n])
                    pos += n
            hasher.update_zeros(st.st_size - pos)
            os.lseek(fd, st.st_size, os.SEEK_SET)   # then whatever was appended since
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
    return digest.hex("/", DIGEST_SIZE - 1)   # a "/" after the first byte only
