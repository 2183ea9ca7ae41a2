"""Tests for mkcfs.sources.dumpfile: the composefs-dump(5) parser (mkcomposefs 1.0.8 semantics) and printer
(composefs-info dump 1.0.8).

Format notes: the docstring of mkcfs/sources/dumpfile.py. The conformance corpus in
../shared/conformance is used when present (tests that need it skip with the reason otherwise).
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mkcfs.sources.dumpfile import escape, format_dumpfile, parse_dumpfile, unescape, write_dumpfile
from mkcfs.errors import DumpfileError
from mkcfs.tree import HardLink, Node, iter_tree, resolve

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CONFORMANCE = SHARED / "conformance"
UPSTREAM = CONFORMANCE / "upstream"

U64 = (1 << 64) - 1
ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
DIGEST_HEX = b"0123456789abcdef" * 4
DIGEST = bytes.fromhex(DIGEST_HEX.decode())


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def parse(text: bytes, strict: bool = False) -> Node:
    return parse_dumpfile(text, strict=strict)


def fail(text: bytes, strict: bool = False) -> DumpfileError:
    with pytest.raises(DumpfileError) as info:
        parse_dumpfile(text, strict=strict)
    assert "\n" not in str(info.value)
    return info.value


def get(root: Node, path: bytes):
    entry = root
    for comp in path.strip(b"/").split(b"/"):
        if comp:
            entry = entry.children[comp]
    return entry


def one(line: bytes, strict: bool = False) -> Node:
    """Parse the root plus one line; return the entry that line made."""
    root = parse(ROOT + line + b"\n", strict)
    return get(root, line.split(b" ", 1)[0])


def snapshot(root: Node) -> list[tuple]:
    """A comparable view of a tree: every path in order with its fields; a hard link as the path of
    the node it reaches (chains collapse: they mean the same thing in an image)."""
    entries = list(iter_tree(root))
    where = {id(e): p for p, e in entries if isinstance(e, Node)}
    out = []
    for path, e in entries:
        if isinstance(e, HardLink):
            out.append((path, "link", where[id(resolve(e))]))
        else:
            out.append((path, e.mode, e.nlink, e.uid, e.gid, e.rdev, e.size, e.mtime_sec,
                        e.mtime_nsec, e.payload, e.content, e.digest, dict(e.xattrs)))
    return out


def conformance_inputs() -> list[tuple[str, Path, bool, bool]]:
    """(name, input, strict, must_fail) for every distinct input of both cases.tsv files."""
    seen: dict[tuple[Path, bool], tuple[str, Path, bool, bool]] = {}
    for tsv in (CONFORMANCE / "cases.tsv", UPSTREAM / "cases.tsv"):
        if not tsv.exists():
            continue
        for row in tsv.read_text().splitlines():
            if not row.strip():
                continue
            name, inp, _args, sha, _digest, strict = row.split("\t")
            path = tsv.parent / inp
            key = (path, strict.strip() == "strict=1")
            seen.setdefault(key, (name.split(":")[0], path, key[1], sha == "FAIL"))
    return sorted(seen.values())


def read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


CONFORMANCE_INPUTS = conformance_inputs()
needs_corpus = pytest.mark.skipif(not CONFORMANCE_INPUTS,
                                  reason=f"conformance corpus not found at {CONFORMANCE}")


# ---------------------------------------------------------------------------------------------
# escapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("escaped, raw", [
    (b"plain", b"plain"),
    (b"a\\\\b", b"a\\b"),
    (b"\\n\\r\\t", b"\n\r\t"),
    (b"\\x41\\x3d\\x3D\\xff\\x00", b"A==\xff\x00"),
    (b"\\x2d", b"-"),
    (b"=\x80\x01", b"=\x80\x01"),  # everything else is literal
    (b"", b""),
])
def test_unescape(escaped, raw):
    assert unescape(escaped) == raw


@pytest.mark.parametrize("escaped, message", [
    (b"abc\\", "No character after escape"),
    (b"\\x", "No hex characters after hex escape"),
    (b"\\x4", "No hex characters after hex escape"),
    (b"\\xg1", "Invalid hex characters after hex escape"),
    (b"\\x1g", "Invalid hex characters after hex escape"),
    (b"\\q", "Unsupported escape type q"),
    (b"\\a\\x", "Unsupported escape type a"),  # the first bad escape is reported
])
def test_unescape_errors(escaped, message):
    with pytest.raises(ValueError, match=message):
        unescape(escaped)


@pytest.mark.parametrize("raw, kwargs, escaped", [
    (b"a b", {}, b"a\\x20b"),
    (b"\\\n\r\t", {}, b"\\\\\\n\\r\\t"),
    (b"\x00\x7f\x80\xff", {}, b"\\x00\\x7f\\x80\\xff"),
    (b"k=v", {}, b"k=v"),
    (b"k=v", {"equal": True}, b"k\\x3dv"),
    (b"-", {}, b"-"),
    (b"-", {"lone_dash": True}, b"\\x2d"),
    (b"--", {"lone_dash": True}, b"--"),
    (b"!~", {}, b"!~"),
])
def test_escape_canonical(raw, kwargs, escaped):
    assert escape(raw, **kwargs) == escaped


@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_escape_roundtrip(raw, equal, lone_dash):
    text = escape(raw, equal=equal, lone_dash=lone_dash)
    assert unescape(text) == raw
    assert all(0x21 <= b <= 0x7E for b in text)  # never a space, newline or NUL
    if equal:
        assert b"=" not in text
    if lone_dash:
        assert text != b"-"


@given(st.binary(max_size=100).filter(lambda b: b"\\" not in b))
def test_unescape_without_backslash_is_identity(raw):
    assert unescape(raw) == raw


# ---------------------------------------------------------------------------------------------
# fields and per-type semantics
# ---------------------------------------------------------------------------------------------

def test_root_fields():
    root = parse(b"/ 123 41777 7 1000 2000 0 1633950376.5 - - - user.a=b\n")
    assert (root.mode, root.nlink, root.uid, root.gid, root.rdev, root.size) == \
        (0o41777, 7, 1000, 2000, 0, 123)
    assert (root.mtime_sec, root.mtime_nsec) == (1633950376, 5)
    assert root.xattrs == {b"user.a": b"b"} and root.children == {}


def test_inline_file_drops_payload_and_digest():
    node = one(b"/f 5 100644 3 0 0 0 0.0 ab/cd hello " + DIGEST_HEX)
    assert (node.size, node.content, node.payload, node.digest, node.nlink) == \
        (5, b"hello", None, None, 3)


def test_external_file():
    node = one(b"/f 10 100755 1 0 0 0 0.0 ab/cd - " + DIGEST_HEX.upper())
    assert (node.mode, node.size, node.content, node.payload, node.digest) == \
        (0o100755, 10, None, b"ab/cd", DIGEST)


def test_external_file_without_payload_or_digest():
    node = one(b"/f 10 100644 1 0 0 0 0.0 - - -")
    assert (node.payload, node.digest) == (None, None)
    assert one(b"/f 10 100644 1 0 0 0 0.0  - -").payload is None  # empty PAYLOAD: no redirect


def test_empty_file_drops_payload_and_digest():
    node = one(b"/f 0 100644 1 0 0 0 0.0 ab/cd - " + DIGEST_HEX)
    assert (node.size, node.payload, node.digest, node.content) == (0, None, None, None)
    node = one(b"/f 0 100644 1 0 0 0 0.0 ab/cd  " + DIGEST_HEX)  # empty CONTENT = none
    assert (node.size, node.content, node.payload) == (0, None, None)


def test_symlink_size_is_target_length():
    node = one(b"/l 999 120777 1 0 0 0 0.0 target - -")
    assert (node.size, node.payload, node.content) == (6, b"target", None)
    assert one(b"/l 3 120777 1 0 0 0 0.0 a\\x20b abc -").payload == b"a b"  # content ignored


@pytest.mark.parametrize("mode, rdev, size", [
    (b"20644", 259, 0), (b"60600", 4294967296 + 5, 17), (b"20000", 0, 5000000000)])
def test_devices_keep_rdev_and_size(mode, rdev, size):
    node = one(b"/d %d %s 1 0 0 %d 0.0 - - -" % (size, mode, rdev))
    assert (node.rdev, node.size) == (rdev & 0xFFFFFFFF, size)


@pytest.mark.parametrize("mode", [b"10644", b"140755", b"40755", b"100644"])
def test_rdev_is_ignored_for_non_devices_when_lenient(mode):
    assert one(b"/x 0 %s 1 0 0 77 0.0 - - -" % mode).rdev == 0
    assert "Non-zero devnum on non-device" in fail(ROOT + b"/x 0 %s 1 0 0 77 0.0 - - -\n" % mode,
                                                   strict=True).message


def test_fifo_and_directory_keep_size():
    assert one(b"/p 5000000000 10644 1 0 0 0 0.0 - - -").size == 5000000000
    assert one(b"/d 27 40755 9 0 0 0 0.0 - - -").size == 27


def test_content_on_other_types_is_checked_then_dropped():
    node = one(b"/d 3 40755 2 0 0 0 0.0 pay abc -")
    assert (node.content, node.payload, node.size) == (None, None, 3)
    assert "Invalid content size 3, must match size 4" in \
        fail(ROOT + b"/p 4 10644 1 0 0 0 0.0 - abc -\n").message


def test_mode_is_cut_to_16_bits():
    assert one(b"/f 0 1100644 1 0 0 0 0.0 - - -").mode == 0o100644


@pytest.mark.parametrize("mtime, sec, nsec", [
    (b"1.1", 1, 1),
    (b"0.999999999", 0, 999999999),
    (b"-1.0", -1, 0),
    (b"18446744073709551615.0", -1, 0),
    (b"9223372036854775808.0", -(1 << 63), 0),
    (b"0.4294967297", 0, 1),
    (b"+5.-1", 5, 0xFFFFFFFF),
    (b"99999999999999999999999.0", -1, 0),
])
def test_mtime(mtime, sec, nsec):
    node = one(b"/f 0 100644 1 0 0 0 %s - - -" % mtime)
    assert (node.mtime_sec, node.mtime_nsec) == (sec, nsec)


@pytest.mark.parametrize("mtime", [b"1", b"1.", b".1", b"1.2.3", b"1.0\r", b"x.0", b""])
def test_bad_mtime(mtime):
    err = fail(ROOT + b"/f 0 100644 1 0 0 0 %s - - -\n" % mtime)
    assert err.message.startswith("Invalid integer") and err.line == 2


# ---------------------------------------------------------------------------------------------
# integers: C strtoull on the whole field
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"00012", 12), (b"+5", 5), (b"-1", U64), (b"-0", 0),
    (b"-18446744073709551615", 1), (b"18446744073709551615", U64),
    (b"18446744073709551616", U64),  # saturates
    (b"99999999999999999999999999999999", U64),
    (b"-99999999999999999999999", U64),  # overflow saturates even when negative
    (b"\t7", 7), (b"\x0b\x0c\r8", 8),  # leading C whitespace
    (b"0" * 5000 + b"3", 3), (b"9" * 5000, U64),
])
def test_integer_quirks(text, value):
    assert one(b"/p %s 10644 1 0 0 0 0.0 - - -" % text).size == value


@pytest.mark.parametrize("text", [
    b"", b"+", b"-", b"--1", b"+-1", b"5\r", b"5\t", b"1_0", b"0x10", b"1e3", b"\xd9\xa3", b"\tx"])
def test_integer_errors(text):
    err = fail(ROOT + b"/p %s 10644 1 0 0 0 0.0 - - -\n" % text)
    assert err.message.startswith("Invalid integer") and "SIZE" in err.message and err.line == 2


def test_u32_fields_are_truncated():
    node = one(b"/f 0 100644 4294967297 4294967298 -1 0 0.0 - - -")
    assert (node.nlink, node.uid, node.gid) == (1, 2, 0xFFFFFFFF)


@pytest.mark.parametrize("mode, expected", [
    (b"0100644", 0o100644), (b"+100644", 0o100644), (b"\t40755", 0o40755),
    (b"1777777777777777100644", 0o100644), (b"777777777777777777777777", None)])
def test_octal_mode(mode, expected):
    if expected is None:  # saturates to 2**64 - 1: type bits 0170000
        assert fail(ROOT + b"/x 0 %s 1 0 0 0 0.0 - - -\n" % mode).message == \
            "Invalid mode 37777777777"
    else:
        assert one(b"/x 0 %s 1 0 0 0 0.0 - - -" % mode).mode == expected & 0o177777


@pytest.mark.parametrize("mode, message", [
    (b"644", "Invalid mode 644"),
    (b"0", "Invalid mode 0"),
    (b"170644", "Invalid mode 170644"),
    (b"-100644", "Invalid mode 37777677134"),
    (b"100648", "Invalid integer 100648"),
    (b"", "Invalid integer "),
    (b"@", "Invalid integer "),
    (b"@@100644", "Invalid integer @100644"),
])
def test_bad_mode(mode, message):
    err = fail(ROOT + b"/x 0 %s 1 0 0 0 0.0 - - -\n" % mode)
    assert err.message.startswith(message) and err.line == 2


@pytest.mark.parametrize("field", [3, 4, 5, 6])
def test_integer_fields_are_checked(field):
    parts = b"/f 0 100644 1 1000 0 0 0.0 - - -".split(b" ")
    parts[field] = b"x"
    err = fail(ROOT + b" ".join(parts) + b"\n")
    assert err.message.startswith("Invalid integer x in ") and err.line == 2


def test_gid_and_rdev_errors_are_not_ignored_when_uid_is_set():
    # Deliberate: the C tool tests the UID result here and silently takes GID/RDEV as 0.
    assert "GID" in fail(ROOT + b"/f 0 100644 1 1000 x 0 0.0 - - -\n").message
    assert "RDEV" in fail(ROOT + b"/f 0 100644 1 1000 0 x 0.0 - - -\n").message


def test_field_error_order_follows_c():
    # SIZE before NLINK before MTIME; the path is placed before any of them is read.
    assert "SIZE" in fail(ROOT + b"/f x 100644 x 0 0 0 x - - -\n").message
    assert "NLINK" in fail(ROOT + b"/f 0 100644 x 0 0 0 x - - -\n").message
    assert "Parent directory missing" in fail(ROOT + b"/a/f x 100644 1 0 0 0 0.0 - - -\n").message
    assert "Invalid mode" in fail(b"/a/f x 0 x 0 0 0 x - - -\n").message


# ---------------------------------------------------------------------------------------------
# lines and fields
# ---------------------------------------------------------------------------------------------

def test_empty_input():
    err = fail(b"")
    assert err.message == "No files in dump file" and err.line == 0


@pytest.mark.parametrize("text, line", [(b"\n", 1), (ROOT + b"\n", 2), (ROOT + b"\n" + ROOT, 2)])
def test_empty_line(text, line):
    err = fail(text)
    assert err.message == "Invalid empty path" and err.line == line


def test_embedded_nul():
    err = fail(ROOT + b"/a\x00 0 100644 1 0 0 0 0.0 - - -\n")
    assert err.message == "Invalid embedded NUL character at position 2" and err.line == 2
    # an error on an earlier line wins
    err = fail(ROOT + b"/b 0 0 1 0 0 0 0.0 - - -\n/a\x00\n")
    assert err.message == "Invalid mode 0" and err.line == 2
    # a NUL in the unparsed last line of a strict parse: the newline error
    err = fail(ROOT + b"/a\x00", strict=True)
    assert err.message == "Missing trailing newline" and err.line == 2
    err = fail(ROOT + b"/a\x00")
    assert "NUL" in err.message and err.line == 2


def test_missing_trailing_newline():
    root = parse(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -")
    assert b"f" in root.children
    err = fail(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -", strict=True)
    assert err.message == "Missing trailing newline" and err.line == 2
    # errors in the complete lines come first
    err = fail(ROOT + b"/g 0 0 1 0 0 0 0.0 - - -\n/f", strict=True)
    assert err.message == "Invalid mode 0" and err.line == 2
    assert parse(b"/ 4096 40755 2 0 0 0 0.0 - - -", strict=False).children == {}


def test_short_lines_give_empty_fields():
    err = fail(ROOT + b"/f 0 100644\n")
    assert err.message == "Invalid integer  in NLINK"
    # nine fields: CONTENT and DIGEST empty; fine for an empty file
    assert one(b"/f 0 100644 1 0 0 0 0.0 -").content is None


def test_trailing_spaces():
    assert one(b"/f 0 100644 1 0 0 0 0.0 - - - ").xattrs == {}
    assert one(b"/f 0 100644 1 0 0 0 0.0 - - - a=b ").xattrs == {b"a": b"b"}
    for text in (b"/f 0 100644 1 0 0 0 0.0 - - -  ", b"/f 0 100644 1 0 0 0 0.0 - - - a=b  c=d"):
        err = fail(ROOT + text + b"\n")
        assert err.message.startswith("Missing = in xattr") and err.line == 2


def test_crlf():
    # "\r" is not stripped: it ends up in the last field
    root = parse(b"/ 4096 40755 2 0 0 0 0.0 - - -\r\n/f 0 100644 1 0 0 0 0.0 - - - a=b\r\n")
    assert root.children[b"f"].xattrs == {b"a": b"b\r"}
    err = fail(ROOT + b"/f 10 100644 1 0 0 0 0.0 ab/cd - -\r\n")
    assert err.message.startswith("Invalid digest")


def test_gc_state_is_restored():
    import gc
    assert gc.isenabled()
    parse(ROOT)
    fail(ROOT + b"/x\n")
    format_dumpfile(parse(ROOT))
    assert gc.isenabled()
    gc.disable()
    try:
        parse(ROOT)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_error_carries_source_and_line():
    with pytest.raises(DumpfileError) as info:
        parse_dumpfile(ROOT + b"/x 0 0 1 0 0 0 0.0 - - -\n", source="in.dump")
    assert str(info.value) == "in.dump:2: Invalid mode 0"
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------
# paths (dumpfile.py, "Paths") and the root
# ---------------------------------------------------------------------------------------------

def test_slash_runs_and_relative_paths():
    root = parse(ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n"
                 b"/a//b 0 100644 1 0 0 0 0.0 - - -\n"
                 b"//c 0 100644 1 0 0 0 0.0 - - -\n"
                 b"rel 0 40755 1 0 0 0 0.0 - - -\n"
                 b"rel///x 0 100644 1 0 0 0 0.0 - - -\n"
                 b"///a/d 0 100644 1 0 0 0 0.0 - - -\n")
    assert sorted(root.children) == [b"a", b"c", b"rel"]
    assert sorted(root.children[b"a"].children) == [b"b", b"d"]
    assert list(root.children[b"rel"].children) == [b"x"]


@pytest.mark.parametrize("line, message", [
    (b"// 0 40755 2 0 0 0 0.0 - - -", "Can't add child"),
    (b"/a/ 0 40755 2 0 0 0 0.0 - - -", "Can't add child"),
    (b"/. 0 40755 2 0 0 0 0.0 - - -", "Invalid . or .. in path: /."),
    (b"/a/.. 0 40755 2 0 0 0 0.0 - - -", "Invalid . or .. in path: /a/.."),
    (b"/./x 0 100644 1 0 0 0 0.0 - - -", "Parent directory missing for /./x"),
    (b"/a/../x 0 100644 1 0 0 0 0.0 - - -", "Parent directory missing for /a/../x"),
    (b"/nope/x 0 100644 1 0 0 0 0.0 - - -", "Parent directory missing for /nope/x"),
    (b"/f/x 0 100644 1 0 0 0 0.0 - - -", "Parent must be a directory for /f/x"),
    (b"/f/ 0 100644 1 0 0 0 0.0 - - -", "Parent must be a directory for /f/"),
    (b"/f/x/y 0 100644 1 0 0 0 0.0 - - -", "Parent directory missing for /f/x/y"),
    (b"/hl/x 0 100644 1 0 0 0 0.0 - - -", "Parent must be a directory for /hl/x"),
    (b"/f 0 100644 1 0 0 0 0.0 - - -", "Can't add child: /f already exists"),
    (b"//f 0 40755 1 0 0 0 0.0 - - -", "Can't add child: //f already exists"),
    (b"/q\\x2fb 0 100644 1 0 0 0 0.0 - - -", "Parent directory missing for /q/b"),
    (b"/sp\\x20ace\\n/x 0 100644 1 0 0 0 0.0 - - -",
     "Parent directory missing for /sp\\x20ace\\n/x"),  # one line, escaped like a dump
    (b"/" + b"n" * 256 + b" 0 100644 1 0 0 0 0.0 - - -", "Can't add child: file name of 256"),
    (b"/ 0 40755 2 0 0 0 0.0 - - -", "Can't have multiple roots"),
    (b"/ 0 100644 2 0 0 0 0.0 - - -", "Root must be a directory"),
])
def test_path_errors(line, message):
    text = (ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 0.0 - - -\n"
            b"/hl 0 @100644 1 0 0 0 0.0 /f - -\n" + line + b"\n")
    err = fail(text)
    assert err.message.startswith(message) and err.line == 5


def test_longest_name_and_nul_cut():
    name = b"n" * 255
    assert name in parse(ROOT + b"/" + name + b" 0 100644 1 0 0 0 0.0 - - -\n").children
    root = parse(ROOT + b"/ab\\x00cd 0 100644 1 0 0 0 0.0 - - -\n")
    assert list(root.children) == [b"ab"]  # the path is a C string


@pytest.mark.parametrize("text, message", [
    (b"/a 0 100644 1 0 0 0 0.0 - - -\n", "Root node not present"),
    (b"/ 0 100644 1 0 0 0 0.0 - - -\n", "Root must be a directory"),
    (b"\\x00 0 40755 1 0 0 0 0.0 - - -\n", "Invalid empty path"),
    (b"/ 0 @40755 1 0 0 0 0.0 - - -\n", "Directories can't be hardlinked"),
    (b"/ 0 @100644 1 0 0 0 0.0 - - -\n", "Root must be a directory"),
])
def test_root_errors(text, message):
    err = fail(text)
    assert err.message.startswith(message) and err.line == 1


# ---------------------------------------------------------------------------------------------
# payload, content, digest
# ---------------------------------------------------------------------------------------------

def test_content_rules():
    assert one(b"/f 5000 100644 1 0 0 0 0.0 - " + b"x" * 5000 + b" -").size == 5000
    err = fail(ROOT + b"/f 5001 100644 1 0 0 0 0.0 - " + b"x" * 5001 + b" -\n")
    assert err.message == "Inline content size 5001 exceeds maximum 5000" and err.line == 2
    err = fail(ROOT + b"/f 10 100644 1 0 0 0 0.0 ab/cd  -\n")
    assert err.message == "Invalid content size 0, must match size 10"
    assert one(b"/f 1 100644 1 0 0 0 0.0 - \\x2d -").content == b"-"
    assert one(b"/f 2 100644 1 0 0 0 0.0 - \\x00\\n -").content == b"\x00\n"  # binary-safe
    err = fail(ROOT + b"/f 3 100644 1 0 0 0 0.0 - ab\\q -\n")
    assert err.message.startswith("Unsupported escape type q") and "CONTENT" in err.message


def test_payload_limits():
    assert one(b"/f 1 100644 1 0 0 0 0.0 " + b"p" * 4095 + b" - -").payload == b"p" * 4095
    err = fail(ROOT + b"/f 1 100644 1 0 0 0 0.0 " + b"p" * 4096 + b" - -\n")
    assert err.message.startswith("Invalid payload") and err.line == 2
    # unused payloads of other types are still checked
    assert fail(ROOT + b"/p 0 10644 1 0 0 0 0.0 " + b"p" * 4096 + b" - -\n").message \
        .startswith("Invalid payload")
    assert one(b"/f 1 100644 1 0 0 0 0.0 ab\\x00cd - -").payload == b"ab"  # C string
    assert one(b"/f 1 100644 1 0 0 0 0.0 \\x2d - -").payload == b"-"


@pytest.mark.parametrize("payload, ok", [
    (b"t" * 4095, True), (b"t" * 4096, False), (b"-", False), (b"", False), (b"\\x00x", False),
    (b"\\x2d", True)])
def test_symlink_target(payload, ok):
    line = b"/l 1 120777 1 0 0 0 0.0 %s - -" % payload
    if ok:
        assert one(line).payload == unescape(payload)
    else:
        err = fail(ROOT + line + b"\n")
        assert err.message.startswith("Invalid symlink") and err.line == 2


@pytest.mark.parametrize("digest", [
    b"", b"a" * 63, b"a" * 65, b"a" * 128, b"g" * 64, b"-\r", b"\\x00" + b"a" * 63])
def test_bad_digest_of_external_file(digest):
    # Deliberate: C leaves uninitialized bytes (or cuts after 32 bytes) instead of failing.
    err = fail(ROOT + b"/f 10 100644 1 0 0 0 0.0 ab/cd - %s\n" % digest)
    assert err.message.startswith("Invalid digest") and err.line == 2


def test_digest_unused_elsewhere_is_not_checked():
    # C accepts these and ignores the digest (upstream asset honggfuzz-longlink-unterminated).
    for line in (b"/c 0 20720777 1 0 0 0 0.0 aaa  ", b"/l 1 120777 1 0 0 0 0.0 t - xyz",
                 b"/f 1 100644 1 0 0 0 0.0 - a zz", b"/e 0 100644 1 0 0 0 0.0 - - short"):
        assert one(line).digest is None
    assert one(b"/f 10 100644 1 0 0 0 0.0 - - " + b"\\x61" * 64).digest == b"\xaa" * 32


# ---------------------------------------------------------------------------------------------
# xattrs
# ---------------------------------------------------------------------------------------------

def test_xattr_parsing():
    node = one(b"/f 0 100644 1 0 0 0 0.0 - - - a=b=c k\\x3dz=v e= n=\\x00x\\x20y user.x=1")
    assert node.xattrs == {b"a": b"b=c", b"k=z": b"v", b"e": b"", b"n": b"\x00x y",
                           b"user.x": b"1"}


def test_xattr_duplicates_later_wins():
    assert one(b"/f 0 100644 1 0 0 0 0.0 - - - a=1 b=2 a=3").xattrs == {b"a": b"3", b"b": b"2"}


def test_xattr_key_is_a_c_string():
    assert one(b"/f 0 100644 1 0 0 0 0.0 - - - k\\x00x=v").xattrs == {b"k": b"v"}
    err = fail(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - \\x00k=v\n")
    assert err.message.startswith("Can't set xattr")


@pytest.mark.parametrize("xattrs, ok", [
    (b"user.a=" + b"b" * 32742, True),  # 12 + 7 + 6 + 32742 = 32767
    (b"user.a=" + b"b" * 32743, False),
    (b"a=1 b=" + b"v" * 32738, True),  # 12 + 7+1+1 + 7+1+32738 = 32767
    (b"a=1 b=" + b"v" * 32739, False),
    (b"user.x=1 user.x=" + b"z" * 32742, True),  # the only xattr replaced: counts from 0
    (b"a=1 user.x=1 user.x=" + b"z" * 32733, True),  # 12+7+1+1 + 7+6+32733 = 32767
    (b"a=1 user.x=1 user.x=" + b"z" * 32735, False),
    (b"k" * 255 + b"=v", True),
    (b"k" * 256 + b"=v", False),
    (b"=v", False),
])
def test_xattr_budget_and_limits(xattrs, ok):
    line = b"/f 0 100644 1 0 0 0 0.0 - - - " + xattrs
    if ok:
        one(line)
    else:
        err = fail(ROOT + line + b"\n")
        assert err.message.startswith("Can't set xattr") and err.line == 2


def test_too_many_xattrs():
    # the check is on the raw text after DIGEST, before any xattr is looked at
    err = fail(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - " + b"a" * 65536 + b"\n")
    assert err.message.startswith("Too many xattrs") and err.line == 2
    err = fail(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - a=" + b"b" * 65533 + b"\n")
    assert err.message.startswith("Can't set xattr")


def test_xattr_escape_errors():
    err = fail(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - a=\\xq1\n")
    assert err.message.startswith("Invalid hex characters after hex escape")
    # split at the first "=" before unescaping: the key is "a\\" here
    err = fail(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - a\\=b\n")
    assert err.message.startswith("No character after escape in xattr key")


# ---------------------------------------------------------------------------------------------
# hard links (dumpfile.py, "Hard links")
# ---------------------------------------------------------------------------------------------

def test_hardlink_basic():
    root = parse(ROOT + b"/f 3 100644 1 0 0 0 0.0 - abc -\n"
                 b"/g 99 @100644 7 1 2 3 x.y /f zz ignored garbage\n")  # other fields ignored
    link = root.children[b"g"]
    assert isinstance(link, HardLink) and link.target is root.children[b"f"]
    assert root.children[b"f"].nlink == 1  # the target's NLINK is not changed


def test_hardlink_forward_reference_and_chain():
    root = parse(ROOT + b"/c 0 @100644 1 0 0 0 0.0 /b - -\n"
                 b"/b 0 @100644 1 0 0 0 0.0 /a - -\n"
                 b"/a 0 100644 5 0 0 0 0.0 - - -\n")
    c, b, a = (root.children[n] for n in (b"c", b"b", b"a"))
    assert c.target is b and b.target is a and resolve(c) is a


def test_hardlink_target_paths():
    root = parse(ROOT + b"/d 0 40755 2 0 0 0 0.0 - - -\n/d/f 0 100644 1 0 0 0 0.0 - - -\n"
                 b"/l1 0 @100644 1 0 0 0 0.0 d//f - -\n"
                 b"/l2 0 @100644 1 0 0 0 0.0 /d/f/ - -\n"
                 b"/l3 0 @100644 1 0 0 0 0.0 / - -\n"  # the root (quirk)
                 b"/l4 0 @100644 1 0 0 0 0.0  - -\n"  # empty PAYLOAD: the root too
                 b"/l5 0 @20000 1 0 0 0 0.0 /d - -\n")  # a directory via a non-dir mode
    f = root.children[b"d"].children[b"f"]
    assert root.children[b"l1"].target is f and root.children[b"l2"].target is f
    assert root.children[b"l3"].target is root and root.children[b"l4"].target is root
    assert root.children[b"l5"].target is root.children[b"d"]


@pytest.mark.parametrize("lines, message, line", [
    (b"/h 0 @100644 1 0 0 0 0.0 /h - -\n", "Self-referential hardlink /h", 2),
    (b"/h 0 @100644 1 0 0 0 0.0 //h - -\n", "Self-referential hardlink //h", 2),
    (b"/h 0 @100644 1 0 0 0 0.0 /nope - -\n", "No target at /nope for hardlink", 2),
    (b"/h 0 @100644 1 0 0 0 0.0 - - -\n", "No target path for the hardlink", 2),
    (b"/h 0 @40755 1 0 0 0 0.0 /f - -\n", "Directories can't be hardlinked", 2),
    (b"/h 0 @0 1 0 0 0 0.0 /f - -\n", "Invalid mode 0", 2),
    (b"/h 0 @100644 1 0 0 0 0.0 /f\\q - -\n", "Unsupported escape type q", 2),
    # resolution runs from the last placeholder back to the first
    (b"/f 0 100644 1 0 0 0 0.0 - - -\n/a 0 @100644 1 0 0 0 0.0 /x - -\n"
     b"/b 0 @100644 1 0 0 0 0.0 /y - -\n/c 0 100644 1 0 0 0 0.0 - - -\n",
     "No target at /y for hardlink", 4),
    # placeholders are not traversed when looking up a target
    (b"/d 0 40755 1 0 0 0 0.0 - - -\n/d/f 0 100644 1 0 0 0 0.0 - - -\n"
     b"/h 0 @100644 1 0 0 0 0.0 /d - -\n/g 0 @100644 1 0 0 0 0.0 /h/f - -\n",
     "No target at /h/f for hardlink", 5),
    (b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n",
     "Too many levels of symbolic links", 3),
])
def test_hardlink_errors(lines, message, line):
    err = fail(ROOT + lines)
    assert err.message.startswith(message) and err.line == line


def test_hardlink_lines_skip_strict_checks():
    root = parse(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -\n/g 0 @100644 1 0 0 9 0.0 /f - -\n",
                 strict=True)
    assert isinstance(root.children[b"g"], HardLink)


# ---------------------------------------------------------------------------------------------
# strict mode (dumpfile.py, "Strict mode")
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -", "Missing trailing newline"),
    (ROOT + b"/f 0 100644 1 0 0 5 0.0 - - -\n", "Non-zero devnum on non-device"),
    (ROOT + b"/f 0 40755 1 0 0 -1 0.0 - - -\n", "Non-zero devnum on non-device"),
    (ROOT + b"/f 0 10644 1 0 0 4294967296 0.0 - - -\n", "Non-zero devnum on non-device"),
    (ROOT + b"/l 3 120777 1 0 0 0 0.0 ab - -\n", "Invalid symlink size 2, must match size 3"),
    (ROOT + b"/l 2 120777 1 0 0 0 0.0 ab ab -\n", "Symlink cannot have content"),
])
def test_strict_only_errors(text, message):
    parse(text, strict=False)
    err = fail(text, strict=True)
    assert err.message.startswith(message) and err.line == 2


def test_strict_accepts_device_rdev_and_matching_symlink():
    root = parse(ROOT + b"/c 0 20644 1 0 0 259 0.0 - - -\n/l 2 120777 1 0 0 0 0.0 ab - -\n",
                 strict=True)
    assert root.children[b"c"].rdev == 259 and root.children[b"l"].payload == b"ab"


# ---------------------------------------------------------------------------------------------
# upstream must-fail assets and the conformance corpus
# ---------------------------------------------------------------------------------------------

# asset -> (message start, line) in lenient mode; in strict mode the inputs without a final
# newline fail with "Missing trailing newline" instead, exactly like the C tool.
SHOULD_FAIL = {
    "should-fail-big-inline.dump": ("Inline content size 5004 exceeds maximum 5000", 2),
    "should-fail-dir-hardlink.dump": ("Directories can't be hardlinked", 2),
    "should-fail-dot-name.dump": ("Invalid . or .. in path: /.", 2),
    "should-fail-dotdot-name.dump": ("Invalid . or .. in path: /..", 2),
    "should-fail-empty-link-name.dump": ("Invalid symlink", 2),
    "should-fail-empty-name.dump": ("Can't add child", 2),
    "should-fail-empty-xattr-key.dump": ("Can't set xattr", 2),
    "should-fail-honggfuzz-long-xattr.dump": ("Can't set xattr", 1),
    "should-fail-long-link.dump": ("Invalid symlink", 2),
    "should-fail-long-xattr-key.dump": ("Too many xattrs", 2),
    "should-fail-long-xattr-value.dump": ("Invalid mode 644", 2),
    "should-fail-no-ftype.dump": ("Invalid mode 0", 2),
    "should-fail-self-hardlink.dump": ("Self-referential hardlink /037blockdev", 2),
}
MUST_FAIL_INPUTS = [c for c in CONFORMANCE_INPUTS if c[3]]


@needs_corpus
@pytest.mark.parametrize("name, path, strict", [c[:3] for c in MUST_FAIL_INPUTS],
                         ids=[c[0] for c in MUST_FAIL_INPUTS])
def test_should_fail_assets(name, path, strict):
    data = read(path)
    if name == "should-fail-too-big.dump":
        # 9.5e15 bytes > 2**53: parses; the writer refuses it ("File too large", erofs/layout.py, "External files")
        assert get(parse(data, strict), b"/bigfile").size == 9500000000000000
        return
    message, line = SHOULD_FAIL[name]
    err = fail(data, strict=False)
    assert err.message.startswith(message) and err.line == line
    err = fail(data, strict=strict)
    if strict and not data.endswith(b"\n"):
        message = "Missing trailing newline"
    assert err.message.startswith(message) and err.line == line


@needs_corpus
def test_every_upstream_should_fail_asset_is_listed():
    names = {p.name for p in UPSTREAM.glob("should-fail-*.dump")}
    assert names == set(SHOULD_FAIL) | {"should-fail-too-big.dump"}
    assert {c[0] for c in MUST_FAIL_INPUTS} == names


PASS_INPUTS = [c for c in CONFORMANCE_INPUTS if not c[3]]


@needs_corpus
@pytest.mark.parametrize("name, path, strict", [c[:3] for c in PASS_INPUTS],
                         ids=[f"{c[0]}-strict{int(c[2])}" for c in PASS_INPUTS])
def test_conformance_dumps_parse_and_roundtrip(name, path, strict):
    first = parse(read(path), strict)
    text = format_dumpfile(first)
    second = parse(text, strict=True)
    assert snapshot(second) == snapshot(first)
    assert format_dumpfile(second) == text


@needs_corpus
def test_cs9_minimal_shape():
    root = parse(read(UPSTREAM / "cs9-x86_64-minimal.dump.gz"), strict=True)
    entries = list(iter_tree(root))
    assert len(entries) == 22010
    bin_ = root.children[b"bin"]
    assert bin_.mode == 0o120777 and bin_.payload == b"usr/bin" and bin_.size == 7


@needs_corpus
def test_hardlink_asset():
    root = parse(read(UPSTREAM / "config-with-hard-link.dump.gz"), strict=True)
    links = [(p, e) for p, e in iter_tree(root) if isinstance(e, HardLink)]
    assert links and all(isinstance(resolve(e), Node) for _, e in links)


# ---------------------------------------------------------------------------------------------
# the printer (composefs-info dump)
# ---------------------------------------------------------------------------------------------

def test_format_exact_text():
    # already canonical text prints back byte for byte
    text = (b"/ 4096 40755 2 0 0 0 -5.7 - - - user.k\\x3d=v\\x3dw security.selinux=a\\x20b\n"
            b"/- 1 100644 1 0 0 0 1.2 - \\x2d -\n"
            b"/a\\x20b 10 100644 9 4294967295 2 0 0.0 \\x2d - " + DIGEST_HEX + b"\n"
            b"/c 0 20644 1 0 0 259 0.0 - - -\n"
            b"/d 27 40755 2 0 0 0 0.0 - - -\n"
            b"/d/h 10 @100644 9 4294967295 2 0 0.0 /a\\x20b - " + DIGEST_HEX + b"\n"
            b"/l 3 120777 1 0 0 0 0.0 x\\t\\n - -\n"
            b"/p 5000000000 10644 1 0 0 0 0.0 - - -\n")
    assert format_dumpfile(parse(text, strict=True)) == text


def test_format_is_canonical():
    text = (b"/ 4096 40755 2 0 0 0 0.0 - - - user.a=x=y\n"
            b"/z 5 100644 1 0 0 0 0.0 ab/cd a\\x62c\\x0a\\x20 " + DIGEST_HEX.upper() + b"\n"
            b"//b 0 10644 1 0 0 7 0.0 pay - -\n"
            b"c 0 100644 1 0 0 0 0.0 pay - " + DIGEST_HEX + b"\n"
            b"/l 99 120777 1 0 0 0 0.0 \\x41 - -\n")
    out = format_dumpfile(parse(text))
    assert out == (b"/ 4096 40755 2 0 0 0 0.0 - - - user.a=x\\x3dy\n"
                   b"/b 0 10644 1 0 0 0 0.0 - - -\n"
                   b"/c 0 100644 1 0 0 0 0.0 - - -\n"
                   b"/l 1 120777 1 0 0 0 0.0 A - -\n"
                   b"/z 5 100644 1 0 0 0 0.0 - abc\\n\\x20 -\n")


def test_format_hardlinks():
    root = parse(ROOT + b"/a 0 @100644 1 0 0 0 0.0 /b - -\n"
                 b"/b 0 @100644 1 0 0 0 0.0 /f - -\n"
                 b"/f 3 100755 4 5 6 0 7.8 - xyz - user.x=1\n"
                 b"/r 0 @100644 1 0 0 0 0.0 / - -\n")
    lines = format_dumpfile(root).splitlines()
    # a chain prints the path of the node it reaches; the target's fields and xattrs
    assert lines[1] == b"/a 3 @100755 4 5 6 0 7.8 /f xyz - user.x=1"
    assert lines[2] == b"/b 3 @100755 4 5 6 0 7.8 /f xyz - user.x=1"
    assert lines[3] == b"/f 3 100755 4 5 6 0 7.8 - xyz - user.x=1"
    # the root's path is empty in node_build_path()
    assert lines[4] == b"/r 4096 @40755 2 0 0 0 0.0  - -"


def test_format_keeps_xattr_order():
    root = parse(ROOT)
    root.xattrs = {b"z": b"1", b"a": b"2"}
    assert format_dumpfile(root) == b"/ 4096 40755 2 0 0 0 0.0 - - - z=1 a=2\n"


def test_format_rejects_dangling_links():
    root = parse(ROOT)
    root.children[b"x"] = HardLink(Node(0o100644))
    with pytest.raises(ValueError):
        format_dumpfile(root)


def test_write_dumpfile_matches_format():
    root = parse(ROOT + b"".join(b"/f%d 0 100644 1 0 0 0 0.0 - - -\n" % i for i in range(5000)))
    buf = io.BytesIO()
    write_dumpfile(root, buf)
    assert buf.getvalue() == format_dumpfile(root)


# ---------------------------------------------------------------------------------------------
# format -> parse round trip of random trees
# ---------------------------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=20).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
cstrings = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)
u32 = st.integers(0, 0xFFFFFFFF)
xattr_dicts = st.dictionaries(cstrings, st.binary(max_size=60), max_size=4)


@st.composite
def trees(draw):
    def common():
        return dict(nlink=draw(u32), uid=draw(u32), gid=draw(u32),
                    mtime_sec=draw(st.integers(-(1 << 63), (1 << 63) - 1)),
                    mtime_nsec=draw(u32), xattrs=draw(xattr_dicts))

    root = Node(0o40000 | draw(st.integers(0, 0o7777)), size=draw(st.integers(0, U64)),
                **common())
    dirs = [root]
    leaves: list[Node] = []
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        if name in parent.children:
            continue
        kind = draw(st.sampled_from(["dir", "inline", "external", "empty", "symlink", "dev",
                                     "fifo", "link"]))
        perm = draw(st.integers(0, 0o7777))
        if kind == "link":
            if not leaves:
                continue
            parent.children[name] = HardLink(draw(st.sampled_from(leaves)))
            continue
        if kind == "dir":
            node = Node(0o40000 | perm, size=draw(st.integers(0, 1 << 40)), **common())
            dirs.append(node)
        elif kind == "inline":
            content = draw(st.binary(min_size=1, max_size=300))
            node = Node(0o100000 | perm, size=len(content), content=content, **common())
        elif kind == "external":
            node = Node(0o100000 | perm, size=draw(st.integers(1, 1 << 60)),
                        payload=draw(st.none() | cstrings),
                        digest=draw(st.none() | st.binary(min_size=32, max_size=32)), **common())
        elif kind == "empty":
            node = Node(0o100000 | perm, **common())
        elif kind == "symlink":
            target = draw(cstrings)
            node = Node(0o120000 | perm, size=len(target), payload=target, **common())
        elif kind == "dev":
            node = Node(draw(st.sampled_from([0o20000, 0o60000])) | perm, rdev=draw(u32),
                        size=draw(st.integers(0, U64)), **common())
        else:
            node = Node(draw(st.sampled_from([0o10000, 0o140000])) | perm,
                        size=draw(st.integers(0, 1 << 40)), **common())
        parent.children[name] = node
        if kind != "dir":
            leaves.append(node)
    return root


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_format_parse_roundtrip(root):
    text = format_dumpfile(root)
    assert text.count(b"\n") == len(list(iter_tree(root)))
    again = parse_dumpfile(text, strict=True)
    assert snapshot(again) == snapshot(root)
    assert format_dumpfile(again) == text


@given(st.lists(st.sampled_from([b"\\", b"x", b"n", b"r", b"t", b"a", b"0", b"F", b"g", b"\\\\",
                                 b"\\x4", b"\\x41", b" ", b"\xff"]), max_size=10).map(b"".join))
def test_fast_unescape_agrees_with_the_exact_path(field):
    from mkcfs.sources.dumpfile import unescape_exact
    try:
        expected = unescape_exact(field)
    except ValueError as exc:
        with pytest.raises(ValueError, match=re.escape(str(exc))):
            unescape(field)
    else:
        assert unescape(field) == expected


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 22])
def test_streamed_input_parses_as_the_whole_text(monkeypatch, block):
    """A file is read a block at a time: every block size gives the tree and the errors
    (message and line) of the whole text, including lines longer than a block."""
    from mkcfs.sources import dumpfile
    sample = (Path(__file__).resolve().parents[1] / "testdata" / "sample.dump").read_bytes()
    long_line = b"/long 70000 100644 1 0 0 0 0.0 ab/" + b"c" * 4000 + b" - " + b"d" * 64 + \
        b" user.big=" + b"v" * 60000 + b"\n"
    texts = [sample, sample.rstrip(b"\n"), b"/ 0 40755 2 0 0 0 0.0 - - -\n" + long_line,
             sample + b"/x 0 100644 1 0 0 0 0.0 - - -\0\n/y 0 100644 1 0 0 0 0.0 - - -\n",
             sample + b"/x 0 100644 1 0 0 0 0.0 - - -\0"]

    def outcome(data, strict):
        try:
            return dumpfile.format_dumpfile(parse_dumpfile(data, strict=strict))
        except DumpfileError as exc:
            return (exc.message, exc.line)

    for text in texts:
        for strict in (False, True):
            whole = outcome(text, strict)
            monkeypatch.setattr(dumpfile, "_READ_BLOCK", block)
            streamed = outcome(io.BytesIO(text), strict)
            monkeypatch.setattr(dumpfile, "_READ_BLOCK", 1 << 22)
            assert streamed == whole


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40) | st.lists(st.sampled_from(b"\\' =\t\n\r\"ax\x00\x7f\xff"),
                                         max_size=20).map(bytes))
def test_fast_escapes_match_the_escape_tables(data):
    from mkcfs.sources.dumpfile import _escaped, _escaped_equal, escape_table, escape_with

    assert _escaped(data) == escape_with(data, *escape_table())
    assert _escaped_equal(data) == escape_with(data, *escape_table(equal=True))
    assert escape(data) == escape_with(data, *escape_table())
