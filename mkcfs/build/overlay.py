"""composefs policy on xattrs: the overlayfs xattrs mkcomposefs adds, and how it escapes them.

An image is mounted as an overlayfs lower layer, so xattrs in the ``trusted.overlay.`` namespace
would be interpreted by overlayfs. Source xattrs there are escaped one level
(``trusted.overlay.X`` -> ``trusted.overlay.overlay.X``); the writer then adds the real ones:
``metacopy``/``redirect`` for files whose data lives in the object store, ``opaque`` on the root,
and the escaped whiteout markers of overlay whiteouts stored in the image.

``XattrBudget`` reproduces libcomposefs's per-node size accounting, including its wrap-around
quirk, so that exactly the inputs mkcomposefs refuses are refused:

**Xattr size accounting.** Each node keeps a running counter (an unsigned 64-bit integer in C).
Setting a key first removes an existing one, subtracting ``7 + len(key) + len(old value)`` (or
resetting the counter to 0 when no other xattr is left); the new entry then costs ``7 + len(key)
+ len(value)``, plus 12 when it is the node's only xattr. Keys must be 1..255 bytes, values at
most 65535, and the counter at most 32767 after the add. The quirk: the writer works on a copy
of the tree whose nodes start counting at 0 again while keeping their xattrs, so when one of the
writer's own additions replaces an xattr that came from the input with a longer value, the
subtraction wraps and the write fails with ERANGE (``cannot write file: Numerical result out of
range``), e.g. a whiteout that carried ``trusted.overlay.whiteout=abc``. Successful images are
not affected.
"""

from __future__ import annotations

import errno

from fsverity.format import FS_VERITY_HASH_ALG_SHA256   # the algorithm byte of the metacopy xattr
from mkcfs.errors import BuildInputError

OVERLAY_PREFIX = b"trusted.overlay."
ESCAPED_PREFIX = b"trusted.overlay.overlay."
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"
OPAQUE = b"trusted.overlay.opaque"
ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
USER_WHITEOUT = b"user.overlay.whiteout"
USER_WHITEOUTS = b"user.overlay.whiteouts"
USER_OPAQUE = b"user.overlay.opaque"
SELINUX = b"security.selinux"

#: limit on the accounted xattr size of one node (``LCFS_INODE_EXTERNAL_XATTR_MAX``).
XATTR_BUDGET_MAX = 32767
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65535
_ENTRY_OVERHEAD = 7   # 2 * sizeof(erofs_xattr_entry) - 1, the worst-case alignment estimate
_HEADER_OVERHEAD = 12
_U64 = (1 << 64) - 1


class XattrLimitError(BuildInputError):
    """An xattr that libcomposefs refuses to set (``errno`` says why, as mkcomposefs reports)."""

    def __init__(self, err: int, key: bytes) -> None:
        self.errno = err
        self.key = key
        super().__init__(f"{key.decode(errors='backslashreplace')}: {errno.errorcode.get(err, err)}")


def metacopy_value(digest: bytes | None) -> bytes:
    """The ``trusted.overlay.metacopy`` value: version 0, length 36, flags 0, algorithm, digest;
    empty when the digest is unknown."""
    if digest is None:
        return b""
    return bytes((0, 4 + len(digest), 0, FS_VERITY_HASH_ALG_SHA256)) + digest


def redirect_value(payload: bytes) -> bytes:
    """The ``trusted.overlay.redirect`` value for a backing path (always a leading ``/``)."""
    return b"/" + payload


def escape_overlay_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """A copy with every ``trusted.overlay.*`` key escaped one level (order kept)."""
    n = len(OVERLAY_PREFIX)
    return {(ESCAPED_PREFIX + k[n:] if k.startswith(OVERLAY_PREFIX) else k): v
            for k, v in xattrs.items()}


class XattrBudget:
    """A node's xattrs plus libcomposefs's running size counter (starts at 0, as after the
    writer's internal copy of the tree)."""

    __slots__ = ("xattrs", "used")

    def __init__(self, xattrs: dict[bytes, bytes]) -> None:
        self.xattrs = xattrs
        self.used = 0

    def set(self, key: bytes, value: bytes) -> None:
        """Insert or replace ``key``, accounting like ``lcfs_node_set_xattr``."""
        if not 0 < len(key) <= XATTR_NAME_MAX:
            raise XattrLimitError(errno.ERANGE, key)
        if len(value) > XATTR_SIZE_MAX:
            raise XattrLimitError(errno.EINVAL, key)
        xattrs = self.xattrs
        old = xattrs.pop(key, None)
        if old is not None:
            if xattrs:
                self.used = (self.used - (_ENTRY_OVERHEAD + len(key) + len(old))) & _U64
            else:
                self.used = 0
        cost = _ENTRY_OVERHEAD + len(key) + len(value) + (0 if xattrs else _HEADER_OVERHEAD)
        if (self.used + cost) & _U64 > XATTR_BUDGET_MAX:
            if old is not None:
                xattrs[key] = old
            raise XattrLimitError(errno.ERANGE, key)
        xattrs[key] = value
        self.used = (self.used + cost) & _U64
