"""The system-call layer of ``mount.composefs``: thin ``ctypes`` wrappers, nothing more.

The new mount API (``fsopen``/``fsconfig``/``fsmount``/``move_mount``/``open_tree``/
``mount_setattr``) by syscall number, ``mount(2)``/``umount2(2)``/``setns(2)``/``ioctl(2)`` from
libc, the loop-device ioctls (``LOOP_CTL_GET_FREE``, ``LOOP_CONFIGURE``) with their structures,
``FS_IOC_MEASURE_VERITY``, and the constants they need. Every call raises ``OSError`` with the
call's errno; deciding what a failure means is left to ``mkcfs.mount.mounter``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct

from fsverity.kernel import FS_VERITY_HASH_ALG_SHA256, measured_digest


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
# fs-verity measurement, loop devices
# --------------------------------------------------------------------------------------------

def _measure_kernel(fd: int) -> bytes | None:
    """The file's fs-verity digest from the kernel, or None when the file has none (or the
    kernel/filesystem cannot tell)."""
    measured = measured_digest(fd)
    if measured is None:
        return None
    algorithm, digest = measured
    if algorithm != FS_VERITY_HASH_ALG_SHA256:
        return b""   # a digest, but not one comparable with a composefs (sha256) digest
    return digest


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
