"""The installed commands end a successful run with ``os._exit`` (``mkcfs.cli.common.console``):
the output must still be complete, the exit functions must still run, a failed flush must still
fail, and anything that needs the normal exit (another thread, a non-zero status) gets it.

Every test runs a real process: the fast exit is never taken by ``main(argv)`` in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from .conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("PYTHONUNBUFFERED", None)   # the probes leave output in stdout's buffer for the exit

#: a program that runs ``console`` with a ``main`` given as source text; it leaves an object
#: whose finalizer reports the interpreter's teardown, and an exit function that reports itself
PROBE = """
import atexit, sys, threading
from mkcfs.cli import common

class Teardown:
    def __del__(self):
        sys.stderr.write("teardown\\n")

keep = Teardown()
atexit.register(lambda: sys.stderr.write("atexit\\n"))
{setup}
common.console("probe", lambda: {status})
"""


def _probe(status: str = "0", setup: str = "", stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(status=status, setup=setup)],
                          env=ENV, stdout=stdout, stderr=subprocess.PIPE, timeout=60)


def test_success_skips_the_teardown_but_runs_the_exit_functions():
    proc = _probe(setup="print('out', end='')")
    assert proc.returncode == 0
    assert proc.stdout == b"out"           # flushed before os._exit
    assert proc.stderr == b"atexit\n"      # exit functions ran once; no teardown


def test_failure_exits_normally():
    proc = _probe(status="3")
    assert proc.returncode == 3
    assert b"atexit" in proc.stderr and b"teardown" in proc.stderr


def test_what_is_kept_to_exit_is_never_freed_after_a_success_and_freed_otherwise():
    # keep_to_exit inside the command; the probe's main returns the status after that
    setup = ("class Garbage:\n"
             "    def __del__(self):\n"
             "        sys.stderr.write('freed\\n')\n"
             "_main = lambda status: (common.keep_to_exit(Garbage()), status)[1]\n")
    ok = subprocess.run([sys.executable, "-c", PROBE.replace("{status}", "_main(0)").format(
        setup=setup)], env=ENV, capture_output=True, timeout=60)
    assert ok.returncode == 0 and ok.stderr == b"atexit\n"
    failed = subprocess.run([sys.executable, "-c", PROBE.replace("{status}", "_main(2)").format(
        setup=setup)], env=ENV, capture_output=True, timeout=60)
    assert failed.returncode == 2 and b"freed" in failed.stderr
    # in-process (no console): dropped at once
    code = setup + "common.keep_to_exit(Garbage()); sys.stderr.write('after\\n')"
    inproc = subprocess.run([sys.executable, "-c", "import sys\nfrom mkcfs.cli import common\n"
                             + code], env=ENV, capture_output=True, timeout=60)
    assert inproc.stderr == b"freed\nafter\n"


def test_another_thread_is_waited_for():
    setup = ("import time\n"
             "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()")
    proc = _probe(setup=setup)
    assert proc.returncode == 0
    assert proc.stdout == b"thread done\n"
    assert b"teardown" in proc.stderr      # the normal exit, which waited for the thread


@pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="needs SIGPIPE")
def test_output_left_in_the_buffer_for_a_closed_pipe_fails():
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = _probe(setup="sys.stdout.write('x' * 100)", stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.returncode == -signal.SIGPIPE, proc.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_left_in_the_buffer_for_a_full_disk_fails():
    with open("/dev/full", "wb") as full:
        proc = _probe(setup="sys.stdout.write('x' * 100)", stdout=full)
    assert proc.returncode == 1
    assert b"probe: standard output: No space left on device" in proc.stderr


def _mkcomposefs_dump(tmp_path) -> str:
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    lines += [b"/f%04d 4096 100644 1 0 0 0 0.0 - %s -" % (i, b"%04d" % i * 1024) for i in range(300)]
    lines += [b"/d%03d 4096 40755 2 0 0 0 0.0 - - -" % i for i in range(300)]
    path = tmp_path / "in.dump"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_piped_image_and_dump_are_complete(tmp_path):
    # a pipe with a slow reader: the image (~1.3 MB) and the dump leave through `cat`
    dump = _mkcomposefs_dump(tmp_path)
    image = tmp_path / "file.img"
    py = [sys.executable, "-m"]
    subprocess.run([*py, "mkcfs.cli.mkcomposefs", "--from-file", dump, str(image)], env=ENV,
                   check=True)
    script = ('set -o pipefail; "$@" | (sleep 0.2; cat)')
    piped = subprocess.run(["bash", "-c", script, "sh", *py, "mkcfs.cli.mkcomposefs",
                            "--from-file", dump, "-"], env=ENV, capture_output=True, check=True)
    assert piped.stdout == image.read_bytes() and len(piped.stdout) > 1 << 20
    direct = subprocess.run([*py, "mkcfs.cli.composefs_info", "dump", str(image)], env=ENV,
                            capture_output=True, check=True)
    piped = subprocess.run(["bash", "-c", script, "sh", *py, "mkcfs.cli.composefs_info", "dump",
                            str(image)], env=ENV, capture_output=True, check=True)
    assert piped.stdout == direct.stdout and piped.stdout.count(b"\n") == 601
