"""Benchmark ``mkcomposefs DIR IMAGE`` (directory source): wall time and peak memory, against
a reference mkcomposefs, for first builds and for rebuilds with the digest cache.

Usage::

    python3 tools/bench_directory.py [--runs N] [--reference PATH-TO-mkcomposefs]
        [--scenarios first,unchanged,touched,touched-unique] [--scratch DIR] [--args "..."]
        [DIR ...]

DIR defaults to /usr/share (metadata-heavy), /usr/lib/x86_64-linux-gnu (digest-heavy) and /usr.
Scenarios (one table row each per DIR):

* ``first``: a build without cache (the reference always reads everything);
* ``unchanged``: mkcfs rebuilds with ``--digest-cache`` (filled by the warm-up run), the tree
  unchanged;
* ``touched``: the tree is copied once under ``--scratch`` (default: a temporary directory in
  /var/tmp, removed at the end); before each run 1% of its non-empty regular files get their
  content changed with size, atime and mtime restored (``utimensat``, what ``touch -d`` does),
  which only the ctime shows; mkcfs rebuilds with the cache, and its image is compared byte for
  byte with the reference's (or, without a reference, with an uncached mkcfs build).
* ``touched-unique``: the same, but the files are chosen among those whose size no other file
  of the tree has (and with one link): their contents are unique before and after the change,
  which is what lets a rebuild rewrite the last image instead of building it
  (``mkcfs.build.reuse``); a random 1% of /usr also hits files that have copies.

Each command runs once to warm the page cache (mkcfs twice for a rebuild: the first fills the
cache, the second remembers its image), then N times (default 5), the tools alternating
run by run so both see the same machine conditions. Printed per row: the median and min wall
time, the median peak RSS (GNU time's ``%M`` when /usr/bin/time exists: a child forked from this
Python process would otherwise be charged this process's pages), the median CPU time (user +
system, workers included; on a shared machine it varies less than the wall time), and the
ratios mkcfs / reference of the medians. mkcfs runs as an installed package would (``python -m``,
bytecode cached). Nothing here needs root.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_DIRS = ["/usr/share", "/usr/lib/x86_64-linux-gnu", "/usr"]


from benchrun import checkout_env, run_once  # noqa: E402  (tools/ is the script's directory)


def regular_files(root: str) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_size > 0 and (st.st_mode & 0o170000) == 0o100000:
                found.append(path)
    return found


def unique_sized(files: list[str]) -> list[str]:
    """The ``files`` whose size no other of them has, with one link each."""
    sizes: dict[int, int] = {}
    stats = [os.lstat(path) for path in files]
    for st in stats:
        sizes[st.st_size] = sizes.get(st.st_size, 0) + 1
    return [path for path, st in zip(files, stats) if sizes[st.st_size] == 1 and st.st_nlink == 1]


def touch_one_percent(files: list[str], rnd: random.Random, among: list[str] | None = None) -> int:
    """Change the first byte of 1% of ``files`` (chosen ``among`` those, if given); restore
    size, atime and mtime."""
    chosen = rnd.sample(among or files, max(1, len(files) // 100))
    for path in chosen:
        st = os.lstat(path)
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return len(chosen)


def same_file(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", default=DEFAULT_DIRS)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reference", help="a mkcomposefs binary to compare with")
    ap.add_argument("--scenarios", default="first",
                    help="comma-separated: first, unchanged, touched, touched-unique "
                         "(default: first)")
    ap.add_argument("--scratch", help="where the touched scenario copies the trees")
    ap.add_argument("--args", default="", help="extra mkcomposefs options for both tools")
    ap.add_argument("--python", default=sys.executable)
    opts = ap.parse_args()
    scenarios = [s for s in opts.scenarios.split(",") if s]
    for s in scenarios:
        if s not in ("first", "unchanged", "touched", "touched-unique"):
            ap.error(f"unknown scenario {s}")

    env = checkout_env()
    extra = shlex.split(opts.args)
    work = tempfile.mkdtemp(prefix="bench-dir-")
    scratch = opts.scratch or tempfile.mkdtemp(prefix="bench-dir-tree-", dir="/var/tmp")
    ours_img, ref_img = os.path.join(work, "ours.img"), os.path.join(work, "ref.img")
    ours_cmd = [opts.python, "-m", "mkcfs.cli.mkcomposefs", *extra]
    ref_cmd = [opts.reference, *extra] if opts.reference else None
    try:
        load = os.getloadavg()
        print(f"# {len(os.sched_getaffinity(0))} CPUs, load average {load[0]:.2f} at start, "
              f"{opts.runs} interleaved runs after one warm-up, options: "
              f"{shlex.join(extra) or '(none)'}")
        print(f"{'directory':26s} {'scenario':10s} {'tool':10s} {'median s':>9s} {'min s':>7s} "
              f"{'peak MB':>8s} {'CPU s':>7s}")
        for directory in opts.dirs:
            for scenario in scenarios:
                tree = directory
                files: list[str] = []
                among: list[str] | None = None
                touching = scenario.startswith("touched")
                if touching:
                    tree = os.path.join(scratch, directory.strip("/").replace("/", "_"))
                    if not os.path.exists(tree):
                        subprocess.run(["cp", "-a", "--reflink=auto", directory, tree],
                                       check=True)
                    files = regular_files(tree)
                    if scenario == "touched-unique":
                        among = unique_sized(files)
                cache = os.path.join(work, f"cache-{scenario}-{directory.strip('/').replace('/', '_')}")
                mine = [*ours_cmd, *([f"--digest-cache={cache}"] if scenario != "first" else []),
                        tree, ours_img]
                tools = [("mkcfs", mine)]
                if ref_cmd:
                    tools.append(("reference", [*ref_cmd, tree, ref_img]))
                if touching:
                    time.sleep(3.5)   # let the copy's ctimes age past the cache's racy margin
                for _name, cmd in tools:   # warm-up (fills the cache)
                    run_once(cmd, env)
                if scenario != "first":   # a rebuild: it remembers its image (a pipeline's
                    run_once(mine, env)   # steady state; see mkcfs.build.reuse)
                results: dict[str, list[tuple[float, int, float]]] = {name: [] for name, _ in tools}
                rnd = random.Random(1)
                mismatches = 0
                for i in range(opts.runs):
                    if touching:
                        touch_one_percent(files, rnd, among)
                    order = tools if i % 2 == 0 else tools[::-1]
                    for name, cmd in order:
                        results[name].append(run_once(cmd, env))
                    if scenario != "first":
                        if ref_cmd is None:
                            run_once([*ours_cmd, tree, ref_img], env)
                        mismatches += not same_file(ours_img, ref_img)
                medians = {}
                for name, _ in tools:
                    walls = [r[0] for r in results[name]]
                    peak = statistics.median(r[1] for r in results[name]) / 1024
                    cpu = statistics.median(r[2] for r in results[name])
                    medians[name] = (statistics.median(walls), peak, cpu)
                    print(f"{directory:26s} {scenario:10s} {name:10s} "
                          f"{statistics.median(walls):9.2f} {min(walls):7.2f} {peak:8.0f} "
                          f"{cpu:7.2f}", flush=True)
                if "reference" in medians:
                    (ours, our_mem, our_cpu) = medians["mkcfs"]
                    (ref, ref_mem, ref_cpu) = medians["reference"]
                    print(f"{'':26s} {scenario:10s} {'ratio':10s} {ours / ref:8.2f}x "
                          f"{'':7s} {our_mem / ref_mem:7.2f}x {our_cpu / ref_cpu:6.2f}x",
                          flush=True)
                if scenario != "first":
                    print(f"{'':26s} {scenario:10s} images equal to an uncached build: "
                          f"{opts.runs - mismatches}/{opts.runs}", flush=True)
        print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not opts.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
