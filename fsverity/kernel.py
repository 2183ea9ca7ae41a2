"""The kernel's fs-verity ioctls: ``FS_IOC_ENABLE_VERITY`` and ``FS_IOC_MEASURE_VERITY``.

The request numbers are encoded for the running machine (``_IOW``/``_IOWR``: the direction bits
differ on ppc, mips, sparc and alpha), never hard-coded.

One errno policy for both calls: an answer that means "fs-verity is not available for this file
here" (``NOT_AVAILABLE``: the file has no fs-verity, or the filesystem or kernel does not
support it) is a normal outcome, returned as ``None``/``False``; anything else raises
``OSError`` with the errno.

``measured_digest`` applies that policy to the measure call; ``measure_sha256`` also requires
a SHA-256 digest; ``fd_digest`` falls back to computing the digest from the data, as
``composefs-info measure-file`` does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .format import FS_VERITY_HASH_ALG_SHA256, MAX_DIGEST_SIZE, ENABLE_ARG, enable_arg

__all__ = ["FS_IOC_ENABLE_VERITY", "FS_IOC_MEASURE_VERITY", "FS_VERITY_HASH_ALG_SHA256",
           "MAX_DIGEST_SIZE", "NOT_AVAILABLE", "enable_verity", "measure_verity",
           "measure_sha256", "measured_digest", "fd_digest"]

_READ, _WRITE, _DIRSHIFT = ((2, 4, 29) if os.uname().machine.startswith(
    ("ppc", "powerpc", "mips", "sparc", "alpha")) else (2, 1, 30))


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)`` in this machine's ioctl encoding."""
    return (direction << _DIRSHIFT) | (size << 16) | (type_ << 8) | nr


def _iow(type_: int, nr: int, size: int) -> int:
    return _ioc(_WRITE, type_, nr, size)


def _iowr(type_: int, nr: int, size: int) -> int:
    return _ioc(_READ | _WRITE, type_, nr, size)


#: ``_IOW('f', 133, struct fsverity_enable_arg)``.
FS_IOC_ENABLE_VERITY = _iow(ord("f"), 133, ENABLE_ARG.size)
#: ``_IOWR('f', 134, struct fsverity_digest)`` (the 4-byte header: algorithm, size).
FS_IOC_MEASURE_VERITY = _iowr(ord("f"), 134, 4)

#: errnos meaning "no fs-verity for this file here": the file has none (ENODATA), the
#: filesystem or kernel cannot do it (ENOTTY, EOPNOTSUPP, ENOSYS, EINVAL), or the digest does
#: not fit (EOVERFLOW, an algorithm composefs does not use).
NOT_AVAILABLE = frozenset((errno.ENODATA, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS,
                           errno.EINVAL, errno.EOVERFLOW))


def measure_verity(fd: int) -> tuple[int, bytes]:
    """``(hash algorithm, digest)`` of an open file that has fs-verity enabled; raises
    ``OSError`` whatever the errno (see ``measured_digest`` for the policy)."""
    buf = bytearray(struct.pack("<HH", 0, MAX_DIGEST_SIZE) + bytes(MAX_DIGEST_SIZE))
    fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    algorithm, size = struct.unpack_from("<HH", buf)
    return algorithm, bytes(buf[4:4 + min(size, MAX_DIGEST_SIZE)])


def measured_digest(fd: int) -> tuple[int, bytes] | None:
    """``(hash algorithm, digest)`` the kernel reports for ``fd``, or ``None`` when fs-verity is
    not available for it (an errno of ``NOT_AVAILABLE``). Other errors raise ``OSError``.
    The caller decides what a digest of another algorithm than SHA-256 means."""
    try:
        return measure_verity(fd)
    except OSError as exc:
        if exc.errno in NOT_AVAILABLE:
            return None
        raise


def enable_verity(fd: int) -> bool:
    """Enable fs-verity (SHA-256, 4 KiB blocks, no salt) on ``fd``, a file open read-only with
    no writer open anywhere. True when enabled (or already on: EEXIST); False when not
    available here (an errno of ``NOT_AVAILABLE``). Other errors raise ``OSError``."""
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, enable_arg())
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return True
        if exc.errno in NOT_AVAILABLE:
            return False
        raise
    return True


def measure_sha256(fd: int) -> bytes | None:
    """The kernel's SHA-256 fs-verity digest of an open file, or None when it has none
    (``measured_digest``). A digest of another algorithm raises ``OSError(EILSEQ)``; other
    ioctl failures raise their ``OSError``."""
    measured = measured_digest(fd)
    if measured is None:
        return None
    algorithm, digest = measured
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
