"""mount.composefs against the real kernel: EROFS + overlayfs mounts of generated and real trees.

These tests mount for real, so they need root and a kernel with erofs and overlayfs (CI has both);
elsewhere the whole module is skipped with the reason. Every test that mounts checks that nothing
is left behind afterwards: no mount in /proc/self/mountinfo, no loop device, no temporary
directory.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator

import pytest

from fsverity import digest_file, object_path
from mkcfs import mount as cfsmount
from mkcfs.cli.mount_composefs import main as mount_main
from mkcfs.build.image import build_image
from mkcfs.mount import MountOptions, mount_image, umount

from . import treegen
from .privileges import CAP_SYS_ADMIN, become_nobody, drop_capabilities, run_forked

REPO = Path(__file__).resolve().parents[1]


def _filesystems() -> set[str]:
    try:
        with open("/proc/filesystems") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "mount tests need Linux"
    if os.geteuid() != 0:
        return "mount tests need root (erofs and overlayfs mounts)"
    have = _filesystems()
    for name in ("erofs", "overlay"):
        if name not in have:
            with contextlib.suppress(OSError):
                subprocess.run(["modprobe", "-q", name], capture_output=True, check=False)
    have = _filesystems()
    missing = [n for n in ("erofs", "overlay") if n not in have]
    if missing:
        return f"the kernel has no {' and no '.join(missing)} filesystem"
    return None


_REASON = _skip_reason()
#: every test that mounts carries this mark
needs_mounts = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


# ------------------------------------------------------------------------------------------------
# leak checks
# ------------------------------------------------------------------------------------------------

def _mounts() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            out.append(f"{fields[4]} {right.split()[0]} {right.split()[1]}")
    return sorted(out)


def _loops() -> dict[str, str]:
    """Loop devices in use -> backing file (what ``losetup -a`` lists)."""
    out = {}
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        with contextlib.suppress(OSError), open(path) as f:
            out[path.split("/")[3]] = f.read().strip()
    return out


def _temp_dirs() -> list[str]:
    found: set[str] = set()
    for base in ("/run", "/tmp", tempfile.gettempdir()):
        found.update(glob.glob(os.path.join(base, cfsmount.TEMP_PREFIX + "*")))
    return sorted(found)


def _state() -> tuple[list[str], dict[str, str], list[str]]:
    return _mounts(), _loops(), _temp_dirs()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a mount, a loop device or a temporary directory behind."""
    if _REASON is not None:
        yield
        return
    before = _state()
    yield
    after = _state()
    deadline = time.monotonic() + 5       # loop autoclear can lag the umount a little
    while after != before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _state()
    assert after[0] == before[0], f"mounts left: {sorted(set(after[0]) - set(before[0]))}"
    assert after[1] == before[1], f"loop devices left: {after[1]}"
    assert after[2] == before[2], f"temporary directories left: {after[2]}"


@contextlib.contextmanager
def mounted(mnt: Path) -> Iterator[Path]:
    """Unmount ``mnt`` at the end whatever happens."""
    try:
        yield mnt
    finally:
        if os.path.ismount(mnt):
            try:
                umount(mnt)
            except OSError:
                umount(mnt, detach=True)


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------

class Built:
    def __init__(self, tree: treegen.GenTree, directory: Path, name: str = "image") -> None:
        self.tree = tree
        image = build_image(tree.root)
        self.version = image.version
        self.digest = image.fsverity_digest()
        self.path = directory / f"{name}.cfs"
        self.path.write_bytes(image.data)
        self.objects = directory / f"{name}-objects"
        treegen.write_objects(tree.objects, self.objects)

    def expected(self) -> dict[bytes, treegen.Rec]:
        return treegen.as_mounted(treegen.snapshot_tree(self.tree), self.version)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A tree with every kind of entry and several thousand entries."""
    return Built(treegen.generate(1, bulk=4000), tmp_path_factory.mktemp("big"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(treegen.generate(2, bulk=60, large=300_000), tmp_path_factory.mktemp("small"))


def cli(*argv: str | os.PathLike[str]) -> int:
    return mount_main([os.fspath(a) for a in argv])


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("mount.composefs: "), lines[0]
    return lines[0]


def mount_line(mnt: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4] == os.fspath(mnt):
                return line
    raise AssertionError(f"{mnt} is not mounted")


def mnt_dir(tmp_path: Path, name: str = "mnt") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


# ------------------------------------------------------------------------------------------------
# option parsing (no mounts)
# ------------------------------------------------------------------------------------------------

def test_split_options_escapes() -> None:
    assert list(cfsmount.split_options(r"basedir=/a\,b:/c,ro,,digest=ab,x=\\y")) == [
        ("basedir", "/a,b:/c"), ("ro", None), ("digest", "ab"), ("x", "\\y")]


def test_parse_options() -> None:
    parse = cfsmount.parse_options
    o = parse("basedir=/a:/b,upperdir=/u,workdir=/w,ro,idmap=/proc/1/ns/user")
    assert (o.basedirs, o.upperdir, o.workdir, o.readonly, o.idmap) == (
        ["/a", "/b"], "/u", "/w", True, "/proc/1/ns/user")
    assert parse(["ro", "rw,basedir=/a"]).readonly is False          # the last one wins
    assert parse("basedir=/a").verity is None                        # default: decided later
    assert parse("basedir=/a,verity,tryverity").verity == "require"  # as upstream
    assert parse("basedir=/a,tryverity").verity == "try"
    assert parse("basedir=/a,noverity,digest=" + "00" * 32).verity == "off"
    assert parse("basedir=/a,noatime,relatime,nosuid,noexec,exec").vfs_flags == (
        "relatime", "nosuid")
    assert parse("basedir=/a,defaults,nofail,x-systemd.requires=foo,_netdev").basedirs == ["/a"]
    assert parse("basedir=/a,whatever=1", sloppy=True).basedirs == ["/a"]
    for bad in ("basedir=/a,bogus", "basedir", "basedir=/a:", "digest=12", "verity=yes",
                "basedir=/a,verity,noverity", "ro=1"):
        with pytest.raises(cfsmount.MountError):
            parse(bad)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------

@needs_mounts
def test_roundtrip_generated_tree(big: Built, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    """Every path of a varied tree with thousands of entries reads back as it was."""
    mnt = mnt_dir(tmp_path)
    before = _mounts()
    assert cli("-o", f"basedir={big.objects}", big.path, mnt) == 0, capsys.readouterr().err
    with mounted(mnt):
        line = mount_line(mnt)
        assert " - overlay composefs " in line
        assert "metacopy=on" in line and "redirect_dir=on" in line
        # only the overlay is visible: the EROFS mount lives inside it
        assert len(_mounts()) == len(before) + 1
        actual = treegen.snapshot_dir(mnt)
        problems = treegen.diff(big.expected(), actual)
        assert not problems, "\n".join(problems)
        assert len(actual) > 4000


@needs_mounts
def test_roundtrip_via_dumpfile(tmp_path: Path) -> None:
    """A tree that went through composefs-dump(5) text (hard links as ``@`` lines)."""
    dumpfile = pytest.importorskip("mkcfs.sources.dumpfile", reason="mkcfs.sources.dumpfile not written yet")
    tree = treegen.generate(3, bulk=200, large=100_000)
    text = dumpfile.format_dumpfile(tree.root)
    assert b" @" in text
    parsed = treegen.GenTree(dumpfile.parse_dumpfile(text), tree.objects)
    image = build_image(parsed.root)
    img = tmp_path / "dump.cfs"
    img.write_bytes(image.data)
    treegen.write_objects(tree.objects, tmp_path / "objects")
    mnt = mnt_dir(tmp_path)
    mount_image(img, mnt, MountOptions(basedirs=[str(tmp_path / "objects")]))
    with mounted(mnt):
        actual = treegen.snapshot_dir(mnt)
    expected = treegen.as_mounted(treegen.snapshot_tree(tree), image.version)
    problems = treegen.diff(expected, actual)
    assert not problems, "\n".join(problems)
    links = [p for p in actual if p.startswith(b"/hardlinks/")]
    assert actual[b"/hardlinks/inline-b"].link_group == b"/hardlinks/inline-a", links


@pytest.mark.parametrize("backing,erofs_api,overlay_api", [
    ("file", "auto", "fd"), ("file", "auto", "path"), ("file", "auto", "legacy"),
    ("loop", "auto", "fd"), ("loop", "auto", "path"), ("loop", "auto", "legacy"),
    ("file", "legacy", "auto"), ("loop", "legacy", "auto"),
])
@needs_mounts
def test_mechanisms(small: Built, tmp_path: Path, backing: str, erofs_api: str,
                    overlay_api: str) -> None:
    """Each way of mounting (file-backed or loop EROFS; new API by fd or path, or mount(2))
    gives the same tree, and none leaves anything behind."""
    mnt = mnt_dir(tmp_path)
    loops_before = _loops()
    opts = MountOptions(basedirs=[str(small.objects)], erofs_backing=backing,
                        erofs_api=erofs_api, overlay_api=overlay_api)
    try:
        result = mount_image(small.path, mnt, opts)
    except cfsmount.MountError as exc:
        if backing == "file" and exc.errno in (errno.ENOTBLK, errno.EINVAL):
            pytest.skip(f"no file-backed EROFS on this kernel: {exc}")
        raise
    with mounted(mnt):
        assert result.erofs == backing
        assert result.erofs_api == ("legacy" if erofs_api == "legacy" else "new")
        if overlay_api != "auto":
            assert result.overlay == overlay_api
        assert result.temp_dir == (result.overlay != "fd")
        assert _temp_dirs() == [], "the temporary directory must be gone once mounted"
        if backing == "loop":
            new = {k: v for k, v in _loops().items() if k not in loops_before}
            assert list(new.values()) == [str(small.path)], new
            assert result.loop_device == f"/dev/{next(iter(new))}"
        problems = treegen.diff(small.expected(), treegen.snapshot_dir(mnt))
        assert not problems, "\n".join(problems)


@needs_mounts
def test_default_mechanism(small: Built, tmp_path: Path) -> None:
    """On a kernel >= 6.15 the default is the cleanest: file-backed EROFS, detached, passed to
    overlayfs by fd, no temporary directory."""
    mnt = mnt_dir(tmp_path)
    result = mount_image(small.path, mnt, MountOptions(basedirs=[str(small.objects)]))
    with mounted(mnt):
        release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
        if release >= (6, 15):
            assert (result.erofs, result.erofs_api, result.overlay, result.temp_dir) == \
                ("file", "new", "fd", False), result
        assert "lowerdir" in mount_line(mnt)


# ------------------------------------------------------------------------------------------------
# upper dir, read-only, idmap, several base dirs
# ------------------------------------------------------------------------------------------------

@needs_mounts
def test_upperdir_writes_land_in_upperdir(small: Built, tmp_path: Path) -> None:
    image_sha = hashlib.sha256(small.path.read_bytes()).hexdigest()
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    mnt = mnt_dir(tmp_path)
    ext = b"files/external-4097"
    old_ext = small.tree.data[id(small.tree.root.children[b"files"].children[b"external-4097"])]
    assert cli("-o", f"basedir={small.objects},upperdir={upper},workdir={work}",
               small.path, mnt) == 0
    with mounted(mnt):
        (mnt / "new.txt").write_bytes(b"brand new")
        with open(mnt / "files/inline-64", "ab") as f:
            f.write(b"+appended")
        with open(mnt / os.fsdecode(ext), "r+b") as f:
            f.seek(10)
            f.write(b"PATCH")
        os.chmod(mnt / "files/external-4096", 0o600)
        os.unlink(mnt / "files/inline-1")
        (mnt / "newdir").mkdir()
        assert (mnt / "new.txt").read_bytes() == b"brand new"
        assert not (mnt / "files/inline-1").exists()
        patched = old_ext[:10] + b"PATCH" + old_ext[15:]
        assert (mnt / os.fsdecode(ext)).read_bytes() == patched
        st = os.stat(mnt / "files/external-4096")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 4096
    # the changes are in the upper dir, nowhere else
    assert (upper / "new.txt").read_bytes() == b"brand new"
    assert (upper / "files/inline-64").read_bytes().endswith(b"+appended")
    assert (upper / os.fsdecode(ext)).read_bytes() == patched
    wh = os.lstat(upper / "files/inline-1")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0, "deletion must leave a whiteout"
    assert (upper / "newdir").is_dir()
    assert hashlib.sha256(small.path.read_bytes()).hexdigest() == image_sha
    for digest in small.tree.objects:
        assert digest_file(small.objects / object_path(digest)) == digest
    # persistent: mounting again with the same upper dir shows the changes
    assert cli("-o", f"basedir={small.objects},upperdir={upper},workdir={work}",
               small.path, mnt) == 0
    with mounted(mnt):
        assert (mnt / "new.txt").read_bytes() == b"brand new"
        assert (mnt / os.fsdecode(ext)).read_bytes() == patched
    # and without it, the image as built
    assert cli("-o", f"basedir={small.objects}", small.path, mnt) == 0
    with mounted(mnt):
        assert not (mnt / "new.txt").exists()
        assert (mnt / os.fsdecode(ext)).read_bytes() == old_ext


@needs_mounts
def test_ro_with_upperdir(small: Built, tmp_path: Path) -> None:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    mnt = mnt_dir(tmp_path)
    assert cli("-o", f"rw,ro,basedir={small.objects},upperdir={upper},workdir={work},nodev",
               small.path, mnt) == 0
    with mounted(mnt):
        opts = mount_line(mnt).split()[5].split(",")
        assert "ro" in opts and "nodev" in opts
        with pytest.raises(OSError) as exc:
            (mnt / "new.txt").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS
    assert list(upper.iterdir()) == []


@needs_mounts
def test_readonly_without_upperdir(small: Built, tmp_path: Path) -> None:
    mnt = mnt_dir(tmp_path)
    assert cli("-o", f"basedir={small.objects}", small.path, mnt) == 0
    with mounted(mnt):
        with pytest.raises(OSError) as exc:
            (mnt / "new.txt").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS


@needs_mounts
def test_several_basedirs(small: Built, tmp_path: Path) -> None:
    """Objects spread over two base dirs (basedir=A:B) are all found."""
    a, b = tmp_path / "a", tmp_path / "b"
    for i, (digest, data) in enumerate(sorted(small.tree.objects.items())):
        treegen.write_objects({digest: data}, a if i % 2 else b)
    mnt = mnt_dir(tmp_path)
    assert cli("-o", f"basedir={a}:{b}", small.path, mnt) == 0
    with mounted(mnt):
        assert f"datadir+={a},datadir+={b}" in mount_line(mnt) or f"{a}::{b}" in mount_line(mnt)
        problems = treegen.diff(small.expected(), treegen.snapshot_dir(mnt))
        assert not problems, "\n".join(problems)


@needs_mounts
def test_idmap(small: Built, tmp_path: Path) -> None:
    """idmap=/proc/PID/ns/user shifts the owners as the namespace maps them."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import ctypes, sys\n"
         "libc = ctypes.CDLL(None, use_errno=True)\n"
         "print(libc.unshare(0x10000000), flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "0":   # type: ignore[union-attr]
            pytest.skip("cannot create a user namespace")
        with open(f"/proc/{child.pid}/uid_map", "w") as f:
            f.write("0 100000 65536\n")
        with open(f"/proc/{child.pid}/gid_map", "w") as f:
            f.write("0 200000 65536\n")
        mnt = mnt_dir(tmp_path)
        code = cli("-o", f"basedir={small.objects},idmap=/proc/{child.pid}/ns/user",
                   small.path, mnt)
        assert code == 0
        with mounted(mnt):
            st = os.lstat(mnt / "owners/u1000-g100")
            assert (st.st_uid, st.st_gid) == (101000, 200100)
            st = os.lstat(mnt / "files/inline-1")
            assert (st.st_uid, st.st_gid) == (100000, 200000)
            assert (mnt / "hardlinks/inline-b").read_bytes() == b"linked inline"
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------
# digest= and verity
# ------------------------------------------------------------------------------------------------

@needs_mounts
def test_digest_right_is_accepted(small: Built, tmp_path: Path) -> None:
    mnt = mnt_dir(tmp_path)
    result = mount_image(small.path, mnt, MountOptions(basedirs=[str(small.objects)],
                                                       digest=small.digest))
    with mounted(mnt):
        assert result.digest_check in ("kernel", "userspace")
        if not cfsmount.kernel_has_fsverity():
            assert result.digest_check == "userspace" and result.verity == "off"
            assert "verity=" not in mount_line(mnt).split(" - ")[1]
        assert (mnt / "hardlinks/inline-a").read_bytes() == b"linked inline"
    # same through the command line, digest in upper case
    assert cli("-o", f"digest={small.digest.hex().upper()},basedir={small.objects}",
               small.path, mnt) == 0
    with mounted(mnt):
        assert (mnt / "hardlinks/inline-a").read_bytes() == b"linked inline"


@needs_mounts
def test_digest_wrong_is_refused(small: Built, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    mnt = mnt_dir(tmp_path)
    wrong = bytearray(small.digest)
    wrong[0] ^= 1
    assert cli("-o", f"basedir={small.objects},digest={wrong.hex()}", small.path, mnt) == 1
    line = one_line(capsys.readouterr().err)
    assert "wrong fs-verity digest" in line and small.digest.hex() in line
    assert not os.path.ismount(mnt)
    # a changed image (one byte in the padding of the header) is refused too
    changed = tmp_path / "changed.cfs"
    data = bytearray(small.path.read_bytes())
    data[20] ^= 0xFF
    changed.write_bytes(data)
    assert cli("-o", f"basedir={small.objects},digest={small.digest.hex()}", changed, mnt) == 1
    assert "wrong fs-verity digest" in one_line(capsys.readouterr().err)
    assert not os.path.ismount(mnt)


@needs_mounts
@pytest.mark.skipif(cfsmount.kernel_has_fsverity(), reason="the kernel has fs-verity")
def test_verity_without_kernel_support(small: Built, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    """``verity`` cannot be honoured without fs-verity: refused, clearly. ``tryverity`` and
    ``noverity`` mount and every file reads."""
    mnt = mnt_dir(tmp_path)
    assert cli("-o", f"basedir={small.objects},verity", small.path, mnt) == 1
    line = one_line(capsys.readouterr().err)
    assert "fs-verity" in line and "verity" in line
    assert not os.path.ismount(mnt)
    for option in ("tryverity", "noverity", f"digest={small.digest.hex()},noverity"):
        assert cli("-o", f"basedir={small.objects},{option}", small.path, mnt) == 0
        with mounted(mnt):
            assert "verity=" not in mount_line(mnt).split(" - ")[1]
            data = (mnt / "files/external-65536").read_bytes()
            assert len(data) == 65536


@needs_mounts
@pytest.mark.parametrize("option,api", [("verity", "auto"), ("tryverity", "auto"),
                                        ("digest", "auto"), ("verity", "legacy")])
def test_verity_reaches_overlayfs(small: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  option: str, api: str) -> None:
    """Where the kernel has fs-verity, verity/tryverity/digest= give overlayfs verity=require
    (forced here; objects without fs-verity then fail to read, files in the image still read)."""
    really = cfsmount.kernel_has_fsverity()
    monkeypatch.setattr(cfsmount.mounter, "kernel_has_fsverity", lambda: True)
    if option == "digest":
        option = f"digest={small.digest.hex()}"
    options = cfsmount.parse_options(f"basedir={small.objects},{option}")
    options.overlay_api = api
    mnt = mnt_dir(tmp_path)
    result = mount_image(small.path, mnt, options)
    with mounted(mnt):
        assert result.verity == "require"
        assert "verity=require" in mount_line(mnt).split(" - ")[1]
        assert (mnt / "files/inline-64").stat().st_size == 64
        if not really:
            with pytest.raises(OSError) as exc:
                (mnt / "files/external-65").read_bytes()
            assert exc.value.errno == errno.EIO


@needs_mounts
def test_missing_object_is_an_io_error(small: Built, tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    shutil.copytree(small.objects, objects)
    node = small.tree.root.children[b"files"].children[b"external-4097"]
    os.unlink(objects / object_path(node.digest))
    mnt = mnt_dir(tmp_path)
    assert cli("-o", f"basedir={objects}", small.path, mnt) == 0
    with mounted(mnt):
        st = os.stat(mnt / "files/external-4097")
        assert st.st_size == 4097
        with pytest.raises(OSError) as exc:
            (mnt / "files/external-4097").read_bytes()
        assert exc.value.errno in (errno.EIO, errno.ENOENT)
        errors: dict[bytes, int] = {}
        treegen.snapshot_dir(mnt, read_errors=errors)
        assert set(errors) == {b"/files/external-4097"}
        assert (mnt / "files/external-4096").stat().st_size == 4096


# ------------------------------------------------------------------------------------------------
# the command line: mount(8) calling convention, errors
# ------------------------------------------------------------------------------------------------

@needs_mounts
def test_mount8_calling_convention(small: Built, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    """mount(8) runs ``mount.composefs IMAGE DIR -n -v -o OPTS -t composefs``."""
    mnt = mnt_dir(tmp_path)
    assert cli(small.path, mnt, "-n", "-v", "-o", f"basedir={small.objects}",
               "-t", "composefs") == 0
    with mounted(mnt):
        assert "mounted on" in capsys.readouterr().out
        assert (mnt / "files/inline-2").stat().st_size == 2
    # -s tolerates unknown options; mount(8)-only options are ignored; -f does not mount
    assert cli("-s", "-o", f"basedir={small.objects},some-option=1,defaults,x-systemd.foo",
               small.path, mnt) == 0
    umount(mnt)
    assert cli("-f", "-o", f"basedir={small.objects}", small.path, mnt) == 0
    assert not os.path.ismount(mnt)
    # several -o accumulate; backslash escapes a comma in a value
    odd = tmp_path / "odd,name"
    shutil.copytree(small.objects, odd)
    assert cli("-o", "ro", "-o", f"basedir={str(odd).replace(',', chr(92) + ',')}",
               small.path, mnt) == 0
    with mounted(mnt):
        assert (mnt / "files/external-65").stat().st_size == 65
        (mnt / "files/external-65").read_bytes()


@needs_mounts
def test_mount_in_another_namespace(small: Built, tmp_path: Path) -> None:
    """-N PID (mount(8) --namespace): the mount appears in that mount namespace only."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import ctypes, sys\n"
         "libc = ctypes.CDLL(None, use_errno=True)\n"
         "ok = libc.unshare(0x00020000) == 0 and libc.mount(b'none', b'/', None, 0x40000 | 0x4000,"
         " None) == 0\n"                                   # CLONE_NEWNS; MS_PRIVATE | MS_REC
         "print(int(ok), flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "1":  # type: ignore[union-attr]
            pytest.skip("cannot create a mount namespace")
        mnt = mnt_dir(tmp_path)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from mkcfs.cli.mount_composefs import main; sys.exit(main(sys.argv[2:]))")
        proc = subprocess.run([sys.executable, "-c", code, str(REPO), str(small.path), str(mnt),
                               "-N", str(child.pid), "-o", f"basedir={small.objects}"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.ismount(mnt)
        with open(f"/proc/{child.pid}/mountinfo") as f:
            theirs = [line for line in f if line.split()[4] == str(mnt)]
        assert len(theirs) == 1 and " - overlay composefs " in theirs[0]
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]


def _error_cases(tmp: Path, small: Built) -> list[tuple[list[str], str]]:
    notcfs = tmp / "not-a-composefs.img"
    notcfs.write_bytes(os.urandom(8192))
    short = tmp / "short.img"
    short.write_bytes(b"\x9a\x62\x78\xd0")
    afile = tmp / "afile"
    afile.write_text("x")
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    img, objs = str(small.path), str(small.objects)
    return [
        (["-o", f"basedir={objs}", str(tmp / "missing.cfs"), str(mnt)], "No such file"),
        (["-o", f"basedir={objs}", str(notcfs), str(mnt)], "not a composefs image"),
        (["-o", f"basedir={objs}", str(short), str(mnt)], "not a composefs image"),
        (["-o", f"basedir={objs}", str(tmp), str(mnt)], "Is a directory"),
        (["-o", f"basedir={tmp / 'nope'}", img, str(mnt)], "basedir"),
        (["-o", f"basedir={objs}:{afile}", img, str(mnt)], "Not a directory"),
        (["-o", f"basedir={objs}", img, str(tmp / "nomnt")], "mountpoint"),
        (["-o", f"basedir={objs}", img, str(afile)], "Not a directory"),
        (["-o", f"basedir={objs},frobnicate", img, str(mnt)], "Unsupported option frobnicate"),
        (["-o", "basedir", img, str(mnt)], "No value specified for basedir"),
        (["-o", "basedir=", img, str(mnt)], "basedir"),
        (["-o", f"basedir={objs}::{objs}", img, str(mnt)], "incorrect format"),
        (["-o", f"basedir={objs},digest=xyz", img, str(mnt)], "Invalid digest"),
        (["-o", f"basedir={objs},digest={'ab' * 31}", img, str(mnt)], "Invalid digest"),
        (["-o", f"basedir={objs},verity=1", img, str(mnt)], "takes no value"),
        (["-o", f"basedir={objs},upperdir={tmp}", img, str(mnt)], "workdir"),
        (["-o", f"basedir={objs},idmap={tmp / 'no-ns'}", img, str(mnt)], "userns"),
        (["-o", f"basedir={objs},verity,noverity", img, str(mnt)], "Conflicting"),
        (["-t", "ext4", "-o", f"basedir={objs}", img, str(mnt)], "Unsupported fs type"),
        (["-o", f"basedir={objs}", img], "No mount path"),
        ([img, str(mnt)], "No object dirs"),
    ]


@needs_mounts
def test_errors(small: Built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each error: exit 1, the message on the first line of stderr, nothing mounted."""
    cases = _error_cases(tmp_path, small)
    before = _mounts()
    for argv, expected in cases:
        code = cli(*argv)
        err = capsys.readouterr().err
        assert code == 1, (argv, err)
        first = err.splitlines()[0]
        assert first.startswith("mount.composefs: ") and expected in first, (argv, err)
        if "usage" not in err:
            one_line(err)
        assert _mounts() == before, argv


@needs_mounts
def test_errors_are_one_line(small: Built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The errors a user meets at mount time are exactly one line (no usage text)."""
    for argv, _ in _error_cases(tmp_path, small)[:-2]:
        assert cli(*argv) == 1
        one_line(capsys.readouterr().err)


@needs_mounts
@pytest.mark.parametrize("how", ["no-cap-sys-admin", "nobody"])
def test_not_root(small: Built, tmp_path: Path, how: str) -> None:
    """Without CAP_SYS_ADMIN (or as nobody) the tool refuses with one line and mounts nothing.
    Runs in a forked child of this interpreter, so nobody need not be able to exec python."""
    mnt = mnt_dir(tmp_path)
    os.chmod(tmp_path, 0o755)
    drop = (lambda: drop_capabilities(CAP_SYS_ADMIN)) if how == "no-cap-sys-admin" else become_nobody
    code, err = run_forked(
        lambda: mount_main(["-o", f"basedir={small.objects}", str(small.path), str(mnt)]), drop)
    with mounted(mnt):
        assert code == 1, err
        line = one_line(err)
        assert "superuser" in line
        assert not os.path.ismount(mnt)


# ------------------------------------------------------------------------------------------------
# mkcomposefs DIR -> mount -> the same tree
# ------------------------------------------------------------------------------------------------

def _mkcomposefs(*argv: str | os.PathLike[str]) -> None:
    from mkcfs.cli.mkcomposefs import main as mkcomposefs_main
    code = mkcomposefs_main([os.fspath(a) for a in argv])
    assert code == 0, f"mkcomposefs {' '.join(map(str, argv))} failed"


def _need_walk() -> None:
    pytest.importorskip("mkcfs.sources.walk", reason="mkcfs.sources.walk (mkcomposefs DIR IMAGE) not written yet")


@needs_mounts
@pytest.mark.parametrize("hardlinks", [False, True])
def test_walk_roundtrip_generated_tree(tmp_path: Path, hardlinks: bool) -> None:
    """The generated tree on disk -> mkcomposefs --digest-store -> mount: the same tree."""
    _need_walk()
    src = tmp_path / "src"
    src.mkdir()
    tree = treegen.generate(4, bulk=1500, large=1 << 20)
    treegen.materialize(tree, src)
    source = treegen.snapshot_dir(src)
    objects, img = tmp_path / "objects", tmp_path / "walk.cfs"
    _mkcomposefs(*(["--hardlinks"] if hardlinks else []), f"--digest-store={objects}", src, img)
    mnt = mnt_dir(tmp_path)
    assert cli("-o", f"basedir={objects}", img, mnt) == 0
    with mounted(mnt):
        actual = treegen.snapshot_dir(mnt)
    version = int.from_bytes(img.read_bytes()[12:16], "little")
    if not hardlinks:
        source = treegen.without_hardlinks(source)
    problems = treegen.diff(treegen.as_mounted(source, version), actual)
    assert not problems, "\n".join(problems)


@needs_mounts
@pytest.mark.parametrize("src", ["/usr/share/perl5", "/usr/share/perl", "/usr/share/zoneinfo"])
def test_walk_roundtrip_real_tree(tmp_path: Path, src: str) -> None:
    """A real tree reads back unchanged through mkcomposefs --digest-store and the mount."""
    _need_walk()
    if not os.path.isdir(src):
        pytest.skip(f"{src} is not on this machine")
    objects, img = tmp_path / "objects", tmp_path / "real.cfs"
    _mkcomposefs(f"--digest-store={objects}", src, img)
    mnt = mnt_dir(tmp_path)
    assert cli("-o", f"basedir={objects}", img, mnt) == 0
    with mounted(mnt):
        actual = treegen.snapshot_dir(mnt)
    source = treegen.without_hardlinks(treegen.snapshot_dir(src))
    problems = treegen.diff(treegen.as_mounted(source, 1), actual)
    assert not problems, "\n".join(problems)
    assert len(actual) == len(source) > 10
