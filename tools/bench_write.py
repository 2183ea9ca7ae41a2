"""Benchmark writing a large file through ``mkcfs.fsutil.write_atomically`` with ``write`` calls
of several sizes: the one ``WRITE_CHUNK`` is chosen by.

Each round writes the same data once per call size, in a shuffled order, to a file in
``--dir`` (a temporary file renamed over the last one, as an image rebuild does), after a pause
that lets the previous write back. Prints per call size the median and the spread of the
rounds, and the ratio of each median to that of ``WRITE_CHUNK``.

    python3 tools/bench_write.py [--size-mb 281 | --input FILE] [--rounds 6] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mkcfs import fsutil  # noqa: E402

_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 1 << 40)


def _label(size: int) -> str:
    return "one call" if size >= 1 << 40 else f"{size >> 10} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=281, help="random data of this size")
    ap.add_argument("--input", help="write the contents of this file instead")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds before each write")
    ap.add_argument("--dir", default="/var/tmp", help="where the file is written")
    opts = ap.parse_args()
    if opts.input:
        with open(opts.input, "rb") as f:
            data = f.read()
    else:
        block = os.urandom(1 << 20)
        data = block * opts.size_mb
    work = tempfile.mkdtemp(prefix="bench-write-", dir=opts.dir)
    target = os.path.join(work, "out.img")
    chosen = fsutil.WRITE_CHUNK
    sizes = sorted(set(_SIZES) | {chosen})
    times: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        fsutil.write_atomically(target, data)
        for _ in range(opts.rounds):
            order = list(sizes)
            random.shuffle(order)
            for size in order:
                time.sleep(opts.pause)
                fsutil.WRITE_CHUNK = size
                start = time.perf_counter()
                fsutil.write_atomically(target, data)
                times[size].append(time.perf_counter() - start)
    finally:
        fsutil.WRITE_CHUNK = chosen
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    print(f"# {len(data) / 1e6:.0f} MB into {opts.dir}, {opts.rounds} rounds, "
          f"write_atomically (ms)")
    base = statistics.median(times[chosen])
    for size in sizes:
        runs = sorted(times[size])
        median = statistics.median(runs)
        mark = "  (WRITE_CHUNK)" if size == chosen else ""
        print(f"{_label(size):>10}: median {median * 1000:7.1f}  min {runs[0] * 1000:7.1f}  "
              f"max {runs[-1] * 1000:7.1f}  ratio {median / base:5.2f}x{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
