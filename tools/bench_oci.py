"""Benchmark ``mkcomposefs --digest-store=S oci:...`` against what a user does today:
``umoci unpack`` and then ``mkcomposefs --digest-store=S ROOTFS``.

Usage::

    python3 tools/bench_oci.py [--runs N] [--reference PATH-TO-mkcomposefs] [--workdir DIR]
                               [--tree /usr/lib/x86_64-linux-gnu]
    python3 tools/bench_oci.py --decompressors [--workdir DIR]

The first run prepares, in WORKDIR (default /tmp/mkcfs-bench-oci, reused by later runs): an OCI
layout whose one layer (gzip, written by ``umoci repack``) holds TREE, and the same image with a
zstd layer (``skopeo copy --dest-compress-format=zstd``). Needs root (umoci keeps owners only
as root).

Each run uses a fresh, empty store. Commands, interleaved run by run:

* ``oci-gzip`` / ``oci-zstd`` -- this package: ``mkcomposefs --digest-store=S oci:LAYOUT IMG``;
* ``today`` -- ``umoci unpack`` of the gzip image, then the reference mkcomposefs (default:
  ours) ``--digest-store=S ROOTFS IMG`` (wall time of both; peak RSS the larger);
* ``directory`` -- ours on the unpacked tree (the memory baseline: peak RSS of a directory
  build of the same tree; its unpack is not timed).

Printed: median/min/max wall and peak RSS per command; then the ratios oci/today (target
<= 0.5) and peak memory oci/directory (target <= 1.5). ``--decompressors`` times the gzip
decompressors (stdlib zlib, isal, zlib-ng when installed) and zstandard on the layer.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import benchrun  # noqa: E402  (tools/ is the script's directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """``(wall seconds, peak RSS in KiB)`` of one command."""
    wall, peak, _cpu = benchrun.run_once(argv, env)
    return wall, peak


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def prepare(work: str, tree: str) -> tuple[str, str]:
    layout, zstd = os.path.join(work, "layout"), os.path.join(work, "zstd")
    if os.path.exists(os.path.join(zstd, "index.json")):
        return layout, zstd
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    bundle = os.path.join(work, "bundle")
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:img")
    sh("umoci", "unpack", "--image", f"{layout}:img", bundle)
    sh("cp", "-a", tree, os.path.join(bundle, "rootfs", os.path.basename(tree)))
    sh("umoci", "repack", "--image", f"{layout}:img", bundle)
    shutil.rmtree(bundle)
    sh("skopeo", "copy", "--dest-compress-format=zstd", f"oci:{layout}:img", f"oci:{zstd}:img")
    return layout, zstd


def layer_blob(layout: str) -> str:
    import json
    index = json.load(open(os.path.join(layout, "index.json")))
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.load(open(os.path.join(layout, "blobs", "sha256", digest)))
    return os.path.join(layout, "blobs", "sha256", manifest["layers"][0]["digest"].split(":")[1])


def bench_decompressors(layout: str, zstd: str, runs: int) -> None:
    import zlib

    def gz(module) -> float:
        start = time.perf_counter()
        d = module.decompressobj(31)
        with open(layer_blob(layout), "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                while chunk:
                    d.decompress(chunk, 1 << 20)
                    chunk = d.unconsumed_tail
        return time.perf_counter() - start

    def zs() -> float:
        import zstandard
        start = time.perf_counter()
        with open(layer_blob(zstd), "rb", buffering=0) as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=1 << 20,
                                                                read_across_frames=True)
            while reader.read(1 << 20):
                pass
        return time.perf_counter() - start

    candidates = {"zlib": lambda: gz(zlib)}
    try:
        from isal import isal_zlib
        candidates["isal"] = lambda: gz(isal_zlib)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng
        candidates["zlib-ng"] = lambda: gz(zlib_ng)
    except ImportError:
        pass
    candidates["zstandard"] = zs
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():
            times[name].append(fn())
    for name, values in times.items():
        print(f"{name:10s} median {statistics.median(values):6.2f} s  min {min(values):6.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reference", help="the mkcomposefs of 'today' (default: ours)")
    ap.add_argument("--workdir", default="/tmp/mkcfs-bench-oci")
    ap.add_argument("--tree", default="/usr/lib/x86_64-linux-gnu")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--decompressors", action="store_true")
    opts = ap.parse_args()

    layout, zstd = prepare(opts.workdir, opts.tree)
    if opts.decompressors:
        bench_decompressors(layout, zstd, opts.runs)
        return 0
    env = dict(os.environ, PYTHONPATH=REPO)
    ours = [opts.python, "-m", "mkcfs.cli.mkcomposefs"]
    reference = [opts.reference] if opts.reference else ours
    tmp = tempfile.mkdtemp(prefix="bench-oci-", dir=opts.workdir)
    store, image, bundle = (os.path.join(tmp, n) for n in ("store", "img", "bundle"))

    def fresh() -> None:
        shutil.rmtree(store, ignore_errors=True)

    def oci(src: str) -> tuple[float, int]:
        fresh()
        return run_once([*ours, f"--digest-store={store}", f"oci:{src}:img", image], env)

    def today() -> tuple[float, int]:
        fresh()
        shutil.rmtree(bundle, ignore_errors=True)
        wall1, rss1 = run_once(["umoci", "unpack", "--image", f"{layout}:img", bundle])
        wall2, rss2 = run_once([*reference, f"--digest-store={store}",
                                os.path.join(bundle, "rootfs"), image], env)
        return wall1 + wall2, max(rss1, rss2)

    def directory() -> tuple[float, int]:
        fresh()
        if not os.path.isdir(bundle):
            sh("umoci", "unpack", "--image", f"{layout}:img", bundle)
        return run_once([*ours, f"--digest-store={store}", os.path.join(bundle, "rootfs"),
                         image], env)

    commands = {"oci-gzip": lambda: oci(layout), "oci-zstd": lambda: oci(zstd),
                "today": today, "directory": directory}
    try:
        load = os.getloadavg()
        print(f"# {len(os.sched_getaffinity(0))} CPUs, load average {load[0]:.2f} at start, "
              f"{opts.runs} interleaved runs after one warm-up; tree {opts.tree}; "
              f"today = umoci unpack + {shlex.join(reference)}")
        for fn in commands.values():
            fn()
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
        for _ in range(opts.runs):
            for name, fn in commands.items():
                results[name].append(fn())
        print(f"{'command':10s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'peak MB':>8s}")
        med: dict[str, tuple[float, float]] = {}
        for name, values in results.items():
            walls = [v[0] for v in values]
            peak = statistics.median(v[1] for v in values) / 1024
            med[name] = (statistics.median(walls), peak)
            print(f"{name:10s} {med[name][0]:9.2f} {min(walls):7.2f} {max(walls):7.2f} "
                  f"{peak:8.0f}")
        for name in ("oci-gzip", "oci-zstd"):
            print(f"{name}: wall {med[name][0] / med['today'][0]:.2f}x today (target <= 0.5), "
                  f"peak memory {med[name][1] / med['directory'][1]:.2f}x a directory build "
                  f"(target <= 1.5)")
        print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
