"""``mkcfs mount`` / ``mkcfs umount`` (the LXC mount-helper contract) against the real kernel.

The store logic (build once, crash safety, concurrent mounts) is driven through the library's
``oci`` hook with a directory-walk builder, so it is tested whatever SOURCE kinds exist; the
OCI sources themselves are tested with umoci-made images in ``test_mount_oci.py``. Every test
that mounts runs under ``test_mount``'s leak check: the mount table, the loop devices and the
temporary directories are as before.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mkcfs.cli import mkcfs as group
from mkcfs.mount import helper
from mkcfs.store import images
from mkcfs.mount.mountinfo import read_mountinfo, top_mount
from mkcfs.store.images import BuildOptions, ManagedStore, image_name

from .privileges import CAP_SYS_ADMIN, drop_capabilities, run_forked
from .test_mount import needs_mounts, no_leaks  # noqa: F401 - no_leaks: autouse leak check

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_tree(root: Path) -> Path:
    """A small tree with every common kind of entry (files inline and external, a symlink, an
    empty directory, odd modes and owners)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("box\n")
    (root / "etc/big.conf").write_bytes(os.urandom(100_000))
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho tool\n" * 10)
    os.chmod(root / "bin/tool", 0o755)
    (root / "bin/sh").symlink_to("tool")
    (root / "empty").mkdir()
    (root / "secret").write_bytes(b"s" * 200)
    os.chmod(root / "secret", 0o600)
    os.chown(root / "secret", 1000, 1000)
    (root / "a").write_text("to be renamed\n" * 20)
    (root / "gone").write_text("to be deleted\n" * 20)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Path -> (type, mode, uid, gid, content or link target) for every entry under ``root``."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                body: object = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = None
            out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                st.st_uid, st.st_gid, body)
    return out


def walk_resolver(src: Path, digest: str, calls: Path, *,
                  during: Callable[[], None] | None = None) -> helper.OciResolver:
    """An ``oci`` hook that "builds" ``src`` (a directory) as the image with manifest
    ``digest``; every build appends a line to ``calls`` (so builds in several processes can
    be counted) and runs ``during()`` after the objects are stored, before the image exists."""
    def resolver(source: str, options: BuildOptions):
        def build(objects: str) -> bytes:
            from mkcfs.build.image import build_image
            from mkcfs.sources.walk import WalkOptions, walk_directory

            with open(calls, "a") as f:
                f.write(f"{os.getpid()}\n")
            tree = walk_directory(src, WalkOptions(digest_store=objects, threads=1))
            if during is not None:
                during()
            return bytes(build_image(tree).data)
        return digest, build
    return resolver


def run_cli(*argv: str | os.PathLike[str]) -> tuple[int, str]:
    """``mkcfs ARGV`` in a fresh interpreter: (exit status, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "mkcfs", *map(os.fspath, argv)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return proc.returncode, proc.stderr


def one_error_line(status: int, err: str, prog: str) -> str:
    assert status == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mkcfs {prog}: "), err
    return lines[0]


def mounted_source(mnt: Path) -> str | None:
    top = top_mount(os.path.realpath(mnt))
    return top.source if top else None


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def image_file(tmp_path: Path, store: Path) -> Path:
    """A composefs image of ``make_tree``, its objects in ``store/objects``."""
    src = make_tree(tmp_path / "src")
    image = tmp_path / "image.cfs"
    from mkcfs.cli.mkcomposefs import main as mkcomposefs

    assert mkcomposefs([f"--digest-store={store / 'objects'}", str(src), str(image)]) == 0
    return image


# ------------------------------------------------------------------------------------------------
# no mounts needed
# ------------------------------------------------------------------------------------------------

def test_image_name_depends_on_digest_options_and_format() -> None:
    a = image_name("sha256:" + "a" * 64)
    assert a == image_name("sha256:" + "a" * 64) and a.endswith(".cfs") and len(a) == 68
    assert a != image_name("sha256:" + "b" * 64)
    assert a != image_name("sha256:" + "a" * 64, BuildOptions(min_version=1))


def test_mountinfo_escapes_and_stacking(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "40 22 0:30 / /a\\040b rw shared:1 - tmpfs x rw\n"
        "41 40 0:31 / /a\\040b rw - overlay mkcfs:/s\\134t ro\n"
        "42 22 0:32 / /c rw - tmpfs y rw\n")
    entries = read_mountinfo(str(info))
    assert [e.mountpoint for e in entries] == ["/proc", "/a b", "/a b", "/c"]
    top = top_mount("/a b", entries)
    assert top is not None and top.mount_id == 41 and top.source == "mkcfs:/s\\t"
    assert helper.is_our_mount(top) and not helper.is_our_mount(entries[1])
    assert top_mount("/nowhere", entries) is None


def test_store_builds_once_and_leaves_no_temporaries(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    calls = tmp_path / "calls"
    managed = ManagedStore(str(tmp_path / "store"))
    _, build = walk_resolver(src, "sha256:1", calls)("x", BuildOptions())
    path, built = managed.ensure_image("x.cfs", build)
    assert built and Path(path).is_file()
    assert managed.ensure_image("x.cfs", build) == (path, False)
    assert calls.read_text().count("\n") == 1
    assert sorted(os.listdir(managed.images)) == [".x.cfs.lock", "x.cfs"]


def test_help_names_the_lxc_form(capsys) -> None:
    assert group.main(["mount", "--help"]) == 0
    out = capsys.readouterr().out
    assert "OCI_DIR:REF" in out and "--persist" in out


# ------------------------------------------------------------------------------------------------
# mounts
# ------------------------------------------------------------------------------------------------

@needs_mounts
def test_image_file_read_only(tmp_path: Path, store: Path, image_file: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    status, err = run_cli("mount", "--store", store, image_file, mnt)
    assert status == 0, err
    try:
        assert mounted_source(mnt) == f"mkcfs:{store}"
        assert snapshot(mnt) == snapshot(tmp_path / "src")
        with pytest.raises(OSError, match="Read-only"):
            (mnt / "new").write_text("x")
        states = images.read_states(ManagedStore(str(store)))
        assert [(s.mountpoint, s.image, s.persist) for s in states] == [
            (str(mnt), str(image_file), None)]
    finally:
        status, err = run_cli("umount", mnt)
    assert status == 0, err
    assert mounted_source(mnt) is None
    assert images.read_states(ManagedStore(str(store))) == []


@needs_mounts
def test_persist_changes_survive_umount(tmp_path: Path, store: Path, image_file: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    persist = tmp_path / "c1" / "upper"          # created, parents included
    lower = hashlib.sha256(image_file.read_bytes()).hexdigest()
    objects_before = snapshot(store / "objects")
    status, err = run_cli("mount", "--store", store, "--persist", persist, image_file, mnt)
    assert status == 0, err
    try:
        (mnt / "new").write_text("new file\n")
        (mnt / "etc/hostname").write_text("changed\n")
        (mnt / "gone").unlink()
        (mnt / "a").rename(mnt / "b")
        (mnt / "dir/sub").mkdir(parents=True)
        expected = snapshot(mnt)
    finally:
        status, err = run_cli("umount", mnt)
    assert status == 0, err
    upper = persist / "persist"
    assert sorted(os.listdir(persist)) == ["persist", "work"]
    whiteout = (upper / "gone").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0   # overlayfs whiteout
    assert (upper / "new").read_text() == "new file\n"
    assert hashlib.sha256(image_file.read_bytes()).hexdigest() == lower
    assert snapshot(store / "objects") == objects_before

    status, err = run_cli("mount", "--store", store, "--persist", persist, image_file, mnt)
    assert status == 0, err
    try:
        assert snapshot(mnt) == expected
        assert not (mnt / "gone").exists() and not (mnt / "a").exists()
        assert (mnt / "b").read_text() == "to be renamed\n" * 20
    finally:
        assert run_cli("umount", mnt)[0] == 0
    # and without --persist the image is as it was built
    status, err = run_cli("mount", "--store", store, image_file, mnt)
    assert status == 0, err
    try:
        assert snapshot(mnt) == snapshot(tmp_path / "src")
    finally:
        assert run_cli("umount", mnt)[0] == 0


@needs_mounts
def test_second_mount_finds_the_image(tmp_path: Path, store: Path) -> None:
    src = make_tree(tmp_path / "src")
    calls = tmp_path / "calls"
    oci = walk_resolver(src, "sha256:" + "1" * 64, calls)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        done = helper.mount_source("img", str(mnt), store=str(store), oci=oci)
        times.append(time.perf_counter() - start)
        try:
            assert snapshot(mnt) == snapshot(src)
        finally:
            helper.umount(str(mnt))
        assert done.image.path.startswith(str(store / "images") + "/")
    assert calls.read_text().count("\n") == 1
    print(f"\nfirst mount {times[0] * 1000:.1f} ms (build), second {times[1] * 1000:.1f} ms")


def _mount_in_child(src: Path, store: Path, mnt: Path, calls: Path, start: float,
                    during: Callable[[], None] | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            time.sleep(max(0.0, start - time.time()))
            helper.mount_source("img", str(mnt), store=str(store),
                                oci=walk_resolver(src, "sha256:" + "2" * 64, calls,
                                                  during=during))
            code = 0
        except BaseException as exc:   # reported through the exit status
            sys.stderr.write(f"child: {exc}\n")
        finally:
            os._exit(code)
    return pid


@needs_mounts
def test_two_concurrent_mounts_build_once(tmp_path: Path, store: Path) -> None:
    src = make_tree(tmp_path / "src")
    calls = tmp_path / "calls"
    mnts = [tmp_path / "m1", tmp_path / "m2"]
    for m in mnts:
        m.mkdir()
    start = time.time() + 0.3
    pids = [_mount_in_child(src, store, m, calls, start, during=lambda: time.sleep(0.5))
            for m in mnts]
    try:
        statuses = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        assert statuses == [0, 0]
        assert calls.read_text().count("\n") == 1
        for m in mnts:
            assert snapshot(m) == snapshot(src)
    finally:
        for m in mnts:
            if mounted_source(m):
                helper.umount(str(m))


@needs_mounts
def test_sigkill_during_build_then_mount(tmp_path: Path, store: Path) -> None:
    src = make_tree(tmp_path / "src")
    calls = tmp_path / "calls"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ready = tmp_path / "ready"

    def stall() -> None:        # objects stored, image not yet written: wait to be killed
        ready.write_text("x")
        time.sleep(60)

    pid = _mount_in_child(src, store, mnt, calls, 0, during=stall)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] != 0
    images = store / "images"
    assert [n for n in os.listdir(images) if not n.startswith(".")] == []
    assert mounted_source(mnt) is None
    done = helper.mount_source("img", str(mnt), store=str(store),
                               oci=walk_resolver(src, "sha256:" + "2" * 64, calls))
    try:
        assert done.image.built
        assert snapshot(mnt) == snapshot(src)
    finally:
        helper.umount(str(mnt))
    assert calls.read_text().count("\n") == 2
    leftovers = [n for n in os.listdir(store / "objects") if n.startswith(".tmp")]
    assert leftovers == []
    assert [n for n in os.listdir(images) if n.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------------------
# errors: one line, exit 1, nothing mounted
# ------------------------------------------------------------------------------------------------

@needs_mounts
def test_errors_are_one_line_and_leave_nothing(tmp_path: Path, store: Path,
                                               image_file: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["mount", "--store", store, image_file, tmp_path / "nomnt"], "mountpoint"),
        (["mount", "--store", store, image_file, afile], "Not a directory"),
        (["mount", "--store", store, "--persist", afile, image_file, mnt], "persist"),
        (["mount", "--store", store, "-o", "upperdir=/x,workdir=/y", image_file, mnt],
         "--persist"),
        (["mount", "--store", store, "-o", "frobnicate", image_file, mnt], "frobnicate"),
        (["mount", "--store", afile, image_file, mnt], "store"),
        (["umount", mnt], "not mounted"),
        (["umount", tmp_path / "nomnt"], "No such file"),
    ]
    for argv, needle in cases:
        line = one_error_line(*run_cli(*argv), argv[0])
        assert needle in line, (argv, line)
        assert mounted_source(mnt) is None
    assert not (tmp_path / "afile" / "persist").exists()


@needs_mounts
def test_second_mount_on_the_same_mountpoint_is_refused(tmp_path: Path, store: Path,
                                                        image_file: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert run_cli("mount", "--store", store, image_file, mnt)[0] == 0
    try:
        line = one_error_line(*run_cli("mount", "--store", store, image_file, mnt), "mount")
        assert "already mounted" in line
        assert len([e for e in read_mountinfo() if e.mountpoint == str(mnt)]) == 1
    finally:
        assert run_cli("umount", mnt)[0] == 0


@needs_mounts
def test_umount_refuses_what_is_not_ours_and_busy(tmp_path: Path, store: Path,
                                                  image_file: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(other)], check=True)
    try:
        line = one_error_line(*run_cli("umount", other), "umount")
        assert "not a mount made by mkcfs" in line and "tmpfs" in line
        assert mounted_source(other) == "none"
    finally:
        subprocess.run(["umount", str(other)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert run_cli("mount", "--store", store, image_file, mnt)[0] == 0
    try:
        with open(mnt / "etc/hostname"):
            line = one_error_line(*run_cli("umount", mnt), "umount")
            assert "busy" in line
            assert mounted_source(mnt) == f"mkcfs:{store}"
    finally:
        assert run_cli("umount", mnt)[0] == 0


@needs_mounts
def test_persist_on_overlayfs_is_refused(tmp_path: Path, store: Path, image_file: Path) -> None:
    """overlayfs cannot use another overlay as its upper layer: one line naming PERSIST."""
    layers = tmp_path / "ov"
    for name in ("lower", "upper", "work", "mnt"):
        (layers / name).mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "none", "-o",
                    f"lowerdir={layers / 'lower'},upperdir={layers / 'upper'},"
                    f"workdir={layers / 'work'}", str(layers / "mnt")], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        persist = layers / "mnt" / "p"
        line = one_error_line(*run_cli("mount", "--store", store, "--persist", persist,
                                       image_file, mnt), "mount")
        assert f"persist directory {persist}" in line and "upperdir" in line
        assert mounted_source(mnt) is None
        assert not persist.exists()           # what the failed mount created is gone
    finally:
        subprocess.run(["umount", str(layers / "mnt")], check=True)


@needs_mounts
def test_not_root_is_one_line(tmp_path: Path, store: Path, image_file: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for argv in (["mount", "--store", str(store), str(image_file), str(mnt)], ["umount", str(mnt)]):
        status, err = run_forked(lambda argv=argv: group.main(argv),
                                 lambda: drop_capabilities(CAP_SYS_ADMIN))
        line = one_error_line(status, err, argv[0])
        assert "superuser" in line
    assert mounted_source(mnt) is None


@needs_mounts
def test_stale_run_state_is_pruned(tmp_path: Path, store: Path, image_file: Path) -> None:
    """Run state of mounts that are gone (namespace dead, or nothing mounted any more) is
    removed by the next mount; the live one stays."""
    managed = ManagedStore(str(store))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ours = helper.mount_namespace()
    gone = [images.MountState("/x", "/i", "/o", None, 1, 1),               # no such namespace
            images.MountState(str(tmp_path), "/i", "/o", None, ours, 1)]     # nothing mounted
    (store / "mounts").mkdir(parents=True)
    for n, state in enumerate(gone):
        helper._write_state(str(store / "mounts" / f"{n}.json"), state)
    assert all(helper.is_stale(s, ours) for s in gone)
    assert run_cli("mount", "--store", store, image_file, mnt)[0] == 0
    try:
        states = images.read_states(managed)
        assert [s.mountpoint for s in states] == [str(mnt)]
        assert not helper.is_stale(states[0], ours)
    finally:
        assert run_cli("umount", mnt)[0] == 0


@needs_mounts
def test_mount_options_pass_through(tmp_path: Path, store: Path, image_file: Path) -> None:
    """-o reaches the mount code: VFS flags and ro on a --persist mount; verity where the kernel
    cannot have it is one line."""
    from mkcfs.mount import kernel_has_fsverity

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    status, err = run_cli("mount", "--store", store, "--persist", tmp_path / "p",
                          "-o", "ro,nodev,noexec", image_file, mnt)
    assert status == 0, err
    try:
        line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if ln.split()[4] == str(mnt))
        flags = line.split()[5].split(",")
        assert {"ro", "nodev", "noexec"} <= set(flags), line
        with pytest.raises(OSError, match="Read-only"):
            (mnt / "new").write_text("x")
    finally:
        assert run_cli("umount", mnt)[0] == 0
    if not kernel_has_fsverity():
        line = one_error_line(*run_cli("mount", "--store", store, "-o", "verity", image_file,
                                       mnt), "mount")
        assert "fs-verity" in line
        assert mounted_source(mnt) is None
