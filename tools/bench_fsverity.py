"""Benchmark fsverity.digest_bytes / FsVerityHasher throughput on in-memory data.

Usage: python3 tools/bench_fsverity.py [MiB] [runs]   (defaults: 256 MiB, 5 runs)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fsverity import FsVerityHasher, digest_bytes  # noqa: E402


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    data = os.urandom(mib << 20)
    size = len(data)

    def bench(name: str, fn) -> None:
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            rates.append(size / (time.perf_counter() - t0) / 1e6)
        print(f"{name:28s} median {statistics.median(rates):7.0f} MB/s  "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")

    def streamed() -> None:
        h = FsVerityHasher()
        mv = memoryview(data)
        for i in range(0, size, 1 << 20):
            h.update(mv[i : i + (1 << 20)])
        h.digest()

    print(f"{mib} MiB random data, {runs} runs, single thread")
    bench("digest_bytes", lambda: digest_bytes(data))
    bench("FsVerityHasher 1 MiB chunks", streamed)


if __name__ == "__main__":
    main()
