"""A cut standard output is a failure: every tool that prints dies by SIGPIPE, as the C tools do.

Each test runs a real process whose standard output is a pipe closed at some point (before any
output, in the middle of an image, at the digest line, in the middle of a dump) and checks
that it does not end with status 0: a ``set -o pipefail`` pipeline must see the cut.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="needs SIGPIPE")


def _dump(tmp_path, files: int = 400) -> str:
    """A dumpfile whose image is ~1.6 MB (each file fills a data block) and whose
    ``composefs-info dump`` is ~3.3 MB: far more than a pipe holds."""
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    lines += [b"/f%04d 4096 100644 1 0 0 0 0.0 - %s -" % (i, b"%04d" % i * 1024) for i in range(files)]
    path = tmp_path / "big.dump"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _spawn(module: str, *args: str, stdout: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", f"mkcfs.cli.{module}", *args], stdout=stdout,
                            stderr=subprocess.PIPE, env=env)


def _read_then_close(proc: subprocess.Popen, nbytes: int) -> tuple[int, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    got = 0
    while got < nbytes:
        chunk = proc.stdout.read1(min(65536, nbytes - got))
        if not chunk:
            break
        got += len(chunk)
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=120), err


def _closed_pipe() -> int:
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def test_image_to_stdout_with_no_reader(tmp_path):
    dump = _dump(tmp_path)
    write_end = _closed_pipe()
    proc = _spawn("mkcomposefs", "--from-file", dump, "-", stdout=write_end)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGPIPE, err


def test_image_to_stdout_cut_in_the_middle(tmp_path):
    dump = _dump(tmp_path)
    proc = _spawn("mkcomposefs", "--from-file", dump, "-", stdout=subprocess.PIPE)
    status, err = _read_then_close(proc, 100000)
    assert status == -signal.SIGPIPE, err


def test_digest_line_with_no_reader(tmp_path):
    dump = _dump(tmp_path, files=3)
    write_end = _closed_pipe()
    proc = _spawn("mkcomposefs", "--print-digest", "--from-file", dump, str(tmp_path / "x.img"),
                  stdout=write_end)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGPIPE, err
    write_end = _closed_pipe()
    proc = _spawn("mkcomposefs", "--print-digest-only", "--from-file", dump, stdout=write_end)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGPIPE, err


def _external_dump(tmp_path, files: int = 20000) -> str:
    """External files only: each prints ~70 bytes in ``ls``, ``objects`` and ``dump``."""
    import hashlib

    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    for i in range(files):
        digest = hashlib.sha256(b"%d" % i).hexdigest().encode()
        lines.append(b"/f%05d 100 100644 1 0 0 0 0.0 %s/%s - -" % (i, digest[:2], digest[2:]))
    path = tmp_path / "external.dump"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("command", ["dump", "ls", "objects"])
def test_composefs_info_cut_in_the_middle(command, tmp_path):
    dump = _external_dump(tmp_path)
    image = tmp_path / "big.img"
    from mkcfs.cli.mkcomposefs import main

    assert main(["--from-file", dump, str(image)]) == 0
    proc = _spawn("composefs_info", command, str(image), stdout=subprocess.PIPE)
    status, err = _read_then_close(proc, 1000)
    assert status == -signal.SIGPIPE, err


def test_composefs_info_with_no_reader(tmp_path):
    dump = _dump(tmp_path, files=3)
    image = tmp_path / "small.img"
    from mkcfs.cli.mkcomposefs import main

    assert main(["--from-file", dump, str(image)]) == 0
    write_end = _closed_pipe()
    proc = _spawn("composefs_info", "dump", str(image), stdout=write_end)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGPIPE, err


def test_mkcfs_help_with_no_reader():
    write_end = _closed_pipe()
    proc = _spawn("mkcfs", "--help", stdout=write_end)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGPIPE, err


def test_composefs_dump_to_a_cut_pipe_fails_with_one_line(tmp_path):
    """composefs-dump writes to a path; a pipe given as /dev/stdout cut mid-image is an error."""
    dump = _dump(tmp_path)
    image = tmp_path / "src.img"
    from mkcfs.cli.mkcomposefs import main

    assert main(["--from-file", dump, str(image)]) == 0
    proc = _spawn("composefs_dump", str(image), "/dev/stdout", stdout=subprocess.PIPE)
    status, err = _read_then_close(proc, 100000)
    assert status != 0
    assert status == -signal.SIGPIPE or len(err.decode().splitlines()) == 1, err
