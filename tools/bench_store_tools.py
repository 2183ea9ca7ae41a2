"""Benchmark ``mkcfs fsck`` (objects/s, MB/s; worker processes against threads) and ``mkcfs gc``
on an existing object store.

Usage::

    python3 tools/bench_store_tools.py --store DIR --image IMAGE [--runs N] [--threads N]

Build the store first, e.g. ``mkcomposefs --digest-store=/tmp/usrstore /usr /tmp/usr.img``.
Each variant runs once to warm the page cache (that first, cold run is printed too), then N
times (default 3), the variants alternating run by run: ``fsck`` with N worker processes, with N
threads (``MKCFS_DIGEST_THREADS`` set), with one process; ``gc --dry-run`` keeping IMAGE
(reads the image, lists the store, removes nothing). Medians of wall time. Nothing is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], threads_env: bool = False) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if threads_env:
        env["MKCFS_DIGEST_THREADS"] = "1"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mkcfs", *args], env=env, capture_output=True)
    elapsed = time.monotonic() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"{args}: exit {proc.returncode}: {proc.stderr.decode()}")
    return elapsed, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    opts = parser.parse_args()
    n = opts.threads
    variants = {
        f"fsck, {n} processes": (["fsck", "--json", f"--threads={n}", opts.store, opts.image], False),
        f"fsck, {n} threads": (["fsck", "--json", f"--threads={n}", opts.store, opts.image], True),
        "fsck, 1 process": (["fsck", "--json", "--threads=1", opts.store, opts.image], False),
        "gc --dry-run": (["gc", "--dry-run", "--json", opts.store, "--keep", opts.image], False),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, dict] = {}
    for name, (args, env) in variants.items():   # warm-up (the first one reads from disk)
        elapsed, results[name] = run(args, env)
        print(f"warm-up {name}: {elapsed:.2f} s", flush=True)
    for _ in range(opts.runs):
        for name, (args, env) in variants.items():
            times[name].append(run(args, env)[0])
    fsck = next(r for name, r in results.items() if name.startswith("fsck"))
    objects, nbytes = fsck["objects"], fsck["bytes"]
    print(f"store: {objects} objects, {nbytes / 1e6:.1f} MB; image {opts.image}; "
          f"medians of {opts.runs} interleaved runs")
    for name, values in times.items():
        median = statistics.median(values)
        rate = (f"{objects / median:,.0f} objects/s, {nbytes / 1e6 / median:,.1f} MB/s"
                if name.startswith("fsck") else
                f"would remove {results[name]['removed_objects']} objects")
        print(f"  {name:<22} {median:7.2f} s  (min {min(values):.2f})  {rate}")


if __name__ == "__main__":
    main()
