#!/usr/bin/env python3
"""Benchmark ``composefs-info dump`` (or ``ls``/``objects``) on images: wall, CPU, peak memory.

Each image is read --runs times in a fresh process (after one warm-up run); the medians of the
wall time, CPU time (user + system) and peak RSS (GNU time) are reported. --reference PATH runs
another composefs-info (e.g. the C 1.0.8 build) on the same images, alternating with mkcfs run
by run, prints the ratios of the medians and checks that both print identical text.

    python3 tools/bench_info.py --runs 7 [--reference /path/to/composefs-info] IMAGE...

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
from benchrun import run_once  # noqa: E402  (tools/ is the script's directory)


def _output_digest(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, check=True)
    return hashlib.sha256(proc.stdout).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--command", default="dump", choices=["dump", "ls", "objects"])
    parser.add_argument("--reference", help="another composefs-info binary to compare with")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for image in args.images:
        tools = {"mkcfs": [sys.executable, "-m", "mkcfs.cli.composefs_info", args.command,
                           image]}
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
            (wall, rss, cpu), (rwall, rrss, rcpu) = medians["mkcfs"], medians["reference"]
            print(f"  ratio      wall {wall / rwall:.2f}x  cpu {cpu / rcpu:.2f}x  "
                  f"peak {rss / rrss:.2f}x")
            same = (_output_digest(tools["mkcfs"], env)
                    == _output_digest(tools["reference"], env))
            print(f"  output     {'identical' if same else 'DIFFERENT'}")
            if not same:
                sys.exit(1)


if __name__ == "__main__":
    main()
