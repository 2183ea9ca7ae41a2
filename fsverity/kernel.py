"""Asking the kernel for a file's fs-verity digest (``FS_IOC_MEASURE_VERITY``).

``measure_verity`` only makes the call and raises ``OSError`` with its errno; ``measure_sha256``
reads "no fs-verity here" errors as None; ``fd_digest`` falls back to computing the digest, as
``composefs-info measure-file`` does.
"""

from __future__ import annotations

import errno
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


#: errnos that mean "this file has no fs-verity digest to report" (none enabled, or the
#: filesystem or kernel cannot do fs-verity at all).
NO_VERITY_ERRNOS = frozenset((errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTTY))


def measure_sha256(fd: int) -> bytes | None:
    """The kernel's SHA-256 fs-verity digest of an open file, or None when it has none
    (:data:`NO_VERITY_ERRNOS`). A digest of another algorithm raises ``OSError(EILSEQ)``; other
    ioctl failures raise their ``OSError``."""
    try:
        algorithm, digest = measure_verity(fd)
    except OSError as exc:
        if exc.errno in NO_VERITY_ERRNOS:
            return None
        raise
    if algorithm != FS_VERITY_HASH_ALG_SHA256 or len(digest) != 32:
        raise OSError(errno.EILSEQ, "file has fs-verity with a digest that is not SHA-256")
    return digest


def fd_digest(fd: int) -> bytes:
    """``lcfs_fd_get_fsverity``: the kernel's digest when the file has fs-verity enabled, else
    the digest computed from the file's data (read from offset 0; an empty file digests as
    libcomposefs computes it). A file that cannot be read raises ``OSError(ENODATA)``."""
    from .merkle import digest_file

    digest = measure_sha256(fd)
    if digest is not None:
        return digest
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return digest_file(fd, empty_as_zero_block=True)
    except OSError:
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA)) from None
