"""The image reader (erofs.reader) and the image -> tree mapping (mkcfs.inspect.unflatten).

* unit tests of ``Image`` on images our writer builds (the worked examples of the format spec);
* the composefs mapping: overlay xattrs hidden or unescaped, whiteouts, root whiteouts, hard
  links (libcomposefs's depth-first choice and the writer's own), ``--filter``, C quirks;
* the round trip of every conformance case: image -> tree -> dumpfile -> tree -> image gives the
  same bytes (skipped when ../shared is absent; the golden dumps in testdata/ always run);
* hypothesis: generated trees survive tree -> image -> reader unchanged.
"""

from __future__ import annotations

import hashlib
import os
import struct
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs.errors import ImageFormatError
from erofs.reader import Image, WorkBudget
from mkcfs.sources.dumpfile import format_dumpfile, parse_dumpfile
from mkcfs.build.image import build_image
from mkcfs.tree import HardLink, Node, iter_tree, resolve
from mkcfs.inspect.unflatten import load_tree

from .conftest import CONFORMANCE, TESTDATA, load_conformance_cases

GOLDEN = TESTDATA / "golden"
CASES = [c for c in load_conformance_cases() if not c.must_fail]
needs_corpus = pytest.mark.skipif(not CASES,
                                  reason=f"conformance corpus not found at {CONFORMANCE}")

DIGEST = bytes.fromhex("838b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4")


def versions(args) -> dict[str, int]:
    """mkcomposefs's --min-version/--max-version arguments as build_image keywords."""
    opts = dict(a[2:].split("=", 1) for a in args)
    if not opts:
        return {}
    return {"min_version": int(opts.get("min-version", 0)),
            "max_version": int(opts.get("max-version", 0))}


def image_of(dump: bytes | str, **kw) -> bytes:
    if isinstance(dump, str):
        dump = dump.encode()
    return bytes(build_image(parse_dumpfile(dump, strict=True), **kw).data)


@cache
def conformance_image(name: str) -> tuple[bytes, tuple[tuple[str, int], ...]]:
    """(image bytes built by our writer, version keywords) of a conformance case, cached for the
    session (test_info.py uses it too)."""
    case = next(c for c in CASES if c.name == name)
    kw = versions(case.args)
    data = bytes(build_image(parse_dumpfile(case.read_input(), strict=case.strict), **kw).data)
    assert hashlib.sha256(data).hexdigest() == case.image_sha256
    return data, tuple(kw.items())


@cache
def golden_image(name: str, args: str) -> bytes:
    return image_of((GOLDEN / name).read_bytes(), **versions(args.split()))


def golden_rows():
    rows = []
    for line in (GOLDEN / "expected.tsv").read_text().splitlines():
        name, args, sha, _digest = line.split("\t")
        rows.append(pytest.param(name, args, sha, id=f"{name}[{args or 'default'}]"))
    return rows


EX1 = "/ 0 40755 2 0 0 0 0.0 - - -\n"
EX2 = (
    "/ 4096 40755 3 0 0 0 1700000000.0 - - - security.selinux=system_u:object_r:root_t:s0\\x00\n"
    "/big 5000 100644 2 0 0 0 1700000000.0 83/8b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4 - 838b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4 user.tag=shared\n"
    "/dir 0 40755 2 1000 1000 0 1700000123.456 - - -\n"
    "/dir/hello.txt 6 100644 1 1000 1000 0 1700000000.0 - hello\\n - user.tag=shared\n"
    "/hl 5000 @100644 2 0 0 0 1700000000.0 /big - 838b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4\n"
    "/link 13 120777 1 0 0 0 1700000000.0 dir/hello.txt - -\n"
)
EX3 = ("/ 0 40755 3 0 0 0 0.0 - - -\n"
       "/d 0 40755 2 0 0 0 0.0 - - - trusted.overlay.opaque=y\n"
       "/d/gone 0 20000 1 0 0 0 0.0 - - -\n"
       "/fifo 0 10644 1 0 0 0 0.0 - - -\n"
       "/null 0 20666 1 0 0 259 0.0 - - -\n")


# --- Image: header, superblock, inodes, xattrs, dirents, data ----------------------------------

def test_header_and_superblock():
    data = image_of(EX1)
    assert hashlib.sha256(data).hexdigest() == \
        "c3dc5b0fc4afb0693a95e017fe5815e1f88f204d485df617541b5ea659aefb8b"
    image = Image(data)
    assert (image.version, image.flags, image.root_nid, image.inos, image.blocks) == (0, 0, 36, 257, 4)
    assert (image.build_time, image.build_time_nsec, image.blkszbits) == (0, 0, 12)
    assert (image.meta_base, image.xattr_base) == (0, 2 * 4096)
    assert Image(memoryview(data)).root_nid == Image(bytearray(data)).root_nid == 36


def test_open_file_and_mmap(tmp_path):
    import mmap
    path = tmp_path / "ex2.cfs"
    path.write_bytes(image_of(EX2))
    want = format_dumpfile(load_tree(Image.open(path)))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert format_dumpfile(load_tree(Image(m))) == want


def test_root_inode_xattrs_and_dirents():
    image = Image(image_of(EX1))
    root = image.inode(36)
    assert (root.offset, root.extended, root.layout, root.mode, root.nlink, root.size,
            root.i_u, root.ino) == (1152, False, 0, 0o40755, 2, 4096, 3, 0)
    assert (root.xattr_offset, root.xattr_size, root.tail_offset) == (1184, 32, 1216)
    [x] = image.xattrs(root)
    assert (x.key, x.value, x.shared) == (b"trusted.overlay.opaque", b"y", False)
    entries = list(image.dirents(root))
    assert len(entries) == 258
    assert entries[:3] == [(b".", 36, 2), (b"..", 36, 2), (b"00", 38, 3)]
    assert entries[-1] == (b"ff", 38 + 255, 3)
    assert image.extents(root) == [(3 * 4096, 4096)]
    wo = image.inode(38)
    assert (wo.mode, wo.rdev, wo.size, wo.xattr_size) == (0o20644, 0, 0, 0)


def test_example_2_inodes():
    data = image_of(EX2)
    assert hashlib.sha256(data).hexdigest() == \
        "9e2c50242c679151b8447ad12fa3449f28b1bdce888eb724b5c6ddcdf21027c2"
    image = Image(data)
    names = {name: nid for name, nid, _t in image.dirents(image.inode(image.root_nid))}
    assert names[b"big"] == names[b"hl"] == 423
    big = image.inode(423)
    assert (big.layout, big.size, big.i_u, big.nlink, big.extended) == (4, 5000, 1, 2, False)
    xs = {x.key: (x.value, x.shared) for x in image.xattrs(big)}
    assert xs[b"user.tag"] == (b"shared", True)
    assert xs[b"trusted.overlay.metacopy"] == (b"\x00\x24\x00\x01" + DIGEST, False)
    assert xs[b"trusted.overlay.redirect"][0] == b"/83/" + DIGEST.hex()[2:].encode()
    # inline entries come first, then shared ones (libcomposefs's order)
    assert [x.shared for x in image.xattrs(big)] == [False, False, True]
    d = image.inode(names[b"dir"])
    assert (d.extended, d.mtime, d.mtime_nsec, d.uid, d.gid, d.size) == \
        (True, 1700000123, 456, 1000, 1000, 48)
    assert [n for n, _i, _t in image.dirents(d)] == [b".", b"..", b"hello.txt"]
    hello = image.inode(564)
    assert image.data_bytes(hello, 5000) == b"hello\n"
    assert hello.mtime == image.build_time == 1700000000
    link = image.inode(names[b"link"])
    assert image.data_bytes(link, 4095) == b"dir/hello.txt"
    with pytest.raises(ImageFormatError):
        image.data_bytes(hello, 5)


def test_block_and_tail_content_and_long_symlink():
    dump = ("/ 0 40755 2 0 0 0 0.0 - - -\n"
            "/a 3000 100644 1 0 0 0 0.0 - " + "ab" * 1500 + " -\n"
            "/b 4500 100644 1 0 0 0 0.0 - " + "cd" * 2250 + " -\n"
            "/l 4095 120777 1 0 0 0 0.0 " + "x" * 4095 + " - -\n")
    image = Image(image_of(dump))
    names = {n: i for n, i, _t in image.dirents(image.inode(image.root_nid))}
    a, b, lnk = (image.inode(names[k]) for k in (b"a", b"b", b"l"))
    assert (a.layout, b.layout, lnk.layout) == (0, 2, 0)
    assert image.data_bytes(a, 5000) == b"ab" * 1500
    assert image.data_bytes(b, 5000) == b"cd" * 2250
    assert [n for _o, n in image.extents(b)] == [4096, 404]
    assert image.data_bytes(lnk, 4095) == b"x" * 4095


def test_multi_block_directory():
    lines = ["/ 0 40755 3 0 0 0 0.0 - - -", "/d 0 40755 2 0 0 0 0.0 - - -"]
    lines += ["/d/entry-with-a-long-name-%03d 0 100644 1 0 0 0 0.0 - - -" % i for i in range(250)]
    image = Image(image_of("\n".join(lines) + "\n"))
    d = dict((n, i) for n, i, _t in image.dirents(image.inode(image.root_nid)))[b"d"]
    ino = image.inode(d)
    assert (ino.size, ino.layout, len(image.extents(ino))) == (9560, 2, 3)
    names = [n for n, _i, _t in image.dirents(ino)]
    assert names == [b".", b".."] + [b"entry-with-a-long-name-%03d" % i for i in range(250)]



def test_lookup_by_path():
    """``Image.lookup`` finds an entry by its names, in a directory of several blocks too;
    a missing name, or a file on the way, gives None."""
    lines = ["/ 0 40755 3 0 0 0 0.0 - - -", "/d 0 40755 2 0 0 0 0.0 - - -",
             "/f 5 100644 1 0 0 0 0.0 - hello -"]
    lines += ["/d/entry-with-a-long-name-%03d 3 100600 1 0 0 0 0.0 - %03d -" % (i, i)
              for i in range(250)]
    image = Image(image_of("\n".join(lines) + "\n"))
    assert image.lookup([]) == image.inode(image.root_nid)
    last = image.lookup([b"d", b"entry-with-a-long-name-249"])
    assert last is not None and image.data_bytes(last, 64) == b"249"
    assert image.data_bytes(image.lookup([b"f"]), 64) == b"hello"  # type: ignore[arg-type]
    for missing in ([b"e"], [b"d", b"entry-with-a-long-name-250"], [b"f", b"x"]):
        assert image.lookup(missing) is None

@pytest.mark.parametrize("mutate,what", [
    (lambda b: b[:4095], "too small"),
    (lambda b: b"\0" + b[1:], "not a composefs image"),
    (lambda b: b[:4] + struct.pack("<I", 2) + b[8:], "header version"),
    (lambda b: b[:1024] + b"\0" + b[1025:], "superblock magic"),
    (lambda b: b[:1064] + struct.pack("<I", 99) + b[1068:], "meta_blkaddr"),
    (lambda b: b[:1068] + struct.pack("<I", 99) + b[1072:], "xattr_blkaddr"),
])
def test_bad_header_or_superblock(mutate, what):
    with pytest.raises(ImageFormatError, match=what) as info:
        Image(mutate(image_of(EX1)))
    assert isinstance(info.value.offset, int)


def test_bounds_are_checked():
    data = bytearray(image_of(EX1))
    image = Image(bytes(data))
    with pytest.raises(ImageFormatError, match="beyond the image end"):
        image.inode(len(data) // 32)
    with pytest.raises(ImageFormatError):
        image.inode(-1)
    data[1152] = 1                             # root becomes extended: still inside
    data[1152 + 2:1152 + 4] = b"\xff\xff"      # icount 65535: body far past the end
    with pytest.raises(ImageFormatError, match="xattr body"):
        Image(bytes(data)).inode(36)
    with pytest.raises(ImageFormatError, match="shared xattr id"):
        image.shared_xattr(1 << 30)
    with pytest.raises(ImageFormatError, match="first name offset"):
        image.dirent_block(3 * 4096 + 12, 30)   # nameoff of ".." (3097) > 30
    with pytest.raises(ImageFormatError, match="too short|directory block of"):
        image.dirent_block(3 * 4096, 5)


def test_work_budget():
    budget = WorkBudget(1200)
    budget.dirents(100, 0)
    with pytest.raises(ImageFormatError):
        budget.dirents(100, 0)
    budget.bytes(2400, 0)
    with pytest.raises(ImageFormatError):
        budget.bytes(70000, 0)


# --- the composefs mapping ---------------------------------------------------------------------

def test_mapping_example_2():
    root = load_tree(image_of(EX2))
    assert root.xattrs == {b"security.selinux": b"system_u:object_r:root_t:s0\x00"}
    assert sorted(root.children) == [b"big", b"dir", b"hl", b"link"]   # no 00..ff
    big = root.children[b"big"]
    assert isinstance(big, Node)
    assert (big.size, big.digest, big.payload, big.content, big.xattrs) == \
        (5000, DIGEST, b"83/" + DIGEST.hex()[2:].encode(), None, {b"user.tag": b"shared"})
    hl = root.children[b"hl"]
    assert isinstance(hl, HardLink) and hl.target is big
    d = root.children[b"dir"]
    assert (d.mtime_sec, d.mtime_nsec, d.size, d.nlink) == (1700000123, 456, 48, 2)
    assert d.children[b"hello.txt"].content == b"hello\n"
    assert root.children[b"link"].payload == b"dir/hello.txt"
    # what composefs-info 1.0.8 prints: the directory's size comes from the image, and a hard
    # link line repeats its target's xattrs
    assert format_dumpfile(root) == (
        EX2.replace("/dir 0 40755", "/dir 48 40755")
        .replace("4458e1d4\n/link", "4458e1d4 user.tag=shared\n/link").encode())


def test_mapping_whiteouts_and_escapes():
    for kw, opaque in (({}, True), ({"min_version": 0, "max_version": 0}, False)):
        root = load_tree(image_of(EX3, **kw))
        d = root.children[b"d"]
        gone = d.children[b"gone"]
        assert (gone.mode, gone.rdev, gone.size, gone.xattrs) == (0o20000, 0, 0, {})
        expected = {b"trusted.overlay.opaque": b"x" if opaque else b"y"}
        if opaque:
            expected[b"user.overlay.opaque"] = b"x"
        assert d.xattrs == expected
        assert root.children[b"null"].rdev == 259
        assert root.xattrs == {}


def test_hardlink_choice_first_vs_writer():
    # /a/x is the node; /b is a hard link. Breadth first, the writer places the inode at /a/x
    # (depth 2, since /b at depth 1 is a link); depth first, /a/x also comes first. With the
    # names swapped (/z/x and /b), depth first meets /b first, the writer had /z/x.
    dump = ("/ 0 40755 3 0 0 0 0.0 - - -\n/b 0 @100644 1 0 0 0 0.0 /z/x - -\n"
            "/z 0 40755 2 0 0 0 0.0 - - -\n/z/x 1 100644 2 0 0 0 0.0 - y -\n")
    data = image_of(dump)
    first = load_tree(data)
    assert isinstance(first.children[b"b"], Node)
    assert isinstance(first.children[b"z"].children[b"x"], HardLink)
    writer = load_tree(data, hardlinks="writer")
    assert isinstance(writer.children[b"b"], HardLink)
    assert isinstance(writer.children[b"z"].children[b"x"], Node)
    assert image_of(format_dumpfile(writer)) == data
    assert image_of(format_dumpfile(first)) != data   # what the C round trip does
    with pytest.raises(ValueError):
        load_tree(data, hardlinks="bogus")


def test_filter_keeps_only_named_root_entries():
    data = image_of(EX2)
    root = load_tree(data, [b"dir", b"nonexistent"])
    assert list(root.children) == [b"dir"]
    assert list(root.children[b"dir"].children) == [b"hello.txt"]
    # a hard link whose target was filtered out is loaded as the node itself
    root = load_tree(data, [b"hl"])
    assert isinstance(root.children[b"hl"], Node) and root.children[b"hl"].size == 5000
    assert load_tree(data, [b"00"]).children == {}   # root whiteouts never show


def test_redirect_quirk_and_odd_metacopy():
    # libcomposefs 1.0.8 copies two bytes past the redirect value (value_size++ for --): they
    # are zero padding unless the entry ends on a 4-byte boundary ("/abc": 24 bytes). Here the
    # shared redirect is followed by the shared empty metacopy entry (10 04 ...).
    dump = ("/ 0 40755 2 0 0 0 0.0 - - -\n/f 10 100644 1 0 0 0 0.0 abc - -\n"
            "/g 10 100644 1 0 0 0 0.0 abcd - -\n/h 10 100644 1 0 0 0 0.0 abc - - user.x=1\n"
            "/i 10 100644 1 0 0 0 0.0 / - -\n/j 10 100644 1 0 0 0 0.0 - - -\n")
    # composefs-info 1.0.8's output for this image:
    expected = (b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
                b"/f 10 100644 1 0 0 0 0.0 abc\\x10\\x04 - -\n"
                b"/g 10 100644 1 0 0 0 0.0 abcd - -\n"
                b"/h 10 100644 1 0 0 0 0.0 abc\\x10\\x04 - - user.x=1\n"
                b"/i 10 100644 1 0 0 0 0.0 / - -\n"
                b"/j 10 100644 1 0 0 0 0.0 - - -\n")
    assert format_dumpfile(load_tree(image_of(dump))) == expected


def test_trailing_empty_acl_is_dropped():
    # the C reader loops while more than 4 bytes are left, so a last inline entry of exactly 4
    # bytes (empty name suffix, empty value) is not read; composefs-info 1.0.8 prints:
    data = image_of("/ 0 40755 2 0 0 0 0.0 - - -\n"
                    "/d 0 40700 2 0 0 0 0.0 - - - system.posix_acl_access=\n"
                    "/e 0 40700 2 0 0 0 0.0 - - - system.posix_acl_access=x security.a=b\n")
    assert format_dumpfile(load_tree(data)) == (
        b"/ 4096 40755 4 0 0 0 0.0 - - -\n/d 27 40700 2 0 0 0 0.0 - - -\n"
        b"/e 27 40700 2 0 0 0 0.0 - - - security.a=b system.posix_acl_access=x\n")


def test_cycle_and_self_reference_become_hard_links():
    data = bytearray(image_of("/ 0 40755 3 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n"
                              "/d/x 1 100644 1 0 0 0 0.0 - y -\n"))
    image = Image(bytes(data))
    d_nid = dict((n, i) for n, i, _t in image.dirents(image.inode(image.root_nid)))[b"d"]
    d = image.inode(d_nid)
    (offset, _length), = image.extents(d)
    x_entry = offset + 24                      # ".", "..", "x"
    for target in (d_nid, image.root_nid):
        data[x_entry:x_entry + 8] = struct.pack("<Q", target)
        root = load_tree(bytes(data))
        x = root.children[b"d"].children[b"x"]
        assert isinstance(x, HardLink) and resolve(x).children is not None
        format_dumpfile(root)                      # terminates


# --- round trips -------------------------------------------------------------------------------

def _roundtrip(data: bytes, kw: dict) -> None:
    image = Image(data)
    root = load_tree(image, hardlinks="writer")
    text = format_dumpfile(root)
    if any(isinstance(e, HardLink) and resolve(e).children is not None for _p, e in iter_tree(root)):
        # a hard link to a directory prints as "@40755", which no dumpfile parser accepts
        # (mkcomposefs 1.0.8 neither): only the direct rewrite can reproduce such an image
        with pytest.raises(ValueError, match="Directories can't be hardlinked"):
            parse_dumpfile(text, strict=True)
    else:
        assert bytes(build_image(parse_dumpfile(text, strict=True), **kw).data) == data
    # composefs-dump: the tree written again at the image's version
    assert bytes(build_image(root, min_version=image.version,
                             max_version=image.version).data) == data


@pytest.mark.parametrize("name,args,sha", golden_rows())
def test_golden_roundtrip(name, args, sha):
    data = golden_image(name, args)
    assert hashlib.sha256(data).hexdigest() == sha
    _roundtrip(data, versions(args.split()))


@needs_corpus
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_conformance_roundtrip(name):
    data, kw = conformance_image(name)
    _roundtrip(data, dict(kw))


# --- hypothesis: tree -> image -> reader ---------------------------------------------------------

_NAMES = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
_XATTR_KEYS = st.sampled_from([b"user.a", b"user.b", b"user.overlay.origin", b"security.selinux",
                               b"security.ima", b"trusted.foo", b"trusted.overlay.opaque",
                               b"trusted.overlay.x", b"trusted.overlay.overlay.y",
                               b"system.posix_acl_access", b"lustre.z", b"other.key"])
# an empty system.posix_acl_access is a 4-byte entry that libcomposefs skips when it is the
# last inline one (test_trailing_empty_acl_is_dropped); keep it out here
_XATTRS = st.dictionaries(_XATTR_KEYS, st.binary(max_size=40), max_size=4).map(
    lambda d: {k: v for k, v in d.items() if v or k != b"system.posix_acl_access"})
_TIMES = st.tuples(st.sampled_from([0, 1, -1, 1700000000, 1 << 40]), st.sampled_from([0, 1, 999999999]))
_IDS = st.sampled_from([0, 1, 1000, 65535, 65536, 1 << 31])
# payload lengths of 3 mod 4 hit libcomposefs's redirect quirk (tested above); keep them out
_PAYLOADS = st.one_of(st.none(), st.binary(min_size=1, max_size=70).filter(
    lambda p: b"\0" not in p and len(p) % 4 != 3))


@st.composite
def _leaf(draw) -> Node:
    kind = draw(st.sampled_from(["inline", "external", "empty", "symlink", "chr", "blk", "fifo",
                                 "sock", "whiteout"]))
    sec, nsec = draw(_TIMES)
    common = dict(uid=draw(_IDS), gid=draw(_IDS), mtime_sec=sec, mtime_nsec=nsec,
                  xattrs=draw(_XATTRS), nlink=draw(st.sampled_from([1, 2, 70000])))
    perm = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0]))
    if kind == "inline":
        content = draw(st.binary(min_size=1, max_size=5000))
        return Node(0o100000 | perm, size=len(content), content=content, **common)
    if kind == "external":
        return Node(0o100000 | perm, size=draw(st.sampled_from([1, 4097, 1 << 33])),
                    payload=draw(_PAYLOADS), digest=draw(st.one_of(st.none(), st.just(DIGEST))),
                    **common)
    if kind == "empty":
        return Node(0o100000 | perm, **common)
    if kind == "symlink":
        target = draw(st.binary(min_size=1, max_size=200).filter(lambda t: b"\0" not in t))
        return Node(0o120777, size=len(target), payload=target, **common)
    if kind == "whiteout":
        common["xattrs"] = {}
        return Node(0o20000 | perm, **common)
    mode = {"chr": 0o20000, "blk": 0o60000, "fifo": 0o10000, "sock": 0o140000}[kind]
    rdev = draw(st.sampled_from([1, 259, 0xFFFFFFFF])) if kind in ("chr", "blk") else 0
    return Node(mode | perm, rdev=rdev, **common)


@st.composite
def _trees(draw) -> Node:
    sec, nsec = draw(_TIMES)
    root = Node(0o40755, mtime_sec=sec, mtime_nsec=nsec, xattrs=draw(_XATTRS))
    dirs = [root]
    files: list[Node] = []
    for _ in range(draw(st.integers(0, 14))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_NAMES)
        if name in parent.children or (parent is root and len(name) == 2):
            continue
        what = draw(st.sampled_from(["dir", "leaf", "leaf", "link"]))
        if what == "dir":
            s2, n2 = draw(_TIMES)
            child = Node(0o40700, mtime_sec=s2, mtime_nsec=n2, xattrs=draw(_XATTRS))
            dirs.append(child)
        elif what == "link" and files:
            child = HardLink(draw(st.sampled_from(files)))
        else:
            child = draw(_leaf())
            files.append(child)
        parent.children[name] = child
    return root


def _canonical(root: Node) -> dict:
    """What survives an image: per path, the fields the reader gives back and the set of paths
    naming the same inode (which of them holds the Node does not change the image when they
    are neighbours in the writer's order; the bytes are compared separately)."""
    entries = list(iter_tree(root))
    groups: dict[int, list[bytes]] = {}
    for path, entry in entries:
        groups.setdefault(id(resolve(entry)), []).append(path)
    out = {}
    for path, entry in entries:
        n = resolve(entry)
        ftype = n.mode & 0o170000
        size = n.size if ftype in (0o100000, 0o120000) else None
        content = n.content or None
        payload = n.payload or None
        digest = n.digest
        if ftype != 0o100000 or content is not None or not n.size:
            payload = payload if ftype == 0o120000 else None
            digest = None
        whiteout_parent = bool(n.children) and any(
            isinstance(c, Node) and c.mode & 0o170000 == 0o20000 and c.rdev == 0
            for c in n.children.values())
        out[path] = [n.mode & 0o177777, n.uid, n.gid, n.rdev if ftype in (0o20000, 0o60000) else 0,
                     size, n.mtime_sec, n.mtime_nsec, payload, content, digest,
                     None if ftype == 0o40000 else n.nlink, dict(n.xattrs), whiteout_parent,
                     tuple(sorted(groups[id(n)]))]
    return out


@settings(max_examples=int(os.environ.get("CFS_HYPOTHESIS_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_trees(), st.sampled_from([{}, {"min_version": 0, "max_version": 0}]))
def test_generated_trees_survive(tree, kw):
    check_tree_survives(tree, kw)


def check_tree_survives(tree: Node, kw: dict) -> None:
    """tree -> image -> reader gives the tree back (as far as an image can hold it), and writing
    what was read gives the same image."""
    try:
        built = build_image(tree, **kw)
    except Exception as exc:  # the writer's limits (e.g. xattr budget) are not under test
        from mkcfs.errors import CfsError
        assert isinstance(exc, CfsError)
        return
    back = load_tree(built.data, hardlinks="writer")
    want = _canonical(tree)
    got = _canonical(back)
    if built.version >= 1:
        for fields in want.values():
            if fields[-2]:      # v1 marks parents of whiteouts opaque, and the reader shows it
                fields[-3][b"trusted.overlay.opaque"] = b"x"
                fields[-3][b"user.overlay.opaque"] = b"x"
    assert got == want
    assert bytes(build_image(back, min_version=built.version, max_version=built.version).data) \
        == bytes(built.data)
