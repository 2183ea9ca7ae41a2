"""Tests for fsverity.merkle: known answers, streaming, file input, object paths."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsverity import (
    BLOCK_SIZE,
    DIGEST_SIZE,
    FsVerityHasher,
    digest_bytes,
    digest_padded,
    digest_file,
    digest_file_and_size,
    object_path,
)

# ---------------------------------------------------------------------------
# Independent naive reference: build every level in full (fsverity/merkle.py, "The digest").
# ---------------------------------------------------------------------------


def _naive_split(data: bytes) -> list[bytes]:
    blocks = []
    for i in range(0, len(data), 4096):
        blocks.append(data[i : i + 4096].ljust(4096, b"\0"))
    return blocks


def _naive_root(blocks: list[bytes]) -> bytes:
    if len(blocks) == 1:
        return hashlib.sha256(blocks[0]).digest()
    joined = b"".join(hashlib.sha256(b).digest() for b in blocks)
    return _naive_root(_naive_split(joined))


def naive_digest(data: bytes, empty_as_zero_block: bool = False) -> bytes:
    if data:
        root = _naive_root(_naive_split(data))
    elif empty_as_zero_block:
        root = hashlib.sha256(bytes(4096)).digest()
    else:
        root = bytes(32)
    desc = bytearray(256)
    desc[0] = 1  # version
    desc[1] = 1  # SHA-256
    desc[2] = 12  # log2(4096)
    desc[3] = 0  # salt size
    desc[8:16] = len(data).to_bytes(8, "little")
    desc[16:48] = root
    return hashlib.sha256(bytes(desc)).digest()


def pattern(n: int) -> bytes:
    """fsverity-utils known-answer test data: byte i = (i%11 + i%439 + i%1103) & 0xff."""
    return bytes((i % 11 + i % 439 + i % 1103) & 0xFF for i in range(n))


# ---------------------------------------------------------------------------
# Known answers (checked with `fsverity digest` and libcomposefs; empty files: fsverity/merkle.py)
# ---------------------------------------------------------------------------

VECTORS = [
    (b"a", "bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557"),
    (b"hello\n", "9c76eecc7b76fcb46199cb27b90cf59a660e10575bb0412128905129d5b1c2aa"),
    (bytes(4096), "babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e"),
    (b"x" * 5000, "838b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4"),
    (bytes(1 << 20), "feb19a23e72cb1b8f935d668a09ecaad0bf7c5b9cdfa6dbba7c88a9998ed2b87"),
    (bytes((1 << 20) + 4096), "acb0f3a6b7c1f85581dedea288b629b7dcfef6ba85992cf3bafa90aaa58ebecd"),
]
BIG_ZERO_SIZE = (64 << 20) + 4096
BIG_ZERO_DIGEST = "f214c03cf33a41ae04bdc7b97b9c85c900278e10437a0bc13a6721068b56add2"
EMPTY_KERNEL = "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
EMPTY_LIBCOMPOSEFS = "cfc3391077edfd51859f6e5e16e03f82b1da3ee1a35d418b0d0b3b57740b4405"


def test_constants() -> None:
    assert BLOCK_SIZE == 4096
    assert DIGEST_SIZE == 32


@pytest.mark.parametrize(("data", "expected"), VECTORS, ids=lambda v: str(len(v)) if isinstance(v, bytes) else None)
def test_known_vectors(data: bytes, expected: str) -> None:
    assert digest_bytes(data).hex() == expected
    h = FsVerityHasher()
    h.update(data)
    assert h.hexdigest() == expected
    assert naive_digest(data).hex() == expected


def test_known_vector_64mib_plus_block_streaming() -> None:
    # 16385 -> 129 -> 2 -> 1 blocks: three hash levels. Fed in 1 MiB pieces.
    h = FsVerityHasher()
    chunk = bytes(1 << 20)
    for _ in range(64):
        h.update(chunk)
    h.update(memoryview(chunk)[:4096])
    assert h.size == BIG_ZERO_SIZE
    assert h.hexdigest() == BIG_ZERO_DIGEST
    assert digest_bytes(bytes(BIG_ZERO_SIZE)).hex() == BIG_ZERO_DIGEST


def test_empty_kernel_definition() -> None:
    assert digest_bytes(b"").hex() == EMPTY_KERNEL
    assert FsVerityHasher().hexdigest() == EMPTY_KERNEL
    assert naive_digest(b"").hex() == EMPTY_KERNEL


def test_empty_libcomposefs_variant() -> None:
    assert FsVerityHasher(empty_as_zero_block=True).hexdigest() == EMPTY_LIBCOMPOSEFS
    assert digest_bytes(b"", empty_as_zero_block=True).hex() == EMPTY_LIBCOMPOSEFS
    assert naive_digest(b"", empty_as_zero_block=True).hex() == EMPTY_LIBCOMPOSEFS


def test_zero_block_flag_only_affects_empty_input() -> None:
    for data in (b"\0", bytes(4096), b"hello\n"):
        assert digest_bytes(data, empty_as_zero_block=True) == digest_bytes(data)


def test_object_path() -> None:
    d = bytes.fromhex(VECTORS[3][1])
    assert object_path(d) == "83/8b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4"
    p = object_path(bytes(range(0xA0, 0xC0)))
    assert p == "a0/" + bytes(range(0xA1, 0xC0)).hex()
    assert len(p) == 65 and p[2] == "/" and p == p.lower()
    with pytest.raises(ValueError):
        object_path(b"\0" * 31)


def test_digest_single_use_and_update_after_digest() -> None:
    h = FsVerityHasher()
    h.update(b"a")
    first = h.digest()
    assert h.digest() == first
    assert h.hexdigest() == first.hex()
    with pytest.raises(ValueError):
        h.update(b"b")


def test_update_accepts_buffer_types() -> None:
    data = pattern(10000)
    expected = naive_digest(data)
    for obj in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))[0:]):
        h = FsVerityHasher()
        h.update(obj)
        assert h.digest() == expected
    h = FsVerityHasher()
    h.update(b"")
    h.update(memoryview(b""))
    h.update(data)
    assert h.digest() == expected


# ---------------------------------------------------------------------------
# Against the naive reference around block and level boundaries
# ---------------------------------------------------------------------------

BOUNDARY_SIZES = [
    0, 1, 31, 32, 33, 4095, 4096, 4097, 8191, 8192, 8193,
    127 * 4096, 128 * 4096 - 1, 128 * 4096, 128 * 4096 + 1, 129 * 4096, 129 * 4096 + 1,
    128 * 128 * 4096, 128 * 128 * 4096 + 1,
]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_boundary_sizes_vs_naive(size: int) -> None:
    data = pattern(size) if size <= 600_000 else os.urandom(size)
    expected = naive_digest(data)
    assert digest_bytes(data) == expected
    if size:   # in place in a buffer with room for the padding, whatever was there after it
        room = bytearray(b"\xa5" * (-(-size // 4096) * 4096))
        room[:size] = data
        assert digest_padded(memoryview(room), size) == expected
        tight = bytearray(data + b"\xa5")   # no room: the same digest
        assert digest_padded(memoryview(tight), size) == expected
    # Also streamed in awkward pieces.
    h = FsVerityHasher()
    step = 4093
    for i in range(0, size, step):
        h.update(data[i : i + step])
    assert h.digest() == expected


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3 * 4096 + 50)
    | st.integers(0, 140 * 4096).map(lambda n: pattern(n)),
    cuts=st.lists(st.integers(0, 140 * 4096), max_size=12),
)
def test_random_chunking_matches_one_shot(data: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    h = FsVerityHasher()
    for a, b in zip(points, points[1:]):
        h.update(data[a:b])
    assert h.size == len(data)
    one_shot = digest_bytes(data)
    assert h.digest() == one_shot
    assert one_shot == naive_digest(data)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=0, max_size=20000), st.integers(1, 5000))
def test_fixed_chunk_sizes(data: bytes, step: int) -> None:
    h = FsVerityHasher()
    for i in range(0, len(data), step):
        h.update(memoryview(data)[i : i + step])
    assert h.digest() == naive_digest(data)


# ---------------------------------------------------------------------------
# Files and file descriptors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 5000, 1 << 20, (1 << 20) + 4097])
def test_digest_file_path_and_fd(tmp_path: Path, size: int) -> None:
    data = pattern(size) if size < 10000 else os.urandom(size)
    p = tmp_path / "f"
    p.write_bytes(data)
    expected = digest_bytes(data)
    assert digest_file(p) == expected
    assert digest_file(str(p)) == expected
    assert digest_file(os.fsencode(p)) == expected
    assert digest_file(p, buffer_size=5000) == expected  # rounded to whole blocks
    assert digest_file_and_size(p, buffer_size=4096) == (expected, size)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert digest_file_and_size(fd) == (expected, size)
        os.fstat(fd)  # still open
        # Reads from the current position.
        os.lseek(fd, 1 if size else 0, os.SEEK_SET)
        assert digest_file(fd) == digest_bytes(data[1:])
    finally:
        os.close(fd)


def test_digest_file_pipe_short_reads() -> None:
    data = os.urandom(3 * 4096 + 123)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            for i in range(0, len(data), 1000):
                os.write(w, data[i : i + 1000])
            os._exit(0)
        os.close(w)
        w = -1
        assert digest_file_and_size(r, buffer_size=8192) == (digest_bytes(data), len(data))
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_digest_file_empty_variant(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    assert digest_file(p).hex() == EMPTY_KERNEL
    assert digest_file(p, empty_as_zero_block=True).hex() == EMPTY_LIBCOMPOSEFS


# ---------------------------------------------------------------------------
# fsverity-utils `fsverity digest` cross-check
# ---------------------------------------------------------------------------

PATTERN_SIZES = [1, 100, 4095, 4096, 4097, 100_000, 128 * 4096, 128 * 4096 + 1, 1_000_000, 3_000_001]


@pytest.mark.parametrize("size", PATTERN_SIZES)
def test_fsverity_utils_pattern(tmp_path: Path, size: int) -> None:
    exe = shutil.which("fsverity")
    if exe is None:
        pytest.skip("fsverity CLI (Debian package 'fsverity') is not installed")
    data = pattern(size)
    p = tmp_path / f"pattern-{size}"
    p.write_bytes(data)
    out = subprocess.run(
        [exe, "digest", "--hash-alg=sha256", "--block-size=4096", str(p)],
        check=True, capture_output=True, text=True,
    ).stdout
    algo_hex, name = out.split()
    assert name == str(p)
    assert algo_hex.startswith("sha256:")
    expected = algo_hex.removeprefix("sha256:")
    assert digest_bytes(data).hex() == expected
    assert digest_file(p).hex() == expected
