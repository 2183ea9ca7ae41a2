#!/usr/bin/env python3
"""Fuzz the image reader: mutated composefs images through the ``composefs-info dump`` logic.

Each input goes through what ``composefs-info dump`` and ``composefs-dump`` do with an image:
``Image`` (header + superblock), ``load_tree`` in both hard-link modes, ``format_dumpfile`` and
the ``ls``/``objects`` walks, then ``build_image`` of the loaded tree. The only exceptions
allowed are ``ImageFormatError`` from reading and the project's ``CfsError`` from writing; anything
else is a crash. Every input must also finish within ``--timeout`` seconds (a hang) and within
the address-space limit (``--memory``, MiB).

Two engines:

* ``--engine=mutate`` (default): seeded structure-aware mutations of seed images built by our
  writer: bit flips, interesting values written over inode, dirent, xattr and superblock fields,
  truncation, copied ranges (overlapping extents), dirents pointed at ancestors (cycles), random
  tails. Reproducible from ``--seed``.
* ``--engine=atheris``: coverage-guided fuzzing with atheris (libFuzzer), when
  ``pip install atheris`` works; the same seeds form the starting corpus.

Crashing inputs are written to ``--save-dir`` (default ``tests/regressions/``) as
``crash-<sha256 prefix>.img``; ``tests/test_mutation.py`` replays every file there.

Usage::

    python3 tools/fuzz_reader.py --runs 10000 [--seed 1] [--engine mutate|atheris] [--image IMG]...

It prints the number of inputs, how many were rejected with ImageFormatError, crashes, hangs
and the time taken.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import signal
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from erofs.errors import ImageFormatError  # noqa: E402
from erofs.reader import Image  # noqa: E402
from mkcfs.sources.dumpfile import format_dumpfile, parse_dumpfile  # noqa: E402
from mkcfs.errors import CfsError  # noqa: E402
from mkcfs.build.image import build_image  # noqa: E402
from mkcfs.tree import HardLink, Node  # noqa: E402
from mkcfs.inspect.unflatten import load_tree  # noqa: E402

DEFAULT_SAVE_DIR = REPO / "tests" / "regressions"

_DIGEST = "838b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4"

#: Seed trees (composefs-dump(5) text) covering what the reader decodes: inline, block and
#: external files, hard links (also across directories), symlinks (inline and in a block),
#: devices, fifos, whiteouts (v0 and v1), shared and inline xattrs, overlay xattrs to escape,
#: extended inodes, multi-block directories.
SEED_DUMPS: list[tuple[str, bytes, dict]] = [
    ("mixed", (
        "/ 4096 40755 3 0 0 0 1700000000.0 - - - security.selinux=system_u:object_r:root_t:s0\\x00\n"
        f"/big 5000 100644 2 0 0 0 1700000000.0 83/{_DIGEST[2:]} - {_DIGEST} user.tag=shared\n"
        "/dir 0 40755 2 1000 1000 0 1700000123.456 - - - trusted.overlay.opaque=y\n"
        "/dir/gone 0 20000 1 0 0 0 0.0 - - -\n"
        "/dir/hello.txt 6 100644 1 1000 1000 0 1700000000.0 - hello\\n - user.tag=shared\n"
        "/dir/mid 3000 100600 1 0 0 0 1700000000.0 - " + "ab" * 1500 + " -\n"
        "/dir/tail 4500 100600 1 0 0 0 1700000000.0 - " + "cd" * 2250 + " -\n"
        f"/hl 5000 @100644 2 0 0 0 1700000000.0 /big - {_DIGEST}\n"
        "/link 13 120777 1 0 0 0 1700000000.0 dir/hello.txt - -\n"
        "/longlink 4000 120777 1 0 0 0 1700000000.0 " + "x" * 4000 + " - -\n"
        "/null 0 20666 1 0 0 259 1700000000.0 - - -\n"
        "/sda 0 60660 1 0 6 2048 1700000000.0 - - -\n"
        "/fifo 0 10644 1 0 0 0 1700000000.0 - - - trusted.overlay.x=1 user.overlay.y=2\n"
        "/abc 10 100644 1 0 0 0 1700000000.0 abc - -\n"
        "/abd 10 100644 1 0 0 0 1700000000.0 abc - -\n"
    ).encode(), {}),
    ("bigdir", ("/ 0 40755 3 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n"
                + "".join(f"/d/entry-with-a-long-name-{i:03d} 0 100644 1 0 0 0 0.0 - - -\n"
                          for i in range(250))
                + "/d/sub 0 40755 2 0 0 0 0.0 - - -\n"
                + "/d/sub/x 1 100644 1 0 0 0 0.0 - y -\n"
                + "/l4095 4095 120777 1 0 0 0 0.0 " + "b" * 4095 + " - -\n").encode(), {}),
    ("whiteouts-v0", (b"/ 0 40755 3 0 0 0 0.0 - - -\n"
                      b"/d 0 40755 2 0 0 0 0.0 - - - trusted.overlay.opaque=y\n"
                      b"/d/gone 0 20000 1 0 0 0 0.0 - - -\n"
                      b"/e 0 40755 2 0 0 0 5.5 - - - user.a=1 user.b=2 user.c=3\n"
                      b"/e/f 1 100644 1 70000 70000 0 -1.999999999 - z - user.a=1\n"),
     {"min_version": 0, "max_version": 0}),
]


def build_seeds() -> list[tuple[str, bytes]]:
    """The seed images, written by our own writer."""
    seeds = []
    for name, dump, kwargs in SEED_DUMPS:
        seeds.append((name, bytes(build_image(parse_dumpfile(dump), **kwargs).data)))
    return seeds


# --- the code under test ----------------------------------------------------------------------

def exercise(data: bytes) -> str:
    """Run ``data`` through the composefs-info/composefs-dump logic.

    Returns ``"ok"`` or ``"rejected"`` (ImageFormatError / CfsError); any other exception
    propagates (a crash)."""
    try:
        image = Image(data)
        root = load_tree(image)
        format_dumpfile(root)
        _walk_like_ls_and_objects(root)
        writer_root = load_tree(image, hardlinks="writer")
    except ImageFormatError:
        return "rejected"
    try:
        build_image(writer_root, min_version=min(image.version, 1), max_version=min(image.version, 1))
    except CfsError:
        pass
    return "ok"


def _walk_like_ls_and_objects(root: Node) -> None:
    stack = [root]
    while stack:
        node = stack.pop()
        for _name, child in sorted((node.children or {}).items()):
            if isinstance(child, Node):
                stack.append(child)
            else:
                assert isinstance(child, HardLink) and isinstance(child.target, Node)


# --- structure-aware mutator ------------------------------------------------------------------

_INTERESTING = [0, 1, 2, 3, 7, 8, 11, 12, 13, 31, 32, 36, 63, 64, 255, 256, 4095, 4096, 4097,
                0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


class Mutator:
    """Mutations of one seed image, aimed at the structures the reader decodes."""

    def __init__(self, seed: bytes, rng: random.Random) -> None:
        self.seed = seed
        self.rng = rng
        image = Image(seed)
        self.root_nid = image.root_nid
        self.inodes: list[int] = []       # inode offsets
        self.xattr_bodies: list[tuple[int, int]] = []
        self.dirent_tables: list[tuple[int, int]] = []   # (offset, count)
        self.dirs: list[int] = []         # nids of directories
        seen = {image.root_nid}
        queue = [image.root_nid]
        while queue:
            nid = queue.pop()
            ino = image.inode(nid)
            self.inodes.append(ino.offset)
            if ino.xattr_size:
                self.xattr_bodies.append((ino.xattr_offset, ino.xattr_size))
            if ino.mode & 0o170000 == 0o040000:
                self.dirs.append(nid)
                for offset, length in image.extents(ino):
                    names = image.dirent_block(offset, length)
                    self.dirent_tables.append((offset, len(names)))
                    for _name, child, _t in names:
                        if child not in seen:
                            seen.add(child)
                            queue.append(child)

    def value(self, width: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            v = rng.choice(_INTERESTING)
        elif r < 0.8:
            v = rng.choice(self.inodes) // 32 + rng.randint(-2, 2)
        else:
            v = rng.getrandbits(width * 8)
        return v & ((1 << (width * 8)) - 1)

    def put(self, buf: bytearray, offset: int, width: int, value: int | None = None) -> None:
        if 0 <= offset and offset + width <= len(buf):
            buf[offset:offset + width] = (self.value(width) if value is None else value).to_bytes(
                width, "little")

    def mutate(self) -> bytes:
        rng = self.rng
        buf = bytearray(self.seed)
        for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
            self.one(buf)
        if rng.random() < 0.05:
            del buf[rng.randrange(len(buf)):]
        return bytes(buf)

    def one(self, buf: bytearray) -> None:
        rng = self.rng
        kind = rng.randrange(12)
        n = len(buf)
        if kind == 0:                                   # bit flips anywhere
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(n)
                buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:                                 # superblock field
            field = rng.choice([(1038, 2), (1040, 8), (1048, 8), (1056, 4), (1060, 4),
                                (1064, 4), (1068, 4), (1036, 1), (0, 4), (4, 4), (12, 4)])
            self.put(buf, *field)
        elif kind in (2, 3):                            # inode header field
            base = rng.choice(self.inodes)
            field = rng.choice([(0, 2), (2, 2), (4, 2), (6, 2), (8, 4), (8, 8), (16, 4),
                                (24, 4), (28, 4), (32, 8), (40, 4), (44, 4)])
            self.put(buf, base + field[0], field[1])
        elif kind == 4 and self.dirent_tables:          # dirent nid / nameoff
            offset, count = rng.choice(self.dirent_tables)
            i = rng.randrange(max(count, 1))
            if rng.random() < 0.5:
                self.put(buf, offset + 12 * i, 8)
            else:
                self.put(buf, offset + 12 * i + 8, 2)
        elif kind == 5 and self.dirent_tables:          # cycle: a dirent to an ancestor
            offset, count = rng.choice(self.dirent_tables)
            i = rng.randrange(max(count, 1))
            self.put(buf, offset + 12 * i, 8, rng.choice(self.dirs))
        elif kind == 6 and self.xattr_bodies:           # xattr body: header / entries / ids
            offset, size = rng.choice(self.xattr_bodies)
            pos = offset + rng.randrange(0, size, 1)
            self.put(buf, pos, rng.choice((1, 2, 4)))
        elif kind == 7:                                 # copy a range elsewhere (overlaps)
            a, b = rng.randrange(n), rng.randrange(n)
            length = rng.choice((4, 12, 32, 64, 4096))
            chunk = buf[a:a + length]
            buf[b:b + len(chunk)] = chunk
            del buf[n:]
        elif kind == 8 and len(self.inodes) > 1:        # an inode's i_u -> another's block
            a = rng.choice(self.inodes)
            self.put(buf, a + 16, 4, rng.choice(self.inodes) // 4096 + rng.randint(0, 3))
        elif kind == 9:                                 # random garbage run
            pos = rng.randrange(n)
            length = rng.randint(1, 64)
            buf[pos:pos + length] = rng.randbytes(min(length, n - pos))
        elif kind == 10:                                # huge counts
            base = rng.choice(self.inodes)
            self.put(buf, base + 2, 2, rng.choice((0xFFFF, 0x8000, 0x4000, 1, 2)))
            if self.xattr_bodies:
                offset, _ = rng.choice(self.xattr_bodies)
                self.put(buf, offset + 4, 1, rng.choice((255, 128, 64)))
        else:                                           # truncate or grow
            if rng.random() < 0.5:
                del buf[rng.randrange(n):]
            else:
                buf.extend(rng.randbytes(rng.choice((1, 100, 4096))))


def random_images(rng: random.Random) -> bytes:
    """A random image: sometimes with a valid header and superblock, random elsewhere."""
    size = rng.choice((0, 31, 1024, 4095, 4096, 8192, 16384))
    data = bytearray(rng.randbytes(size))
    if size >= 1152 and rng.random() < 0.7:
        data[0:16] = struct.pack("<IIII", 0xD078629A, 1, 0, rng.randint(0, 2))
        data[1024:1028] = struct.pack("<I", 0xE0F5E1E2)
        data[1038:1040] = struct.pack("<H", rng.choice((36, 37, 0, 1, rng.randrange(65536))))
        data[1064:1072] = struct.pack("<II", 0, rng.randrange(4))
    return bytes(data)


# --- drivers ----------------------------------------------------------------------------------

class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


def save_crash(data: bytes, save_dir: Path, exc: BaseException) -> Path:
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / f"crash-{hashlib.sha256(data).hexdigest()[:16]}.img"
    path.write_bytes(data)
    (path.with_suffix(".txt")).write_text(f"{type(exc).__name__}: {exc}\n")
    return path


def run_mutate(runs: int, seed: int, timeout: float, save_dir: Path, verbose: bool,
               images: list[Path] = ()) -> int:
    rng = random.Random(seed)
    seeds = build_seeds() + [(str(p), p.read_bytes()) for p in images]
    mutators = [Mutator(data, rng) for _name, data in seeds]
    counts = {"ok": 0, "rejected": 0, "crash": 0, "hang": 0}
    signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    slowest = 0.0
    for i in range(runs):
        if rng.random() < 0.05:
            data = random_images(rng)
        else:
            data = rng.choice(mutators).mutate()
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            counts[exercise(data)] += 1
        except _Timeout:
            counts["hang"] += 1
            print(f"HANG ({timeout}s): {save_crash(data, save_dir, TimeoutError('hang'))}")
        except MemoryError as exc:
            counts["crash"] += 1
            print(f"MEMORY: {save_crash(data, save_dir, exc)}")
        except Exception as exc:  # noqa: BLE001 - that is the point
            counts["crash"] += 1
            path = save_crash(data, save_dir, exc)
            print(f"CRASH {type(exc).__name__}: {exc} -> {path}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest = max(slowest, time.perf_counter() - t0)
        if verbose and (i + 1) % 1000 == 0:
            print(f"  {i + 1} inputs, {time.perf_counter() - start:.1f} s", flush=True)
    elapsed = time.perf_counter() - start
    print(f"engine=mutate seed={seed}: {runs} inputs in {elapsed:.1f} s "
          f"({runs / elapsed:.0f}/s, slowest {slowest * 1000:.0f} ms): {counts['ok']} read, "
          f"{counts['rejected']} rejected with ImageFormatError, {counts['crash']} crashes, "
          f"{counts['hang']} hangs")
    return 1 if counts["crash"] or counts["hang"] else 0


def run_atheris(runs: int, seed: int, timeout: float, save_dir: Path, memory: int,
                images: list[Path] = ()) -> int:
    import atheris  # noqa: F401 - optional dependency
    import tempfile

    save_dir.mkdir(parents=True, exist_ok=True)
    seeds = build_seeds() + [(p.name, p.read_bytes()) for p in images]
    # libFuzzer keeps the inputs that found new coverage here; reused from run to run
    corpus = Path(tempfile.gettempdir()) / "cfs-fuzz-reader-corpus"
    corpus.mkdir(exist_ok=True)
    for name, data in seeds:
        (corpus / name).write_bytes(data)
    max_len = max(len(d) for _n, d in seeds) + 4096

    def test_one(data: bytes) -> None:
        try:
            exercise(data)
        except Exception as exc:
            save_crash(data, save_dir, exc)
            raise

    args = [sys.argv[0], f"-runs={runs}", f"-seed={seed}", f"-max_len={max_len}",
            f"-timeout={int(max(timeout, 1))}", f"-rss_limit_mb={memory}",
            f"-artifact_prefix={save_dir}/", str(corpus)]
    print(f"engine=atheris: {' '.join(args[1:])}", flush=True)
    with atheris.instrument_imports():
        pass
    atheris.instrument_all()
    atheris.Setup(args, test_one)
    atheris.Fuzz()      # exits the process; libFuzzer prints "Done N runs in T second(s)"
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", choices=("mutate", "atheris"), default="mutate")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--memory", type=int, default=2048, help="address space limit, MiB")
    parser.add_argument("--save-dir", type=Path, default=DEFAULT_SAVE_DIR)
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="also mutate this image (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.engine == "atheris":
        return run_atheris(args.runs, args.seed, args.timeout, args.save_dir, args.memory,
                           args.image)
    limit = args.memory << 20
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    return run_mutate(args.runs, args.seed, args.timeout, args.save_dir, args.verbose, args.image)


if __name__ == "__main__":
    sys.exit(main())
