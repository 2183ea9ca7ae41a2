"""What every benchmark in tools/ shares: run one command and measure it.

``checkout_env()`` is the environment that runs this checkout as installed. ``run_once(argv,
env)`` gives ``(wall seconds, peak RSS in KiB, CPU seconds)``. The peak comes
from GNU time (``/usr/bin/time``, Debian package ``time``) when installed: a child forked from a
large Python process is otherwise charged that process's pages too. CPU is user + system of the
command and every process it waited for (e.g. mkcfs's digest workers), which varies less than
the wall time on a shared machine.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


def checkout_env() -> dict[str, str]:
    """The environment that runs this checkout's mkcfs as an installed package would run:
    the checkout on ``PYTHONPATH``, and bytecode cached. pip byte-compiles an installed
    package, so its modules are never recompiled per run; under PYTHONDONTWRITEBYTECODE=1 a
    checkout would recompile every changed module on every run, so the variable is dropped and
    the warm-up run writes the cache."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_once(argv: list[str], env: dict[str, str] | None = None,
             cwd: str = REPO) -> tuple[float, int, float]:
    """``(wall seconds, peak RSS in KiB, CPU seconds)`` of one run of ``argv`` in the checkout
    (``cwd``: another one, whose modules ``python -m`` then finds first); a failing command
    ends the benchmark with its status and error output."""
    if GNU_TIME:
        argv = [GNU_TIME, "-f", "%M", *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {shlex.join(argv)}\n{err}")
    peak = int(err.strip().splitlines()[-1]) if GNU_TIME else usage.ru_maxrss
    return wall, peak, usage.ru_utime + usage.ru_stime
