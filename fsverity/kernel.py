"""Asking the kernel for a file's fs-verity digest (``FS_IOC_MEASURE_VERITY``).

Callers decide what a failure means (no verity on the file, no support in the filesystem or
kernel): this module only makes the call and raises ``OSError`` with its errno.
"""

from __future__ import annotations

import fcntl
import os
import struct


def _iowr(type_: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, size)`` in this machine's ioctl encoding."""
    if os.uname().machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        read, write, dirshift = 2, 4, 29
    else:
        read, write, dirshift = 2, 1, 30
    return ((read | write) << dirshift) | (size << 16) | (type_ << 8) | nr


#: ``_IOWR('f', 134, struct fsverity_digest)`` (the 4-byte header: algorithm, size).
FS_IOC_MEASURE_VERITY = _iowr(ord("f"), 134, 4)
FS_VERITY_HASH_ALG_SHA256 = 1
#: the largest digest the kernel may return (FS_VERITY_MAX_DIGEST_SIZE).
MAX_DIGEST_SIZE = 64


def measure_verity(fd: int) -> tuple[int, bytes]:
    """``(hash algorithm, digest)`` of an open file that has fs-verity enabled.

    Raises ``OSError``: ``ENODATA`` when the file has no fs-verity, ``ENOTTY``/``EOPNOTSUPP``
    where the filesystem or kernel does not support it, or whatever else the ioctl reports."""
    buf = bytearray(struct.pack("<HH", 0, MAX_DIGEST_SIZE) + bytes(MAX_DIGEST_SIZE))
    fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    algorithm, size = struct.unpack_from("<HH", buf)
    return algorithm, bytes(buf[4:4 + min(size, MAX_DIGEST_SIZE)])
