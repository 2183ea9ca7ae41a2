"""The fs-verity descriptor and enable argument built by the derived packers are the bytes the
construct declarations give for composefs's parameters, and the digest is the descriptor's hash."""

from __future__ import annotations

import hashlib

from fsverity import digest_bytes
from fsverity import format as vfmt
from fsverity import structs as vstructs
from fsverity.merkle import FsVerityHasher


def test_descriptor_matches_the_declaration():
    root = hashlib.sha256(b"root").digest()
    expected = vstructs.FsVerityDescriptor.build(dict(
        version=1, hash_algorithm=1, log_blocksize=12, salt_size=0, sig_size=0,
        data_size=123456789, root_hash=root + bytes(32), salt=bytes(32), reserved=bytes(144)))
    assert vfmt.descriptor(123456789, root) == expected


def test_enable_arg_matches_the_declaration():
    expected = vstructs.FsVerityEnableArg.build(dict(
        version=1, hash_algorithm=1, block_size=4096, salt_size=0, salt_ptr=0, sig_size=0,
        reserved1=0, sig_ptr=0, reserved2=bytes(88)))
    assert vfmt.enable_arg() == expected and len(expected) == 128


def test_digest_is_the_hash_of_the_descriptor():
    data = b"x" * 5000
    blocks = [data[:4096], data[4096:] + bytes(8192 - len(data))]
    level1 = b"".join(hashlib.sha256(b).digest() for b in blocks)
    root = hashlib.sha256(level1 + bytes(4096 - len(level1))).digest()
    expected = hashlib.sha256(vfmt.descriptor(len(data), root)).digest()
    assert digest_bytes(data) == expected
    streamed = FsVerityHasher()
    streamed.update(data)
    assert streamed.digest() == expected


def test_ioctl_numbers():
    from fsverity import kernel

    # x86/arm encoding (this is what the test machines run): _IOW('f', 133, 128 bytes)
    assert kernel._ioc(1, ord("f"), 133, 128) == 0x40806685
    assert kernel._ioc(3, ord("f"), 134, 4) == 0xC0046686
