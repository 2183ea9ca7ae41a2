"""Reusing the last image (mkcfs.build.reuse): a rebuild of an unchanged tree into the same image
file keeps that file, and any change of the tree, the options, the code or the image file
itself gives a full build whose image is the uncached one.

Each case that must build again is checked against the control that the same rebuild without
the change does reuse (the image file keeps its inode): so a test fails if the key missed what
the case changes.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

import fsverity

from mkcfs.build import image as image_mod
from mkcfs.build import reuse
from mkcfs.build.image import build_image
from mkcfs.cli import mkcomposefs
from mkcfs.sources import walk as walk_mod
from mkcfs.sources.walk import WalkOptions, start_walk, walk_directory
from mkcfs.store import cache as cache_mod


@pytest.fixture(autouse=True)
def no_racy_margin(monkeypatch):
    """Files made by a test are seconds old at most: cache them anyway."""
    monkeypatch.setattr(cache_mod, "RACY_MARGIN_NS", -3600 * 10**9)


def make_tree(src) -> None:
    for d in range(20):
        sub = src / f"d{d:02}" / "deeper"
        sub.mkdir(parents=True)
        for i in range(4):
            (sub.parent / f"f{i}").write_bytes(bytes([d, i]) * (60 * i))
        (sub / "small").write_bytes(b"s" * (d + 1))
        os.symlink(f"../f{d % 4}", sub / "link")
        (sub / "file").write_bytes(b"x" * 300 + bytes([d]))


def uncached(src) -> bytes:
    return bytes(build_image(walk_directory(src, WalkOptions(threads=1))).data)


def run(src, img, *extra, capsys=None) -> str:
    status = mkcomposefs.main([f"--digest-cache={src.parent / 'cache'}", "--threads=2",
                               *extra, str(src), *([str(img)] if img else [])])
    assert status == 0
    return capsys.readouterr().out if capsys else ""


def primed(tmp_path):
    """A tree, and an image of it built twice with the cache (the first build fills the digest
    cache; the second, which walks with the workers, remembers its image)."""
    src = tmp_path / "src"
    make_tree(src)
    img = tmp_path / "out.img"
    run(src, img)
    run(src, img)
    return src, img


def test_unchanged_rebuild_keeps_the_image_file(tmp_path, monkeypatch, capsys):
    src, img = primed(tmp_path)
    capsys.readouterr()
    before = os.stat(img)
    assert img.read_bytes() == uncached(src)
    monkeypatch.setattr(image_mod, "build_image_from",
                        lambda *a, **k: pytest.fail("an unchanged tree was built again"))
    time.sleep(0.01)
    out = run(src, img, "--print-digest", capsys=capsys)
    after = os.stat(img)
    assert after.st_ino == before.st_ino
    assert after.st_mtime_ns > before.st_mtime_ns   # touched as a rewrite would
    assert out == fsverity.digest_bytes(img.read_bytes()).hex() + "\n"
    assert img.read_bytes() == uncached(src)
    # --print-digest-only needs no image file
    assert run(src, None, "--print-digest-only", capsys=capsys) == out


def _chmod(src):
    os.chmod(src / "d07" / "f2", 0o600)


def _xattr(src):
    try:
        os.setxattr(src / "d12" / "deeper" / "file", "user.k", b"v")
    except OSError as exc:
        pytest.skip(f"no user xattrs here: {exc}")


def _content_same_size_and_mtime(src):
    path = src / "d15" / "deeper" / "file"
    st = os.lstat(path)
    time.sleep(0.02)
    path.write_bytes(b"y" * 300 + b"\x0f")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _inline_content(src):
    path = src / "d03" / "deeper" / "small"
    st = os.lstat(path)
    path.write_bytes(b"t" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _mtime(src):
    os.utime(src / "d09" / "f1", ns=(0, 10**9))


def _rename(src):
    os.rename(src / "d05" / "f3", src / "d05" / "f4")


def _add(src):
    (src / "d18" / "deeper" / "new").write_bytes(b"n" * 100)


def _remove(src):
    os.unlink(src / "d01" / "f1")


def _symlink_target(src):
    link = src / "d11" / "deeper" / "link"
    os.unlink(link)
    os.symlink("../f00", link)   # the same length


def _empty_directory(src):
    (src / "d19" / "deeper" / "empty").mkdir()


def _root_mode(src):
    os.chmod(src, 0o700)


CHANGES = [_chmod, _xattr, _content_same_size_and_mtime, _inline_content, _mtime, _rename,
           _add, _remove, _symlink_target, _empty_directory, _root_mode]


@pytest.mark.parametrize("change", [None, *CHANGES],
                         ids=lambda c: "control" if c is None else c.__name__.strip("_"))
def test_any_change_of_the_tree_builds_again(tmp_path, change):
    src, img = primed(tmp_path)
    before = os.stat(img).st_ino
    if change is not None:
        change(src)
    run(src, img)
    if change is None:
        assert os.stat(img).st_ino == before
    else:
        assert os.stat(img).st_ino != before
    assert img.read_bytes() == uncached(src)
    run(src, img)   # and the new image is remembered in its turn
    assert img.read_bytes() == uncached(src)


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "directory"])
def test_image_file_changed_since_is_built_again(tmp_path, damage):
    src, img = primed(tmp_path)
    good = img.read_bytes()
    if damage == "flip":
        data = bytearray(good)
        data[len(data) // 2] ^= 1
        img.write_bytes(bytes(data))
    elif damage == "truncate":
        img.write_bytes(good[:-4096])
    elif damage == "remove":
        img.unlink()
    else:
        img.unlink()
        img.mkdir()
        img = tmp_path / "other.img"
    run(src, img)
    assert img.read_bytes() == good


def test_an_image_write_that_fails_leaves_nothing_the_next_build_trusts(tmp_path, monkeypatch,
                                                                         capsys):
    """The digest cache is saved, with the image it remembers, while the image is written; if
    that write fails, the next build finds the image file without that digest and builds."""
    from mkcfs import fsutil

    src, img = primed(tmp_path)
    old = img.read_bytes()
    (src / "d03" / "new").write_bytes(b"n" * 200)
    real_write = fsutil.write_atomically

    def failing(path, *args, **kwargs):
        if os.fsencode(path) == os.fsencode(img):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, *args, **kwargs)
    with monkeypatch.context() as patched:
        patched.setattr(fsutil, "write_atomically", failing)
        status = mkcomposefs.main([f"--digest-cache={tmp_path / 'cache'}", "--threads=2",
                                   str(src), str(img)])
    assert status != 0 and "No space left on device" in capsys.readouterr().err
    assert img.read_bytes() == old
    memo = cache_mod.DigestCache(tmp_path / "cache", os.fsencode(src), os.lstat(src)).image_memo
    assert memo is not None and memo[1] != fsverity.digest_bytes(old)   # the unwritten image's
    run(src, img)
    assert img.read_bytes() == uncached(src) != old


@pytest.mark.parametrize("option", ["--use-epoch", "--min-version=1", "--user-xattrs",
                                    "--skip-devices", "--code-changed"])
def test_other_options_or_code_build_again(tmp_path, monkeypatch, option):
    src, img = primed(tmp_path)
    (src / "d02" / "deeper" / "dev").touch()   # a new file: the next two builds differ
    run(src, img)
    before = os.stat(img).st_ino
    if option == "--code-changed":
        monkeypatch.setattr(reuse, "code_fingerprint", lambda: b"\x01" * 32)
        extra: list[str] = []
    else:
        extra = [option]
    run(src, img, *extra)
    assert os.stat(img).st_ino != before
    expected = WalkOptions(threads=1, use_epoch=option == "--use-epoch",
                           user_xattrs=option == "--user-xattrs",
                           skip_devices=option == "--skip-devices")
    assert img.read_bytes() == bytes(build_image(
        walk_directory(src, expected), min_version=1 if option == "--min-version=1" else 0
    ).data)


@pytest.mark.parametrize("job_entries,min_dirs", [(3000, 16), (1, 16), (1, 1), (50, 64)])
def test_tree_key_is_the_same_however_the_walk_was_shared(tmp_path, monkeypatch, job_entries,
                                                          min_dirs):
    src, _ = primed(tmp_path)
    options = WalkOptions(threads=2, digest_cache=tmp_path / "cache")

    def key() -> bytes:
        walk = start_walk(src, options)
        assert walk.shared
        walk.wait(for_reuse=True)
        assert walk.tree_key is not None
        return walk.tree_key

    reference = key()
    monkeypatch.setattr(walk_mod, "_JOB_ENTRIES", job_entries)
    monkeypatch.setattr(walk_mod, "_SHARED_MIN_DIRS", min_dirs)
    assert key() == reference
    os.chmod(src / "d10" / "deeper", 0o700)   # deep in a part a worker walks
    assert key() != reference


def test_code_fingerprint_follows_the_modules(tmp_path, monkeypatch):
    """An edit of a module (size or mtime) changes the fingerprint."""
    reuse.code_fingerprint.cache_clear()
    first = reuse.code_fingerprint()
    layout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "erofs", "layout.py")
    st = os.stat(layout)
    try:
        os.utime(layout, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        reuse.code_fingerprint.cache_clear()
        assert reuse.code_fingerprint() != first
    finally:
        os.utime(layout, ns=(st.st_atime_ns, st.st_mtime_ns))
        reuse.code_fingerprint.cache_clear()
    assert reuse.code_fingerprint() == first


# -- rewriting the last image when only some files' contents changed ---------------------------

def _rewrite(path, contents: bytes) -> None:
    """New contents for ``path``, its size and mtime restored (only the ctime shows it)."""
    st = os.lstat(path)
    path.write_bytes(contents)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_first_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    _rewrite(path, bytes(data))


def _no_full_build(monkeypatch) -> None:
    monkeypatch.setattr(image_mod, "build_image_from",
                        lambda *a, **k: pytest.fail("the last image was not rewritten"))


def _full_builds(monkeypatch) -> list[int]:
    built: list[int] = []
    real = image_mod.build_image_from
    monkeypatch.setattr(image_mod, "build_image_from",
                        lambda *a, **k: built.append(1) or real(*a, **k))
    return built


@pytest.mark.parametrize("store", [False, True], ids=["cache", "store"])
def test_changed_contents_rewrite_the_last_image(tmp_path, monkeypatch, capsys, store):
    src = tmp_path / "src"
    make_tree(src)
    (src / "top").write_bytes(b"t" * 99)   # in the root, which this process walks
    (src / "top-small").write_bytes(b"t" * 9)
    img = tmp_path / "out.img"
    extra = [f"--digest-store={tmp_path / 'store'}"] if store else []
    run(src, img, *extra)
    run(src, img, *extra)
    capsys.readouterr()
    for path in (src / "d04" / "f3", src / "d11" / "deeper" / "file", src / "d19" / "f1",
                 src / "d06" / "deeper" / "small", src / "top", src / "top-small"):
        _flip_first_byte(path)
    with monkeypatch.context() as patched:
        _no_full_build(patched)
        out = run(src, img, "--print-digest", *extra, capsys=capsys)
    assert img.read_bytes() == uncached(src)
    assert out == fsverity.digest_bytes(img.read_bytes()).hex() + "\n"
    if store:
        digest = fsverity.digest_file(src / "d04" / "f3")
        assert (tmp_path / "store" / fsverity.object_path(digest)).is_file()
    # remembered in its turn: unchanged, the image is kept; changed again, rewritten again
    before = os.stat(img).st_ino
    run(src, img, *extra)
    assert os.stat(img).st_ino == before
    _flip_first_byte(src / "d04" / "f3")
    with monkeypatch.context() as patched:
        _no_full_build(patched)
        run(src, img, *extra)
    assert img.read_bytes() == uncached(src)


def _edit(path, contents: bytes) -> None:
    """New contents, and a new mtime (later than every other file's), as an editor leaves."""
    time.sleep(0.002)
    path.write_bytes(contents)


@pytest.mark.parametrize("epoch", [False, True], ids=["mtimes", "use-epoch"])
def test_edited_files_with_new_sizes_and_mtimes_rewrite_the_last_image(tmp_path, monkeypatch,
                                                                       epoch):
    """Real edits: new contents of other sizes with new mtimes (and an inline file of the
    same size with a new mtime); with --use-epoch the inodes are compact."""
    src, img = tmp_path / "src", tmp_path / "out.img"
    make_tree(src)
    extra = ["--use-epoch"] if epoch else []
    run(src, img, *extra)
    run(src, img, *extra)
    _edit(src / "d04" / "f3", b"longer contents " * 30)
    _edit(src / "d12" / "deeper" / "file", b"short" * 20)
    _edit(src / "d13" / "deeper" / "small", b"S" * 14)
    os.utime(src / "d14" / "f2", ns=(0, time.time_ns()))   # a new mtime alone
    with monkeypatch.context() as patched:
        _no_full_build(patched)
        run(src, img, *extra)
    assert img.read_bytes() == bytes(build_image(walk_directory(
        src, WalkOptions(threads=1, use_epoch=epoch))).data)


def test_racy_files_of_the_last_build_still_allow_a_rewrite(tmp_path, monkeypatch):
    """With the real racy margin every file of a fresh tree is recorded untrusted, so each
    build reads them all again; what the cache recorded still says what the last image had."""
    monkeypatch.setattr(cache_mod, "RACY_MARGIN_NS", 3 * 10**9)
    src, img = primed(tmp_path)
    _flip_first_byte(src / "d08" / "f2")
    with monkeypatch.context() as patched:
        _no_full_build(patched)
        run(src, img)
    assert img.read_bytes() == uncached(src)
    _flip_first_byte(src / "d08" / "f2")   # back, and another one
    _flip_first_byte(src / "d02" / "deeper" / "small")
    with monkeypatch.context() as patched:
        _no_full_build(patched)
        run(src, img)
    assert img.read_bytes() == uncached(src)


def _becomes_a_copy(src):
    """New contents that another file has (its xattrs then go to the shared table)."""
    _rewrite(src / "d05" / "f2", (src / "d06" / "f2").read_bytes())


def _copy_changes(src):
    """A file one other file had the same contents as (both shared their xattrs)."""
    _flip_first_byte(src / "d09" / "copy")


def _make_copy(src):
    (src / "d09" / "copy").write_bytes((src / "d09" / "f3").read_bytes())
    (src / "d10" / "copy").write_bytes((src / "d10" / "f3").read_bytes())


def _both_copies_change_alike(src):
    _flip_first_byte(src / "d10" / "f3")
    _flip_first_byte(src / "d10" / "copy")


def _swap(src):
    a, b = src / "d01" / "f2", src / "d02" / "f2"
    first, second = a.read_bytes(), b.read_bytes()
    _rewrite(a, second)
    _rewrite(b, first)


def _and_a_chmod(src):
    _flip_first_byte(src / "d03" / "f3")
    os.chmod(src / "d12" / "f1", 0o640)


def _and_a_new_file(src):
    _flip_first_byte(src / "d03" / "f3")
    (src / "d12" / "new").write_bytes(b"n" * 200)


def _older_than_the_build_time(src):
    """A new mtime before every other file's: the image's build time changes."""
    path = src / "d07" / "f3"
    path.write_bytes(path.read_bytes() + b"+")
    os.utime(path, ns=(0, 10**9))


def _oldest_file_edited(src):
    """The file that gave the image its build time gets a new mtime: the build time moves,
    and with it which inodes are compact."""
    _edit(src / "d16" / "f2", b"new" * 50)


def _make_oldest(src):
    os.utime(src / "d16" / "f2", ns=(0, 10**9))


def _beyond_one_chunk(src):
    """Grown past 8 TiB (sparse): two chunks, a longer chunk index."""
    with open(src / "d17" / "f3", "r+b") as f:
        f.truncate((1 << 43) + 4096)


def _inline_size_changed(src):
    path = src / "d07" / "deeper" / "small"
    _rewrite(path, path.read_bytes() + b"+")


def _make_hard_link(src):
    os.link(src / "d14" / "f3", src / "d14" / "f3-again")


def _hard_link(src):
    _flip_first_byte(src / "d14" / "f3")


def _add_overlay_xattr(src):
    try:
        os.setxattr(src / "d15" / "f3", "trusted.overlay.x", b"1")
    except OSError as exc:
        pytest.skip(f"trusted xattrs need root: {exc}")


def _overlay_xattr(src):
    """A file with an xattr that sorts between its metacopy and redirect (escaped:
    trusted.overlay.overlay.x): the two are not next to each other."""
    _flip_first_byte(src / "d15" / "f3")


#: (what the tree has before it is primed, the change), for the changes a rewrite cannot make
REWRITE_REFUSED = [(None, _becomes_a_copy), (_make_copy, _copy_changes),
                   (_make_copy, _both_copies_change_alike), (None, _swap),
                   (None, _and_a_chmod), (None, _and_a_new_file),
                   (None, _older_than_the_build_time), (_make_oldest, _oldest_file_edited),
                   (None, _beyond_one_chunk), (None, _inline_size_changed),
                   (_make_hard_link, _hard_link), (_add_overlay_xattr, _overlay_xattr)]


@pytest.mark.parametrize("setup,change", REWRITE_REFUSED,
                         ids=[change.__name__.strip("_") for _, change in REWRITE_REFUSED])
def test_changes_a_rewrite_cannot_make_build_in_full(tmp_path, monkeypatch, setup, change):
    """Each gives the uncached image, through a full build."""
    src = tmp_path / "src"
    make_tree(src)
    if setup is not None:
        setup(src)
    img = tmp_path / "out.img"
    run(src, img)
    run(src, img)
    change(src)
    built = _full_builds(monkeypatch)
    run(src, img)
    assert built == [1]
    assert img.read_bytes() == uncached(src)


def test_a_compact_inode_that_must_become_extended_is_built_in_full(tmp_path, monkeypatch):
    """With --use-epoch every inode is compact; a file grown past 4 GiB (sparse, its mtime
    restored) needs an extended one, which moves every inode after it."""
    src, img = tmp_path / "src", tmp_path / "out.img"
    make_tree(src)
    run(src, img, "--use-epoch")
    run(src, img, "--use-epoch")
    path = src / "d05" / "f3"
    st = os.lstat(path)
    with open(path, "r+b") as f:
        f.truncate((1 << 32) + 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    built = _full_builds(monkeypatch)
    run(src, img, "--use-epoch")
    assert built == [1]
    assert img.read_bytes() == bytes(build_image(walk_directory(
        src, WalkOptions(threads=1, use_epoch=True))).data)


def test_a_damaged_last_image_is_built_in_full(tmp_path, monkeypatch):
    src, img = primed(tmp_path)
    data = bytearray(img.read_bytes())
    data[-1] ^= 1
    img.write_bytes(bytes(data))
    _flip_first_byte(src / "d04" / "f3")
    built = _full_builds(monkeypatch)
    run(src, img)
    assert built == [1]
    assert img.read_bytes() == uncached(src)


def test_replace_digests_refuses_what_it_cannot_place(tmp_path):
    """``replace_digests`` on a real image: a digest found once, inline and followed by its
    redirect, is replaced; one only in the shared table (two files have it), one not in the
    image, and one also planted in another file's xattr value are refused, and a refusal
    leaves the image as it was."""
    from mkcfs.build.overlay import metacopy_value
    from mkcfs.build.patch import replace_digests

    src = tmp_path / "src"
    src.mkdir()
    (src / "unique").write_bytes(b"u" * 100)
    (src / "copy1").write_bytes(b"c" * 100)
    (src / "copy2").write_bytes(b"c" * 100)
    unique = fsverity.digest_file(src / "unique")
    copy = fsverity.digest_file(src / "copy1")
    new = bytes(range(32))
    image = bytearray(uncached(src))
    for edits in ([(copy, new)], [(b"\x07" * 32, new)], [(unique, new), (copy, b"\x08" * 32)]):
        before = bytes(image)
        assert not replace_digests(image, edits)
        assert image == before
    assert replace_digests(image, [(unique, new)])
    assert unique not in image and image.count(new) == 1
    assert fsverity.object_path(new).encode() in image
    # the metacopy entry of "unique" (20 bytes of header and name, then the value) planted
    entry_at = bytes(uncached(src)).index(metacopy_value(unique)) - 20
    entry = bytes(uncached(src))[entry_at:entry_at + 56]
    try:
        os.setxattr(src / "copy1", "user.planted", entry)
    except OSError as exc:
        pytest.skip(f"no user xattrs here: {exc}")
    twice = bytearray(uncached(src))
    assert twice.count(entry) == 2
    before = bytes(twice)
    assert not replace_digests(twice, [(unique, new)])
    assert twice == before
