"""The directory walker (mkcfs.sources.walk) and the digest pool (mkcfs.store.digests) on real trees in tmp_path.

Parts that need root (device nodes, trusted.* xattrs, chown) run when the tests run as root and
are skipped with a reason otherwise; CI runs them as root.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import socket
import stat
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fsverity
from mkcfs.store import digests, reading
from mkcfs.errors import BuildInputError, WalkError
from mkcfs.build.image import build_image, build_image_from
from mkcfs.progress import Progress
from mkcfs.tree import HardLink, Node, iter_tree, resolve
from mkcfs.sources.walk import WalkOptions, start_walk, walk_directory

from .privileges import CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, drop_capabilities, run_forked

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mknod, trusted.* xattrs, chown)")
NS = 1_000_000_000


def _user_xattrs_supported(path) -> bool:
    probe = os.path.join(path, ".xattr-probe")
    open(probe, "wb").close()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


def write(path, data: bytes, mode: int = 0o644, mtime_ns: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def entries(root: Node) -> dict[bytes, Node | HardLink]:
    return dict(iter_tree(root))


def image(root: Node, **kw) -> bytes:
    return bytes(build_image(root, **kw).data)


@pytest.fixture
def tree(tmp_path):
    """A tree with every unprivileged file type and the inline boundary sizes."""
    src = tmp_path / "src"
    src.mkdir()
    write(src / "empty", b"")
    write(src / "one", b"x")
    write(src / "s64", b"a" * 64, 0o600)
    write(src / "s65", b"b" * 65, 0o4755)
    write(src / "block", os.urandom(4096))
    write(src / "big", os.urandom(300_000), 0o755, mtime_ns=1_234_567_890_123_456_789)
    (src / "dir").mkdir(mode=0o750)
    (src / "dir" / "sub").mkdir()
    write(src / "dir" / "sub" / "deep", b"deep file content " * 10)
    os.symlink("big", src / "link")
    os.symlink("/nowhere/" + "x" * 300, src / "dir" / "dangling")
    os.mkfifo(src / "fifo", 0o640)
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(src)
    try:
        sock.bind("sock")
    finally:
        os.chdir(cwd)
        sock.close()
    os.utime(src / "dir", ns=(5 * NS + 7, 5 * NS + 7))
    return src


# -- basic attributes ---------------------------------------------------------------------------

def test_file_types_and_attributes(tree):
    root = walk_directory(tree, WalkOptions(threads=2, progress=False))
    e = entries(root)
    assert set(e) == {b"/", b"/empty", b"/one", b"/s64", b"/s65", b"/block", b"/big", b"/dir",
                      b"/dir/sub", b"/dir/sub/deep", b"/link", b"/dir/dangling", b"/fifo",
                      b"/sock"}
    for path, node in e.items():
        assert isinstance(node, Node)
        st_ = os.lstat(os.path.join(os.fsencode(tree), path.lstrip(b"/")) if path != b"/"
                       else tree)
        assert node.mode == st_.st_mode, path
        assert (node.uid, node.gid) == (st_.st_uid, st_.st_gid)
        assert node.mtime_sec * NS + node.mtime_nsec == st_.st_mtime_ns
        assert node.nlink == 1
        if not stat.S_ISDIR(st_.st_mode):
            assert node.size == st_.st_size
    assert e[b"/empty"].content is None and e[b"/empty"].payload is None
    assert e[b"/one"].content == b"x" and e[b"/one"].payload is None
    assert e[b"/s64"].content == b"a" * 64 and e[b"/s64"].digest is None
    for name in (b"s65", b"block", b"big"):
        node = e[b"/" + name]
        digest = fsverity.digest_file(os.path.join(tree, name.decode()))
        assert node.content is None
        assert node.digest == digest
        assert node.payload == fsverity.object_path(digest).encode()
    assert e[b"/big"].mtime_sec == 1_234_567_890 and e[b"/big"].mtime_nsec == 123_456_789
    assert e[b"/link"].payload == b"big"
    assert e[b"/dir/dangling"].payload == b"/nowhere/" + b"x" * 300
    assert stat.S_ISFIFO(e[b"/fifo"].mode) and stat.S_ISSOCK(e[b"/sock"].mode)
    assert e[b"/dir"].mode == stat.S_IFDIR | 0o750
    assert (e[b"/dir"].mtime_sec, e[b"/dir"].mtime_nsec) == (5, 7)
    image(root)  # the tree is writable


def test_use_epoch(tree):
    root = walk_directory(tree, WalkOptions(use_epoch=True, progress=False))
    for _, node in iter_tree(root):
        assert (node.mtime_sec, node.mtime_nsec) == (0, 0)


def test_threads_do_not_change_the_image(tree):
    images = {image(walk_directory(tree, WalkOptions(threads=n, progress=False)))
              for n in (1, 2, 7)}
    assert len(images) == 1


def test_negative_and_large_mtimes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "old", b"o", mtime_ns=-100 * NS + 5)
    write(src / "future", b"f", mtime_ns=(2 ** 33) * NS + 999_999_999)
    e = entries(walk_directory(src, WalkOptions(progress=False)))
    assert (e[b"/old"].mtime_sec, e[b"/old"].mtime_nsec) == (-100, 5)
    assert (e[b"/future"].mtime_sec, e[b"/future"].mtime_nsec) == (2 ** 33, 999_999_999)


def test_names_are_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    odd = b"\xff\xfe not utf-8 \x01"
    with open(os.path.join(os.fsencode(src), odd), "wb") as f:
        f.write(b"data")
    e = entries(walk_directory(src, WalkOptions(progress=False)))
    assert e[b"/" + odd].content == b"data"


def test_deep_tree_has_no_recursion_limit(tmp_path):
    src = os.fsencode(tmp_path / "src")
    depth = 1500                     # deeper than Python's recursion limit (paths < PATH_MAX)
    os.mkdir(src)
    try:
        for level in range(1, depth + 1):
            os.mkdir(src + b"/d" * level)
        root = walk_directory(src, WalkOptions(progress=False))
        node, found = root, 0
        while node.children:
            node = node.children[b"d"]
            found += 1
        assert found == depth
    finally:
        # shutil.rmtree (pytest's cleanup) recurses and cannot remove this: unwind by hand
        for level in range(depth, 0, -1):
            try:
                os.rmdir(src + b"/d" * level)
            except FileNotFoundError:
                pass


# -- xattrs -------------------------------------------------------------------------------------

def test_user_xattrs_and_options(tree):
    if not _user_xattrs_supported(tree):
        pytest.skip("the filesystem of tmp_path has no user xattrs")
    os.setxattr(tree / "one", "user.b", b"2")
    os.setxattr(tree / "one", "user.a", b"")
    os.setxattr(tree / "dir", "user.dir", b"\x00\xff")
    os.setxattr(tree / "big", "user.overlay.x", b"v")
    e = entries(walk_directory(tree, WalkOptions(progress=False)))
    assert e[b"/one"].xattrs == {b"user.a": b"", b"user.b": b"2"}
    assert e[b"/dir"].xattrs == {b"user.dir": b"\x00\xff"}
    assert e[b"/big"].xattrs == {b"user.overlay.x": b"v"}
    assert e[b"/s64"].xattrs == {}
    e = entries(walk_directory(tree, WalkOptions(skip_xattrs=True, progress=False)))
    assert all(not n.xattrs for n in e.values())
    e = entries(walk_directory(tree, WalkOptions(user_xattrs=True, progress=False)))
    assert e[b"/one"].xattrs == {b"user.a": b"", b"user.b": b"2"}


def test_skip_and_user_xattrs_conflict(tree):
    with pytest.raises(BuildInputError):
        walk_directory(tree, WalkOptions(skip_xattrs=True, user_xattrs=True))


@needs_root
def test_privileged_xattrs(tree):
    os.setxattr(tree / "one", "trusted.t", b"tv")
    os.setxattr(tree / "one", "security.s", b"sv")
    os.setxattr(tree / "dir", "trusted.overlay.opaque", b"y")
    os.setxattr(tree / "link", "trusted.on-link", b"l", follow_symlinks=False)
    # an extended ACL (a named user and a mask): a minimal one would fold into the mode bits
    acl = bytes.fromhex("02000000" "01000600ffffffff" "02000400e8030000" "04000400ffffffff"
                        "10000400ffffffff" "20000000ffffffff")
    try:
        os.setxattr(tree / "s65", "system.posix_acl_access", acl)
    except OSError:
        acl = None
    if _user_xattrs_supported(tree):
        os.setxattr(tree / "one", "user.u", b"uv")
    e = entries(walk_directory(tree, WalkOptions(progress=False)))
    one = e[b"/one"].xattrs
    assert one[b"trusted.t"] == b"tv" and one[b"security.s"] == b"sv"
    assert e[b"/dir"].xattrs[b"trusted.overlay.opaque"] == b"y"
    assert e[b"/link"].xattrs == {b"trusted.on-link": b"l"}   # not the target's
    assert b"trusted.on-link" not in e[b"/big"].xattrs
    if acl is not None:
        assert e[b"/s65"].xattrs[b"system.posix_acl_access"] == acl
    e = entries(walk_directory(tree, WalkOptions(user_xattrs=True, progress=False)))
    assert all(k.startswith(b"user.") for n in e.values() for k in n.xattrs)
    image(walk_directory(tree, WalkOptions(progress=False)))


def test_filesystem_without_xattrs(tree, monkeypatch):
    def nosup(path, *, follow_symlinks=True):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
    monkeypatch.setattr(os, "listxattr", nosup)
    root = walk_directory(tree, WalkOptions(progress=False))
    assert all(not n.xattrs for _, n in iter_tree(root))


def test_xattr_error_names_the_path(tree, monkeypatch):
    real = os.listxattr

    def failing(path, *, follow_symlinks=True):
        if os.fsencode(path).endswith(b"/s64"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real(path, follow_symlinks=follow_symlinks)
    monkeypatch.setattr(os, "listxattr", failing)
    with pytest.raises(WalkError, match=r"^error accessing .*/s64: Input/output error$"):
        walk_directory(tree, WalkOptions(progress=False))


def test_too_many_xattrs_is_erange(tree, monkeypatch):
    # ext4 cannot hold this much, so fake the filesystem (libcomposefs caps one inode at 32767)
    monkeypatch.setattr(os, "listxattr", lambda p, *, follow_symlinks=True:
                        [f"user.k{i}" for i in range(20)] if os.fsencode(p).endswith(b"/one") else [])
    monkeypatch.setattr(os, "getxattr", lambda p, n, *, follow_symlinks=True: b"v" * 2000)
    with pytest.raises(WalkError, match=r"/one: Numerical result out of range$"):
        walk_directory(tree, WalkOptions(progress=False))


# -- devices and owners (root) ------------------------------------------------------------------

@needs_root
def test_devices_and_skip_devices(tree):
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(tree / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.mknod(tree / "dir" / "whiteout", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    root = walk_directory(tree, WalkOptions(progress=False))
    e = entries(root)
    assert e[b"/null"].rdev == os.makedev(1, 3) and stat.S_ISCHR(e[b"/null"].mode)
    assert e[b"/sda"].rdev == os.makedev(8, 1) and stat.S_ISBLK(e[b"/sda"].mode)
    assert e[b"/dir/whiteout"].rdev == 0
    assert build_image(root).version == 1       # a whiteout raises the format version
    root = walk_directory(tree, WalkOptions(skip_devices=True, progress=False))
    e = entries(root)
    assert b"/null" not in e and b"/sda" not in e and b"/dir/whiteout" not in e
    assert b"/fifo" in e and b"/sock" in e
    assert build_image(root).version == 0


@needs_root
def test_owners(tree):
    os.chown(tree / "one", 1234, 5678)
    os.chown(tree / "link", 42, 43, follow_symlinks=False)
    os.chown(tree, 7, 8)
    e = entries(walk_directory(tree, WalkOptions(progress=False)))
    assert (e[b"/one"].uid, e[b"/one"].gid) == (1234, 5678)
    assert (e[b"/link"].uid, e[b"/link"].gid) == (42, 43)
    assert (e[b"/"].uid, e[b"/"].gid) == (7, 8)


# -- hard links ---------------------------------------------------------------------------------

@pytest.fixture
def linked(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    write(src / "b" / "file", os.urandom(5000))
    os.link(src / "b" / "file", src / "a" / "z-link")
    os.link(src / "b" / "file", src / "top")
    write(src / "small", b"tiny")
    os.link(src / "small", src / "b" / "small2")
    os.symlink("target", src / "sym")
    os.link(src / "sym", src / "a" / "sym2", follow_symlinks=False)
    write(src / "empty", b"")
    os.link(src / "empty", src / "b" / "empty2")
    write(src / "outside-linked", os.urandom(100))
    os.link(src / "outside-linked", tmp_path / "elsewhere")
    return src


def test_hardlinks_default_is_one_inode_per_path(linked):
    root = walk_directory(linked, WalkOptions(progress=False))
    e = entries(root)
    assert all(isinstance(n, Node) and n.nlink == 1 for n in e.values())
    digest = fsverity.digest_file(linked / "top")
    for p in (b"/a/z-link", b"/b/file", b"/top"):
        assert e[p].digest == digest and e[p].payload == fsverity.object_path(digest).encode()
    assert e[b"/b/small2"].content == e[b"/small"].content == b"tiny"
    assert e[b"/a/sym2"].payload == b"target"


def test_hardlinks_option_keeps_links(linked):
    root = walk_directory(linked, WalkOptions(hardlinks=True, progress=False))
    e = entries(root)
    # the first path in sorted depth-first order holds the inode
    primary = e[b"/a/z-link"]
    assert isinstance(primary, Node) and primary.nlink == 3
    assert primary.digest == fsverity.digest_file(linked / "top")
    for p in (b"/b/file", b"/top"):
        assert isinstance(e[p], HardLink) and resolve(e[p]) is primary
    assert isinstance(e[b"/b/small2"], Node) and e[b"/b/small2"].nlink == 2
    assert e[b"/b/small2"].content == b"tiny"
    assert isinstance(e[b"/small"], HardLink)
    assert isinstance(e[b"/a/sym2"], Node) and e[b"/a/sym2"].nlink == 2
    assert isinstance(e[b"/sym"], HardLink)
    assert isinstance(e[b"/b/empty2"], Node) and e[b"/b/empty2"].nlink == 2   # empty files too
    assert isinstance(e[b"/empty"], HardLink) and e[b"/b/empty2"].content is None
    # the other link is outside the tree: not counted
    assert isinstance(e[b"/outside-linked"], Node) and e[b"/outside-linked"].nlink == 1
    data = image(root)
    assert data != image(walk_directory(linked, WalkOptions(progress=False)))


# -- the source itself --------------------------------------------------------------------------

def test_source_errors(tmp_path):
    with pytest.raises(WalkError, match=r"^error accessing .*/missing: No such file or directory$"):
        walk_directory(tmp_path / "missing")
    write(tmp_path / "file", b"x")
    with pytest.raises(WalkError, match=r"^error accessing .*/file: Not a directory$"):
        walk_directory(tmp_path / "file")
    (tmp_path / "d").mkdir()
    os.symlink("d", tmp_path / "dlink")
    with pytest.raises(WalkError, match=r"/dlink: Not a directory$"):
        walk_directory(tmp_path / "dlink")
    # with a trailing slash the symlink is resolved by the kernel, as in mkcomposefs
    root = walk_directory(str(tmp_path / "dlink") + "/", WalkOptions(progress=False))
    assert root.is_dir()


def test_root_node_describes_the_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir(mode=0o711)
    os.chmod(src, 0o711)
    os.utime(src, ns=(3 * NS + 4, 3 * NS + 4))
    root = walk_directory(src, WalkOptions(progress=False))
    assert root.mode == stat.S_IFDIR | 0o711 and (root.mtime_sec, root.mtime_nsec) == (3, 4)
    assert root.children == {}


def _check_unreadable_directory_and_file(tree) -> None:
    os.chmod(tree / "dir" / "sub", 0)
    try:
        with pytest.raises(WalkError, match=r"^error accessing .*/dir/sub: Permission denied$"):
            walk_directory(tree, WalkOptions(progress=False))
    finally:
        os.chmod(tree / "dir" / "sub", 0o755)
    os.chmod(tree / "big", 0)
    with pytest.raises(WalkError, match=r"/big: Permission denied$"):
        walk_directory(tree, WalkOptions(progress=False))
    os.chmod(tree / "empty", 0)   # an empty file is never read
    os.chmod(tree / "big", 0o644)
    walk_directory(tree, WalkOptions(progress=False))


def test_unreadable_directory_and_file(tree):
    if not ROOT:
        _check_unreadable_directory_and_file(tree)
        return
    # root reads everything: check as root without the capabilities that bypass permissions
    code, err = run_forked(lambda: _check_unreadable_directory_and_file(tree),
                           lambda: drop_capabilities(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH))
    assert code == 0, err


# -- files changing while read ------------------------------------------------------------------

@pytest.mark.parametrize("name,change", [
    ("big", "grow"), ("big", "shrink"), ("big", "vanish"),
    ("one", "grow"), ("one", "vanish"), ("s65", "shrink")])
def test_file_changing_while_read(tree, monkeypatch, name, change):
    real = reading.open_source
    target = os.fsencode(tree / name)

    def tampering(path):
        if path == target:
            if change == "grow":
                with open(path, "ab") as f:
                    f.write(b"more" * 40)
            elif change == "shrink":
                os.truncate(path, 3)
            else:
                os.unlink(path)
        return real(path)
    monkeypatch.setattr(reading, "open_source", tampering)
    monkeypatch.setattr(digests, "open_source", tampering)
    expected = ("No such file or directory" if change == "vanish"
                else "file changed size while being read")
    with pytest.raises(WalkError) as info:
        walk_directory(tree, WalkOptions(threads=2, progress=False))
    message = str(info.value)
    assert message.startswith("error computing digest of ") and name in message
    assert expected in message and "\n" not in message


def test_hash_fd_and_read_inline_check_the_size(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(3 * digests.BUFFER_SIZE + 17)
    write(p, data)
    view = memoryview(bytearray(digests.BUFFER_SIZE))
    path = os.fsencode(p)
    assert digests.digest_path(path, len(data), view) == fsverity.digest_bytes(data)
    for wrong in (len(data) - 1, len(data) + 1, 3 * digests.BUFFER_SIZE, 0):
        with pytest.raises(WalkError, match="changed size"):
            digests.digest_path(path, wrong, view)
    write(p, b"12345")
    assert digests.read_inline(path, 5) == b"12345"
    for wrong in (4, 6):
        with pytest.raises(WalkError, match="changed size"):
            digests.read_inline(path, wrong)


def test_source_replaced_by_fifo_does_not_hang(tmp_path):
    p = tmp_path / "f"
    os.mkfifo(p)
    with pytest.raises(WalkError, match="changed size"):
        digests.digest_path(os.fsencode(p), 100)


@given(size=st.integers(1, 600_000))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_digests_match_fsverity(tmp_path, size):
    p = tmp_path / f"f{size}"
    data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    write(p, data)
    try:
        assert digests.digest_path(os.fsencode(p), size) == fsverity.digest_bytes(data)
    finally:
        os.unlink(p)


@pytest.mark.parametrize("n", [1, 64, 65, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1,
                               129 * 4096, digests.BUFFER_SIZE - 1, digests.BUFFER_SIZE])
def test_one_shot_digest_matches_streaming(n):
    data = hashlib.sha512(str(n).encode()).digest() * (n // 64 + 1)
    view = memoryview(bytearray(digests.BUFFER_SIZE))
    view[:n] = data[:n]
    streamed = fsverity.FsVerityHasher()
    for i in range(0, n, 1000):
        streamed.update(data[i:min(i + 1000, n)])
    assert fsverity.digest_bytes(view[:n]) == streamed.digest()


def test_thread_and_process_workers_agree(tree, monkeypatch):
    pool = digests.DigestPool(2)
    try:
        assert pool.processes
    finally:
        pool.finish()
    with_processes = image(walk_directory(tree, WalkOptions(threads=2, progress=False)))
    monkeypatch.setenv("MKCFS_DIGEST_THREADS", "1")
    pool = digests.DigestPool(2)
    try:
        assert not pool.processes
    finally:
        pool.finish()
    assert image(walk_directory(tree, WalkOptions(threads=2, progress=False))) == with_processes


def test_threads_when_the_caller_runs_threads(tree):
    other = threading.Event()
    helper = threading.Thread(target=other.wait)
    helper.start()
    try:
        pool = digests.DigestPool(1)
        assert not pool.processes        # never fork a multi-threaded process
        pool.finish()
        root = walk_directory(tree, WalkOptions(progress=False))
    finally:
        other.set()
        helper.join()
    assert image(root) == image(walk_directory(tree, WalkOptions(progress=False)))


def test_pool_error_stops_early_and_aliases(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a", os.urandom(1000))
    pool = digests.DigestPool(2)
    good = Node(stat.S_IFREG | 0o644, size=1000)
    alias = Node(stat.S_IFREG | 0o644, size=1000)
    pool.add(os.fsencode(src / "a"), good)
    pool.alias(alias, good)
    pool.finish()
    assert alias.digest == good.digest == fsverity.digest_file(src / "a")
    assert alias.payload == good.payload
    pool = digests.DigestPool(1)
    pool.add(os.fsencode(src / "missing"), Node(stat.S_IFREG | 0o644, size=1000))
    with pytest.raises(WalkError, match="missing: No such file"):
        pool.finish()


# -- a tree in progress: flattened while its files are read -------------------------------------

@pytest.mark.parametrize("options", [
    WalkOptions(progress=False), WalkOptions(threads=1, progress=False),
    WalkOptions(hardlinks=True, progress=False), WalkOptions(skip_xattrs=True, progress=False)],
    ids=["default", "one-thread", "hardlinks", "skip-xattrs"])
def test_tree_in_progress_builds_the_walked_tree_image(linked, options):
    # duplicate contents (shared xattrs), hard links read once (aliases), inline, empty files
    write(linked / "a" / "same-as-file", (linked / "b" / "file").read_bytes())
    write(linked / "a" / "same-as-small", b"tiny")
    expected = image(walk_directory(linked, options))
    for version in ((0, 1), (1, 1)):
        built = build_image_from(lambda: start_walk(linked, options),
                                 min_version=version[0], max_version=version[1])
        assert bytes(built.data) == image(walk_directory(linked, options),
                                          min_version=version[0], max_version=version[1])
    assert bytes(build_image_from(lambda: start_walk(linked, options)).data) == expected


def test_tree_in_progress_with_files_known_from_the_digest_cache(linked, tmp_path, monkeypatch):
    from mkcfs.store import cache as cache_module
    monkeypatch.setattr(cache_module, "RACY_MARGIN_NS", -3600 * 10**9)   # all cacheable
    options = WalkOptions(digest_cache=str(tmp_path / "cache"), threads=2, progress=False)
    expected = image(walk_directory(linked, WalkOptions(progress=False)))
    assert bytes(build_image_from(lambda: start_walk(linked, options)).data) == expected
    write(linked / "a" / "new", os.urandom(3000))   # read; the others come from the cache
    expected = image(walk_directory(linked, WalkOptions(progress=False)))
    added = []
    real_add = digests.DigestPool.add
    monkeypatch.setattr(digests.DigestPool, "add",
                        lambda pool, path, node: added.append(path) or real_add(pool, path, node))
    for _ in range(2):
        assert bytes(build_image_from(lambda: start_walk(linked, options)).data) == expected
    # the files larger than 64 bytes, but for the new one, came from the cache
    assert {path for path in added if os.path.getsize(path) > 64} == {
        os.fsencode(linked / "a" / "new")}


def test_tree_in_progress_a_read_error_is_reported_before_a_flatten_error(tree, monkeypatch):
    from mkcfs.build import image as image_module
    from mkcfs.build.flatten import WriteError
    real_open, real_flatten = reading.open_source, image_module.flatten_choosing_version
    target = os.fsencode(tree / "big")

    def failing_open(path):
        if path == target:
            raise reading.walk_error("error computing digest of", path, "injected")
        return real_open(path)

    def failing_flatten(*args, **kwargs):
        real_flatten(*args, **kwargs)
        raise WriteError(errno.EINVAL, "injected")
    monkeypatch.setattr(reading, "open_source", failing_open)
    monkeypatch.setattr(digests, "open_source", failing_open)
    monkeypatch.setattr(image_module, "flatten_choosing_version", failing_flatten)
    with pytest.raises(WalkError, match=r"^error computing digest of .*big: injected$"):
        build_image_from(lambda: start_walk(tree, WalkOptions(threads=2, progress=False)))
    monkeypatch.setattr(reading, "open_source", real_open)   # no read error: flatten's
    monkeypatch.setattr(digests, "open_source", real_open)
    with pytest.raises(WriteError, match="injected"):
        build_image_from(lambda: start_walk(tree, WalkOptions(threads=2, progress=False)))
    assert not multiprocessing.active_children()


def test_tree_in_progress_is_aborted_when_interrupted(tree, monkeypatch):
    from mkcfs.build import image as image_module
    started = []

    def walk():
        started.append(start_walk(tree, WalkOptions(threads=2, progress=False)))
        return started[0]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(image_module, "flatten_choosing_version", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_image_from(walk)
    assert not multiprocessing.active_children()   # the workers are gone
    started[0].wait()   # nothing left to wait for: it was aborted


def test_pool_passes_each_batch_of_filled_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "_BATCH_FILES", 3)
    src = tmp_path / "src"
    src.mkdir()
    nodes = []
    pool = digests.DigestPool(2)
    for i in range(10):
        write(src / f"f{i}", bytes([i]) * (10 if i % 2 else 1000))
        nodes.append(Node(stat.S_IFREG | 0o644, size=10 if i % 2 else 1000))
        pool.add(os.fsencode(src / f"f{i}"), nodes[-1])
    alias = Node(stat.S_IFREG | 0o644, size=1000)
    pool.alias(alias, nodes[0])
    seen = []
    pool.finish(lambda batch: seen.append([(n.content, n.digest) for n in batch]))
    assert [len(batch) for batch in seen] == [3, 3, 3, 1]
    assert [item for batch in seen for item in batch] == [(n.content, n.digest) for n in nodes]
    assert all(content or digest for batch in seen for content, digest in batch)
    assert alias.digest == nodes[0].digest


def test_a_batch_looks_at_its_cancel_flag_every_16_files(tmp_path):
    class Flag:
        def __init__(self, at: int) -> None:
            self.looks, self.at = 0, at

        def is_set(self) -> bool:
            self.looks += 1
            return self.looks >= self.at
    batch = []
    for i in range(40):
        write(tmp_path / f"f{i}", bytes([i]) * (10 if i % 2 else 5000))
        batch.append((os.fsencode(tmp_path / f"f{i}"), 10 if i % 2 else 5000))
    never = Flag(10 ** 9)
    results = digests.run_batch(batch, None, never)
    assert never.looks == 3 and len(results) == 40
    assert results[1] == bytes([1]) * 10 and results[0][0] == fsverity.digest_bytes(bytes(5000))
    with pytest.raises(digests.Cancelled):
        digests.run_batch(batch, None, Flag(2))   # set while the first 16 files were read


def test_pool_batches_grow_from_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "_FIRST_BATCH_FILES", 2)
    monkeypatch.setattr(digests, "_BATCH_FILES", 8)
    src = tmp_path / "src"
    src.mkdir()
    pool = digests.DigestPool(2)
    for i in range(30):
        write(src / f"f{i}", b"x" * 100)
        pool.add(os.fsencode(src / f"f{i}"), Node(stat.S_IFREG | 0o644, size=100))
    sizes = []
    pool.finish(lambda batch: sizes.append(len(batch)))
    assert sizes == [2, 4, 8, 8, 8]


# -- progress -----------------------------------------------------------------------------------

class _FakeTTY:
    def __init__(self) -> None:
        self.text = ""
        self.lock = threading.Lock()

    def write(self, s: str) -> None:
        with self.lock:
            self.text += s

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("no fd")


def test_progress_line_is_drawn_and_cleared():
    stream = _FakeTTY()
    progress = Progress(stream, interval=0.01)
    progress.start()
    progress.entries = 12
    progress.add_files(1, 2_500_000)
    deadline = threading.Event()
    for _ in range(200):
        if "12 entries" in stream.text:
            break
        deadline.wait(0.01)
    progress.close()
    assert "12 entries, 1 files hashed (2.5 MB)" in stream.text
    assert stream.text.endswith("\r\x1b[K")
    assert "\n" not in stream.text


def test_progress_off_when_not_a_tty(tmp_path):
    with open(tmp_path / "log", "w") as f:
        assert Progress.for_stream(f) is None
        assert Progress.for_stream(f, enabled=False) is None
    fake = _FakeTTY()
    progress = Progress.for_stream(fake, enabled=True)
    assert progress is not None
    progress.close()


# -- a tree materialized from a dumpfile builds to the dumpfile's image --------------------------

def _dumpfile_and_tree(base, hardlinks: bool) -> tuple[bytes, str]:
    """Write a dumpfile and materialize the same tree under ``base``/src."""
    big = os.urandom(70_000)
    mid = bytes(range(256)) * 20
    small = b"small content\n"
    dig_big = fsverity.digest_bytes(big)
    dig_mid = fsverity.digest_bytes(mid)
    uid, gid = (1000, 2000) if ROOT else (os.getuid(), os.getgid())
    xattrs_ok = _user_xattrs_supported(base)
    xa = " user.color=blue user.bin=\\x00\\xff" if xattrs_ok else ""
    def op(d):
        return (fsverity.object_path(d))
    lines = [
        f"/ 4096 40755 4 {uid} {gid} 0 1700000000.500000000 - - -{xa}",
        f"/big 70000 100644 {2 if hardlinks else 1} {uid} {gid} 0 1600000000.123456789 "
        f"{op(dig_big)} - {dig_big.hex()}",
        f"/dir 4096 40700 2 {uid} {gid} 0 1500000000.0 - - -",
        f"/dir/mid 5120 100600 1 {uid} {gid} 0 12.000000001 {op(dig_mid)} - {dig_mid.hex()}",
        f"/dir/small 14 104755 1 {uid} {gid} 0 13.500000000 - small\\x20content\\n -{xa}",
        f"/dir/zempty 0 100644 1 {uid} {gid} 0 14.0 - - -",
        f"/fifo 0 10640 1 {uid} {gid} 0 99.990000000 - - -",
        f"/sym 7 120777 1 {uid} {gid} 0 1000.250000000 dir/mid - -",
        f"/sub 4096 40755 2 {uid} {gid} 0 1.0 - - -",
    ]
    if hardlinks:
        lines.append("/sub/hard 0 @100644 - - - - 0.0 /big - -")
    else:
        lines.append(f"/sub/hard 70000 100644 1 {uid} {gid} 0 1600000000.123456789 "
                     f"{op(dig_big)} - {dig_big.hex()}")
    if ROOT:
        lines.append(f"/zchr 0 20644 1 {uid} {gid} {os.makedev(1, 7)} 7.0 - - -"
                     " trusted.secret=s security.x=y")
    dump = ("\n".join(lines) + "\n").encode()

    src = base / "src"
    src.mkdir()
    write(src / "big", big)
    (src / "dir").mkdir()
    write(src / "dir" / "mid", mid, 0o600)
    write(src / "dir" / "small", small)
    write(src / "dir" / "zempty", b"")
    os.mkfifo(src / "fifo", 0o640)
    os.symlink("dir/mid", src / "sym")
    (src / "sub").mkdir()
    if hardlinks:
        os.link(src / "big", src / "sub" / "hard")
    else:
        write(src / "sub" / "hard", big)
    if xattrs_ok:
        for p in (src, src / "dir" / "small"):
            os.setxattr(p, "user.color", b"blue")
            os.setxattr(p, "user.bin", b"\x00\xff")
    if ROOT:
        os.mknod(src / "zchr", stat.S_IFCHR | 0o644, os.makedev(1, 7))
        os.setxattr(src / "zchr", "trusted.secret", b"s")
        os.setxattr(src / "zchr", "security.x", b"y")
    times = {"big": 1600000000_123456789, "dir/mid": 12_000000001, "dir/small": 13_500000000,
             "dir/zempty": 14 * NS, "fifo": 99_990000000, "sym": 1000_250000000,
             "sub/hard": 1600000000_123456789, "dir": 1500000000 * NS, "sub": NS,
             ".": 1700000000_500000000}
    if ROOT:
        times["zchr"] = 7 * NS
        for p in ("big", "dir/mid", "dir/small", "dir/zempty", "fifo", "sym", "sub/hard",
                  "dir", "sub", ".", "zchr"):
            os.chown(src / p, uid, gid, follow_symlinks=False)
    os.chmod(src / "dir", 0o700)
    os.chmod(src / "dir" / "small", 0o4755)   # after chown, which clears set-uid
    for p, t in times.items():
        os.utime(src / p, ns=(t, t), follow_symlinks=False)
    return dump, str(src)


@pytest.mark.parametrize("hardlinks", [False, True], ids=["default", "hardlinks"])
def test_dumpfile_equivalence(tmp_path, hardlinks):
    from mkcfs.sources.dumpfile import parse_dumpfile
    dump, src = _dumpfile_and_tree(tmp_path, hardlinks)
    expected = image(parse_dumpfile(dump, strict=False))
    walked = walk_directory(src, WalkOptions(hardlinks=hardlinks, progress=False))
    assert image(walked) == expected
    assert image(walked, min_version=1, max_version=1) == image(
        parse_dumpfile(dump, strict=False), min_version=1, max_version=1)


# -- hypothesis: random trees, expected tree built by hand ----------------------------------------

_names = st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n
                                                   and n not in (b".", b".."))
_files = st.dictionaries(_names, st.tuples(
    st.sampled_from(["file", "dir", "link", "fifo"]),
    st.binary(max_size=300),
    st.integers(0, 2 ** 33 * NS),   # within what every Linux filesystem stores
    st.sampled_from([0o644, 0o600, 0o755, 0o4711, 0o1777])), max_size=12)


@given(files=_files)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_trees_build_like_the_expected_tree(tmp_path_factory, files):
    base = tmp_path_factory.mktemp("h")
    src = os.fsencode(base / "src")
    os.mkdir(src)
    expected = Node(stat.S_IFDIR | 0o755)
    for name, (kind, data, mtime, perm) in files.items():
        path = src + b"/" + name
        if kind == "file":
            write(path, data, perm)
            node = Node(stat.S_IFREG | perm, size=len(data))
            if 0 < len(data) <= 64:
                node.content = data
            elif data:
                node.digest = fsverity.digest_bytes(data)
                node.payload = fsverity.object_path(node.digest).encode()
        elif kind == "dir":
            os.mkdir(path)
            os.chmod(path, perm)
            node = Node(stat.S_IFDIR | perm)
        elif kind == "link":
            target = data.replace(b"\0", b"x") or b"t"
            os.symlink(target, path)
            node = Node(stat.S_IFLNK | 0o777, size=len(target), payload=target)
        else:
            os.mkfifo(path)
            os.chmod(path, perm)
            node = Node(stat.S_IFIFO | perm)
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        node.mtime_sec, node.mtime_nsec = divmod(mtime, NS)
        node.uid, node.gid = os.getuid(), os.getgid()
        expected.children[name] = node
    os.utime(src, ns=(NS, NS))
    expected.mtime_sec = 1
    expected.uid, expected.gid = os.getuid(), os.getgid()
    walked = walk_directory(src, WalkOptions(progress=False))
    assert image(walked) == image(expected)
