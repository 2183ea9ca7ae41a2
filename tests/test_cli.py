"""mkcomposefs command line: arguments, exit codes, messages, outputs, and what is left on disk."""

from __future__ import annotations

import hashlib
import os
import pty
import signal
import subprocess
import sys
import time

import pytest

from mkcfs.cli.mkcomposefs import main
from mkcfs.sources.dumpfile import parse_dumpfile
from mkcfs.build.image import build_image

from .conftest import REPO, TESTDATA

SAMPLE = TESTDATA / "sample.dump"
SAMPLE_SHA = "9bb0c127e2e2d0d07a566bec6900cd2f7c389a7e5a80f3a8126e82e38f88ab79"
SAMPLE_DIGEST = "142615cdfe64371bc40b19501bceb0a035a6d9d236ea8d2c9f6f75eb53803b96"


def run_cli(*args: str, stdin: bytes | None = None, env: dict | None = None, **kw):
    """Run ``python -m mkcfs.cli.mkcomposefs`` as a user would: a separate process, real stdio."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mkcfs.cli.mkcomposefs", *args], input=stdin,
                          capture_output=True, env=env, **kw)


def one_line_error(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("mkcomposefs: ")
    return err


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_print_digest_writes_image_and_digest(tmp_path):
    proc = run_cli("--print-digest", "--from-file", str(SAMPLE), str(tmp_path / "o.img"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == SAMPLE_DIGEST + "\n"
    assert sha(tmp_path / "o.img") == SAMPLE_SHA


def test_print_digest_only_writes_nothing(tmp_path):
    proc = run_cli("--print-digest-only", "--from-file", str(SAMPLE), cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.decode() == SAMPLE_DIGEST + "\n"
    assert list(tmp_path.iterdir()) == []


def test_stdin_source_and_stdout_image():
    proc = run_cli("--from-file", "-", "-", stdin=SAMPLE.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(proc.stdout).hexdigest() == SAMPLE_SHA


def test_stdout_image_followed_by_digest():
    proc = run_cli("--print-digest", "--from-file", "-", "-", stdin=SAMPLE.read_bytes())
    assert proc.returncode == 0
    image, digest = proc.stdout[:-65], proc.stdout[-65:]
    assert hashlib.sha256(image).hexdigest() == SAMPLE_SHA
    assert digest.decode() == SAMPLE_DIGEST + "\n"


def test_stdout_terminal_is_refused():
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "mkcfs.cli.mkcomposefs", "--from-file", str(SAMPLE), "-"],
                              stdout=slave, stderr=subprocess.PIPE)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 1
    assert b"stdout is a tty" in proc.stderr


def test_option_forms_and_abbreviations(tmp_path):
    # --opt value, --opt=value, unique abbreviation, options after the positionals
    out = tmp_path / "o.img"
    proc = run_cli("--from", str(SAMPLE), str(out), "--min-version", "1", "--max-v=1")
    assert proc.returncode == 0, proc.stderr
    root = parse_dumpfile(SAMPLE.read_bytes())
    assert out.read_bytes() == build_image(root, min_version=1, max_version=1).data


@pytest.mark.parametrize("args,message", [
    ([], "No source path specified"),
    (["", "x.img"], "Empty source path specified"),
    (["--from-file", "a", "b", "c"], "Too many arguments"),
    (["--from-file", "a"], "No destination path specified"),
    (["--print-digest-only", "--from-file", "a", "b"], "Cannot specify destination path"),
    (["--min-version=x", "--from-file", "a", "b"], "Invalid min version x"),
    (["--max-version=", "--from-file", "a", "b"], "Invalid max version"),
    (["--threads=0", "--from-file", "a", "b"], "Invalid threads count 0"),
    (["--threads=two", "--from-file", "a", "b"], "Invalid threads count two"),
    (["--print", "a", "b"], "ambiguous"),
    (["--bogus", "a", "b"], "unrecognized option"),
    (["--from-file", "a", "b", "--min-version"], "needs a value"),
    (["--skip-xattrs", "--user-xattrs", "a", "b"], "cannot be used together"),
])
def test_usage_errors(args, message, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert message in one_line_error(proc).splitlines()[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version_args", [["--min-version=2"], ["--max-version=2"],
                                          ["--min-version=-1"]])
def test_unsupported_versions_are_refused(version_args, tmp_path):
    proc = run_cli(*version_args, "--from-file", str(SAMPLE), str(tmp_path / "o.img"))
    assert "Invalid argument" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


def test_missing_dumpfile(tmp_path):
    proc = run_cli("--from-file", str(tmp_path / "nope.dump"), str(tmp_path / "o.img"))
    err = one_line_error(proc)
    assert "nope.dump" in err and "No such file" in err
    assert list(tmp_path.iterdir()) == []


def test_dumpfile_is_a_directory(tmp_path):
    proc = run_cli("--from-file", str(tmp_path), str(tmp_path / "o.img"))
    assert "Error reading from file" in one_line_error(proc)


def test_image_in_missing_directory(tmp_path):
    proc = run_cli("--from-file", str(SAMPLE), str(tmp_path / "no" / "such" / "o.img"))
    assert "does not exist" in one_line_error(proc)


def test_bad_dumpfile_names_file_and_line_and_keeps_old_image(tmp_path):
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n/b 0 644 1 0 0 0 0.0 - - -\n")
    target = tmp_path / "o.img"
    target.write_bytes(b"previous image")
    proc = run_cli("--from-file", str(bad), str(target))
    err = one_line_error(proc)
    assert len(err.splitlines()) == 1
    assert "bad.dump:3" in err and "Invalid mode 644" in err
    assert target.read_bytes() == b"previous image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.dump", "o.img"]


def test_write_error_is_one_line(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    proc = run_cli("--from-file", str(SAMPLE), str(target))
    assert "Is a directory" in one_line_error(proc)


def test_success_replaces_existing_image_atomically(tmp_path):
    target = tmp_path / "o.img"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    assert main(["--from-file", str(SAMPLE), str(target)]) == 0
    assert sha(target) == SAMPLE_SHA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.img"]


def test_image_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["--from-file", str(SAMPLE), str(tmp_path / "o.img")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o.img").stat().st_mode & 0o777 == 0o640


def test_killed_build_never_leaves_a_partial_image(tmp_path):
    """SIGKILL a build of a large tree at several moments: the target is the old image or the new
    complete one, never anything in between."""
    lines = [b"/ 0 40755 2 0 0 0 0.0 - - -"]
    for d in range(200):
        lines.append(b"/d%d 0 40755 2 0 0 0 0.0 - - -" % d)
        lines.extend(b"/d%d/f%d 6 100644 1 0 0 0 %d.0 - hello\\n - user.x=%d" % (d, i, i, i)
                     for i in range(150))
    dump = tmp_path / "big.dump"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    expected = hashlib.sha256(build_image(parse_dumpfile(dump.read_bytes())).data).hexdigest()
    target = tmp_path / "o.img"
    target.write_bytes(b"old")
    for delay in (0.05, 0.2, 0.4, 0.6, 0.9):
        proc = subprocess.Popen([sys.executable, "-m", "mkcfs.cli.mkcomposefs", "--from-file", str(dump), str(target)],
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        content = target.read_bytes()
        assert content == b"old" or hashlib.sha256(content).hexdigest() == expected
    # leftovers of killed runs are only hidden temporaries, never the target name...
    for p in tmp_path.iterdir():
        assert p.name in ("big.dump", "o.img") or (p.name.startswith(".o.img.") and p.name.endswith(".tmp"))
    # ...and the next run to the same target removes them
    assert main(["--from-file", str(dump), str(target)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.dump", "o.img"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected


def test_live_writers_temporary_is_not_removed(tmp_path):
    import fcntl

    from mkcfs.fsutil import remove_stale_temporaries, temporaries_of

    target = tmp_path / "o.img"
    live = tmp_path / ".o.img.live.tmp"
    stale = tmp_path / ".o.img.dead.tmp"
    stale.write_bytes(b"partial")
    with open(live, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert remove_stale_temporaries(*temporaries_of(str(target))) == 1
        assert live.exists() and not stale.exists()


def test_files_and_standard_output_are_written_in_chunks(tmp_path, monkeypatch):
    """Every ``write`` call gets at most ``WRITE_CHUNK`` bytes (larger calls were slow on
    ext4), and short writes are continued: the file holds exactly the data."""
    import io

    from mkcfs import fsutil
    from mkcfs.cli import common

    data = os.urandom(3 * fsutil.WRITE_CHUNK + 5)
    calls: list[int] = []
    real_write = os.write

    def short_write(fd, view):
        calls.append(len(view))
        return real_write(fd, view[:max(1, len(view) - 7)])   # never all of it
    monkeypatch.setattr(os, "write", short_write)
    fsutil.write_atomically(tmp_path / "out", data)
    monkeypatch.undo()
    assert (tmp_path / "out").read_bytes() == data
    assert max(calls) == fsutil.WRITE_CHUNK and len(calls) > 4

    class ShortStream(io.BytesIO):
        def write(self, view):
            calls.append(len(view))
            return super().write(bytes(view)[:max(1, len(view) - 7)])
    calls.clear()
    stream = ShortStream()
    common.write_all(stream, data)
    assert stream.getvalue() == data
    assert max(calls) == fsutil.WRITE_CHUNK and len(calls) > 4


def test_written_files_get_the_umask_read_without_changing_it(tmp_path, monkeypatch):
    """``write_atomically`` reads the umask from /proc: setting it to 0 for an instant would
    give a file another thread creates meanwhile mode 0666 (the image and the digest cache are
    written at the same time)."""
    import stat

    from mkcfs import fsutil

    old = os.umask(0o027)
    try:
        calls: list[int] = []
        real_umask = os.umask
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
        fsutil.write_atomically(tmp_path / "f", b"x")
        assert calls == []
        assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o640
        # without /proc: set and restored at once, same mode
        monkeypatch.setattr(fsutil, "open", lambda *a, **k: (_ for _ in ()).throw(OSError()),
                            raising=False)
        fsutil.write_atomically(tmp_path / "g", b"x")
        assert calls == [0, 0o027]
        assert stat.S_IMODE(os.stat(tmp_path / "g").st_mode) == 0o640
    finally:
        os.umask(old)


def test_python_dash_m_and_console_entry_point_agree(tmp_path):
    proc = run_cli("--print-digest-only", "--from-file", str(SAMPLE))
    assert proc.stdout.decode() == SAMPLE_DIGEST + "\n"


def test_help():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert b"--print-digest-only" in proc.stdout
