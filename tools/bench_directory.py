"""Benchmark ``mkcomposefs DIR IMAGE`` (directory source): wall time and peak memory.

Usage::

    python3 tools/bench_directory.py [--runs N] [--reference PATH-TO-mkcomposefs]
                                     [--args "--digest-store=/tmp/objs ..."] [DIR ...]

DIR defaults to /usr/share (metadata-heavy), /usr/lib/x86_64-linux-gnu (digest-heavy) and /usr.
Each command runs once to warm the page cache, then N times (default 5); with a reference the
two tools alternate run by run, so both see the same machine conditions. Reported: median and
min wall time, and the peak RSS (``ru_maxrss`` from ``wait4`` of that one child: the largest of
the process and of its waited-for descendants, e.g. mkcfs's digest worker processes, which are
much smaller than the build process itself).

The image goes to a temporary file that is removed at the end. Nothing here needs root.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIRS = ["/usr/share", "/usr/lib/x86_64-linux-gnu", "/usr"]


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """``(wall seconds, peak RSS in KiB)`` of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(argv)}\n{err}")
    return wall, usage.ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", default=DEFAULT_DIRS)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reference", help="a mkcomposefs binary to compare with")
    ap.add_argument("--args", default="", help="extra mkcomposefs options for both tools")
    ap.add_argument("--python", default=sys.executable)
    opts = ap.parse_args()

    env = dict(os.environ, PYTHONPATH=REPO)
    extra = shlex.split(opts.args)
    fd, image = tempfile.mkstemp(prefix="bench-", suffix=".img")
    os.close(fd)
    tools = [("mkcfs", [opts.python, "-m", "mkcfs.cli.mkcomposefs"])]
    if opts.reference:
        tools.append(("reference", [opts.reference]))
    try:
        load = os.getloadavg()
        print(f"# {len(os.sched_getaffinity(0))} CPUs, load average {load[0]:.2f} at start, "
              f"{opts.runs} runs after one warm-up, options: {shlex.join(extra) or '(none)'}")
        print(f"{'directory':28s} {'tool':10s} {'median s':>9s} {'min s':>7s} {'max s':>7s} "
              f"{'peak MB':>8s}")
        for directory in opts.dirs:
            results: dict[str, list[tuple[float, int]]] = {name: [] for name, _ in tools}
            for _name, cmd in tools:   # warm the page cache, and the tools
                run_once([*cmd, *extra, directory, image], env)
            for _ in range(opts.runs):
                for name, cmd in tools:
                    results[name].append(run_once([*cmd, *extra, directory, image], env))
            medians = {}
            for name, _ in tools:
                walls = [r[0] for r in results[name]]
                peak = max(r[1] for r in results[name]) / 1024
                medians[name] = (statistics.median(walls), peak)
                print(f"{directory:28s} {name:10s} {statistics.median(walls):9.2f} "
                      f"{min(walls):7.2f} {max(walls):7.2f} {peak:8.0f}", flush=True)
            if "reference" in medians:
                (ours, our_mem), (ref, ref_mem) = medians["mkcfs"], medians["reference"]
                print(f"{'':28s} {'ratio':10s} {ours / ref:9.2f}x {'':15s} {our_mem / ref_mem:8.2f}x")
        print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        os.unlink(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
