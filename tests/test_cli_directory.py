"""``python3 -m mkcfs.cli.mkcomposefs SOURCE-DIR IMAGE`` end to end: options, digests on stdout, progress on a
terminal, and errors (exit 1, one line on stderr, no traceback, nothing half-written)."""

from __future__ import annotations

import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fsverity
from mkcfs.build.image import build_image
from mkcfs.sources.walk import WalkOptions, walk_directory

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkcfs.cli.mkcomposefs", *args], cwd=REPO, env=ENV,
                          capture_output=True, timeout=120, **kw)


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    (s / "dir").mkdir(parents=True)
    write(s / "small", b"small")
    write(s / "big", os.urandom(10_000))
    os.link(s / "big", s / "dir" / "big-link")
    os.symlink("big", s / "link")
    os.mkfifo(s / "fifo")
    try:
        os.setxattr(s / "small", "user.k", b"v")
    except OSError:
        pass
    if ROOT:
        os.mknod(s / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(s / "dir" / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
        os.setxattr(s / "big", "trusted.t", b"x")
        os.chown(s / "dir", 12, 34)
    return s


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err.startswith("mkcomposefs: ") and err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    import re
    assert re.search(pattern, err), err
    return err


OPTION_SETS = [
    ([], WalkOptions()),
    (["--use-epoch"], WalkOptions(use_epoch=True)),
    (["--skip-devices"], WalkOptions(skip_devices=True)),
    (["--skip-xattrs"], WalkOptions(skip_xattrs=True)),
    (["--user-xattrs"], WalkOptions(user_xattrs=True)),
    (["--hardlinks"], WalkOptions(hardlinks=True)),
    (["--threads=1"], WalkOptions(threads=1)),
    (["--threads", "5", "--use-epoch", "--skip-devices"],
     WalkOptions(threads=5, use_epoch=True, skip_devices=True)),
]


@pytest.mark.parametrize("args,options", OPTION_SETS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_options_build_the_api_image(src, tmp_path, args, options):
    out = tmp_path / "out.img"
    result = run(*args, str(src), str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"" and result.stdout == b""     # no progress when not a terminal
    expected = build_image(walk_directory(src, options)).data
    assert out.read_bytes() == expected


@pytest.mark.parametrize("versions", [["--min-version=1"], ["--max-version=0"],
                                      ["--min-version=0", "--max-version=1"]])
def test_version_options(src, tmp_path, versions):
    out = tmp_path / "out.img"
    result = run(*versions, str(src), str(out))
    assert result.returncode == 0, result.stderr
    kw = {"min_version": 0, "max_version": 1}
    for v in versions:
        name, value = v[2:].split("=")
        kw[name.replace("-", "_")] = int(value)
    if "--min-version=1" in versions:
        kw["max_version"] = 1
    if versions == ["--max-version=0"]:
        kw = {"min_version": 0, "max_version": 0}
    assert out.read_bytes() == build_image(walk_directory(src), **kw).data


def test_print_digest_and_digest_only(src, tmp_path):
    out = tmp_path / "out.img"
    result = run("--print-digest", str(src), str(out))
    assert result.returncode == 0, result.stderr
    digest = fsverity.digest_bytes(out.read_bytes()).hex()
    assert result.stdout == f"{digest}\n".encode()
    result = run("--print-digest-only", str(src))
    assert result.returncode == 0 and result.stdout == f"{digest}\n".encode()


def test_digest_store_through_the_cli(src, tmp_path):
    store = tmp_path / "objects"
    result = run(f"--digest-store={store}", str(src), str(tmp_path / "out.img"))
    assert result.returncode == 0, result.stderr
    name = fsverity.object_path(fsverity.digest_file(src / "big"))
    assert (store / name).read_bytes() == (src / "big").read_bytes()
    assert stat.S_IMODE((store / name).stat().st_mode) == 0o644
    # the objects, and the digest cache that is on by default in a store outside the source
    assert sorted(p.name for p in store.iterdir()) == [".mkcfs-digest-cache", name[:2]]


def test_image_to_stdout(src, tmp_path):
    result = run(str(src), "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout == build_image(walk_directory(src)).data


# -- errors -------------------------------------------------------------------------------------

@pytest.fixture
def old_image(tmp_path):
    """An existing image at the target: a failed build must leave it as it was."""
    out = tmp_path / "out.img"
    write(out, b"old image")
    return out


def _untouched(out: Path) -> None:
    assert out.read_bytes() == b"old image"
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in ("out.img", "src")
                 and not p.name.startswith("objects") and p.name not in ("file", "d", "dlink")]
    assert leftovers == [], leftovers


def test_missing_source(tmp_path, old_image):
    r = run(str(tmp_path / "nope"), str(old_image))
    assert_one_line_error(r, r"error accessing .*/nope: No such file or directory$")
    _untouched(old_image)
    r = run(str(tmp_path / "nope"), str(tmp_path / "new.img"))
    assert r.returncode == 1 and not (tmp_path / "new.img").exists()


def test_source_not_a_directory(tmp_path, old_image):
    write(tmp_path / "file", b"x")
    assert_one_line_error(run(str(tmp_path / "file"), str(old_image)),
                          r"error accessing .*/file: Not a directory$")
    (tmp_path / "d").mkdir()
    os.symlink("d", tmp_path / "dlink")
    assert_one_line_error(run(str(tmp_path / "dlink"), str(old_image)),
                          r"/dlink: Not a directory$")
    _untouched(old_image)


def test_image_in_missing_directory(src, tmp_path):
    r = run(str(src), str(tmp_path / "no" / "such" / "dir" / "out.img"))
    assert_one_line_error(r, r"does not exist")
    assert not (tmp_path / "no").exists()


def test_conflicting_xattr_options(src, tmp_path):
    r = run("--user-xattrs", "--skip-xattrs", str(src), str(tmp_path / "o.img"))
    assert r.returncode == 1 and "Traceback" not in r.stderr.decode()
    assert not (tmp_path / "o.img").exists()


def test_digest_store_is_a_file(src, tmp_path, old_image):
    write(tmp_path / "objects-file", b"")
    r = run(f"--digest-store={tmp_path / 'objects-file'}", str(src), str(old_image))
    assert_one_line_error(r, r"cannot fill store .*objects-file: Not a directory$")
    _untouched(old_image)


def test_digest_store_not_writable(src, tmp_path, old_image):
    from .test_store import _make_unwritable
    store = tmp_path / "objects"
    store.mkdir()
    undo = _make_unwritable(store)
    try:
        r = run(f"--digest-store={store}", str(src), str(old_image))
    finally:
        undo()
    assert_one_line_error(r, r"cannot fill store .*objects: (Permission denied|Operation not "
                             r"permitted)$")
    _untouched(old_image)
    assert list(store.iterdir()) == []


_AS_NOBODY = """
import os, sys
import mkcfs.cli.mkcomposefs as cli, mkcfs.sources.walk, mkcfs.store.objects, mkcfs.store.digests, mkcfs.build.image
import mkcfs.progress, mkcfs.sources.dumpfile, concurrent.futures.thread, encodings.idna
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def shared_dir():
    """A directory that uid 65534 can reach (pytest's tmp_path is private to root)."""
    d = tempfile.mkdtemp(prefix="mkcfs-cli-")
    os.chmod(d, 0o777)
    yield Path(d)
    shutil.rmtree(d)


def _run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    if ROOT:
        return subprocess.run([sys.executable, "-c", _AS_NOBODY, *args], cwd=REPO, env=ENV,
                              capture_output=True, timeout=60)
    return run(*args)


@pytest.mark.parametrize("what", ["directory", "file"])
def test_unreadable_entries(shared_dir, what):
    src = shared_dir / "src"
    (src / "d").mkdir(parents=True)
    write(src / "d" / "f", os.urandom(1000))
    write(src / "zero", b"")
    os.chmod(src / "zero", 0)                    # an empty file is never opened
    for p in (src, src / "d"):
        os.chmod(p, 0o755)
    os.chmod(src / "d" / "f", 0o644)
    out = shared_dir / "out.img"
    if what == "directory":
        os.chmod(src / "d", 0o300)
        pattern = r"error accessing .*src/d: Permission denied$"
    else:
        os.chmod(src / "d" / "f", 0)
        pattern = r"error computing digest of .*src/d/f: Permission denied$"
    try:
        r = _run_unprivileged(str(src), str(out))
    finally:
        os.chmod(src / "d", 0o755)
    assert_one_line_error(r, pattern)
    assert not out.exists()
    assert [p.name for p in shared_dir.iterdir()] == ["src"]


# -- progress on a terminal ---------------------------------------------------------------------

def test_progress_line_on_a_terminal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # data to hash for a few tenths of a second with one thread (a sparse file would not do:
    # its holes are not read), while the line is drawn every tenth of a second
    block = b"\x5a" * (1 << 20)
    with open(src / "f0", "wb") as f:
        for _ in range(384):
            f.write(block)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mkcfs.cli.mkcomposefs", "--threads=1", str(src),
                                 str(tmp_path / "out.img")], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        slave = -1
        output = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:   # EIO: the other side is closed
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == 0
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = output.decode()
    assert "entries" in text and "files hashed" in text and "\n" not in text.replace("\r\n", "")
    assert text.endswith("\r\x1b[K")   # erased at the end
