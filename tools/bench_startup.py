#!/usr/bin/env python3
"""Benchmark the fixed cost of a command: start-up, imports and exit, on inputs too small to
matter.

Rows: ``mkcomposefs --from-file`` of a one-line dumpfile (the root directory) and
``composefs-info dump`` of its image, by mkcfs of this checkout (run as ``python -m``, as the
other benchmarks run it), by each ``--compare`` checkout (e.g. a copy of an older commit) and by
the reference tools (``--reference``: an mkcomposefs, with the composefs-info beside it), plus
``python -c pass`` (the interpreter alone). Every row runs once to warm up (bytecode cached),
then --runs times, all rows interleaved run by run; medians of wall time, CPU time (user +
system) and peak RSS, and the ratios to the reference of the same runs::

    python3 tools/bench_startup.py --runs 15 --reference /path/to/mkcomposefs [--compare DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchrun import REPO, checkout_env, run_once  # noqa: E402  (tools/ is the script's directory)

#: the smallest tree: the root directory alone
TINY_DUMP = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--reference", help="an mkcomposefs binary (composefs-info beside it)")
    parser.add_argument("--compare", action="append", default=[], metavar="CHECKOUT",
                        help="also run the mkcfs of this checkout (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "tiny.dump"
        dump.write_bytes(TINY_DUMP)
        image = Path(tmp) / "tiny.img"
        out = Path(tmp) / "out.img"
        here = checkout_env()
        checkouts = {"mkcfs": REPO}
        for path in args.compare:
            checkouts[f"mkcfs {os.path.basename(os.path.abspath(path))}"] = os.path.abspath(path)
        Row = tuple[list[str], str]   # argv, checkout (the directory it runs in, on PYTHONPATH)
        rows: dict[str, dict[str, Row]] = {"from-file": {}, "dump": {}}
        for label, checkout in checkouts.items():
            rows["from-file"][label] = ([sys.executable, "-m", "mkcfs.cli.mkcomposefs",
                                         "--from-file", str(dump), str(out)], checkout)
            rows["dump"][label] = ([sys.executable, "-m", "mkcfs.cli.composefs_info", "dump",
                                    str(image)], checkout)
        if args.reference:
            info = os.path.join(os.path.dirname(args.reference), "composefs-info")
            rows["from-file"]["reference"] = ([args.reference, "--from-file", str(dump), str(out)],
                                              REPO)
            rows["dump"]["reference"] = ([info, "dump", str(image)], REPO)
        rows["python -c pass"] = {"python": ([sys.executable, "-c", "pass"], REPO)}
        # the image to dump, by this checkout
        run_once([sys.executable, "-m", "mkcfs.cli.mkcomposefs", "--from-file", str(dump),
                  str(image)], here)
        flat = [(work, label, argv, dict(here, PYTHONPATH=checkout), checkout)
                for work, tools in rows.items() for label, (argv, checkout) in tools.items()]
        results: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
        for work, label, argv, env, cwd in flat:
            run_once(argv, env, cwd)   # warm up: bytecode, page cache
            results[work, label] = []
        for _ in range(args.runs):
            for work, label, argv, env, cwd in flat:
                results[work, label].append(run_once(argv, env, cwd))
    print(f"medians of {args.runs} interleaved runs")
    for work, tools in rows.items():
        print(f"{work}:")
        medians = {}
        for label in tools:
            runs = results[work, label]
            medians[label] = (statistics.median(r[0] for r in runs),
                              statistics.median(r[2] for r in runs),
                              statistics.median(r[1] for r in runs) / 1024)
        ref = medians.get("reference")
        for label, (wall, cpu, rss) in medians.items():
            ratio = (f"  wall {wall / ref[0]:5.1f}x  cpu {cpu / ref[1]:5.1f}x  peak {rss / ref[2]:4.1f}x"
                     if ref and label != "reference" else "")
            print(f"  {label:22s} {wall * 1000:7.1f} ms wall {cpu * 1000:7.1f} ms cpu "
                  f"{rss:6.1f} MB peak{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
