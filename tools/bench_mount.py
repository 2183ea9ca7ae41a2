"""Benchmark ``mkcfs mount`` of an OCI image: the first mount (builds the image into an empty
store) and the second (finds it), against ``umoci unpack`` of the same image (what LXC's
lxc-oci template does without a mount helper) and a bare ``python3 -c pass`` (the interpreter's
own start, the floor of any Python command).

Runs are interleaved (one of each per round) and medians reported, with the ratios measured in
the same run. Needs root. Without --image, builds the image the issue names: umoci init/new/
unpack, ``/usr/lib/x86_64-linux-gnu`` copied into the rootfs, repack (one gzip layer).

    sudo python3 tools/bench_mount.py [--image OCI_DIR:REF] [--runs 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchrun import checkout_env  # tools/ is the script's directory

TREE = "/usr/lib/x86_64-linux-gnu"


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return elapsed


def make_image(work: Path) -> str:
    layout, bundle = work / "oci", work / "bundle"
    env = dict(os.environ)
    run(["umoci", "init", "--layout", str(layout)], env)
    run(["umoci", "new", "--image", f"{layout}:bench"], env)
    run(["umoci", "unpack", "--image", f"{layout}:bench", str(bundle)], env)
    (bundle / "rootfs" / "usr/lib").mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", TREE, str(bundle / "rootfs/usr/lib/")], env)
    run(["umoci", "repack", "--image", f"{layout}:bench", str(bundle)], env)
    shutil.rmtree(bundle)
    return f"{layout}:bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="OCI_DIR:REF (default: build the /usr/lib image)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", help="where to put stores and unpacks (default: a temp dir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_mount: needs root (it mounts)")

    env = checkout_env()   # the tool as installed: byte-compiled once, not on every run
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        image = args.image or make_image(work)
        mkcfs = [sys.executable, "-m", "mkcfs"]
        mnt = work / "mnt"
        mnt.mkdir()
        kept = work / "kept-store"
        layout, _, ref = image.rpartition(":")
        run([*mkcfs, "mount", "--store", str(kept), image, str(mnt)], env)   # warm-up + build
        run([*mkcfs, "umount", str(mnt)], env)

        times: dict[str, list[float]] = {"python": [], "umoci": [], "first": [], "second": []}
        for _ in range(args.runs):
            times["python"].append(run([sys.executable, "-c", "pass"], env))
            unpack = work / "unpack"
            times["umoci"].append(run(["umoci", "unpack", "--image", f"{layout}:{ref}",
                                       str(unpack)], env))
            shutil.rmtree(unpack)
            fresh = work / "fresh-store"
            times["first"].append(run([*mkcfs, "mount", "--store", str(fresh), image,
                                       str(mnt)], env))
            run([*mkcfs, "umount", str(mnt)], env)
            shutil.rmtree(fresh)
            times["second"].append(run([*mkcfs, "mount", "--store", str(kept), image,
                                        str(mnt)], env))
            run([*mkcfs, "umount", str(mnt)], env)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"image {image}, {args.runs} interleaved runs, medians:")
    print(f"  python3 -c pass           {med['python']:7.3f} s")
    print(f"  umoci unpack              {med['umoci']:7.3f} s")
    print(f"  mkcfs mount, first        {med['first']:7.3f} s  "
          f"({med['first'] / med['umoci']:.2f}x umoci unpack)")
    print(f"  mkcfs mount, second       {med['second']:7.3f} s  "
          f"({med['second'] / med['python']:.2f}x python3 -c pass, "
          f"{med['second'] - med['python']:+.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
