#!/usr/bin/env python3
"""Benchmark ``mkcomposefs --from-file`` on large dumpfiles: wall time and peak memory.

Inputs: ../shared/conformance/upstream/cs9-x86_64-minimal.dump.gz (22,010 lines, a real tree)
when present, a generated dumpfile of --entries entries (default 64,000: realistic mix of
directories, inline and external files, symlinks, xattrs), and any dumpfiles given with --input.
Each input is run --runs times in a fresh process; the median wall time and the median peak RSS
(GNU time) are reported. --reference PATH runs another mkcomposefs (e.g. the C 1.0.8 build)
on the same inputs, alternating with mkcfs run by run, prints the ratios of the medians and
checks that both produce identical images. Inputs given with --input are used as they are
(uncompressed ones are not copied: a 2M-entry dumpfile is large). --stages also builds each
input once in a fresh process stage by stage and prints each stage's CPU time and the RSS after
it (parse, flatten, lay out and emit), to see where the time and the memory go.

    python3 tools/bench_fromfile.py --runs 7 [--reference /path/to/mkcomposefs] [--stages]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CS9 = REPO.parent / "shared" / "conformance" / "upstream" / "cs9-x86_64-minimal.dump.gz"


def generate_dumpfile(entries: int, seed: int = 1) -> bytes:
    """A deterministic tree shaped like an OS image: ~12% directories, 70% files (two thirds
    external with digests), 15% symlinks, some hard links and xattrs."""
    rnd = random.Random(seed)
    lines = [b"/ 4096 40755 2 0 0 0 1700000000.0 - - - security.selinux=system_u:object_r:root_t:s0\\x00"]
    dirs = [b""]
    files: list[bytes] = []
    labels = [b"system_u:object_r:%s_t:s0\\x00" % n for n in (b"usr", b"lib", b"bin", b"etc", b"man")]
    for i in range(entries - 1):
        parent = dirs[rnd.randrange(len(dirs))] if rnd.random() < 0.9 else dirs[-1]
        name = b"%s-%d" % (rnd.choice((b"file", b"lib", b"share", b"x86_64", b"python3.11")), i)
        path = parent + b"/" + name
        mtime = b"%d.%d" % (1700000000 + rnd.randrange(100000), rnd.randrange(1000))
        label = b"security.selinux=" + rnd.choice(labels)
        r = rnd.random()
        if r < 0.12:
            lines.append(b"%s 4096 40755 2 0 0 0 %s - - - %s" % (path, mtime, label))
            dirs.append(path)
        elif r < 0.27:
            target = b"../lib/libfoo.so.%d" % rnd.randrange(100)
            lines.append(b"%s %d 120777 1 0 0 0 %s %s - - %s" % (path, len(target), mtime, target, label))
        elif r < 0.29 and files:
            lines.append(b"%s 0 @100644 1 0 0 0 %s %s - -" % (path, mtime, rnd.choice(files)))
        elif r < 0.52:
            size = rnd.randrange(0, 4000)
            content = b"".join(b"\\x%02x" % rnd.randrange(256) for _ in range(min(size, 64)))
            size = min(size, 64)
            lines.append(b"%s %d 100644 1 0 0 0 %s - %s - %s" % (path, size, mtime, content or b"-", label))
            files.append(path)
        else:
            size = rnd.randrange(65, 1 << 24)
            digest = hashlib.sha256(path).hexdigest().encode()
            lines.append(b"%s %d 100644 1 0 0 0 %s %s/%s - %s %s" % (
                path, size, mtime, digest[:2], digest[2:], digest, label))
            files.append(path)
    return b"\n".join(lines) + b"\n"


from benchrun import checkout_env, run_once  # noqa: E402  (tools/ is the script's directory)


def build_in_stages(dumpfile: Path) -> None:
    """Build ``dumpfile`` the way ``mkcomposefs --from-file`` does (mkcfs.build.image), timing
    each stage; prints one line. Run in a fresh process (``--stages-of``)."""
    import gc
    import resource
    import time

    sys.path.insert(0, str(REPO))
    from erofs.writer import build_image as emit
    from mkcfs.build.flatten import flatten_choosing_version
    from mkcfs.sources.dumpfile import parse_dumpfile

    def rss_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)

    gc.disable()   # as build_image_from: no collector passes over the build
    marks = [("start", time.process_time(), rss_mib())]
    with open(dumpfile, "rb") as stream:
        root = parse_dumpfile(stream, share_xattrs=True)
    marks.append(("parse", time.process_time(), rss_mib()))
    records, version = flatten_choosing_version(root, 0, 1, consume=True)
    del root
    marks.append(("flatten", time.process_time(), rss_mib()))
    emit(records, version)
    marks.append(("emit", time.process_time(), rss_mib()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("  stages (CPU s, RSS MiB after):  " + "  ".join(
        f"{name} {t - marks[i][1]:.3f} s {rss:.0f}" for i, (name, t, rss) in enumerate(marks[1:]))
        + f"  peak {peak:.0f}", flush=True)


def bench_pair(tools: list[tuple[str, list[str], Path]], dumpfile: Path,
               runs: int) -> dict[str, tuple[float, int, float]]:
    """Median wall time and median peak RSS per tool, the tools alternating run by run (so both
    see the same machine conditions)."""
    env = checkout_env()   # this checkout, as installed (bytecode cached)
    env.pop("CFS_PARSE_STRICT", None)
    cmds = {label: [*prefix, "--from-file", str(dumpfile), str(out)] for label, prefix, out in tools}
    for cmd in cmds.values():
        run_once(cmd, env)  # warm the page cache and bytecode caches
    results: dict[str, list[tuple[float, int, float]]] = {label: [] for label in cmds}
    for i in range(runs):
        order = list(cmds.items()) if i % 2 == 0 else list(cmds.items())[::-1]
        for label, cmd in order:
            results[label].append(run_once(cmd, env))
    medians = {}
    for label, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        rss = int(statistics.median(r[1] for r in rows))
        cpu = statistics.median(r[2] for r in rows)
        print(f"  {label:10s} median {wall:6.3f} s  (min {min(r[0] for r in rows):.3f})  "
              f"peak {rss / 1024:6.1f} MiB  CPU {cpu:6.2f} s")
        medians[label] = (wall, rss, cpu)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--entries", type=int, default=64000)
    parser.add_argument("--reference", help="another mkcomposefs binary to compare with")
    parser.add_argument("--input", action="append", default=[], help="extra dumpfile (.gz ok)")
    parser.add_argument("--no-generated", action="store_true",
                        help="only the cs9 dump and the --input files")
    parser.add_argument("--stages", action="store_true",
                        help="also time each build stage (one run per input)")
    parser.add_argument("--stages-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages_of is not None:
        build_in_stages(args.stages_of)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        inputs: list[tuple[str, Path]] = []
        sources = ([CS9] if CS9.exists() else []) + [Path(p).resolve() for p in args.input]
        for src in sources:
            if not src.name.endswith(".gz"):
                inputs.append((src.name, src))
                continue
            path = tmpdir / src.name.removesuffix(".gz")
            path.write_bytes(gzip.decompress(src.read_bytes()))
            inputs.append((src.name, path))
        if not args.no_generated:
            generated = tmpdir / f"generated-{args.entries}.dump"
            generated.write_bytes(generate_dumpfile(args.entries))
            inputs.append((generated.name, generated))

        ours = [sys.executable, "-m", "mkcfs.cli.mkcomposefs"]
        for name, path in inputs:
            with open(path, "rb") as f:
                lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
            print(f"{name}: {lines} lines")
            tools = [("mkcfs", ours, tmpdir / "ours.img")]
            if args.reference:
                tools.append(("reference", [args.reference], tmpdir / "ref.img"))
            medians = bench_pair(tools, path, args.runs)
            if args.reference:
                (wall, rss, cpu), (rwall, rrss, rcpu) = medians["mkcfs"], medians["reference"]
                same = (tmpdir / "ours.img").read_bytes() == (tmpdir / "ref.img").read_bytes()
                print(f"  ratio: wall {wall / rwall:.2f}x, peak memory {rss / rrss:.2f}x, "
                      f"CPU {cpu / rcpu:.2f}x, images {'identical' if same else 'DIFFERENT'}",
                      flush=True)
            if args.stages:
                subprocess.run([sys.executable, __file__, "--stages-of", str(path)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
