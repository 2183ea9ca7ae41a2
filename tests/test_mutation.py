"""Damaged and hostile images: the reader may only raise ImageFormatError, quickly.

* a few hundred seeded structure-aware mutations of several images (the mutator of
  ``tools/fuzz_reader.py``) through the composefs-info/composefs-dump logic, with a time bound
  per input and for the whole run;
* hand-made adversarial images: directory cycles, directories sharing blocks, huge counts and
  sizes, deep nesting, every truncation point of a small image;
* every input kept in ``tests/regressions/`` is replayed (crashes the fuzzer finds, saved as
  ``crash-*.img``, and ``c-segfault-*.img.gz``: mutated images on which composefs-info 1.0.8
  dies with SIGSEGV);
* the command-line tools turn all of it into one line on stderr and exit status 1.
"""

from __future__ import annotations

import gzip
import importlib.util
import random
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

from erofs.errors import ImageFormatError
from erofs.reader import Image
from mkcfs.cli import composefs_dump, composefs_info
from mkcfs.sources.dumpfile import format_dumpfile, parse_dumpfile
from mkcfs.build.image import build_image
from mkcfs.inspect.unflatten import load_tree

REPO = Path(__file__).resolve().parents[1]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_reader", REPO / "tools" / "fuzz_reader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_reader", module)
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzzer()
SEEDS = fuzz.build_seeds()
PER_INPUT_SECONDS = 5


class _Timeout(Exception):
    pass


def _exercise_bounded(data: bytes) -> str:
    """``fuzz.exercise`` with a wall-clock bound (a hang fails the test)."""
    def alarm(_signum, _frame):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, PER_INPUT_SECONDS)
    try:
        return fuzz.exercise(data)
    except _Timeout:
        pytest.fail(f"no result after {PER_INPUT_SECONDS} s (hang) for input {data[:64]!r}...")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_seeds_are_read():
    assert [name for name, _ in SEEDS] == ["mixed", "bigdir", "whiteouts-v0"]
    for _name, data in SEEDS:
        assert fuzz.exercise(data) == "ok"


@pytest.mark.parametrize("seed", range(4))
def test_seeded_mutations(seed):
    rng = random.Random(seed)
    mutators = [fuzz.Mutator(data, rng) for _name, data in SEEDS]
    start = time.monotonic()
    results = {"ok": 0, "rejected": 0}
    for _ in range(150):
        data = rng.choice(mutators).mutate() if rng.random() > 0.05 else fuzz.random_images(rng)
        results[_exercise_bounded(data)] += 1
    assert results["rejected"] > 10 and results["ok"] > 10, results
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.img*")), ids=lambda p: p.name)
def test_regressions(path):
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    assert _exercise_bounded(data) in ("ok", "rejected")


def test_regressions_present():
    # inputs that crash composefs-info 1.0.8 (SIGSEGV): two it rejects, two it reads
    assert len(list(REGRESSIONS.glob("c-segfault-*.img.gz"))) >= 4


# --- hand-made adversarial images --------------------------------------------------------------

def _image(dump: str, **kw) -> bytes:
    return bytes(build_image(parse_dumpfile(dump.encode(), strict=True), **kw).data)


def _names(image: Image, nid: int) -> dict[bytes, int]:
    return {n: i for n, i, _t in image.dirents(image.inode(nid))}


MANY_DIRS = ("/ 0 40755 3 0 0 0 0.0 - - -\n"
             + "".join(f"/d{i:03d} 0 40755 2 0 0 0 0.0 - - -\n" for i in range(300))
             + "/z 0 40755 2 0 0 0 0.0 - - -\n"
             + "".join(f"/z/entry-{i:04d} 0 100644 1 0 0 0 0.0 - - -\n" for i in range(300)))


def test_directories_sharing_blocks_hit_the_work_budget():
    # every directory pointed at /z's full dirent block: each would list ~200 entries, 60000
    # in all from a ~100 KB image; the walk must refuse instead of multiplying the work
    data = bytearray(_image(MANY_DIRS))
    image = Image(bytes(data))
    names = _names(image, image.root_nid)
    z = image.inode(names[b"z"])
    assert z.size >= 4096 and z.i_u
    for i in range(300):
        off = image.inode(names[b"d%03d" % i]).offset
        data[off:off + 2] = struct.pack("<H", 0)                 # compact, FLAT_PLAIN
        data[off + 8:off + 12] = struct.pack("<I", 4096)         # one full block...
        data[off + 16:off + 20] = struct.pack("<I", z.i_u)      # ...the one of /z
    start = time.monotonic()
    with pytest.raises(ImageFormatError, match="share blocks|more directory entries"):
        load_tree(bytes(data))
    assert time.monotonic() - start < 5


def test_directory_cycles_terminate():
    data = bytearray(_image("/ 0 40755 3 0 0 0 0.0 - - -\n/a 0 40755 3 0 0 0 0.0 - - -\n"
                            "/a/b 0 40755 2 0 0 0 0.0 - - -\n/a/b/c 0 40755 2 0 0 0 0.0 - - -\n"))
    image = Image(bytes(data))
    a = _names(image, image.root_nid)[b"a"]
    b = _names(image, a)[b"b"]
    (offset, _length), = image.extents(image.inode(b))
    for target in (image.root_nid, a, b):           # /a/b/c -> /, /a, itself
        data[offset + 24:offset + 32] = struct.pack("<Q", target)
        assert _exercise_bounded(bytes(data)) == "ok"
        root = load_tree(bytes(data))
        assert format_dumpfile(root).count(b"\n") == 4


def test_huge_counts_and_sizes():
    base = _image("/ 0 40755 2 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 0.0 - - - user.a=1\n"
                  "/l 1 120777 1 0 0 0 0.0 x - -\n/c 3 100644 1 0 0 0 0.0 - abc -\n")
    image = Image(base)
    names = _names(image, image.root_nid)
    f, lnk, c = (image.inode(names[k]) for k in (b"f", b"l", b"c"))
    cases = [
        (f.offset + 2, struct.pack("<H", 0xFFFF)),           # xattr icount: 262 KB body
        (f.xattr_offset + 4, b"\xff"),                         # 255 shared ids
        (f.xattr_offset + 12, b"\xff\x01\xff\xff"),            # entry: 255-byte name, 64K value
        (lnk.offset + 8, struct.pack("<I", 0xFFFFFFFF)),       # symlink of 4 GiB
        (c.offset + 8, struct.pack("<I", 0xFFFFFFFF)),         # inline file of 4 GiB
        (c.offset + 8, struct.pack("<I", 5001)),               # inline file over the limit
        (image.inode(image.root_nid).offset + 8, struct.pack("<I", 0xFFFFFFFF)),  # 4 GiB dir
        (1038, struct.pack("<H", 0xFFFF)),                     # root nid beyond the end
    ]
    for offset, patch in cases:
        data = bytearray(base)
        data[offset:offset + len(patch)] = patch
        assert _exercise_bounded(bytes(data)) in ("ok", "rejected"), (offset, patch)
        with pytest.raises(ImageFormatError):
            load_tree(bytes(data))
    # the inode count is not used by readers
    data = bytearray(base)
    data[1040:1048] = struct.pack("<Q", (1 << 64) - 1)
    assert _exercise_bounded(bytes(data)) == "ok"
    # an extended inode claiming a 2^64-1 byte directory
    data = bytearray(base)
    root = image.inode(image.root_nid).offset
    data[root:root + 2] = b"\x01\x00"
    data[root + 8:root + 16] = struct.pack("<Q", (1 << 64) - 1)
    with pytest.raises(ImageFormatError):
        load_tree(bytes(data))


def test_deep_nesting_is_iterative():
    depth = 3000
    lines = ["/ 0 40755 3 0 0 0 0.0 - - -"]
    path = ""
    for _ in range(depth):
        path += "/d"
        lines.append(f"{path} 0 40755 2 0 0 0 0.0 - - -")
    data = _image("\n".join(lines) + "\n")
    start = time.monotonic()
    root = load_tree(data)
    node, n = root, 0
    while node.children:
        node = node.children[b"d"]
        n += 1
    assert n == depth
    root = load_tree(data, hardlinks="writer")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("seed_name", ["mixed", "whiteouts-v0"])
def test_every_truncation(seed_name):
    data = dict(SEEDS)[seed_name]
    step = 1 if len(data) <= 20000 else 7
    for end in range(0, len(data), step):
        assert fuzz.exercise(data[:end]) in ("ok", "rejected")


def test_single_bytes_of_the_metadata():
    # every byte of the superblock set to 0x00, 0x7f, 0x80 and 0xff; every byte of the first
    # inodes and a sample of the rest of the metadata set to 0x00 and 0xff
    data = dict(SEEDS)["mixed"]
    image = Image(data)
    rng = random.Random(5)
    changes = [(pos, v) for pos in range(1024, 1152) for v in (0x00, 0x7F, 0x80, 0xFF)]
    changes += [(pos, v) for pos in list(range(1152, 1600))
                + rng.sample(range(1600, image.xattr_base + 256), 350) for v in (0x00, 0xFF)]
    for pos, value in changes:
        if data[pos] != value:
            assert fuzz.exercise(data[:pos] + bytes((value,)) + data[pos + 1:]) in (
                "ok", "rejected")


# --- the command-line tools ----------------------------------------------------------------------

def test_cli_one_line_errors_for_mutated_images(tmp_path, capsysbinary):
    rng = random.Random(99)
    mutators = [fuzz.Mutator(data, rng) for _name, data in SEEDS]
    path = tmp_path / "m.cfs"
    failures = 0
    for _ in range(60):
        path.write_bytes(rng.choice(mutators).mutate())
        for args in (["dump", path], ["ls", path], ["objects", path]):
            rc = composefs_info.main([str(a) for a in args])
            _out, err = capsysbinary.readouterr()
            assert rc in (0, 1)
            if rc:
                failures += 1
                lines = err.decode(errors="replace").splitlines()
                assert len(lines) == 1 and lines[0].startswith("composefs-info: Failed to load")
        rc = composefs_dump.main([str(path), str(tmp_path / "out.cfs")])
        _out, err = capsysbinary.readouterr()
        assert rc in (0, 1)
        if rc:
            assert len(err.decode(errors="replace").splitlines()) == 1
            assert b"Traceback" not in err
    assert failures > 0
