"""Sparse files: holes are hashed as fixed zero hashes (``update_zeros``), never read, and give
the digest of the dense data. Oracles: ``fsverity digest`` (fsverity-utils) on a multi-GiB sparse
file, and the dense path on random small layouts (property tests)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsverity import (FsVerityHasher, data_extents, digest_bytes, digest_file,
                      digest_file_and_size, is_sparse, zero_hash)


def test_zero_hashes():
    assert zero_hash(0) == hashlib.sha256(bytes(4096)).digest()
    assert zero_hash(1) == hashlib.sha256(zero_hash(0) * 128).digest()
    assert zero_hash(3) == hashlib.sha256(zero_hash(2) * 128).digest()


def _sparse_file(path: Path, size: int, extents: list[tuple[int, bytes]]) -> bytes | None:
    """Write a sparse file; returns its dense content when it is small enough to hold."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)
    if size > 64 << 20:
        return None
    return path.read_bytes()


@given(ops=st.lists(st.one_of(
    st.tuples(st.just("data"), st.binary(min_size=0, max_size=9000)),
    st.tuples(st.just("zeros"), st.integers(0, 3 * 128 * 4096 + 5000))), max_size=8))
@settings(max_examples=150, deadline=None)
def test_update_zeros_equals_feeding_zeros(ops):
    sparse, dense = FsVerityHasher(), FsVerityHasher()
    content = bytearray()
    for kind, value in ops:
        if kind == "data":
            sparse.update(value)
            dense.update(value)
            content += value
        else:
            sparse.update_zeros(value)
            dense.update(bytes(value))
            content += bytes(value)
    assert sparse.digest() == dense.digest() == digest_bytes(content)


def test_huge_run_of_zeros_is_instant():
    h = FsVerityHasher()
    h.update(b"x")
    h.update_zeros((1 << 40) - 1)
    # 1 TiB: 2^28 data blocks; levels of 2^21, 2^14, 2^7 blocks and the root block. Only the
    # first block of each level holds anything but zeros.
    block = hashlib.sha256(b"x" + bytes(4095)).digest()
    for level in range(4):
        block = hashlib.sha256(block + zero_hash(level) * 127).digest()
    root = block
    from fsverity.format import descriptor
    assert h.digest() == hashlib.sha256(descriptor(1 << 40, root)).digest()


@given(layout=st.lists(st.tuples(st.integers(0, 2 << 20), st.binary(min_size=1, max_size=20000)),
                       max_size=6),
       tail=st.integers(0, 300_000))
@settings(max_examples=60, deadline=None)
def test_sparse_path_equals_dense_path(tmp_path_factory, layout, tail):
    path = tmp_path_factory.mktemp("sparse") / "f"
    size = max([o + len(d) for o, d in layout] + [0]) + tail
    dense = _sparse_file(path, size, layout)
    assert dense is not None
    assert digest_file(path) == digest_bytes(dense)
    fd = os.open(path, os.O_RDONLY)
    try:
        covered = bytearray(size)
        for start, length in data_extents(fd, 0, size):
            covered[start:start + length] = os.pread(fd, length, start)
        assert bytes(covered) == dense   # whatever is outside the extents is zeros
    finally:
        os.close(fd)


def test_fsverity_utils_agrees_on_a_big_sparse_file(tmp_path):
    exe = shutil.which("fsverity")
    if exe is None:
        pytest.skip("fsverity CLI (Debian package 'fsverity') is not installed")
    path = tmp_path / "sparse"
    size = (1 << 30) + 12345           # 1 GiB and a partial block, data at odd offsets
    _sparse_file(path, size, [(1, b"head"), (4095, os.urandom(10_000)),
                              ((1 << 29) - 3, os.urandom(70_000)), (size - 7, b"tail!!!")])
    assert is_sparse(os.stat(path))
    out = subprocess.run([exe, "digest", "--hash-alg=sha256", "--block-size=4096", str(path)],
                         check=True, capture_output=True, text=True).stdout
    expected = out.split()[0].removeprefix("sha256:")
    digest, size_read = digest_file_and_size(path)
    assert (digest.hex(), size_read) == (expected, size)
