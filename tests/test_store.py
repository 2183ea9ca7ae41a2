"""The object store (``--digest-store``): layout, modes, existing objects, copy strategies, errors,
stale temporary files, crash safety under SIGKILL and two builds filling one store at once."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fsverity
from mkcfs.store import digests, objects as store_mod, reading
from fsverity.kernel import FS_IOC_ENABLE_VERITY
from mkcfs.errors import StoreError, WalkError
from mkcfs.store.objects import TEMP_PREFIX, ObjectStore
from mkcfs.sources.walk import WalkOptions, walk_directory

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def store_contents(store) -> dict[str, bytes]:
    """``{"ab/cdef…": content}`` of every object; asserts names, modes and no temporary files."""
    store = Path(store)
    objects: dict[str, bytes] = {}
    if not store.exists():   # created only at the first object (and removed again if empty)
        return objects
    for entry in store.iterdir():
        assert not entry.name.startswith(".tmp"), f"stray temporary file {entry}"
        if entry.name == ".mkcfs-digest-cache":   # the default digest cache of a store
            assert entry.is_file()
            continue
        assert entry.is_dir() and len(entry.name) == 2, entry
        for obj in entry.iterdir():
            data = obj.read_bytes()
            name = f"{entry.name}/{obj.name}"
            assert name == fsverity.object_path(fsverity.digest_bytes(data)), name
            assert stat.S_IMODE(obj.lstat().st_mode) == 0o644, name
            assert stat.S_ISREG(obj.lstat().st_mode)
            objects[name] = data
    return objects


def expected_objects(*datas: bytes) -> dict[str, bytes]:
    return {fsverity.object_path(fsverity.digest_bytes(d)): d for d in datas if len(d) > 64}


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    (s / "sub").mkdir(parents=True)
    write(s / "tiny", b"x" * 64)
    write(s / "a", os.urandom(65))
    write(s / "b", os.urandom(200_000))
    write(s / "sub" / "same-as-b", (s / "b").read_bytes())
    write(s / "sub" / "c", os.urandom(4096))
    write(s / "empty", b"")
    os.symlink("a" * 100, s / "longlink")
    return s


def datas(src) -> list[bytes]:
    return [(src / n).read_bytes() for n in ("tiny", "a", "b", "sub/c")]


def test_store_layout_and_modes(src, tmp_path):
    store = tmp_path / "objects"
    root = walk_directory(src, WalkOptions(digest_store=str(store), progress=False))
    assert store_contents(store) == expected_objects(*datas(src))   # only > 64 bytes, b once
    for sub in store.iterdir():
        assert stat.S_IMODE(sub.stat().st_mode) == 0o755 & ~_umask()
    node = root.children[b"b"]
    assert (store / node.payload.decode()).read_bytes() == (src / "b").read_bytes()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_store_modes_under_umask_077(src, tmp_path):
    store = tmp_path / "deep" / "objects"
    old = os.umask(0o077)
    try:
        walk_directory(src, WalkOptions(digest_store=store, progress=False))
    finally:
        os.umask(old)
    assert store_contents(store) == expected_objects(*datas(src))   # objects still 0644
    for sub in store.iterdir():
        assert stat.S_IMODE(sub.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.stat().st_mode) == 0o700


def test_existing_objects_are_left_alone(src, tmp_path):
    store = tmp_path / "objects"
    b = (src / "b").read_bytes()
    name = fsverity.object_path(fsverity.digest_bytes(b))
    (store / name[:2]).mkdir(parents=True)
    write(store / name, b"not the real content")
    os.chmod(store / name, 0o600)
    before = os.stat(store / name)
    walk_directory(src, WalkOptions(digest_store=store, progress=False))
    after = os.stat(store / name)
    assert (store / name).read_bytes() == b"not the real content"
    assert (before.st_ino, before.st_mtime_ns, after.st_mode) == (
        after.st_ino, after.st_mtime_ns, before.st_mode)
    # a second build into the full store writes nothing
    snapshot = {p: os.stat(p).st_mtime_ns for p in store.rglob("*")}
    walk_directory(src, WalkOptions(digest_store=store, progress=False))
    assert {p: os.stat(p).st_mtime_ns for p in store.rglob("*")} == snapshot


@pytest.mark.parametrize("strategy", ["copy-while-hashing", "hash-then-copy"])
@pytest.mark.parametrize("copy_range", ["works", "ENOSYS", "EXDEV", "EINVAL", "short"])
def test_copy_strategies(tmp_path, monkeypatch, strategy, copy_range):
    store = ObjectStore(tmp_path / "objects")
    store._reflink = False
    store._hit_score = 8.0 if strategy == "hash-then-copy" else 0.0
    if copy_range != "works":
        def fake(src, dst, count, offset_src=None, offset_dst=None):
            if copy_range == "short":
                return 0
            raise OSError(getattr(errno, copy_range), "fake")
        monkeypatch.setattr(os, "copy_file_range", fake)
    view = memoryview(bytearray(digests.BUFFER_SIZE))
    files = []
    for size in (65, 4096, 3 * digests.BUFFER_SIZE + 5):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        write(path, data)
        files.append(data)
        digest = store.add_file(os.fsencode(path), size, view)
        assert digest == fsverity.digest_bytes(data)
        assert digest in store
        # adding again is a no-op
        assert store.add_file(os.fsencode(path), size, view) == digest
    if strategy == "hash-then-copy":
        store._hit_score = 8.0
    assert store_contents(tmp_path / "objects") == expected_objects(*files)
    if copy_range in ("ENOSYS", "EXDEV") and strategy == "hash-then-copy":
        assert store._copy_range is False


@pytest.mark.parametrize("syncfs", ["works", "missing"])
def test_deferred_objects_appear_at_flush(tmp_path, monkeypatch, syncfs):
    if syncfs == "missing":
        def nosyncfs(fd):
            raise OSError(errno.ENOSYS, "no syncfs")
        monkeypatch.setattr(store_mod, "_syncfs", nosyncfs)
    store = ObjectStore(tmp_path / "objects")
    view = memoryview(bytearray(digests.BUFFER_SIZE))
    data = [os.urandom(100 + i) for i in range(3)]
    digests_ = []
    for i, d in enumerate(data):
        write(tmp_path / f"f{i}", d)
        digests_.append(store.add_file(os.fsencode(tmp_path / f"f{i}"), len(d), view,
                                       defer=True))
    assert not any(d in store for d in digests_)          # complete, not yet named
    store.flush()
    assert all(d in store for d in digests_)
    assert store_contents(tmp_path / "objects") == expected_objects(*data)
    # dropped instead (after an error): nothing is left
    write(tmp_path / "g", os.urandom(500))
    dropped = store.add_file(os.fsencode(tmp_path / "g"), 500, view, defer=True)
    store.discard_pending()
    store.flush()
    assert dropped not in store
    store_contents(tmp_path / "objects")


def test_deferred_objects_are_flushed_in_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_GROUP", 2)
    store = ObjectStore(tmp_path / "objects")
    view = memoryview(bytearray(digests.BUFFER_SIZE))
    names = []
    for i in range(3):
        write(tmp_path / f"f{i}", os.urandom(70 + i))
        names.append(store.add_file(os.fsencode(tmp_path / f"f{i}"), 70 + i, view, defer=True))
    assert [d in store for d in names] == [True, True, False]
    store.flush()
    assert all(d in store for d in names)


def test_reflink_when_available(tmp_path, monkeypatch):
    calls = []
    real_ioctl = fcntl.ioctl

    def fake_ioctl(fd, request, arg=0, *rest):
        if request == store_mod.FICLONE:   # pretend: a reflink is a plain copy here
            calls.append(request)
            os.lseek(arg, 0, os.SEEK_SET)
            while chunk := os.read(arg, 1 << 16):
                os.write(fd, chunk)
            return 0
        return real_ioctl(fd, request, arg, *rest)
    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    store = ObjectStore(tmp_path / "objects")
    data = [os.urandom(n) for n in (100, 10_000, 70_000)]
    view = memoryview(bytearray(digests.BUFFER_SIZE))
    for i, d in enumerate(data):
        write(tmp_path / f"f{i}", d)
        store.add_file(os.fsencode(tmp_path / f"f{i}"), len(d), view)
    assert store._reflink is True and len(calls) == 3
    assert store_contents(tmp_path / "objects") == expected_objects(*data)


def test_verity_is_tried_and_failures_ignored(tmp_path, monkeypatch):
    tried = []
    real_ioctl = fcntl.ioctl

    def fake_ioctl(fd, request, arg=0, *rest):
        if request == FS_IOC_ENABLE_VERITY:
            tried.append(os.fstat(fd).st_ino)
            assert arg[:4] == b"\x01\x00\x00\x00" and len(arg) == 128
            # the descriptor must be read-only, with no writer left open
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            raise OSError(errno.ENOTTY, "fake")
        return real_ioctl(fd, request, arg, *rest)
    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    store = ObjectStore(tmp_path / "objects")
    view = memoryview(bytearray(digests.BUFFER_SIZE))
    data = [os.urandom(100), os.urandom(200)]
    for i, d in enumerate(data):
        write(tmp_path / f"f{i}", d)
        store.add_file(os.fsencode(tmp_path / f"f{i}"), len(d), view)
    assert len(tried) == 1 and store._verity is False   # not supported: asked once
    assert store_contents(tmp_path / "objects") == expected_objects(*data)


def test_source_changed_between_hash_and_copy(tmp_path, monkeypatch):
    store = ObjectStore(tmp_path / "objects")
    store._hit_score = 8.0
    path = tmp_path / "f"
    write(path, os.urandom(10_000))
    real_copy = store._copy

    def tamper(src_fd, temp, size, view, sparse):
        with open(path, "r+b") as f:
            f.write(b"changed!")
        os.utime(path, ns=(1, 1))
        real_copy(src_fd, temp, size, view, sparse)
    monkeypatch.setattr(store, "_copy", tamper)
    with pytest.raises(WalkError, match="changed while being copied"):
        store.add_file(os.fsencode(path), 10_000, memoryview(bytearray(digests.BUFFER_SIZE)))
    assert store_contents(tmp_path / "objects") == {}


@pytest.mark.parametrize("path,size", [
    (path, size) for path in ("copy-while-hashing", "hash-then-copy", "object-exists")
    for size in (5000, 3 * digests.BUFFER_SIZE + 5)] + [("sparse", 3 * digests.BUFFER_SIZE + 5)])
def test_source_changed_while_read_is_refused_on_every_path(tmp_path, monkeypatch, path, size):
    """The same size, new data and a new mtime, written while the file is read: every copy path
    refuses it, naming the path, and stores nothing under a wrong name."""
    store = ObjectStore(tmp_path / "objects")
    store._reflink = False
    store._hit_score = 0.0 if path == "copy-while-hashing" else 8.0
    f = tmp_path / "f"
    data = os.urandom(size)
    if path == "sparse":   # (a file up to one buffer is read in one piece, never as sparse)
        with open(f, "wb") as out:
            out.truncate(size)
            out.seek(size // 2)
            out.write(data[:5000])
    else:
        write(f, data)
    if path == "object-exists":
        store.add_file(os.fsencode(f), size, memoryview(bytearray(digests.BUFFER_SIZE)))
    real = store_mod.hash_fd

    def tampering(fd, *args, **kw):
        digest = real(fd, *args, **kw)
        with open(f, "r+b") as out:
            out.write(os.urandom(100))
        os.utime(f, ns=(10**18, 10**18))
        return digest
    monkeypatch.setattr(store_mod, "hash_fd", tampering)
    before = store_contents(tmp_path / "objects")
    with pytest.raises(WalkError, match=rf"^error computing digest of {f}: file changed while "
                                        r"being copied to the store$"):
        store.add_file(os.fsencode(f), size, memoryview(bytearray(digests.BUFFER_SIZE)))
    assert store_contents(tmp_path / "objects") == before


@pytest.mark.parametrize("existing", [False, True])
def test_failed_build_leaves_no_temporary_files(src, tmp_path, monkeypatch, existing):
    """... nor the empty ab/ directories (or store) it created; directories that were there
    before stay."""
    store = tmp_path / "deep" / "objects"
    if existing:
        (store / "00").mkdir(parents=True)
    real = reading.open_source

    def vanishing(path):
        if path.endswith(b"/sub/c"):
            os.unlink(path)
        return real(path)
    monkeypatch.setattr(reading, "open_source", vanishing)
    monkeypatch.setattr(digests, "open_source", vanishing)
    monkeypatch.setattr(store_mod, "open_source", vanishing)
    with pytest.raises(WalkError, match="sub/c: No such file"):
        walk_directory(src, WalkOptions(digest_store=store, threads=1, progress=False))
    assert store_contents(store) == {}
    if existing:
        assert sorted(p.name for p in store.iterdir()) == ["00"]
    else:
        assert list(tmp_path.iterdir()) == [tmp_path / "src"]


@pytest.mark.parametrize("strategy", ["copy-while-hashing", "hash-then-copy"])
def test_write_error_names_the_store_and_the_source(tmp_path, monkeypatch, strategy):
    store = ObjectStore(tmp_path / "objects")
    store._reflink = False
    store._copy_range = False
    store._hit_score = 0.0 if strategy == "copy-while-hashing" else 8.0
    write(tmp_path / "f", os.urandom(1000))

    def full(fd, data, *offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StoreError, match=rf"^cannot fill store {tmp_path}/objects with "
                                         rf"{tmp_path}/f: No space left on device$"):
        store.add_file(os.fsencode(tmp_path / "f"), 1000,
                       memoryview(bytearray(digests.BUFFER_SIZE)))
    monkeypatch.undo()
    store_contents(tmp_path / "objects")


def test_cancel_stops_a_long_read(tmp_path):
    import threading
    write(tmp_path / "f", os.urandom(3 * digests.BUFFER_SIZE))
    cancel = threading.Event()
    cancel.set()
    store = ObjectStore(tmp_path / "objects")
    store._reflink = False
    with pytest.raises(digests.Cancelled):
        store.add_file(os.fsencode(tmp_path / "f"), 3 * digests.BUFFER_SIZE,
                       memoryview(bytearray(digests.BUFFER_SIZE)), cancel)
    assert store_contents(tmp_path / "objects") == {}


# -- errors -------------------------------------------------------------------------------------

def test_store_is_a_file(src, tmp_path):
    write(tmp_path / "file", b"")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(StoreError, match=r"^cannot fill store .*file.*: Not a directory$"):
            walk_directory(src, WalkOptions(digest_store=path, progress=False))


def _make_unwritable(path: Path):
    """chmod for a normal user; the immutable attribute for root (skips if unsupported)."""
    if not ROOT:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], "little")
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, (flags | FS_IMMUTABLE_FL).to_bytes(8, "little"))
    except OSError as exc:
        pytest.skip(f"cannot make a directory unwritable for root here: {exc}")
    finally:
        os.close(fd)

    def undo() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags.to_bytes(8, "little"))
        finally:
            os.close(fd)
    return undo


def test_store_not_writable(src, tmp_path):
    store = tmp_path / "objects"
    store.mkdir()
    undo = _make_unwritable(store)
    try:
        with pytest.raises(StoreError, match=r"^cannot fill store .*objects: "
                                             r"(Permission denied|Operation not permitted)$"):
            walk_directory(src, WalkOptions(digest_store=store, progress=False))
    finally:
        undo()
    assert list(store.iterdir()) == []


# -- stale temporary files ----------------------------------------------------------------------

_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_stale_temporary_files_are_removed(tmp_path):
    store = tmp_path / "objects"
    store.mkdir()
    dead = store / (TEMP_PREFIX.decode() + "12345-deadbeef")
    write(dead, b"partial")
    alive = store / (TEMP_PREFIX.decode() + "1-alive")
    write(alive, b"being written")
    foreign = store / ".tmpAbC123"          # mkcomposefs 1.0.8's own: not ours to judge
    write(foreign, b"?")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(alive)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        ObjectStore(store)
        assert not dead.exists() and alive.exists() and foreign.exists()
    finally:
        holder.stdin.close()
        holder.wait()
    ObjectStore(store)                       # the holder is gone now
    assert not alive.exists() and foreign.exists()


def test_live_temporary_file_is_not_taken_for_a_stale_one(tmp_path):
    store = ObjectStore(tmp_path / "objects")
    temp = store._new_temp(b"src")
    try:
        assert store.clean_stale_temps() == 0   # locked by us (another open file description)
        assert os.path.exists(temp.name)
    finally:
        temp.discard()
    assert not os.path.exists(temp.name)


def test_new_temporary_file_taken_by_a_cleaner_before_its_lock(tmp_path, monkeypatch):
    store = ObjectStore(tmp_path / "objects")
    real_flock = fcntl.flock
    raced = []

    def racing_flock(fd, operation):
        if operation == fcntl.LOCK_EX and not raced:
            # another build's cleaner runs between our create and our lock
            raced.append(store.clean_stale_temps())
        return real_flock(fd, operation)
    monkeypatch.setattr(fcntl, "flock", racing_flock)
    temp = store._new_temp(b"src")
    try:
        assert raced == [1]                       # it removed our first file...
        assert os.fstat(temp.lock_fd).st_nlink == 1   # ... and we made a new one
        temp.write(memoryview(b"data"))
    finally:
        temp.discard()
    assert [n for n in os.listdir(store.root) if n.startswith(b".tmp")] == []


# -- crash safety and concurrency (real processes) -----------------------------------------------

def _mkcfs(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "mkcfs.cli.mkcomposefs", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """~100 MB in 1 large and 120 medium files: a build takes long enough to be killed midway."""
    base = tmp_path_factory.mktemp("bigtree")
    src = base / "src"
    (src / "d").mkdir(parents=True)
    seed = os.urandom(1 << 20)
    with open(src / "large", "wb") as f:
        for i in range(48):
            f.write(seed[i:] + seed[:i])
    for i in range(120):
        write(src / "d" / f"m{i:03d}", os.urandom(400_000 + i))
    for i in range(50):
        write(src / f"s{i}", b"small %d" % i)
    return src


def _check_after_kill(store: Path, image: Path, expected_image: bytes) -> int:
    """Every object under its final name is complete, the image is absent or complete.
    Returns the number of temporary files left."""
    temps = 0
    for sub in (store.iterdir() if store.exists() else ()):
        if sub.name.startswith(".tmp"):
            temps += 1
            continue
        if ".mkcfs-digest-cache" in sub.name:   # the default digest cache (or its temporary)
            continue
        for obj in sub.iterdir():
            assert f"{sub.name}/{obj.name}" == fsverity.object_path(
                fsverity.digest_bytes(obj.read_bytes()))
    assert not image.exists() or image.read_bytes() == expected_image
    return temps


def _processes_with(arg: str) -> list[int]:
    """Live processes whose command line holds ``arg`` (a build and its forked workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie is dead
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [p for p in pids if _alive(p)], "worker processes survived their parent"


def test_sigkill_leaves_only_complete_objects(big_tree, tmp_path):
    sources = [p.read_bytes() for p in big_tree.rglob("*") if p.is_file()]
    started = time.monotonic()
    ref = _mkcfs(f"--digest-store={tmp_path / 'ref-store'}", str(big_tree),
                 str(tmp_path / "ref.img"))
    assert ref.wait() == 0, ref.stderr.read()
    duration = time.monotonic() - started
    expected_image = (tmp_path / "ref.img").read_bytes()
    # kill builds into fresh stores at moments spread over a whole build, and at random ones
    import random
    seed = random.randrange(1 << 30)
    moments = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9, *(random.Random(seed).uniform(0.02, 1.0)
                                                  for _ in range(2)))
    for i, fraction in enumerate(moments):
        store = tmp_path / f"objects{i}"
        image = tmp_path / f"out{i}.img"
        proc = _mkcfs("--threads=2", f"--digest-store={store}", str(big_tree), str(image))
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _wait_gone(_processes_with(str(image)))   # the digest workers die with the build
        _check_after_kill(store, image, expected_image)
        # the next build cleans up and completes the store
        proc = _mkcfs(f"--digest-store={store}", str(big_tree), str(image))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert store_contents(store) == expected_objects(*sources), f"kill at {fraction} ({seed=})"
        assert image.read_bytes() == expected_image


def test_four_builds_fill_one_store_at_once(big_tree, tmp_path):
    store = tmp_path / "objects"
    procs = [_mkcfs("--threads=1", f"--digest-store={store}", str(big_tree),
                    str(tmp_path / f"{i}.img")) for i in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert err == b""
    images = {(tmp_path / f"{i}.img").read_bytes() for i in range(4)}
    assert len(images) == 1
    sources = [p.read_bytes() for p in big_tree.rglob("*") if p.is_file()]
    assert store_contents(store) == expected_objects(*sources)


def test_two_builds_write_one_image_at_once(big_tree, tmp_path):
    """Both succeed; the image is one of the two complete images, no temporary file is left."""
    other = tmp_path / "other"
    other.mkdir()
    write(other / "f", os.urandom(100_000))
    expected = []
    for i, src in enumerate((big_tree, other)):
        proc = _mkcfs(str(src), str(tmp_path / f"expected{i}.img"))
        assert proc.wait(timeout=300) == 0
        expected.append((tmp_path / f"expected{i}.img").read_bytes())
    image = tmp_path / "out" / "one.img"
    image.parent.mkdir()
    for _ in range(3):
        procs = [_mkcfs(str(src), str(image)) for src in (big_tree, other)]
        for p in procs:
            _out, err = p.communicate(timeout=300)
            assert p.returncode == 0 and err == b"", err
        assert image.read_bytes() in expected
        assert os.listdir(image.parent) == ["one.img"]


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("where", ["store", "image", "both"])
def test_full_filesystem_then_rerun_after_freeing_space(big_tree, tmp_path, where):
    """A store and/or an image on a tmpfs too small for them: one line naming the store and the
    source (or the image), exit 1, no image, no temporary file, no empty ab/ directory; after
    the tmpfs is grown, the same command gives the image of a clean build."""
    proc = _mkcfs(f"--digest-store={tmp_path / 'clean-store'}", str(big_tree),
                  str(tmp_path / "clean.img"))
    assert proc.wait(timeout=300) == 0
    clean = (tmp_path / "clean.img").read_bytes()
    fs = tmp_path / "fs"
    assert len(clean) > 8192
    _tmpfs(fs, "4k" if where == "image" else "20m")
    try:
        if where == "image":   # the image does not fit; the store (outside) does
            store, image = tmp_path / "store", fs / "out.img"
        else:
            store = fs / "store"
            image = fs / "out.img" if where == "both" else tmp_path / "out.img"
        proc = _mkcfs(f"--digest-store={store}", str(big_tree), str(image))
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1
        lines = err.decode().splitlines()
        assert len(lines) == 1 and lines[0].endswith(": No space left on device"), err
        if where == "image":
            assert str(image) in lines[0] or "cannot write" in lines[0], lines[0]
        else:
            assert lines[0].startswith(f"mkcomposefs: cannot fill store {store} with {big_tree}/")
            assert ".tmp" not in lines[0]
        assert not image.exists()
        assert [n for n in os.listdir(image.parent) if n.startswith(".")] == []
        for sub in (store.iterdir() if store.exists() else ()):
            assert not sub.name.startswith(".tmp"), sub
            if sub.name != ".mkcfs-digest-cache":   # the default digest cache of a store
                assert any(sub.iterdir()), f"empty directory {sub} left behind"
        subprocess.run(["mount", "-o", "remount,size=400m", str(fs)], check=True)
        proc = _mkcfs(f"--digest-store={store}", str(big_tree), str(image))
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert image.read_bytes() == clean
        sources = [p.read_bytes() for p in big_tree.rglob("*") if p.is_file()]
        assert store_contents(store) == expected_objects(*sources)
    finally:
        subprocess.run(["umount", str(fs)], check=True)


# -- a store inside the source tree (issue 11) -----------------------------------------------------

#: mkcomposefs 1.0.8 --use-epoch --skip-xattrs --digest-store=t/store t IMG, as root, on the tree
#: of ``_inside_tree``: with t/store absent (no /store in the image) and on the rerun (t/store
#: and its two objects listed).
_INSIDE_FIRST = "0b21d1b0b458be85bfcace9a0584013a5257bb8bd3330efb7b8009d1632b833d"
_INSIDE_RERUN = "46066e3a06278a3d9a323c822085201429a11fcb7ed603bd89041b71cc456558"


def _inside_tree(t: Path) -> None:
    (t / "sub").mkdir(parents=True)
    write(t / "a", bytes(range(256)) * 2)
    write(t / "sub" / "b", b"composefs\n" * 700)
    write(t / "c", b"tiny")
    for p in (t, t / "sub"):
        os.chmod(p, 0o755)
    for p in (t / "a", t / "sub" / "b", t / "c"):
        os.chmod(p, 0o644)


@pytest.mark.skipif(not ROOT, reason="the pinned 1.0.8 images were made as root (uid/gid 0)")
@pytest.mark.parametrize("threads", ["1", "4"])
def test_store_inside_the_source_gives_the_1_0_8_image(tmp_path, threads):
    import hashlib

    t = tmp_path / "t"
    _inside_tree(t)
    images = []
    for name in ("first.img", "rerun.img"):
        proc = _mkcfs("--use-epoch", "--skip-xattrs", f"--threads={threads}",
                      f"--digest-store={t / 'store'}", str(t), str(tmp_path / name))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        images.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert images == [_INSIDE_FIRST, _INSIDE_RERUN]
    assert store_contents(t / "store") == expected_objects(
        (t / "a").read_bytes(), (t / "sub" / "b").read_bytes())


def test_store_is_created_at_the_first_object(tmp_path, monkeypatch):
    only_small = tmp_path / "src"
    only_small.mkdir()
    write(only_small / "small", b"x" * 64)
    store = tmp_path / "a" / "b" / "objects"
    walk_directory(only_small, WalkOptions(digest_store=store, progress=False))
    assert not (tmp_path / "a").exists()      # nothing stored, nothing created
    write(only_small / "big", b"y" * 65)
    walk_directory(only_small, WalkOptions(digest_store=store, progress=False))
    assert store_contents(store) == expected_objects(b"y" * 65)
    monkeypatch.chdir(tmp_path)   # a relative store path that does not exist yet
    walk_directory(only_small, WalkOptions(digest_store="rel/objects", progress=False))
    assert store_contents(tmp_path / "rel" / "objects") == expected_objects(b"y" * 65)


def test_store_changed_between_walk_and_store_pass(tmp_path, monkeypatch):
    """A store inside the source is filled after the walk: a file that changed in between is
    refused (its data is not what the image refers to)."""
    t = tmp_path / "t"
    _inside_tree(t)
    import mkcfs.sources.walk as walk_mod
    real = walk_mod._fill_store_after_walk

    def tamper(src, root, store, threads):
        write(t / "a", b"z" * 512)
        return real(src, root, store, threads)
    monkeypatch.setattr(walk_mod, "_fill_store_after_walk", tamper)
    with pytest.raises(WalkError, match=r"a: file changed while being copied to the store$"):
        walk_directory(t, WalkOptions(digest_store=t / "store", threads=1, progress=False))
    store_contents(t / "store")   # whatever got stored is under its own digest


# -- sparse files ------------------------------------------------------------------------------------

def test_sparse_file_is_hashed_without_reading_holes_and_stored_with_holes(tmp_path):
    size = 256 << 20
    src = tmp_path / "src"
    src.mkdir()
    extents = [(12345, os.urandom(100_000)), (100 << 20, os.urandom(5000)), (size - 3, b"end")]
    with open(src / "sparse", "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)
    dense = bytearray(size)
    for offset, data in extents:
        dense[offset:offset + len(data)] = data
    expected = fsverity.digest_bytes(dense)
    store = tmp_path / "objects"
    root = walk_directory(src, WalkOptions(digest_store=store, progress=False))
    assert root.children[b"sparse"].digest == expected
    obj = store / fsverity.object_path(expected)
    assert obj.stat().st_size == size
    assert obj.stat().st_blocks * 512 < 4 << 20      # the holes stayed holes
    with open(obj, "rb") as f:
        for offset, data in extents:
            f.seek(offset)
            assert f.read(len(data)) == data
    assert fsverity.digest_file(obj) == expected
