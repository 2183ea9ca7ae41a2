"""OCI images made by real tools: ``umoci`` (init/new/unpack/repack with changes, so the layers
carry umoci's own whiteouts) converted by ``skopeo`` to oci-archive, docker-archive and zstd.

Oracle: ``umoci unpack`` of the same image, then the directory source with ``--hardlinks``
must give the identical image (root directory metadata normalised, since umoci makes the root
itself). Mount round trip: the OCI-built image mounted with mount.composefs over its store
shows the unpacked rootfs file by file. Needs root (umoci keeps owners and devices only as
root) and the tools; skipped with the reason otherwise."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from mkcfs.build.image import build_image
from mkcfs.sources.dumpfile import format_dumpfile
from mkcfs.sources.oci import OciOptions, load_image_tree
from mkcfs.sources.walk import WalkOptions, walk_directory
from mkcfs.tree import Node, iter_tree


def _reason() -> str | None:
    if os.geteuid() != 0:
        return "umoci unpack keeps owners, devices and xattrs only as root"
    missing = [t for t in ("umoci", "skopeo") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian packages umoci, skopeo)"
    return None


pytestmark = pytest.mark.skipif(_reason() is not None, reason=_reason() or "")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=300)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def populate(root: Path) -> None:
    write(root / "etc" / "small", b"small file")
    write(root / "etc" / "exact64", b"6" * 64)
    write(root / "usr" / "lib" / "big", os.urandom(300_000))
    write(root / "usr" / "lib" / "mid", b"m" * 5000)
    os.link(root / "usr" / "lib" / "big", root / "usr" / "lib" / "big.link")
    os.link(root / "usr" / "lib" / "mid", root / "etc" / "mid.first")   # sorts first
    os.symlink("../usr/lib/big", root / "etc" / "sym")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "disk", stat.S_IFBLK | 0o600, os.makedev(8, 1))
    os.setxattr(root / "etc" / "small", "user.note", b"hello")
    os.setxattr(root / "usr", "user.dir", b"\x00\x01binary")
    (root / "opt" / "keep" / "deep").mkdir(parents=True)
    write(root / "opt" / "keep" / "deep" / "f", b"deep file content, more than 64 bytes " * 3)
    write(root / "opt" / "gone" / "x", b"x")
    write(root / "swap", b"a file that becomes a directory")
    (root / "swapdir").mkdir()
    write(root / "swapdir" / "child", b"c")
    os.chown(root / "etc" / "small", 1000, 1001)
    os.chmod(root / "usr" / "lib" / "mid", 0o4755)
    os.utime(root / "etc" / "exact64", ns=(1, 1_600_000_000_123_456_789))


def change(root: Path) -> None:
    os.unlink(root / "usr" / "lib" / "big")          # first name of a hard link goes
    os.unlink(root / "etc" / "mid.first")
    shutil.rmtree(root / "opt" / "gone")              # whiteout of a directory
    os.unlink(root / "swap")
    (root / "swap").mkdir()                           # file -> directory
    write(root / "swap" / "inside", b"now a directory")
    shutil.rmtree(root / "swapdir")
    write(root / "swapdir", b"directory -> file")
    os.chmod(root / "opt" / "keep", 0o700)
    write(root / "etc" / "small", b"replaced content, longer than sixty-four bytes for sure....")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("umoci")
    lay = base / "layout"
    sh("umoci", "init", "--layout", str(lay))
    sh("umoci", "new", "--image", f"{lay}:img")
    sh("umoci", "unpack", "--image", f"{lay}:img", str(base / "b1"))
    populate(base / "b1" / "rootfs")
    sh("umoci", "repack", "--image", f"{lay}:img", str(base / "b1"))
    sh("umoci", "unpack", "--image", f"{lay}:img", str(base / "b2"))
    change(base / "b2" / "rootfs")
    sh("umoci", "repack", "--image", f"{lay}:img", str(base / "b2"))
    sh("umoci", "unpack", "--image", f"{lay}:img", str(base / "oracle"))
    sources = {"oci": f"oci:{lay}:img"}
    sh("skopeo", "copy", f"oci:{lay}:img", f"oci-archive:{base}/img.tar:img")
    sources["oci-archive"] = f"oci-archive:{base}/img.tar:img"
    sh("skopeo", "copy", f"oci:{lay}:img", f"docker-archive:{base}/docker.tar:example/img:v1")
    sources["docker-archive"] = f"docker-archive:{base}/docker.tar:example/img:v1"
    sh("skopeo", "copy", "--dest-compress-format=zstd", f"oci:{lay}:img", f"oci:{base}/zstd:img")
    sources["zstd"] = f"oci:{base}/zstd:img"
    return base, sources


def _normalise_root(root: Node, like: Node) -> None:
    """Root metadata from ``like``; directory sizes 0 in both (lstat shows the filesystem's
    block size, the image writer computes its own)."""
    root.mode, root.uid, root.gid = like.mode, like.uid, like.gid
    root.mtime_sec, root.mtime_nsec, root.xattrs = like.mtime_sec, like.mtime_nsec, like.xattrs
    for tree in (root, like):
        for _, entry in iter_tree(tree):
            if isinstance(entry, Node) and entry.children is not None:
                entry.size = 0


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive", "zstd"])
def test_image_equals_the_unpacked_rootfs_image(images, kind):
    base, sources = images
    if kind == "zstd":
        blobs = (base / "zstd" / "index.json").read_text()
        assert blobs   # the layout exists; its layers must really be zstd:
        manifests = list((base / "zstd" / "blobs" / "sha256").iterdir())
        assert any(b"tar+zstd" in p.read_bytes()[:4096] for p in manifests
                   if p.stat().st_size < 4096)
    tree = load_image_tree(sources[kind]).root
    oracle = walk_directory(base / "oracle" / "rootfs", WalkOptions(hardlinks=True))
    _normalise_root(tree, oracle)
    assert format_dumpfile(tree) == format_dumpfile(oracle)
    assert bytes(build_image(tree).data) == bytes(build_image(oracle).data)


def test_umoci_whiteouts_were_applied(images):
    base, sources = images
    tree = load_image_tree(sources["oci"]).root
    assert b"gone" not in tree.children[b"opt"].children
    assert tree.children[b"swap"].children is not None
    assert tree.children[b"swapdir"].children is None
    big_link = tree.children[b"usr"].children[b"lib"].children[b"big.link"]
    assert isinstance(big_link, Node) and big_link.size == 300_000


def _mounted_equals(mnt: Path, rootfs: Path) -> None:
    got = walk_directory(mnt, WalkOptions(hardlinks=True))
    want = walk_directory(rootfs, WalkOptions(hardlinks=True))
    _normalise_root(got, want)
    assert format_dumpfile(got) == format_dumpfile(want)


def test_mount_round_trip(images, tmp_path):
    from tests.test_mount import _REASON as mount_reason
    if mount_reason is not None:
        pytest.skip(mount_reason)
    from mkcfs.mount import MountOptions, mount_image, umount
    base, sources = images
    store = tmp_path / "objects"
    tree = load_image_tree(sources["oci"], OciOptions(digest_store=str(store)))
    img = tmp_path / "img.cfs"
    img.write_bytes(bytes(build_image(tree.root).data))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_image(str(img), str(mnt), MountOptions(basedirs=[str(store)]))
    try:
        _mounted_equals(mnt, base / "oracle" / "rootfs")
    finally:
        with contextlib.suppress(OSError):
            umount(str(mnt))
    assert not os.path.ismount(mnt)
