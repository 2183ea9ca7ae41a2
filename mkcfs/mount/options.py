"""``mount.composefs`` options: the ``-o`` string parsed into ``MountOptions``.

``split_options`` splits a mount option string at unescaped commas, ``parse_options`` turns the
items into ``MountOptions`` (composefs's own options, the generic VFS flags, the verity modes),
``MountOptions.validate`` checks the result. ``MountError`` is the error every part of the mount
raises.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator, Sequence

from fsverity import DIGEST_SIZE

from mkcfs.errors import CfsError
from mkcfs.mount.kernel import (
    _MOUNT_ATTR_NOATIME,
    _MOUNT_ATTR_NODEV,
    _MOUNT_ATTR_NODIRATIME,
    _MOUNT_ATTR_NOEXEC,
    _MOUNT_ATTR_NOSUID,
    _MOUNT_ATTR_RDONLY,
    _MOUNT_ATTR_RELATIME,
    _MOUNT_ATTR_STRICTATIME,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_STRICTATIME,
)

class MountError(CfsError, OSError):
    """A mount that cannot be done; the message is one line, ``errno`` says why."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------

#: the default ``source`` of the overlay mount, as upstream: identifies what made the mount.
MOUNT_SOURCE = "composefs"

#: verity modes: what overlayfs is asked for.
VERITY_OFF = "off"
VERITY_TRY = "try"
VERITY_REQUIRE = "require"

#: generic mount flags accepted besides composefs's own options: (mount(2) flag, MOUNT_ATTR_*).
_VFS_FLAGS: dict[str, tuple[int, int]] = {
    "nosuid": (MS_NOSUID, _MOUNT_ATTR_NOSUID),
    "nodev": (MS_NODEV, _MOUNT_ATTR_NODEV),
    "noexec": (MS_NOEXEC, _MOUNT_ATTR_NOEXEC),
    "noatime": (MS_NOATIME, _MOUNT_ATTR_NOATIME),
    "nodiratime": (MS_NODIRATIME, _MOUNT_ATTR_NODIRATIME),
    "relatime": (MS_RELATIME, _MOUNT_ATTR_RELATIME),
    "strictatime": (MS_STRICTATIME, _MOUNT_ATTR_STRICTATIME),
}
#: their opposites (clear the flag)
_VFS_CLEAR: dict[str, str] = {"suid": "nosuid", "dev": "nodev", "exec": "noexec",
                              "atime": "noatime", "diratime": "nodiratime"}
#: options that only mean something to mount(8) / fstab and are ignored here.
_USERSPACE_OPTIONS = frozenset(("defaults", "auto", "noauto", "nofail", "_netdev", "user",
                                "nouser", "users", "owner", "group", "comment"))
_ATIME_MODES = ("noatime", "relatime", "strictatime")


@dataclass
class MountOptions:
    """What to mount and how. ``basedirs`` is required (at least one).

    ``erofs_backing`` (``auto``/``file``/``loop``), ``erofs_api`` (``auto``/``legacy``) and
    ``overlay_api`` (``auto``/``fd``/``path``/``legacy``) force one mechanism instead of the first
    that works; they exist for tests."""

    basedirs: list[str] = field(default_factory=list)
    digest: bytes | None = None
    verity: str | None = None          # None: default (off, or require when digest is given)
    upperdir: str | None = None
    workdir: str | None = None
    idmap: str | None = None
    readonly: bool = False
    vfs_flags: tuple[str, ...] = ()
    erofs_backing: str = "auto"
    erofs_api: str = "auto"
    overlay_api: str = "auto"
    #: the overlay mount's source (what /proc/self/mountinfo shows); not a ``-o`` option
    source: str = MOUNT_SOURCE

    def validate(self) -> None:
        if not self.basedirs:
            raise MountError(errno.EINVAL, "No object dirs specified (option basedir=PATH)")
        if any(not d for d in self.basedirs):
            raise MountError(errno.EINVAL, "Value for basedir option has incorrect format")
        if (self.upperdir is None) != (self.workdir is None):
            raise MountError(errno.EINVAL, "Both workdir and upperdir must be specified if used")
        if self.digest is not None and len(self.digest) != DIGEST_SIZE:
            raise MountError(errno.EINVAL, f"digest must be {DIGEST_SIZE} bytes")
        if self.verity not in (None, VERITY_OFF, VERITY_TRY, VERITY_REQUIRE):
            raise MountError(errno.EINVAL, f"bad verity mode {self.verity!r}")
        if self.erofs_backing not in ("auto", "file", "loop"):
            raise MountError(errno.EINVAL, f"bad erofs_backing {self.erofs_backing!r}")
        if self.erofs_api not in ("auto", "legacy"):
            raise MountError(errno.EINVAL, f"bad erofs_api {self.erofs_api!r}")
        if self.overlay_api not in ("auto", "fd", "path", "legacy"):
            raise MountError(errno.EINVAL, f"bad overlay_api {self.overlay_api!r}")
        if not self.source or len(self.source.encode()) > 255 or "\0" in self.source:
            raise MountError(errno.EINVAL, f"bad mount source {self.source!r}")
        for name in self.vfs_flags:
            if name not in _VFS_FLAGS:
                raise MountError(errno.EINVAL, f"Unsupported option {name}")


def split_options(text: str) -> Iterator[tuple[str, str | None]]:
    """``key[=value]`` items of a mount option string, split at commas not escaped by ``\\``;
    the value has its escapes removed (as mount.composefs does). Empty items are skipped."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if c == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    items.append("".join(current))
    for item in items:
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            yield key, None
            continue
        out: list[str] = []
        j = 0
        while j < len(value):
            if value[j] == "\\" and j + 1 < len(value):
                j += 1
            out.append(value[j])
            j += 1
        yield key, "".join(out)


def _parse_digest(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != DIGEST_SIZE or len(text) != 2 * DIGEST_SIZE:
        raise MountError(errno.EINVAL, f"Invalid digest '{text}': expected {2 * DIGEST_SIZE} "
                                       "hex digits (a sha256 fs-verity digest)")
    return raw


def parse_options(texts: str | Iterable[str], sloppy: bool = False) -> MountOptions:
    """Parse ``-o`` option strings (composefs syntax) into ``MountOptions``.

    Unknown options are an error unless ``sloppy`` (mount -s). Options that only mean something
    to mount(8) (``defaults``, ``nofail``, ``x-*``...) are ignored."""
    if isinstance(texts, str):
        texts = [texts]
    opts = MountOptions()
    verity = tryverity = noverity = False
    vfs: dict[str, bool] = {}
    for text in texts:
        for key, value in split_options(text):
            if key in ("basedir", "digest", "upperdir", "workdir", "idmap"):
                if value is None:
                    raise MountError(errno.EINVAL, f"No value specified for {key} option")
                if value == "":
                    raise MountError(errno.EINVAL, f"Empty value for {key} option")
                if key == "basedir":
                    parts = value.split(":")
                    if any(not p for p in parts):
                        raise MountError(errno.EINVAL,
                                         "Value for basedir option has incorrect format")
                    opts.basedirs = parts
                elif key == "digest":
                    opts.digest = _parse_digest(value)
                else:
                    setattr(opts, key, value)
                continue
            if key in ("verity", "tryverity", "noverity", "ro", "rw") or key in _VFS_FLAGS \
                    or key in _VFS_CLEAR:
                if value is not None:
                    raise MountError(errno.EINVAL, f"Option {key} takes no value")
                if key == "verity":
                    verity = True
                elif key == "tryverity":
                    tryverity = True
                elif key == "noverity":
                    noverity = True
                elif key in ("ro", "rw"):
                    opts.readonly = key == "ro"
                elif key in _VFS_FLAGS:
                    if key in _ATIME_MODES:      # they exclude each other: the last one wins
                        for other in _ATIME_MODES:
                            vfs.pop(other, None)
                    vfs[key] = True
                else:
                    vfs[_VFS_CLEAR[key]] = False
                continue
            if key in _USERSPACE_OPTIONS or key.startswith(("x-", "X-")):
                continue
            if sloppy:
                continue
            raise MountError(errno.EINVAL, f"Unsupported option {key}")
    if noverity and (verity or tryverity):
        raise MountError(errno.EINVAL, "Conflicting options: noverity with "
                                       + ("verity" if verity else "tryverity"))
    if verity:
        opts.verity = VERITY_REQUIRE
    elif tryverity:
        opts.verity = VERITY_TRY
    elif noverity:
        opts.verity = VERITY_OFF
    opts.vfs_flags = tuple(k for k, on in vfs.items() if on)
    return opts


def _vfs_bits(names: Sequence[str], readonly: bool, attrs: bool) -> int:
    bits = (_MOUNT_ATTR_RDONLY if attrs else MS_RDONLY) if readonly else 0
    for name in names:
        bits |= _VFS_FLAGS[name][1 if attrs else 0]
    return bits
