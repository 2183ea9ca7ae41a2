#!/usr/bin/env python3
"""Benchmark ``composefs-info dump`` (or ``ls``/``objects``) on images: wall, CPU, peak memory.

Each image is read --runs times in a fresh process (after one warm-up run); the medians of the
wall time, CPU time (user + system) and peak RSS (GNU time) are reported. --reference PATH runs
another composefs-info (e.g. the C 1.0.8 build) on the same images, alternating with mkcfs run
by run, prints the ratios of the medians and checks that both print identical text.

    python3 tools/bench_info.py --runs 7 [--reference /path/to/composefs-info] IMAGE...

``--processes 1,2`` runs ``dump`` as one process and as two (what it does on an idle CPU), each
as its own row, instead of letting it decide (``auto``: two only when a CPU is idle).

Make an image of a dumpfile with ``mkcomposefs --from-file DUMP IMAGE``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchrun import checkout_env, run_once  # noqa: E402  (tools/ is the script's directory)


def _output_digest(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, check=True)
    return hashlib.sha256(proc.stdout).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--command", default="dump", choices=["dump", "ls", "objects"])
    parser.add_argument("--reference", help="another composefs-info binary to compare with")
    parser.add_argument("--processes", default="auto",
                        help="comma-separated among auto, 1, 2: how many processes dump may "
                             "use (auto: two only when a CPU is idle)")
    args = parser.parse_args()
    env = checkout_env()   # this checkout, as installed (bytecode cached)
    for image in args.images:
        tools = {}
        for processes in args.processes.split(","):
            label = "mkcfs" if processes == "auto" else f"mkcfs-{processes}p"
            tools[label] = _mkcfs_argv(processes, args.command, image)
        if args.reference:
            tools["reference"] = [args.reference, args.command, image]
        print(f"{image} ({os.path.getsize(image) / 1e6:.1f} MB), {args.command}:")
        results: dict[str, list[tuple[float, int, float]]] = {label: [] for label in tools}
        for cmd in tools.values():
            run_once(cmd, env)  # warm the page cache
        for _ in range(args.runs):
            for label, cmd in tools.items():
                results[label].append(run_once(cmd, env))
        medians = {}
        for label, rows in results.items():
            wall = statistics.median(r[0] for r in rows)
            rss = statistics.median(r[1] for r in rows)
            cpu = statistics.median(r[2] for r in rows)
            medians[label] = (wall, rss, cpu)
            print(f"  {label:10s} median {wall:6.3f} s wall  {cpu:6.3f} s cpu  "
                  f"{rss / 1024:7.1f} MB peak")
        if args.reference:
            rwall, rrss, rcpu = medians["reference"]
            reference = _output_digest(tools["reference"], env)
            for label in tools:
                if label == "reference":
                    continue
                wall, rss, cpu = medians[label]
                same = _output_digest(tools[label], env) == reference
                print(f"  {label:10s} wall {wall / rwall:.2f}x  cpu {cpu / rcpu:.2f}x  "
                      f"peak {rss / rrss:.2f}x  output {'identical' if same else 'DIFFERENT'}")
                if not same:
                    sys.exit(1)


def _mkcfs_argv(processes: str, command: str, image: str) -> list[str]:
    """composefs-info of this checkout, deciding the number of processes itself (``auto``) or
    told whether a CPU is idle (``1``: no, ``2``: yes)."""
    if processes == "auto":
        return [sys.executable, "-m", "mkcfs.cli.composefs_info", command, image]
    if processes not in ("1", "2"):
        raise SystemExit(f"--processes: {processes!r} is not auto, 1 or 2")
    code = ("import sys; from mkcfs import forksafe; "
            f"forksafe.spare_cpu = lambda: {processes == '2'}; "
            "from mkcfs.cli.composefs_info import console; console()")
    return [sys.executable, "-c", code, command, image]


if __name__ == "__main__":
    main()
