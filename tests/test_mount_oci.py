"""``mkcfs mount`` of OCI images made by umoci, the LXC hook call form, and LXC itself.

umoci is the oracle: ``umoci unpack`` of the same image must give the same files (type, mode,
owner, content, link target, mtime) as the mount. The LXC test starts a real container whose
rootfs this helper mounts from ``lxc.hook.pre-mount`` (as ``lxc-oci --mount-helper`` configures
it) and runs one command in it. Needs root, the kernel's erofs and overlayfs, and umoci (LXC for
the last test); each is skipped with the reason otherwise. The mount table and the loop devices
are checked to be as before after every test (``test_mount.no_leaks``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mkcfs.mount import helper
from mkcfs.store import images
from mkcfs.mount.mountinfo import top_mount
from mkcfs.store.images import ManagedStore

from .test_mount import needs_mounts, no_leaks  # noqa: F401 - no_leaks: autouse leak check
from .test_mount_helper import make_tree, one_error_line, run_cli, snapshot

REPO = Path(__file__).resolve().parents[1]
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")


def umoci_image(layout: Path, ref: str, rootfs: Path, work: Path) -> None:
    """Make the OCI layout ``layout`` with one image ``ref`` whose one layer holds ``rootfs``
    (umoci init / new / unpack, copy the tree in, repack: one gzip layer)."""
    bundle = work / f"bundle-{ref}"
    if not (layout / "oci-layout").exists():
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:{ref}"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle)], check=True,
                   capture_output=True)
    subprocess.run(["cp", "-a", f"{rootfs}/.", str(bundle / "rootfs")], check=True)
    subprocess.run(["umoci", "repack", "--image", f"{layout}:{ref}", str(bundle)], check=True,
                   capture_output=True)
    shutil.rmtree(bundle)


def archive_dir(layout: Path) -> Path:
    """``layout`` under a path without ':' (skopeo and umoci split their argument at every
    ':'): a symlink beside the parent of the ':' directory."""
    link = layout.parents[2] / "layout-link"
    if not link.exists():
        link.symlink_to(layout)
    return link


def umoci_unpack(layout: Path, ref: str, target: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(target)], check=True,
                   capture_output=True)
    return target / "rootfs"


def with_mtimes(root: Path) -> dict[str, tuple]:
    """``snapshot`` plus the mtime of every entry but the root."""
    snap = snapshot(root)
    return {path: (*rec, int((root / path).lstat().st_mtime)) for path, rec in snap.items()}


@pytest.fixture(scope="module")
def oci(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(layout dir whose path contains ':', ref, umoci's unpack of the image)."""
    if shutil.which("umoci") is None or os.geteuid() != 0:
        pytest.skip("needs root and umoci")
    base = tmp_path_factory.mktemp("oci")
    src = make_tree(base / "src")
    os.symlink("etc/hostname", src / "hostlink")
    os.link(src / "bin/tool", src / "bin/tool-link")
    plain = base / "layout"
    umoci_image(plain, "c1", src, base)
    unpacked = umoci_unpack(plain, "c1", base / "unpacked")    # umoci cannot take a ':' path
    home = base / "lxc:containers" / "c1"        # the LXC form: a ':' inside the path
    home.mkdir(parents=True)
    layout = home / "oci"
    plain.rename(layout)
    return layout, "c1", unpacked


@needs_mounts
@needs_umoci
def test_read_only_mount_matches_umoci_unpack(oci, tmp_path: Path) -> None:
    layout, ref, unpacked = oci
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    status, err = run_cli("mount", "--store", store, f"{layout}:{ref}", mnt)
    assert status == 0, err
    try:
        assert with_mtimes(mnt) == with_mtimes(unpacked)
        assert (mnt / "bin/tool").stat().st_ino == (mnt / "bin/tool-link").stat().st_ino \
            or (mnt / "bin/tool").read_bytes() == (mnt / "bin/tool-link").read_bytes()
        with pytest.raises(OSError, match="Read-only"):
            (mnt / "x").write_text("x")
    finally:
        assert run_cli("umount", mnt)[0] == 0
    images = [n for n in os.listdir(store / "images") if not n.startswith(".")]
    assert len(images) == 1 and images[0].endswith(".cfs")


@needs_mounts
@needs_umoci
def test_lxc_hook_form_with_persist(oci, tmp_path: Path) -> None:
    """``HELPER mount --persist UPPER ${LXC_ROOTFS_PATH}/../oci:${LXC_NAME} ${LXC_ROOTFS_PATH}``
    as LXC runs it (through sh), with a ':' in the container's path; then write, delete and
    rename, umount, mount again: the changes are there, the image in the store is unchanged."""
    layout, ref, unpacked = oci
    home = layout.parent
    rootfs = home / "rootfs"
    rootfs.mkdir(exist_ok=True)
    upper = home / "upper"
    store = tmp_path / "store"
    hook = (f"{sys.executable} -m mkcfs mount --store {store} --persist {upper} "
            "${LXC_ROOTFS_PATH}/../oci:${LXC_NAME} ${LXC_ROOTFS_PATH}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LXC_ROOTFS_PATH": str(rootfs),
           "LXC_NAME": ref}
    try:
        proc = subprocess.run(["sh", "-c", hook], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert with_mtimes(rootfs) == with_mtimes(unpacked)
        (rootfs / "new").write_text("new\n")
        (rootfs / "gone").unlink()
        (rootfs / "a").rename(rootfs / "b")
        (rootfs / "etc/hostname").write_text("c1\n")
        expected = snapshot(rootfs)
        assert run_cli("umount", rootfs)[0] == 0
        image = [store / "images" / n for n in os.listdir(store / "images")
                 if not n.startswith(".")][0]
        before = image.read_bytes()
        assert (upper / "persist/gone").lstat().st_rdev == 0        # the whiteout
        proc = subprocess.run(["sh", "-c", hook], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert snapshot(rootfs) == expected
        assert image.read_bytes() == before
    finally:
        if top_mount(str(rootfs)) is not None:
            assert run_cli("umount", rootfs)[0] == 0
        shutil.rmtree(upper, ignore_errors=True)


@needs_mounts
@needs_umoci
def test_transports_and_second_mount_time(oci, tmp_path: Path) -> None:
    """``oci:`` and ``oci-archive:`` name the same image: one build, the rest only mount."""
    layout, ref, unpacked = oci
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    store = tmp_path / "store"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    times = []
    for source in (f"oci:{layout}:{ref}", f"{layout}:{ref}", f"oci-archive:{archive}:{ref}"):
        start = time.perf_counter()
        status, err = run_cli("mount", "--store", store, source, mnt)
        times.append(time.perf_counter() - start)
        assert status == 0, err
        try:
            assert snapshot(mnt) == snapshot(unpacked)
        finally:
            assert run_cli("umount", mnt)[0] == 0
    assert len([n for n in os.listdir(store / "images") if not n.startswith(".")]) == 1
    if shutil.which("skopeo"):       # docker save format: named by its config digest, built anew
        docker = tmp_path / "docker.tar"
        subprocess.run(["skopeo", "copy", "--insecure-policy", f"oci:{archive_dir(layout)}:{ref}",
                        f"docker-archive:{docker}:example/c1:latest"], check=True,
                       capture_output=True)
        status, err = run_cli("mount", "--store", store, f"docker-archive:{docker}", mnt)
        assert status == 0, err
        try:
            assert snapshot(mnt) == snapshot(unpacked)
        finally:
            assert run_cli("umount", mnt)[0] == 0
        assert len([n for n in os.listdir(store / "images") if not n.startswith(".")]) == 2
    print(f"\nmkcfs mount (fresh process): first {times[0]:.3f} s, "
          f"then {times[1]:.3f} s and {times[2]:.3f} s (oci-archive)")


@needs_mounts
@needs_umoci
def test_oci_errors(oci, tmp_path: Path) -> None:
    layout, ref, _ = oci
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    for source, needle in ((f"{tmp_path / 'missing'}:c1", "missing"),
                           (f"{layout}:nosuchref", "nosuchref")):
        line = one_error_line(*run_cli("mount", "--store", store, source, mnt), "mount")
        assert needle in line, line
        assert top_mount(str(mnt)) is None
    line = one_error_line(*run_cli("mount", "--store", store, "-o", f"basedir={tmp_path}",
                                   f"{layout}:{ref}", mnt), "mount")
    assert "basedir" in line
    assert images.read_states(ManagedStore(str(store))) == []


# ------------------------------------------------------------------------------------------------
# LXC end to end
# ------------------------------------------------------------------------------------------------

def _lxc_reason() -> str | None:
    if os.geteuid() != 0:
        return "LXC containers need root here"
    for tool in ("lxc-execute", "umoci"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/bin/busybox").exists():
        return "busybox(-static) is not installed"
    return None


@needs_mounts
@pytest.mark.skipif(_lxc_reason() is not None, reason=_lxc_reason() or "")
def test_lxc_container_runs_on_the_helper_mount(tmp_path: Path) -> None:
    """lxc-execute of a busybox image whose rootfs ``mkcfs mount`` mounts from the container's
    pre-mount hook, exactly as ``lxc-oci --mount-helper`` writes the configuration."""
    rootfs = tmp_path / "busybox"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (rootfs / d).mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    for applet in ("sh", "cat", "echo", "ls"):
        os.symlink("busybox", rootfs / "bin" / applet)
    (rootfs / "etc/motd").write_text("hello from a composefs rootfs\n")
    lxcpath = tmp_path / "lxc"
    home = lxcpath / "c1"
    (home / "rootfs").mkdir(parents=True)
    umoci_image(home / "oci", "c1", rootfs, tmp_path)
    helper_cmd = tmp_path / "mkcfs"
    helper_cmd.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m mkcfs "
                          f"\"$@\"\n")
    helper_cmd.chmod(0o755)
    store = tmp_path / "store"
    upper = home / "upper"
    (home / "config").write_text(
        "lxc.uts.name = c1\n"
        f"lxc.rootfs.path = dir:{home / 'rootfs'}\n"
        "lxc.net.0.type = none\n"
        "lxc.mount.auto = proc:mixed sys:mixed\n"
        "lxc.hook.version = 1\n"
        f"lxc.hook.pre-mount = {helper_cmd} mount --store {store} --persist {upper} "
        "${LXC_ROOTFS_PATH}/../oci:${LXC_NAME} ${LXC_ROOTFS_PATH}\n")
    log = tmp_path / "lxc.log"
    proc = subprocess.run(["lxc-execute", "-P", str(lxcpath), "-n", "c1", "-o", str(log),
                           "-l", "INFO", "--", "/bin/sh", "-c",
                           "cat /etc/motd; echo written > /root/note"],
                          capture_output=True, text=True, timeout=120)
    detail = proc.stderr + (log.read_text() if log.exists() else "")
    assert proc.returncode == 0, detail
    assert proc.stdout == "hello from a composefs rootfs\n", detail
    assert (upper / "persist/root/note").read_text() == "written\n"
    assert top_mount(str(home / "rootfs")) is None        # it lived in the container only
    states = images.read_states(ManagedStore(str(store)))   # made in the container's namespace,
    assert len(states) == 1 and states[0].mntns != helper.mount_namespace()
    assert helper.is_stale(states[0], helper.mount_namespace())   # which died with it


@needs_mounts
@needs_umoci
def test_two_mounts_of_one_image_started_at_once(oci, tmp_path: Path) -> None:
    """Two ``mkcfs mount`` processes of the same image on two mount points, started together:
    both succeed, one image is built."""
    layout, ref, unpacked = oci
    store = tmp_path / "store"
    mnts = [tmp_path / "m1", tmp_path / "m2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for m in mnts:
        m.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "mkcfs", "mount", "--store",
                                       str(store), f"{layout}:{ref}", str(m)], env=env,
                                      stderr=subprocess.PIPE, text=True))
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        for m in mnts:
            assert snapshot(m) == snapshot(unpacked)
        assert len([n for n in os.listdir(store / "images") if not n.startswith(".")]) == 1
    finally:
        for m in mnts:
            if top_mount(str(m)) is not None:
                assert run_cli("umount", m)[0] == 0


@needs_mounts
@needs_umoci
def test_sigkill_during_oci_build_then_mount(tmp_path: Path) -> None:
    """``mkcfs mount`` killed (SIGKILL) while it fills the store: no image under its name;
    the next mount builds it and succeeds, and no temporary file is left."""
    src = tmp_path / "src"
    src.mkdir()
    for n in range(40):
        (src / f"blob{n}").write_bytes(os.urandom(512 * 1024))
    umoci_image(tmp_path / "layout", "big", src, tmp_path)
    store = tmp_path / "store"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mkcfs", "mount", "--store", str(store),
           f"{tmp_path / 'layout'}:big", str(mnt)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    objects = store / "objects"
    deadline = time.monotonic() + 120
    # objects are written to .tmp-* files in the store first (named in groups, later): kill as
    # soon as the first one is being written, with most of the 20 MB still to go
    while time.monotonic() < deadline and proc.poll() is None:
        if objects.is_dir() and any(n.startswith(".tmp-") for n in os.listdir(objects)):
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    if top_mount(str(mnt)) is not None:       # lost the race: it finished first
        assert run_cli("umount", mnt)[0] == 0
        pytest.skip("the build finished before it could be killed")
    images = store / "images"
    assert [n for n in os.listdir(images) if not n.startswith(".")] == []
    assert top_mount(str(mnt)) is None
    status, err = run_cli("mount", "--store", store, f"{tmp_path / 'layout'}:big", mnt)
    assert status == 0, err
    try:
        assert snapshot(mnt) == snapshot(src)
    finally:
        assert run_cli("umount", mnt)[0] == 0
    assert [n for n in os.listdir(objects) if n.startswith(".tmp")] == []
    assert [n for n in os.listdir(images) if n.endswith(".tmp")] == []
