"""``mkcfs mount`` / ``mkcfs umount``: the runtime mount-helper contract (LXC's ``lxc-oci``).

``mount_source`` resolves SOURCE to an image in the managed store (``mkcfs.mount.source``),
mounts it with ``mount.composefs``'s code (``mkcfs.mount.mounter``) read-only, or with
``persist`` as a writable overlay whose changes are kept in the PERSIST directory::

    PERSIST/persist/    the overlay upper layer: every change (new files, copied-up files,
                        whiteouts for deletions, opaque directories)
    PERSIST/work/       overlayfs's work directory (same filesystem, owned by the helper)

Both are created when missing (PERSIST too); what a failed mount created is removed again.

Recognising our mounts, and run state
-------------------------------------
The overlay mount's source (first field after the filesystem type in ``/proc/self/mountinfo``,
``SOURCE`` in ``findmnt``) is ``mkcfs:STORE`` (just ``mkcfs`` when the store's path is longer
than the 255 bytes the kernel keeps there). ``umount`` unmounts only a mount with that source,
so it never takes down a mount somebody else made.

Every mount also leaves a run-state file ``STORE/mounts/KEY.json`` (``KEY``: sha256 of the mount
namespace and the mount point), written before the mount and removed by ``umount``: the mount
point, the image, the object directory, the PERSIST directory, the mount namespace (``mntns``,
the inode of ``/proc/self/ns/mnt``) and the pid that mounted. A garbage collector keeps the images
(and their objects) named there; a file whose namespace is this one but whose mount point has no
``mkcfs`` mount any more, or whose namespace has no process left (LXC's pre-mount hook mounts in
the container's namespace, which dies with the container), is stale: every ``mkcfs mount``
removes the stale files of its store (``is_stale``). Mounting and unmounting hold
``STORE/mounts/.lock`` (``flock``) so that two mounts on one mount point cannot both succeed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from mkcfs.mount.kernel import _kernel
from mkcfs.mount.mounter import MountResult, is_privileged, mount_image
from mkcfs.mount.mountinfo import MountEntry, top_mount
from mkcfs.mount.options import MountError, MountOptions
from mkcfs.mount.source import OciResolver, ResolvedImage, resolve
from mkcfs.store.images import DEFAULT_BUILD, DEFAULT_STORE, BuildOptions, ManagedStore, MountState

#: first part of the overlay mount source of every mount this helper makes
SOURCE_MARK = "mkcfs"
#: the names inside PERSIST
PERSIST_UPPER = "persist"
PERSIST_WORK = "work"


class HelperError(MountError):
    """A mount or umount that cannot be done; the message is one line, ``errno`` says why."""


@dataclass(frozen=True)
class Mounted:
    """What ``mount_source`` did."""

    image: ResolvedImage
    result: MountResult
    state_file: str


# --------------------------------------------------------------------------------------------
# small pieces
# --------------------------------------------------------------------------------------------

def mount_namespace() -> int:
    """This process's mount namespace (the inode number of ``/proc/self/ns/mnt``)."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return 0


def mount_source_string(store: ManagedStore) -> str:
    text = f"{SOURCE_MARK}:{store.root}"
    return text if len(text.encode()) <= 255 else SOURCE_MARK


def is_our_mount(entry: MountEntry) -> bool:
    return entry.fstype == "overlay" and (entry.source == SOURCE_MARK
                                          or entry.source.startswith(SOURCE_MARK + ":/"))


def state_key(mountpoint: str, mntns: int) -> str:
    return hashlib.sha256(f"{mntns}\0{mountpoint}".encode()).hexdigest()[:32]


def _real_dir(what: str, path: str) -> str:
    """``path`` made absolute with symlinks resolved; it must be an existing directory."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as exc:
        raise HelperError(exc.errno or errno.ENOENT,
                          f"{what} {path}: {exc.strerror or exc}") from None
    if not os.path.isdir(real):
        raise HelperError(errno.ENOTDIR, f"{what} {path}: Not a directory")
    return real


@contextlib.contextmanager
def _mounts_lock(store: ManagedStore) -> Iterator[None]:
    store.make_dirs(store.mounts)
    path = os.path.join(store.mounts, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise HelperError(exc.errno or errno.EIO, f"cannot lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_state(path: str, state: MountState) -> None:
    from mkcfs.fsutil import write_atomically   # the project's temp + rename protocol

    data = json.dumps(asdict(state), indent=1, sort_keys=True).encode() + b"\n"
    try:
        write_atomically(path, data, mode=0o644)
    except OSError as exc:
        raise HelperError(exc.errno or errno.EIO,
                          f"cannot write {path}: {exc.strerror or exc}") from None


def live_namespaces() -> set[int]:
    """The mount namespaces some process is in (inodes of ``/proc/*/ns/mnt``)."""
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                found.add(os.stat(f"/proc/{pid}/ns/mnt").st_ino)
    return found


def is_stale(state: MountState, mntns: int, namespaces: set[int] | None = None) -> bool:
    """Whether ``state`` describes a mount that is gone: in this namespace (``mntns``), no
    ``mkcfs`` mount on its mount point; elsewhere, no process left in its namespace (LXC's
    pre-mount hook mounts inside the container's namespace, which dies with the container)."""
    if state.mntns == mntns:
        top = top_mount(state.mountpoint)
        return top is None or not is_our_mount(top)
    if namespaces is None:
        namespaces = live_namespaces()
    return state.mntns not in namespaces


def _prune_stale(store: ManagedStore, mntns: int) -> None:
    """Remove the run-state files of mounts that are gone (called under the mounts lock)."""
    try:
        names = [n for n in os.listdir(store.mounts) if n.endswith(".json")]
    except OSError:
        return
    namespaces: set[int] | None = None
    for name in names:
        path = os.path.join(store.mounts, name)
        try:
            with open(path, encoding="utf-8") as f:
                state = MountState(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if state.mntns != mntns and namespaces is None:
            namespaces = live_namespaces()
        if is_stale(state, mntns, namespaces):
            _remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------------------------
# persist directory
# --------------------------------------------------------------------------------------------

def prepare_persist(persist: str, created: list[bytes]) -> tuple[str, str]:
    """Create PERSIST, PERSIST/persist and PERSIST/work where missing; return (upper, work).
    Every directory created is appended to ``created`` (``fsutil.remove_created_dirs`` removes
    them if the mount fails)."""
    from mkcfs.fsutil import makedirs

    persist = os.path.abspath(persist)
    upper = os.path.join(persist, PERSIST_UPPER)
    work = os.path.join(persist, PERSIST_WORK)
    for path in (upper, work):
        try:
            created += makedirs(os.fsencode(path))
        except OSError as exc:
            where = os.fsdecode(exc.filename) if exc.filename else path
            raise HelperError(exc.errno or errno.EIO,
                              f"persist directory {where}: {exc.strerror or exc}") from None
    return upper, work


def _remove_created(created: list[bytes]) -> None:
    from mkcfs.fsutil import remove_created_dirs

    remove_created_dirs(created)
    created.clear()


# --------------------------------------------------------------------------------------------
# mount, umount
# --------------------------------------------------------------------------------------------

def mount_source(source: str, mountpoint: str, *, store: str = DEFAULT_STORE,
                 persist: str | None = None, options: MountOptions | None = None,
                 build_options: BuildOptions = DEFAULT_BUILD,
                 oci: OciResolver | None = None) -> Mounted:
    """Mount SOURCE on ``mountpoint`` (see the module docstring). ``options``: the ``-o``
    options for the mount code (``basedir`` only with an image file SOURCE; no ``upperdir``/
    ``workdir``: that is what ``persist`` is for). Raises a one-line ``CfsError`` and leaves
    nothing mounted (and no run state) when it fails."""
    options = options or MountOptions()
    if options.upperdir is not None or options.workdir is not None:
        raise HelperError(errno.EINVAL, "options upperdir/workdir: use --persist PERSIST")
    if not is_privileged():
        raise HelperError(errno.EPERM, "must be superuser to mount (needs CAP_SYS_ADMIN)")
    managed = ManagedStore(store)
    mnt = _real_dir("mountpoint", mountpoint)
    mntns = mount_namespace()
    _refuse_if_mounted(mnt, mountpoint)    # early, before any build (checked again below)

    image = resolve(source, managed, options=build_options, oci=oci)
    if options.basedirs and image.from_store:
        raise HelperError(errno.EINVAL, "option basedir: only for a composefs image file "
                                        "SOURCE (an OCI image's data is in the store)")
    mount_opts = MountOptions(**{**asdict(options), "basedirs": list(options.basedirs)
                                 or [image.objects], "source": mount_source_string(managed)})

    created: list[bytes] = []
    with _mounts_lock(managed):
        _refuse_if_mounted(mnt, mountpoint)
        _prune_stale(managed, mntns)
        try:
            if persist is not None:
                mount_opts.upperdir, mount_opts.workdir = prepare_persist(persist, created)
            state_file = os.path.join(managed.mounts, state_key(mnt, mntns) + ".json")
            state = MountState(mnt, image.path, mount_opts.basedirs[0],
                               os.path.abspath(persist) if persist is not None else None,
                               mntns, os.getpid())
            _write_state(state_file, state)
            try:
                result = mount_image(image.path, mnt, mount_opts)
            except BaseException:
                _remove(state_file)
                raise
        except MountError as exc:
            _remove_created(created)
            raise HelperError(exc.errno or errno.EIO, _explain(exc, persist)) from None
        except BaseException:
            _remove_created(created)
            raise
    return Mounted(image, result, state_file)


def _explain(exc: MountError, persist: str | None) -> str:
    """The mount code's message, with the PERSIST directory named when the kernel refused it."""
    message = str(exc)
    if persist is not None and "upperdir" in message:
        return f"persist directory {persist} cannot hold the writable layer: {message}"
    return message


def _refuse_if_mounted(mnt: str, given: str) -> None:
    top = top_mount(mnt)
    if top is not None and is_our_mount(top):
        raise HelperError(errno.EBUSY, f"mountpoint {given}: already mounted by mkcfs "
                                       f"({top.source}); umount it first")


def umount(mountpoint: str, *, store: str | None = None) -> MountState | None:
    """Unmount what ``mount_source`` mounted on ``mountpoint`` and remove its run state.

    Refused (one line) when the mount point has no mount, or the mount on top of it is not
    one of ours. Returns the run state that was recorded (None if there was none)."""
    if not is_privileged():
        raise HelperError(errno.EPERM, "must be superuser to unmount (needs CAP_SYS_ADMIN)")
    mnt = _real_dir("mountpoint", mountpoint)
    top = top_mount(mnt)
    if top is None:
        raise HelperError(errno.EINVAL, f"{mountpoint}: not mounted")
    if not is_our_mount(top):
        raise HelperError(errno.EINVAL, f"{mountpoint}: not a mount made by mkcfs mount "
                                        f"({top.fstype} from {top.source}); not unmounting it")
    if store is None:
        root = top.source.partition(":")[2]
        store = root or DEFAULT_STORE
    managed = ManagedStore(store)
    state_file = os.path.join(managed.mounts, state_key(mnt, mount_namespace()) + ".json")
    with _mounts_lock(managed):
        top = top_mount(mnt)
        if top is None or not is_our_mount(top):    # unmounted while we waited
            raise HelperError(errno.EINVAL, f"{mountpoint}: not mounted")
        try:
            _kernel().umount2(mnt, 0)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise HelperError(errno.EBUSY, f"{mountpoint}: busy (a process uses it)") from None
            raise HelperError(exc.errno or errno.EIO,
                              f"cannot unmount {mountpoint}: {exc.strerror}") from None
        state: MountState | None = None
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(state_file, encoding="utf-8") as f:
                state = MountState(**json.load(f))
        _remove(state_file)
    return state
