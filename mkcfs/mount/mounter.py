"""Mounting a composefs image: the checks, EROFS (file-backed or on a loop device), overlayfs.

``mount_image`` opens and checks the image (header, ``digest=``), then ``_Mounter`` mounts EROFS
detached and stacks overlayfs on it, falling back mechanism by mechanism on older kernels (see the
``mkcfs.mount`` package docstring for the order). Also ``umount``, ``enter_mount_namespace`` and
``kernel_has_fsverity``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from dataclasses import dataclass
from collections.abc import Iterable, Sequence

from erofs.errors import ImageFormatError
from erofs.format import LCFS_EROFS_FLAGS_HAS_ACL
from erofs.reader import HEADER_AREA_SIZE, read_header, read_superblock

from mkcfs.mount.kernel import (
    _CLONE_NEWNS,
    _FSCONFIG_CMD_CREATE,
    _FSCONFIG_SET_FD,
    _FSCONFIG_SET_FLAG,
    _FSCONFIG_SET_STRING,
    _MNT_DETACH,
    _MOUNT_ATTR_RDONLY,
    MS_RDONLY,
    MS_SILENT,
    _close,
    _fs_log,
    _Kernel,
    _kernel,
    _loop_device,
    _measure_kernel,
)
from mkcfs.mount.options import VERITY_OFF, VERITY_REQUIRE, VERITY_TRY, MountError, MountOptions, _vfs_bits

#: name prefix of the temporary directories the path-based fallbacks create (and remove).
TEMP_PREFIX = ".composefs."


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

@functools.cache
def kernel_has_fsverity() -> bool:
    """Whether the running kernel was built with fs-verity (``CONFIG_FS_VERITY``).

    Asks /proc/config.gz, then /boot/config-$(uname -r), then /proc/kallsyms; when none of them
    can tell, assumes yes (and lets the kernel decide, as upstream does)."""
    import gzip   # here: only this check reads a compressed file

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


def _measure_userspace(fd: int) -> bytes:
    """The fs-verity digest of everything readable from ``fd`` (read with pread from 0)."""
    from fsverity import FsVerityHasher   # here: hashlib costs ~10 ms to import, most mounts hash nothing

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
    head = os.pread(fd, HEADER_AREA_SIZE, 0)
    try:
        flags = read_header(head).flags
        read_superblock(head)
    except ImageFormatError as exc:
        what = exc.what if exc.what.startswith("not a composefs image") else \
            f"not a composefs image ({exc.what})"
        raise MountError(errno.EINVAL, f"Failed to mount composefs {image}: {what}") from None
    return flags


def is_privileged() -> bool:
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
        import tempfile   # here: only the legacy mount paths need a directory

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
            config("source", opts.source, unsupported_on_einval=False)
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
                self.kernel.mount(opts.source, self.mountpoint, "overlay",
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
    if not is_privileged():
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
