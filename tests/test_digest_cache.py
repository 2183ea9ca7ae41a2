"""The digest cache (mkcfs.store.cache): a rebuild reads only changed files, and a cache that
does not match the files exactly is never trusted.

Each "never trusted" case first shows that the cache IS used when it matches (a forged cache with
wrong digests changes the image), then that the case at hand gives the uncached image: so each
test fails if the check it covers were missing.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import pytest

import fsverity
from fsverity import object_path

from mkcfs.build.image import build_image
from mkcfs.store import cache as cache_mod
from mkcfs.store.cache import DigestCache, default_cache_path
from mkcfs.sources import walk as walk_module
from mkcfs.sources.walk import WalkOptions, walk_directory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_racy_margin(monkeypatch):
    """Files made by a test are seconds old at most: record them anyway (the racy rule has its
    own test below)."""
    monkeypatch.setattr(cache_mod, "RACY_MARGIN_NS", -3600 * 10**9)


def make_tree(root, files: int = 20) -> None:
    os.makedirs(root / "sub", exist_ok=True)
    for i in range(files):
        where = root / ("sub" if i % 2 else "")
        (where / f"f{i}").write_bytes(bytes([65 + i % 26]) * (100 + 37 * i))
    (root / "small").write_bytes(b"inline content")


def build(src, cache=None, store=None, threads=1) -> bytes:
    options = WalkOptions(digest_cache=cache, digest_store=store, threads=threads)
    return bytes(build_image(walk_directory(src, options)).data)


def sections(path) -> list:
    data = open(path, "rb").read()
    parsed = cache_mod._parse(data)
    assert parsed is not None
    return parsed


def opened_files(monkeypatch) -> list[bytes]:
    """The files of more than 64 bytes this process opens to read from now on (with
    ``MKCFS_DIGEST_THREADS`` set, the build's workers are threads of this process)."""
    from mkcfs.store import reading
    opened: list[bytes] = []
    real_open = reading.open_source

    def counting_open(path: bytes) -> int:
        fd = real_open(path)
        if os.fstat(fd).st_size > 64:
            opened.append(path)
        return fd
    monkeypatch.setattr(reading, "open_source", counting_open)
    return opened


def forge(path, src, digest: bytes = b"\xee" * 32, **change) -> None:
    """A cache for ``src`` in which every file > 64 bytes has ``digest``; ``change`` alters
    one lstat field of every record (as a replaced file would show)."""
    st = os.lstat(src)
    forged = DigestCache(path, os.fsencode(src), st)
    for dirpath, _, names in os.walk(src):
        for name in names:
            fst = os.lstat(os.path.join(dirpath, name))
            if fst.st_size > 64:
                fields = {k: getattr(fst, k) for k in
                          ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")}
                fields.update(change)
                forged.record(SimpleNamespace(**fields), digest)
    forged.save()


def test_rebuild_reads_nothing_and_gives_the_same_image(tmp_path, monkeypatch):
    monkeypatch.setenv("MKCFS_DIGEST_THREADS", "1")   # files are opened in this process
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    opened = opened_files(monkeypatch)
    first = build(src, cache)
    assert len(opened) == 20   # the control: this build reads every file of more than 64 bytes
    assert first == build(src)
    # 20 files of more than 64 bytes, and ``small`` with NO_DIGEST
    assert len(sections(cache)) == 1 and len(sections(cache)[0].raw) == 21 * 64
    # the second build must not open a file of more than 64 bytes
    opened.clear()
    assert build(src, cache) == first
    assert opened == []


def test_forged_cache_is_used_when_it_matches(tmp_path):
    """The control for every test below: a matching cache is trusted (its wrong digests reach
    the image), so an image equal to the uncached one there means the cache was refused."""
    src = tmp_path / "src"
    make_tree(src)
    forge(tmp_path / "cache", src)
    assert build(src, tmp_path / "cache") != build(src)


def test_content_changed_with_size_and_mtime_restored(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    build(src, cache)
    target = src / "sub" / "f5"
    before = os.lstat(target)
    time.sleep(0.02)   # past the file system clock's tick
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))   # what touch -d does
    after = os.lstat(target)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (before.st_size, before.st_mtime_ns, before.st_ino)
    assert build(src, cache) == build(src)


def test_file_replaced_by_one_with_the_same_inode_number(tmp_path):
    """A new file that reuses the inode number (same size, mtime set back) was created later,
    so its ctime differs: the record is not trusted."""
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    # a record for every file as the file it replaced would have left it: same inode, size
    # and mtime, an older ctime, another digest
    forge(cache, src, st_ctime_ns=1)
    assert build(src, cache) == build(src)
    # and for real, where the file system hands the inode number out again (ext4 does)
    target = src / "f4"
    old = os.lstat(target)
    build(src, cache)
    os.unlink(target)
    time.sleep(0.02)
    target.write_bytes(b"Z" * old.st_size)
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert build(src, cache) == build(src)


def listxattr_calls(monkeypatch) -> list[bytes]:
    """The paths the walk asks ``listxattr`` for from now on."""
    asked: list[bytes] = []
    real = os.listxattr

    def counting(path, *args, **kwargs):
        asked.append(os.fsencode(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "listxattr", counting)
    return asked


def test_files_known_without_xattrs_are_not_asked_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MKCFS_DIGEST_THREADS", "1")   # the walk runs in this process
    src = tmp_path / "src"
    make_tree(src)
    os.setxattr(src / "sub" / "f1", "user.kept", b"1")
    (src / "link").symlink_to("f0")
    cache = tmp_path / "cache"
    asked = listxattr_calls(monkeypatch)
    first = build(src, cache)
    assert len(asked) == 24    # the control: every entry (root, sub, link, small, 20 files)
    assert first == build(src)
    asked.clear()
    assert build(src, cache) == first
    # a file that had xattrs is asked again, and so are directories and symlinks
    base = os.fsencode(src)
    assert sorted(asked) == sorted([base, base + b"/link", base + b"/sub",
                                    base + b"/sub/f1"])
    # walked without xattrs, the files are recorded without that knowledge
    skipping = WalkOptions(digest_cache=tmp_path / "cache2", threads=1, skip_xattrs=True)
    build_image(walk_directory(src, skipping))
    asked.clear()
    build(src, tmp_path / "cache2")
    assert len(asked) == 24


@pytest.mark.parametrize("change", ["set", "remove"])
def test_xattrs_changed_after_the_cached_build_are_seen(tmp_path, change):
    """Setting or removing an xattr sets the ctime: the record that said the file had none
    (or had some) is not trusted, and the image is the uncached one."""
    src = tmp_path / "src"
    make_tree(src)
    target = src / "sub" / "f3"
    if change == "remove":
        os.setxattr(target, "user.old", b"1")
    cache = tmp_path / "cache"
    first = build(src, cache)
    before = os.lstat(target)
    time.sleep(0.02)   # past the file system clock's tick
    if change == "set":
        os.setxattr(target, "user.new", b"2")
    else:
        os.removexattr(target, "user.old")
    after = os.lstat(target)
    assert after.st_ctime_ns != before.st_ctime_ns
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    uncached = build(src)
    assert uncached != first
    assert build(src, cache) == uncached
    # the control: a record that matches the new ctime and says "no xattrs" is believed
    forged = DigestCache(cache, os.fsencode(src), os.lstat(src))
    forged.record(after, fsverity.digest_file(target), no_xattrs=True)
    forged.save()
    without = build(src, cache)
    assert (without == uncached) == (change == "remove")
    if change == "set":
        os.removexattr(target, "user.new")
        assert without == build(src)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage", "trailing"])
def test_corrupt_cache_is_ignored(tmp_path, damage):
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    forge(cache, src)
    data = bytearray(cache.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[-10:]
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data += b"\0" * 64
    cache.write_bytes(bytes(data))
    assert build(src, cache) == build(src)
    assert len(sections(cache)) == 1   # and it was rewritten, whole


@pytest.mark.parametrize("field", ["machine", "boot", "dev", "ino", "fsid"])
def test_cache_from_another_machine_boot_or_file_system_is_ignored(tmp_path, field):
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    forge(cache, src)
    data = bytearray(cache.read_bytes())
    offset = cache_mod._HEAD.size + {"machine": 0, "boot": 16, "dev": 32, "ino": 40,
                                     "fsid": 48}[field]
    data[offset] ^= 0x5A
    crc = zlib.crc32(memoryview(data)[12:])
    struct.pack_into("<I", data, 8, crc)   # a well-formed file, for another place
    cache.write_bytes(bytes(data))
    assert build(src, cache) == build(src)


def test_racy_entries_are_recorded_untrusted(tmp_path, monkeypatch):
    """A file hashed within the racy margin of its ctime is recorded (the next build's
    ``previous`` digest) with the UNTRUSTED ctime, which no lookup answers from: it is read
    again, and only then trusted."""
    monkeypatch.setattr(cache_mod, "RACY_MARGIN_NS", 3 * 10**9)
    monkeypatch.setenv("MKCFS_DIGEST_THREADS", "1")   # files are opened in this process
    src = tmp_path / "src"
    make_tree(src)
    old = time.time_ns() - 10 * 10**9
    os.utime(src / "f0", ns=(old, old))   # an old mtime does not make the file old: ctime is now
    os.utime(src / "f2", ns=(0, -5 * 10**9))   # before 1970: recorded as two's complement
    cache = tmp_path / "cache"
    first = build(src, cache)
    [section] = sections(cache)
    assert len(section.raw) == 21 * 64
    assert set(section.words[3::8]) == {cache_mod.UNTRUSTED}
    opened = opened_files(monkeypatch)
    st = os.lstat(src / "f0")
    loaded = DigestCache(cache, os.fsencode(src), os.lstat(src))
    assert loaded.lookup(st) is None
    assert loaded.previous(st) == (fsverity.digest_file(src / "f0"), st.st_size, st.st_mtime_ns)
    assert loaded.previous(os.lstat(src / "f2"))[2] == -5 * 10**9  # type: ignore[index]
    assert build(src, cache) == first
    assert len(opened) == 20
    # a file whose ctime is -1 ns (the UNTRUSTED word) is not answered from such a record
    forged = SimpleNamespace(st_dev=st.st_dev, st_ino=st.st_ino, st_size=st.st_size,
                             st_mtime_ns=st.st_mtime_ns, st_ctime_ns=-1)
    assert loaded.lookup(forged) is None
    # once the margin has passed, the next build's records are trusted
    monkeypatch.setattr(cache_mod, "RACY_MARGIN_NS", -3600 * 10**9)
    opened.clear()
    build(src, cache)
    assert len(opened) == 20
    assert cache_mod.UNTRUSTED not in set(sections(cache)[0].words[3::8])
    opened.clear()
    assert build(src, cache) == first
    assert opened == []


def test_files_no_longer_seen_are_dropped(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    build(src, cache)
    for i in range(0, 20, 2):
        os.unlink(src / f"f{i}")
    build(src, cache)
    assert len(sections(cache)[0].raw) == 11 * 64


def test_sections_are_bounded_and_kept_per_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MAX_SECTIONS", 2)
    cache = tmp_path / "cache"
    trees = []
    for n in range(3):
        src = tmp_path / f"src{n}"
        make_tree(src, files=3 + n)
        build(src, cache)
        trees.append(src)
    counts = sorted(len(s.raw) // 64 for s in sections(cache))
    assert counts == [5, 6]    # the least recently used tree's section went (each: its
    # files and ``small``)


def test_missing_store_object_is_stored_again(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    store = tmp_path / "store"
    cache = tmp_path / "cache"
    first = build(src, cache, store)
    victim = next(p for p in store.rglob("*") if p.is_file() and not p.name.startswith("."))
    os.unlink(victim)
    assert build(src, cache, store) == first
    assert victim.exists()


def test_default_cache_is_in_the_store_unless_the_store_is_in_the_source(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    assert default_cache_path(str(tmp_path / "store"), str(src)) == \
        str(tmp_path / "store" / cache_mod.STORE_CACHE_NAME)
    assert default_cache_path(str(src / "store"), str(src)) is None
    assert default_cache_path(str(src), str(src)) is None
    env = dict(os.environ, PYTHONPATH=REPO)
    for store in (tmp_path / "store", src / "store"):
        subprocess.run([sys.executable, "-m", "mkcfs.cli.mkcomposefs", f"--digest-store={store}",
                        str(src), str(tmp_path / "img")], check=True, env=env)
        assert (store / cache_mod.STORE_CACHE_NAME).exists() == (store == tmp_path / "store")


_SAVER = """
import os, sys
from types import SimpleNamespace
from mkcfs.store.cache import DigestCache
import mkcfs.store.cache as c
c.RACY_MARGIN_NS = -3600 * 10**9
path, src = sys.argv[1], sys.argv[2].encode()
st = os.lstat(src)
print("ready", flush=True)
n = 0
while True:
    cache = DigestCache(path, src, st)
    for i in range(50000):
        cache.record(SimpleNamespace(st_dev=st.st_dev, st_ino=i + 1, st_size=100 + n,
                                     st_mtime_ns=1, st_ctime_ns=2), bytes([n % 256]) * 32)
    cache.save()
    n += 1
"""


def test_kill_9_while_saving_leaves_a_usable_cache(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=REPO)
    for delay in (0.05, 0.2, 0.37, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(cache), str(src)],
                                env=env, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if cache.exists():
            (section,) = sections(cache)
            n = section.words[1] - 100   # every record of a saved section is of one round
            assert all(section.words[i] == 100 + n for i in range(1, len(section.words), 8))
            assert section.raw[32:64] == bytes([n % 256]) * 32
    DigestCache(cache, os.fsencode(src), os.lstat(src)).save()   # the next writer cleans up
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_concurrent_builds_share_one_cache(tmp_path):
    trees = []
    for n in range(4):
        src = tmp_path / f"src{n}"
        make_tree(src, files=5 + n)
        trees.append(src)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-m", "mkcfs.cli.mkcomposefs",
                               f"--digest-cache={cache}", str(src), str(tmp_path / f"{n}.img")],
                              env=env) for n, src in enumerate(trees)]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    sections(cache)   # whole and valid
    for n, src in enumerate(trees):
        assert (tmp_path / f"{n}.img").read_bytes() == build(src)
        assert build(src, cache) == build(src)


def test_unchanged_rebuild_does_not_rewrite_the_cache(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    build(src, cache)
    before = os.stat(cache)
    assert build(src, cache) == build(src)
    after = os.stat(cache)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # one file fewer: rewritten, without it
    os.unlink(src / "f4")
    build(src, cache)
    assert os.stat(cache).st_ino != before.st_ino
    assert len(sections(cache)[0].raw) == 20 * 64


def test_partly_changed_tree_keeps_hit_records_and_replaces_changed_ones(tmp_path, monkeypatch):
    """A rebuild keeps the records of the files it found unchanged as they were and merges the
    new records of changed and added files into one section sorted by inode, one per file; the
    next build then reads nothing."""
    src = tmp_path / "src"
    make_tree(src)
    cache = tmp_path / "cache"
    build(src, cache)
    (old,) = sections(cache)
    time.sleep(0.02)
    (src / "f4").write_bytes(b"x" * 500)
    (src / "sub" / "f7").write_bytes(b"y" * 300)
    (src / "new").write_bytes(b"z" * 200)
    os.unlink(src / "f2")
    changed = build(src, cache)
    assert changed == build(src)
    (section,) = sections(cache)
    words = section.words
    records = {words[i]: (words[i + 1], words[i + 2], words[i + 3]) for i in range(0, len(words), 8)}
    inodes = list(words[0::8])
    assert inodes == sorted(inodes) and len(records) == len(inodes) == 21
    expected = {}
    for dirpath, _, names in os.walk(src):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_size > 0:
                expected[st.st_ino] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert records == expected
    def raw_records(section) -> dict[int, bytes]:
        return {section.words[i // 8]: section.raw[i:i + 64] for i in range(0, len(section.raw), 64)}

    rewritten = {os.lstat(src / name).st_ino for name in ("f4", "sub/f7", "new")}
    before, now = raw_records(old), raw_records(section)
    unchanged = set(now) - rewritten
    assert len(unchanged) == 18 and all(now[ino] == before[ino] for ino in unchanged)
    monkeypatch.setenv("MKCFS_DIGEST_THREADS", "1")   # files are opened in this process
    opened = opened_files(monkeypatch)
    assert build(src, cache) == changed
    assert opened == []


@pytest.mark.parametrize("job_entries", [walk_module._JOB_ENTRIES, 1])
def test_rebuild_walked_with_the_workers_is_the_uncached_build(tmp_path, monkeypatch, job_entries):
    """A rebuild that expects cache hits has the pool's worker processes walk parts of the
    tree (``walk._Walker.walk_shared``): the image is the uncached one, the cache keeps a
    record of every file (hits found in the workers included), and the next build finds
    every file in it."""
    from mkcfs.sources import walk

    src = tmp_path / "src"
    for d in range(24):
        sub = src / f"d{d:02}" / "deeper"
        sub.mkdir(parents=True)
        for i in range(6):   # 0..500 bytes: empty, inline and external files
            (sub.parent / f"f{i}").write_bytes(bytes([d, i]) * (50 * i))
        (sub / "small").write_bytes(b"s" * d)
        os.symlink(f"../f{d % 6}", sub / "link")
        os.mkfifo(sub / "fifo")
        try:
            os.setxattr(sub.parent / "f3", "user.test", bytes([65 + d]))
        except OSError:
            pass
        os.link(sub.parent / "f5", sub / "f5-again")
    cache = tmp_path / "cache"
    build(src, cache)
    time.sleep(0.02)
    (src / "d03" / "f4").write_bytes(b"changed" * 50)
    (src / "d17" / "deeper" / "new").write_bytes(b"new" * 50)
    grafted = []
    graft = walk._Walker.graft
    monkeypatch.setattr(walk._Walker, "graft",
                        lambda self, job, packed: grafted.extend(job) or graft(self, job, packed))
    # one entry per job: each job walks the directories it is given and leaves those below
    monkeypatch.setattr(walk, "_JOB_ENTRIES", job_entries)
    assert build(src, cache, threads=2) == build(src)
    assert len(grafted) == (24 if job_entries > 100 else 48)
    (section,) = sections(cache)
    expected = {os.lstat(os.path.join(dirpath, name)).st_ino
                for dirpath, _, names in os.walk(src) for name in names
                if os.path.getsize(os.path.join(dirpath, name)) > 0   # inline ones too
                and os.path.isfile(os.path.join(dirpath, name))
                and not os.path.islink(os.path.join(dirpath, name))}
    assert sorted(section.words[0::8]) == sorted(expected)
    saved = os.lstat(cache)
    build(src, cache, threads=2)
    assert os.lstat(cache).st_ino == saved.st_ino   # all hits, nothing new: not rewritten


def test_error_in_a_directory_a_worker_walks_names_the_path(tmp_path, monkeypatch):
    """An entry that cannot be read in a part of the tree a worker walks fails the build with
    the one-line error of the walk done here."""
    from mkcfs.errors import WalkError

    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d:02}").mkdir(parents=True)
        (src / f"d{d:02}" / "file").write_bytes(b"x" * 100)
        os.symlink("target", src / f"d{d:02}" / "link")
    cache = tmp_path / "cache"
    build(src, cache)
    bad = os.fsencode(src / "d13" / "link")
    readlink = os.readlink

    def failing_readlink(path, *args, **kwargs):
        if os.fsencode(path) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return readlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "readlink", failing_readlink)   # before the workers are forked
    with pytest.raises(WalkError) as info:
        build(src, cache, threads=2)
    assert str(info.value) == f"error accessing {src}/d13/link: {os.strerror(errno.EIO)}"


def test_rebuild_walked_with_the_workers_into_a_store(tmp_path, monkeypatch):
    """With a digest store, the workers that walk parts of the tree store the new files they
    find and check that each cached digest's object is still in the store."""
    from mkcfs.sources import walk

    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d:02}").mkdir(parents=True)
        (src / f"d{d:02}" / "file").write_bytes(bytes([d]) * 1000)
        (src / f"d{d:02}" / "small").write_bytes(bytes([d]) * 10)
    store = tmp_path / "store"
    cache = tmp_path / "cache"
    build(src, cache, store)
    time.sleep(0.02)
    (src / "d05" / "file").write_bytes(b"changed" * 200)
    victim = store / object_path(fsverity.digest_bytes(bytes([9]) * 1000))
    os.unlink(victim)
    grafted = []
    graft = walk._Walker.graft
    monkeypatch.setattr(walk._Walker, "graft",
                        lambda self, job, packed: grafted.extend(job) or graft(self, job, packed))
    assert build(src, cache, store, threads=2) == build(src)
    assert len(grafted) == 20
    assert victim.exists()
    assert (store / object_path(fsverity.digest_bytes(b"changed" * 200))).exists()


def test_worker_that_dies_while_it_walks_fails_the_build_in_one_line(tmp_path, monkeypatch):
    from mkcfs.errors import WalkError
    from mkcfs.sources import walk

    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d:02}").mkdir(parents=True)
        (src / f"d{d:02}" / "file").write_bytes(b"x" * 100)
    cache = tmp_path / "cache"
    build(src, cache)
    monkeypatch.setattr(walk, "_pack", lambda *args: os._exit(3))   # only workers pack
    with pytest.raises(WalkError, match=r"^error walking .*/src/d\d\d: a worker process died"):
        build(src, cache, threads=2)
