"""Mount a composefs image: the EROFS image read-only, overlayfs stacked on top of it.

What ``mount.composefs`` (composefs 1.0.8) does, in Python with ``ctypes`` system calls:

1. Open the image once (``O_RDONLY``). Everything after that works on this descriptor: the
   ``digest=`` check measures it (kernel fs-verity where the file has it, else the fs-verity digest
   computed in user space from the descriptor), the header is read from it, and the kernel mounts
   it through ``/proc/self/fd/N`` (a file-backed EROFS mount, Linux >= 6.12) or through a read-only
   loop device configured from it (``LOOP_CONFIGURE``, autoclear). The checked file is the mounted
   file.
2. Mount EROFS with the new mount API (``fsopen``/``fsconfig``/``fsmount``) as a *detached* mount:
   it has no place in any directory tree, only a file descriptor.
3. Create overlayfs with ``metacopy=on,redirect_dir=on``, the EROFS mount as the one lower layer and
   the base directories as data-only layers, and attach it at the mount point. Preferred: the
   layer given by descriptor (``fsconfig(FSCONFIG_SET_FD, "lowerdir+")``, Linux >= 6.13), so no
   temporary directory is ever created. Fallbacks, in this order, for older kernels: the EROFS
   mount attached on a private temporary directory and named by path (``lowerdir+``/``datadir+``,
   Linux >= 6.7), then the legacy ``mount(2)`` string ``lowerdir=meta::data1::data2`` (data-only
   layers, Linux >= 6.5), then ``lowerdir=meta:data1:data2``. A temporary directory is detached
   (``umount2(MNT_DETACH)``) and removed as soon as overlayfs holds its layer.

After ``umount MOUNTPOINT`` nothing remains: the EROFS mount only lived inside the overlay, the loop
device (if any) clears itself, no directory was left behind.

Verity (options as upstream):

* ``verity``: overlayfs ``verity=require`` (every file of the image must carry an fs-verity digest
  and every backing object must have fs-verity enabled with that digest). Refused with a clear
  message on a kernel built without fs-verity, where no file could ever be read.
* ``tryverity``: ``verity=require`` when the kernel has fs-verity and overlayfs accepts the option;
  otherwise nothing.
* ``digest=HEX``: the image must have this fs-verity digest. Like upstream it implies ``verity``
  where the kernel has fs-verity; on a kernel without fs-verity only the image is checked (there is
  nothing to check the objects with). ``noverity`` turns the implied verity off.
* ``noverity``: no verity checks by overlayfs (the default when none of the above is given).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gzip
import os
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from erofs.format import (
    COMPOSEFS_HEADER,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    LCFS_EROFS_FLAGS_HAS_ACL,
    LCFS_EROFS_MAGIC,
    SUPER_BLOCK,
)
from fsverity import DIGEST_SIZE, FsVerityHasher

from .errors import CfsError

__all__ = [
    "MountError",
    "MountOptions",
    "MountResult",
    "kernel_has_fsverity",
    "mount_image",
    "parse_options",
    "split_options",
    "umount",
    "TEMP_PREFIX",
]

#: name prefix of the temporary directories the path-based fallbacks create (and remove).
TEMP_PREFIX = ".composefs."
#: the ``source`` of the overlay mount, as upstream: identifies what made the mount.
MOUNT_SOURCE = "composefs"


class MountError(CfsError, OSError):
    """A mount that cannot be done; the message is one line, ``errno`` says why."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------
# system calls
# --------------------------------------------------------------------------------------------

_FSOPEN_CLOEXEC = 0x1
_FSMOUNT_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_SET_FD = 5
_FSCONFIG_CMD_CREATE = 6
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_MOVE_MOUNT_T_SYMLINKS = 0x10
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MNT_DETACH = 2
_CLONE_NEWNS = 0x00020000

# mount(2) flags and their fsmount(2) MOUNT_ATTR_* counterparts
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_SILENT = 0x8000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_NOEXEC = 0x8
_MOUNT_ATTR_RELATIME = 0x0
_MOUNT_ATTR_NOATIME = 0x10
_MOUNT_ATTR_STRICTATIME = 0x20
_MOUNT_ATTR_NODIRATIME = 0x80
_MOUNT_ATTR_IDMAP = 0x100000

# loop devices (linux/loop.h): plain numbers, the same on every architecture
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_LO_FLAGS_DIRECT_IO = 16
_LO_NAME_SIZE = 64


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_char * _LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_char * _LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * 32), ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", _LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _FsverityDigest(ctypes.Structure):
    _fields_ = [("digest_algorithm", ctypes.c_uint16), ("digest_size", ctypes.c_uint16),
                ("digest", ctypes.c_uint8 * 64)]


def _syscall_numbers() -> dict[str, int]:
    """The new mount API's syscall numbers for this machine (unified numbering since 5.2, with
    the usual offsets on alpha and mips)."""
    machine = os.uname().machine
    base = 0
    if machine == "alpha":
        base = 110
    elif machine.startswith("mips"):
        base = 5000 if struct.calcsize("P") == 8 else 4000
    numbers = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
               "fsmount": 432, "mount_setattr": 442}
    return {k: v + base for k, v in numbers.items()}


def _ioc_wr(type_: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, size)`` in this machine's ioctl encoding."""
    machine = os.uname().machine
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        read, write, dirshift = 2, 4, 29
    else:
        read, write, dirshift = 2, 1, 30
    return ((read | write) << dirshift) | (size << 16) | (type_ << 8) | nr


_FS_IOC_MEASURE_VERITY = _ioc_wr(ord("f"), 134, 4)
_FS_VERITY_HASH_ALG_SHA256 = 1


class _Kernel:
    """Thin ctypes wrappers; each raises ``OSError`` with the call's errno."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.nr = _syscall_numbers()

    def _sys(self, name: str, *args: object) -> int:
        res = self.libc.syscall(ctypes.c_long(self.nr[name]), *args)
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return res

    @staticmethod
    def _s(text: str | bytes | None) -> ctypes.c_char_p | None:
        if text is None:
            return None
        return ctypes.c_char_p(os.fsencode(text))

    def fsopen(self, fstype: str) -> int:
        return self._sys("fsopen", self._s(fstype), ctypes.c_uint(_FSOPEN_CLOEXEC))

    def fsconfig(self, fd: int, cmd: int, key: str | None = None,
                 value: str | bytes | None = None, aux: int = 0) -> None:
        self._sys("fsconfig", ctypes.c_int(fd), ctypes.c_uint(cmd), self._s(key), self._s(value),
                  ctypes.c_int(aux))

    def fsmount(self, fd: int, attr_flags: int) -> int:
        return self._sys("fsmount", ctypes.c_int(fd), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                         ctypes.c_uint(attr_flags))

    def move_mount(self, from_fd: int, to_path: str) -> None:
        self._sys("move_mount", ctypes.c_int(from_fd), ctypes.c_char_p(b""),
                  ctypes.c_int(_AT_FDCWD), self._s(to_path),
                  ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_SYMLINKS))

    def mount_setattr_idmap(self, mnt_fd: int, userns_fd: int) -> None:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        self._sys("mount_setattr", ctypes.c_int(mnt_fd), ctypes.c_char_p(b""),
                  ctypes.c_uint(_AT_EMPTY_PATH), ctypes.byref(attr),
                  ctypes.c_size_t(ctypes.sizeof(attr)))

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
        res = self.libc.mount(self._s(source), self._s(target), self._s(fstype),
                              ctypes.c_ulong(flags), self._s(data))
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def umount2(self, target: str, flags: int = 0) -> None:
        res = self.libc.umount2(self._s(target), ctypes.c_int(flags))
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), target)

    def setns(self, fd: int, nstype: int) -> None:
        if self.libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def ioctl(self, fd: int, request: int, arg: object) -> int:
        res = self.libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), arg)
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return res


_KERNEL: _Kernel | None = None


def _kernel() -> _Kernel:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _Kernel()
    return _KERNEL


def _fs_log(fd: int) -> list[str]:
    """The messages the kernel queued on a filesystem context (``e overlay: ...`` lines)."""
    messages = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        text = chunk.decode(errors="replace").strip()
        if text[:2] in ("e ", "w "):
            text = text[2:]
        messages.append(text)
    return messages


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def kernel_has_fsverity() -> bool:
    """Whether the running kernel was built with fs-verity (``CONFIG_FS_VERITY``).

    Asks /proc/config.gz, then /boot/config-$(uname -r), then /proc/kallsyms; when none of them
    can tell, assumes yes (and lets the kernel decide, as upstream does)."""
    release = os.uname().release
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{release}", open)):
        try:
            with opener(path, "rt") as f:  # type: ignore[operator]
                for line in f:
                    if line.startswith("CONFIG_FS_VERITY="):
                        return line.strip().split("=", 1)[1] in ("y", "m")
                return False
        except OSError:
            continue
    try:
        with open("/proc/kallsyms", "rb") as f:
            data = f.read()
        if data:
            return b" fsverity_ioctl_measure" in data or b" fsverity_get_digest" in data
    except OSError:
        pass
    return True


def _measure_kernel(fd: int) -> bytes | None:
    """The file's fs-verity digest from the kernel, or None when the file has none (or the
    kernel/filesystem cannot tell)."""
    arg = _FsverityDigest(0, 64)
    try:
        _kernel().ioctl(fd, _FS_IOC_MEASURE_VERITY, ctypes.byref(arg))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL,
                         errno.ENOSYS, errno.EOVERFLOW):
            return None
        raise
    if arg.digest_algorithm != _FS_VERITY_HASH_ALG_SHA256:
        return b""   # a digest, but not one comparable with a composefs (sha256) digest
    return bytes(arg.digest[:arg.digest_size])


def _measure_userspace(fd: int) -> bytes:
    """The fs-verity digest of everything readable from ``fd`` (read with pread from 0)."""
    hasher = FsVerityHasher()
    buf = bytearray(1 << 20)
    offset = 0
    with memoryview(buf) as view:
        while True:
            n = os.preadv(fd, [view], offset)
            if n == 0:
                break
            hasher.update(view[:n])
            offset += n
    return hasher.digest()


def _read_image_flags(fd: int, image: str) -> int:
    """The composefs header flags; MountError if this is not a composefs image."""
    head = os.pread(fd, EROFS_SUPER_OFFSET + SUPER_BLOCK.size, 0)
    if len(head) < EROFS_SUPER_OFFSET + SUPER_BLOCK.size:
        raise MountError(errno.EINVAL, f"Failed to mount composefs {image}: "
                                       "not a composefs image (file too short)")
    magic, _version, flags = COMPOSEFS_HEADER.unpack_from(head, 0)[:3]
    sb_magic = struct.unpack_from("<I", head, EROFS_SUPER_OFFSET)[0]
    if magic != LCFS_EROFS_MAGIC or sb_magic != EROFS_SUPER_MAGIC_V1:
        raise MountError(errno.EINVAL, f"Failed to mount composefs {image}: "
                                       "not a composefs image (bad magic)")
    return flags


def _is_privileged() -> bool:
    """CAP_SYS_ADMIN in the effective set (root usually has it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 21))
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _abspath(path: str) -> str:
    """Absolute, but not normalized (``..`` after a symlink keeps its meaning)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _check_dir(what: str, path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise MountError(exc.errno or errno.ENOENT, f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(errno.ENOTDIR, f"{what} {path}: Not a directory")


# --------------------------------------------------------------------------------------------
# mounting
# --------------------------------------------------------------------------------------------

@dataclass
class MountResult:
    """How a mount was made (for -v and tests)."""

    erofs: str = ""              # "file" (file-backed) or "loop"
    erofs_api: str = ""          # "new" (fsmount) or "legacy" (mount(2))
    overlay: str = ""            # "fd" (lowerdir+ by fd), "path" (lowerdir+ by path), "legacy"
    loop_device: str | None = None
    digest_check: str | None = None   # "kernel" or "userspace"
    verity: str = VERITY_OFF     # what overlayfs was given
    temp_dir: bool = False       # whether a temporary directory was needed

    def describe(self) -> str:
        erofs = "file-backed EROFS" if self.erofs == "file" else f"EROFS on {self.loop_device}"
        overlay = {"fd": "overlayfs (new mount API, layer by fd)",
                   "path": "overlayfs (new mount API, layer by path)",
                   "legacy": "overlayfs (mount(2))"}[self.overlay]
        extra = f", digest checked ({self.digest_check})" if self.digest_check else ""
        return f"{erofs} ({self.erofs_api} mount API), {overlay}, verity={self.verity}{extra}"


class _Unsupported(Exception):
    """This mechanism is not supported by the kernel: try the next one."""

    def __init__(self, err: OSError, log: list[str] | None = None) -> None:
        super().__init__(str(err))
        self.err = err
        self.log = log or []


def _loop_device(image_fd: int, image_name: str, cleanup: contextlib.ExitStack) -> tuple[int, str]:
    """A read-only autoclear loop device over ``image_fd``: (open fd, /dev/loopN)."""
    kernel = _kernel()
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        last: OSError | None = None
        for _ in range(16):
            number = kernel.ioctl(ctl, _LOOP_CTL_GET_FREE, ctypes.c_long(0))
            name = f"/dev/loop{number}"
            loop_fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            for flags in (_LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR | _LO_FLAGS_DIRECT_IO,
                          _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR):
                config = _LoopConfig()
                config.fd = image_fd
                config.block_size = 4096
                config.info.lo_flags = flags
                config.info.lo_file_name = os.fsencode(image_name)[:_LO_NAME_SIZE - 1]
                try:
                    kernel.ioctl(loop_fd, _LOOP_CONFIGURE, ctypes.byref(config))
                except OSError as exc:
                    last = exc
                    if exc.errno == errno.EINVAL and flags & _LO_FLAGS_DIRECT_IO:
                        continue    # the backing file cannot do direct I/O
                    break
                cleanup.callback(_close, loop_fd)
                return loop_fd, name
            os.close(loop_fd)
            if last is not None and last.errno != errno.EBUSY:
                raise last   # EBUSY: someone else took that device, get another
        assert last is not None
        raise last
    finally:
        os.close(ctl)


class _Mounter:
    def __init__(self, image: str, fd: int, image_flags: int, mountpoint: str,
                 options: MountOptions, verity: str, idmap_fd: int,
                 cleanup: contextlib.ExitStack) -> None:
        self.image = image
        self.fd = fd
        self.has_acl = bool(image_flags & LCFS_EROFS_FLAGS_HAS_ACL)
        self.mountpoint = mountpoint
        self.options = options
        self.verity = verity
        self.idmap_fd = idmap_fd
        self.cleanup = cleanup
        self.kernel = _kernel()
        self.result = MountResult(verity=verity)
        self.erofs_fd = -1           # detached EROFS mount
        self.erofs_path: str | None = None   # or: attached on a temporary directory
        self.loop_name: str | None = None

    # -- EROFS ------------------------------------------------------------------------------

    def _source(self) -> str:
        return self.loop_name or f"/proc/self/fd/{self.fd}"

    def _use_loop(self) -> None:
        _loop_fd, self.loop_name = _loop_device(self.fd, self.image, self.cleanup)
        self.result.erofs = "loop"
        self.result.loop_device = self.loop_name

    def _erofs_new_api(self) -> int:
        """A detached read-only EROFS mount of the image; ENOTBLK when the source must be a
        block device (no file-backed mounts)."""
        k = self.kernel
        fs = k.fsopen("erofs")
        try:
            try:
                k.fsconfig(fs, _FSCONFIG_SET_STRING, "source", self._source())
                k.fsconfig(fs, _FSCONFIG_SET_FLAG, "ro")
                if not self.has_acl:
                    k.fsconfig(fs, _FSCONFIG_SET_FLAG, "noacl")
                k.fsconfig(fs, _FSCONFIG_CMD_CREATE)
            except OSError as exc:
                log = _fs_log(fs)
                if log and exc.errno != errno.ENOTBLK:
                    raise OSError(exc.errno, f"{exc.strerror} ({'; '.join(log)})") from None
                raise
            mnt = k.fsmount(fs, _MOUNT_ATTR_RDONLY)
        finally:
            os.close(fs)
        try:
            if self.idmap_fd >= 0:
                k.mount_setattr_idmap(mnt, self.idmap_fd)
        except BaseException:
            os.close(mnt)
            raise
        return mnt

    def mount_erofs(self) -> None:
        backing = self.options.erofs_backing
        self.result.erofs = "file"
        try:
            if backing == "loop":
                self._use_loop()
            if self.options.erofs_api == "legacy":
                raise OSError(errno.ENOSYS, "forced legacy mount(2)")
            try:
                self.erofs_fd = self._erofs_new_api()
            except OSError as exc:
                if exc.errno != errno.ENOTBLK or backing != "auto":
                    raise
                self._use_loop()
                self.erofs_fd = self._erofs_new_api()
            self.cleanup.callback(_close, self.erofs_fd)
            self.result.erofs_api = "new"
            return
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise self._fail("cannot mount the EROFS image", exc) from None
        # no new mount API: mount(2) on a temporary directory
        if self.idmap_fd >= 0:
            raise MountError(errno.EOPNOTSUPP, f"Failed to mount composefs {self.image}: "
                                               "idmap needs the new mount API (Linux >= 5.12)")
        self.result.erofs_api = "legacy"
        path = self._temp_dir()
        data = None if self.has_acl else "noacl"
        try:
            self.kernel.mount(self._source(), path, "erofs", MS_RDONLY, data)
        except OSError as exc:
            if exc.errno != errno.ENOTBLK or backing != "auto":
                raise self._fail("cannot mount the EROFS image", exc) from None
            self._use_loop()
            try:
                self.kernel.mount(self._source(), path, "erofs", MS_RDONLY, data)
            except OSError as exc2:
                raise self._fail("cannot mount the EROFS image", exc2) from None
        self._attached(path)

    def _temp_dir(self) -> str:
        base = "/run" if os.path.isdir("/run") and os.access("/run", os.W_OK) \
            else tempfile.gettempdir()
        path = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=base)
        self.cleanup.callback(_rmdir, path)
        self.result.temp_dir = True
        return path

    def _attached(self, path: str) -> None:
        """The EROFS mount is on ``path``: detach it when done (the overlay keeps its own
        reference)."""
        self.erofs_path = path
        self.cleanup.callback(_detach, self.kernel, path)

    def erofs_on_path(self) -> str:
        """The EROFS mount attached on a temporary directory (for the path-based fallbacks)."""
        if self.erofs_path is None:
            path = self._temp_dir()
            try:
                self.kernel.move_mount(self.erofs_fd, path)
            except OSError as exc:
                raise self._fail(f"cannot attach the EROFS mount on {path}", exc) from None
            self._attached(path)
        assert self.erofs_path is not None
        return self.erofs_path

    # -- overlayfs ---------------------------------------------------------------------------

    def _fail(self, what: str, exc: OSError, log: Iterable[str] = ()) -> MountError:
        detail = exc.strerror or os.strerror(exc.errno or 0)
        log = [m for m in log if m]
        if log:
            detail += " (" + "; ".join(dict.fromkeys(log)) + ")"
        return MountError(exc.errno or errno.EIO,
                          f"Failed to mount composefs {self.image}: {what}: {detail}")

    def _overlay_new_api(self, by_fd: bool) -> int:
        """Create the overlay with the new mount API; return the detached mount's fd.

        Raises _Unsupported where the kernel lacks what this needs (the caller falls back)."""
        k = self.kernel
        opts = self.options
        try:
            fs = k.fsopen("overlay")
        except OSError as exc:
            raise _Unsupported(exc) from None
        try:
            def config(key: str, value: str | None = None, fd: int = -1,
                       unsupported_on_einval: bool = True) -> None:
                try:
                    if fd >= 0:
                        k.fsconfig(fs, _FSCONFIG_SET_FD, key, None, fd)
                    else:
                        k.fsconfig(fs, _FSCONFIG_SET_STRING, key, value)
                except OSError as exc:
                    log = _fs_log(fs)
                    if exc.errno == errno.EINVAL and unsupported_on_einval:
                        raise _Unsupported(exc, log) from None
                    raise self._fail(f"overlayfs option {key}", exc, log) from None

            # a kernel that accepts anything only emulates the new API (no validation): fall back
            try:
                k.fsconfig(fs, _FSCONFIG_SET_STRING, "unsupported", "unsupported")
            except OSError:
                _fs_log(fs)
            else:
                raise _Unsupported(OSError(errno.ENOSYS, "overlayfs without the new mount API"))
            config("source", MOUNT_SOURCE, unsupported_on_einval=False)
            config("metacopy", "on", unsupported_on_einval=False)
            config("redirect_dir", "on", unsupported_on_einval=False)
            if self.verity != VERITY_OFF:
                try:
                    k.fsconfig(fs, _FSCONFIG_SET_STRING, "verity", "require")
                    self.result.verity = VERITY_REQUIRE
                except OSError as exc:
                    log = _fs_log(fs)
                    if self.verity == VERITY_REQUIRE:
                        raise self._fail("overlayfs does not support verity=require", exc,
                                         log) from None
                    self.result.verity = VERITY_OFF
            if by_fd:
                config("lowerdir+", fd=self.erofs_fd)
            else:
                config("lowerdir+", self.erofs_on_path())
            for basedir in opts.basedirs:
                config("datadir+", _abspath(basedir))
            if opts.upperdir is not None:
                config("upperdir", _abspath(opts.upperdir))
                config("workdir", _abspath(opts.workdir or ""))
            try:
                k.fsconfig(fs, _FSCONFIG_CMD_CREATE)
            except OSError as exc:
                log = _fs_log(fs)
                if exc.errno == errno.EINVAL:
                    raise _Unsupported(exc, log) from None
                raise self._fail("cannot create the overlay", exc, log) from None
            try:
                return k.fsmount(fs, _vfs_bits(opts.vfs_flags, opts.readonly, attrs=True))
            except OSError as exc:
                raise self._fail("cannot create the overlay mount", exc, _fs_log(fs)) from None
        finally:
            os.close(fs)

    def _legacy_lowerdir(self, data_only: bool) -> str:
        sep = "::" if data_only else ":"
        return sep.join(_escape_legacy(p) for p in
                        [self.erofs_on_path()] + [_abspath(d) for d in self.options.basedirs])

    def _overlay_legacy(self, logs: Sequence[str] = ()) -> None:
        """mount(2) with the option string; ``logs``: what the kernel said to the new-API
        attempts (mount(2) errors come without a message, those help explain them)."""
        opts = self.options
        flags = _vfs_bits(opts.vfs_flags, opts.readonly, attrs=False)
        last: OSError | None = None
        for data_only in (True, False):
            parts = ["metacopy=on", "redirect_dir=on",
                     "lowerdir=" + self._legacy_lowerdir(data_only)]
            if opts.upperdir is not None:
                parts.append("upperdir=" + _escape_legacy(_abspath(opts.upperdir)))
                parts.append("workdir=" + _escape_legacy(_abspath(opts.workdir or "")))
            if self.verity == VERITY_REQUIRE:
                parts.append("verity=require")
            try:
                self.kernel.mount(MOUNT_SOURCE, self.mountpoint, "overlay",
                                  flags | (MS_SILENT if data_only else 0), ",".join(parts))
                return
            except OSError as exc:
                last = exc
                if exc.errno != errno.EINVAL:
                    break
        assert last is not None
        logs = list(logs) if last.errno == errno.EINVAL else []
        if last.errno == errno.EINVAL and not logs:
            logs = ["see the kernel log (dmesg) for why"]
        raise self._fail("cannot mount overlayfs", last, logs)

    def mount_overlay(self) -> None:
        api = self.options.overlay_api
        choices = {"auto": ("fd", "path", "legacy"), "fd": ("fd",), "path": ("path",),
                   "legacy": ("legacy",)}[api]
        if self.erofs_fd < 0:
            choices = tuple(c for c in choices if c != "fd")
            if not choices:
                raise MountError(errno.EOPNOTSUPP, f"Failed to mount composefs {self.image}: "
                                                   "no detached EROFS mount to pass by fd")
        unsupported: _Unsupported | None = None
        logs: list[str] = []
        for choice in choices:
            self.result.overlay = choice
            if choice == "legacy":
                if self.verity == VERITY_TRY:
                    self.result.verity = VERITY_OFF   # as upstream: no "try" with mount(2)
                self._overlay_legacy(logs)
                return
            try:
                mnt = self._overlay_new_api(by_fd=choice == "fd")
            except _Unsupported as exc:
                unsupported = exc
                logs.extend(exc.log)
                continue
            try:
                self.kernel.move_mount(mnt, self.mountpoint)
            except OSError as exc:
                raise self._fail(f"cannot attach the mount on {self.mountpoint}", exc) from None
            finally:
                os.close(mnt)
            return
        assert unsupported is not None
        raise self._fail("overlayfs refused the mount", unsupported.err, logs)

    # -- digest -------------------------------------------------------------------------------

    fingerprint: tuple[int, ...] | None = None

    def _check_unchanged(self) -> None:
        """The image was checked against digest=: it must not have changed since."""
        if self.fingerprint is not None and _fingerprint(self.fd) != self.fingerprint:
            raise MountError(errno.EBUSY, f"Failed to mount composefs {self.image}: "
                                          "the image changed while it was being checked")

    def run(self) -> MountResult:
        self.mount_erofs()
        self._check_unchanged()
        self.mount_overlay()
        return self.result


def _fingerprint(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _escape_legacy(path: str) -> str:
    """A path inside a mount(2) overlay option string: ``\\``, ``,`` and ``:`` escaped."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _detach(kernel: _Kernel, path: str) -> None:
    with contextlib.suppress(OSError):
        kernel.umount2(path, _MNT_DETACH)


def _rmdir(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _resolve_verity(options: MountOptions) -> str:
    mode = options.verity
    if mode is None:
        mode = VERITY_REQUIRE if options.digest is not None else VERITY_OFF
        if mode == VERITY_REQUIRE and not kernel_has_fsverity():
            mode = VERITY_OFF    # implied by digest=, impossible here: only the image is checked
    elif mode == VERITY_TRY and not kernel_has_fsverity():
        mode = VERITY_OFF
    return mode


def mount_image(image: str | os.PathLike[str] | int, mountpoint: str | os.PathLike[str],
                options: MountOptions, *, image_name: str | None = None) -> MountResult:
    """Mount the composefs ``image`` (a path, or an open file descriptor) on ``mountpoint``.

    Raises ``MountError`` (one-line message) and leaves nothing mounted when it fails."""
    options.validate()
    mountpoint = os.fspath(mountpoint)
    if isinstance(image, int):
        name = image_name or f"fd {image}"
    else:
        name = image_name or os.fspath(image)
    if not _is_privileged():
        raise MountError(errno.EPERM, "must be superuser to mount (needs CAP_SYS_ADMIN)")
    verity = _resolve_verity(options)
    if verity == VERITY_REQUIRE and not kernel_has_fsverity():
        raise MountError(errno.EOPNOTSUPP, f"Failed to mount composefs {name}: option verity "
                                           "needs fs-verity, which this kernel does not have")

    with contextlib.ExitStack() as cleanup:
        if isinstance(image, int):
            fd = os.dup(image)
        else:
            try:
                fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                raise MountError(exc.errno or errno.EIO,
                                 f"Failed to open {name}: {exc.strerror}") from None
        cleanup.callback(os.close, fd)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise MountError(errno.EISDIR, f"Failed to mount composefs {name}: Is a directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise MountError(errno.EINVAL, f"Failed to mount composefs {name}: "
                                           "not a regular file")
        flags = _read_image_flags(fd, name)
        for basedir in options.basedirs:
            _check_dir("basedir", basedir)
        if options.upperdir is not None:
            _check_dir("upperdir", options.upperdir)
            _check_dir("workdir", options.workdir or "")
        _check_dir("mountpoint", mountpoint)

        idmap_fd = -1
        if options.idmap is not None:
            try:
                idmap_fd = os.open(options.idmap, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                raise MountError(exc.errno or errno.EIO, f"Failed to open userns "
                                 f"{options.idmap}: {exc.strerror}") from None
            cleanup.callback(os.close, idmap_fd)

        mounter = _Mounter(name, fd, flags, mountpoint, options, verity, idmap_fd, cleanup)
        if options.digest is not None:
            found = _measure_kernel(fd)
            how = "kernel"
            if found is None:
                mounter.fingerprint = _fingerprint(fd)
                found = _measure_userspace(fd)
                how = "userspace"
            if found != options.digest:
                found_text = found.hex() if found else "(not sha256)"
                raise MountError(errno.EINVAL,
                                 f"Failed to mount composefs {name}: Image has wrong fs-verity "
                                 f"digest (expected {options.digest.hex()}, found {found_text})")
            mounter.result.digest_check = how
        return mounter.run()
    raise AssertionError("unreachable")  # pragma: no cover


def umount(mountpoint: str | os.PathLike[str], *, detach: bool = False) -> None:
    """``umount2(mountpoint)`` (lazy with ``detach``)."""
    _kernel().umount2(os.fspath(mountpoint), _MNT_DETACH if detach else 0)


def enter_mount_namespace(ns: str) -> None:
    """``setns`` into a mount namespace: a path (``/proc/PID/ns/mnt``) or a PID (mount -N)."""
    path = f"/proc/{ns}/ns/mnt" if ns.isdigit() else ns
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(exc.errno or errno.EIO, f"namespace {ns}: {exc.strerror}") from None
    try:
        _kernel().setns(fd, _CLONE_NEWNS)
    except OSError as exc:
        raise MountError(exc.errno or errno.EIO, f"cannot enter namespace {ns}: "
                                                 f"{exc.strerror}") from None
    finally:
        os.close(fd)
