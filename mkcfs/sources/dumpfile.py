r"""composefs-dump(5): the text ``mkcomposefs --from-file`` reads and ``composefs-info dump`` prints.

``parse_dumpfile`` turns the text into a :class:`~mkcfs.tree.Node` tree with the semantics of the
1.0.8 parser (``tree_from_dump`` in ``tools/mkcomposefs.c``); ``format_dumpfile`` prints a tree the
way ``composefs-info dump`` prints one (``dump_node`` in ``tools/composefs-info.c``).

One line per entry, fields separated by single spaces::

    PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST [KEY=VALUE ...]

Deliberate differences from the C parser (it accepts these with undefined or quirky results; we
reject them): a DIGEST of an external regular file (the only kind that uses it) that is not exactly
64 hex digits (``Invalid digest``; C fills the digest from uninitialized memory or cuts it); an
unparsable GID or RDEV when UID is not 0 (``Invalid integer``; C silently takes 0); a cycle of hard
links (``Too many levels of symbolic links``; C fails the same way, later, in the writer).
Messages keep the C wording first and add what was wrong; byte strings in them are escaped as in a
dump, so every message is one line.

What the tree holds after parsing (only what can reach an image):

* mode: the permission and type bits, cut to 16 bits (the image's ``i_mode`` is 16 bits wide);
* regular file with CONTENT: ``content`` and ``size = len(content)``; PAYLOAD and DIGEST dropped;
* regular file with SIZE 0 and no content: PAYLOAD and DIGEST dropped;
* other regular files (external): ``size``, ``payload`` (``None`` when ``-`` or empty), ``digest``;
* symlink: ``payload`` = target, ``size = len(target)``;
* directory, chr, blk, fifo, socket: the dumpfile SIZE is kept in ``size`` (the writer's compact
  inode test uses it for devices, fifos and sockets); ``rdev`` only for chr/blk (32 bits), else 0;
* hard link (``@`` mode): a :class:`~mkcfs.tree.HardLink` whose ``target`` is the ``Node`` or
  ``HardLink`` at the PAYLOAD path (chains allowed, resolved after the whole file is read).

Format notes (the rules of the 1.0.8 parser and printer that the code below follows; other
modules refer to them by these headings):

**Paths.** A path is split on ``/``; a leading slash is optional and runs of slashes are
skipped (``/a//b`` is ``/a/b``). The last component is the new entry's name: it must be 1..255
bytes and neither ``.`` nor ``..``; every earlier component must already exist and be a
directory. Only the exact path ``/`` names the root, which must be the first line.

**Escapes.** Input: ``\\``, ``\n``, ``\r``, ``\t`` and ``\xHH`` (either case); anything else
after a backslash is an error; every other byte is literal. A field that is exactly ``-`` means
"none" (PAYLOAD, CONTENT, DIGEST), so a one-byte ``-`` value is written ``\x2d``. Output (what
``composefs-info dump`` prints): backslash, LF, CR and TAB as above, every byte outside
0x21..0x7E as lowercase ``\xhh``; in xattr keys and values also ``=`` as ``\x3d``; PAYLOAD and
CONTENT that are exactly ``-`` as ``\x2d``.

**Printing.** Entries are printed depth first, pre-order, children in bytewise name order. A
hard link prints ``@`` before the target's mode, the target's absolute path as PAYLOAD (the
root's is empty) and the target's other fields. DIGEST is 64 lowercase hex digits or ``-``.
Xattrs are printed in the node's order (the image's stored order, for a tree read back).

**Xattrs.** The text after the 11th field (at most 65535 bytes) is ``KEY=VALUE`` items separated
by single spaces, split at the first ``=``; a later duplicate key wins. Keys are 1..255 bytes,
values at most 65535, and a node's xattrs are accounted as libcomposefs does: each costs
``7 + len(key) + len(value)``, the first one 12 more, and the total may not exceed 32767.

**Strict mode** (``CFS_PARSE_STRICT`` set): the last line must end with a newline, RDEV must be
0 except for devices, and a symlink's SIZE must equal its target length and it may not have
CONTENT.

**Hard links.** An ``@`` line reads only its mode (any type but a directory) and its PAYLOAD (the
target path). Placeholders are resolved after the whole file is read, from the last back to the
first; chains of placeholders are followed, a cycle is an error, and the target's NLINK is
written as its own line gave it.
"""

from __future__ import annotations

import binascii
import codecs
import io
import os
import re
from collections.abc import Generator, Iterable, Iterator
from itertools import chain
from binascii import unhexlify
from typing import BinaryIO, Protocol

from mkcfs.errors import DumpfileError
from mkcfs.gcpause import gc_paused
from mkcfs.tree import (S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, VALID_TYPES, HardLink,
                   HardLinkLoopError, Node, iter_tree, link_targets, resolve)

__all__ = ["parse_dumpfile", "format_dumpfile", "write_dumpfile", "dump_blocks", "tree_records",
           "DumpRecord", "escape", "unescape", "INLINE_CONTENT_MAX"]

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

#: Largest inline CONTENT (``LCFS_INLINE_CONTENT_MAX``).
INLINE_CONTENT_MAX = 5000
#: Payloads and symlink targets must be shorter than this (``PATH_MAX``).
PATH_MAX = 4096
#: Longest file name (``LCFS_MAX_NAME_LENGTH``).
NAME_MAX = 255
#: Longest xattr key (``XATTR_NAME_MAX``) and value (``UINT16_MAX``).
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65535
#: Per-inode xattr budget for dumpfile input (``LCFS_INODE_EXTERNAL_XATTR_MAX``): each entry costs
#: 7 + len(key) + len(value), the first one 12 more (module docstring, "Xattrs").
XATTR_BUDGET = 32767
_XATTR_ENTRY_COST = 7
_XATTR_HEADER_COST = 12
#: The text after the 11th field may be at most this long (``Too many xattrs``).
XATTR_TEXT_MAX = 65535

class _LineError(Exception):
    """A message for the current line; turned into DumpfileError with the line number."""


# ---------------------------------------------------------------------------------------------
# Escapes
# ---------------------------------------------------------------------------------------------

# One escape as the C parser consumes it: "\x" + two bytes, or "\" + one byte, or a lone "\" at
# the end. Splitting with this capture group gives [literal, escape, literal, escape, ...].
_ESCAPE_SPLIT = re.compile(rb"(\\(?:x..|.|\Z))", re.DOTALL).split
_HEX = b"0123456789abcdefABCDEF"
_UNESCAPES: dict[bytes, bytes] = {b"\\\\": b"\\", b"\\n": b"\n", b"\\r": b"\r", b"\\t": b"\t"}
for _hi in _HEX:
    for _lo in _HEX:
        _UNESCAPES[b"\\x" + bytes((_hi, _lo))] = bytes((int(bytes((_hi, _lo)), 16),))
del _hi, _lo


#: A backslash not followed by one of the five escapes this format knows.
_SUSPECT_ESCAPE = re.compile(rb"\\(?![\\nrt]|x[0-9a-fA-F]{2})").search
_escape_decode = codecs.escape_decode  # type: ignore[attr-defined]


def _escape_error(token: bytes) -> str:
    """The C parser's message for the first escape it cannot decode."""
    if len(token) == 1:
        return "No character after escape"
    if token[1:2] == b"x":
        if len(token) < 4:
            return "No hex characters after hex escape"
        return "Invalid hex characters after hex escape"
    return f"Unsupported escape type {_show(token[1:])}"


def unescape(field: bytes) -> bytes:
    """Decode the escapes of one dumpfile field (``\\\\ \\n \\r \\t \\xHH``).

    Binary-safe (a ``\\x00`` stays a NUL byte). Raises ``ValueError`` with the C parser's message
    for a bad escape."""
    if b"\\" not in field:
        return field
    if _SUSPECT_ESCAPE(field) is None:
        # Only escapes of our five kinds: the C codec decodes exactly these the same way, ~5x
        # faster. Anything else (or a false alarm, e.g. after an escaped backslash) goes the
        # exact way below, which also words the error.
        return _escape_decode(field)[0]
    return unescape_exact(field)


def unescape_exact(field: bytes) -> bytes:
    """``unescape`` token by token, with the C parser's error messages (the reference path)."""
    parts = _ESCAPE_SPLIT(field)
    try:
        parts[1::2] = [_UNESCAPES[t] for t in parts[1::2]]
    except KeyError:
        bad = next(t for t in parts[1::2] if t not in _UNESCAPES)
        raise ValueError(_escape_error(bad)) from None
    return b"".join(parts)


def _unescape_field(field: bytes, what: str, cstring: bool) -> bytes:
    """Unescape a field of the current line; ``cstring`` cuts at the first NUL as C strings do."""
    try:
        value = unescape(field)
    except ValueError as exc:
        raise _LineError(f"{exc} in {what}") from None
    if cstring:
        nul = value.find(b"\0")
        if nul >= 0:
            value = value[:nul]
    return value


def escape_table(*, equal: bool = False, space: bool = False) -> tuple[list[bytes], bytes]:
    """``(table, safe)`` for composefs's ``print_escaped``: ``table[b]`` is how byte ``b`` is
    written; ``safe`` lists the bytes written as themselves. ``\\`` LF CR TAB get their escapes,
    bytes outside 0x21..0x7E become ``\\xhh`` (``space`` keeps 0x20 literal, as ``ls`` paths do;
    ``equal`` also escapes ``=``, as xattrs need)."""
    low = 0x20 if space else 0x21
    table = []
    for b in range(256):
        if b == 0x5C:
            table.append(b"\\\\")
        elif b == 0x0A:
            table.append(b"\\n")
        elif b == 0x0D:
            table.append(b"\\r")
        elif b == 0x09:
            table.append(b"\\t")
        elif (b == 0x3D and equal) or not low <= b <= 0x7E:
            table.append(b"\\x%02x" % b)
        else:
            table.append(bytes((b,)))
    safe = bytes(b for b in range(256) if len(table[b]) == 1)
    return table, safe


#: the bytes that print as they are (those :func:`escape` leaves alone)
_SAFE_STD = escape_table()[1]
_SAFE_EQ = escape_table(equal=True)[1]


def escape_with(data: bytes, table: list[bytes], safe: bytes) -> bytes:
    """Escape ``data`` with a table from :func:`escape_table` (no copy when nothing changes)."""
    if not data.translate(None, safe):
        return data
    return b"".join(map(table.__getitem__, data))


_escape_encode = codecs.escape_encode  # type: ignore[attr-defined]


def _escaped(data: bytes) -> bytes:
    """``escape_with(data, *escape_table())`` at C speed, for data that needs escaping.

    ``codecs.escape_encode`` writes Python's bytes escapes, which are composefs's for every byte
    but two: it leaves a space as is and writes ``'`` as ``\\'``."""
    text = _escape_encode(data)[0]
    if b"'" in data:
        # an escaped quote is the only escape that ends in a quote
        text = text.replace(b"\\'", b"'")
    if b" " in data:
        text = text.replace(b" ", b"\\x20")
    return text


def _escaped_equal(data: bytes) -> bytes:
    """:func:`_escaped` that also escapes ``=`` (xattr keys and values)."""
    text = _escaped(data)
    return text.replace(b"=", b"\\x3d") if b"=" in data else text


def escape(data: bytes, *, equal: bool = False, lone_dash: bool = False) -> bytes:
    """Escape bytes the way ``composefs-info dump`` does (module docstring, "Escapes").

    ``\\`` LF CR TAB become ``\\\\ \\n \\r \\t``; every other byte outside 0x21..0x7E becomes
    ``\\xhh``. ``equal`` also escapes ``=`` (xattr keys and values); ``lone_dash`` writes a value
    that is exactly ``-`` as ``\\x2d`` (PAYLOAD and CONTENT, where ``-`` means "none")."""
    if lone_dash and data == b"-":
        return b"\\x2d"
    if not data.translate(None, _SAFE_EQ if equal else _SAFE_STD):
        return data
    return _escaped_equal(data) if equal else _escaped(data)


def _show(data: bytes, limit: int = 300) -> str:
    """A byte string for an error message: escaped like PATH in a dump, so always one line, and
    shortened when long."""
    if len(data) > limit:
        return escape(data[:limit]).decode("ascii") + f"...({len(data)} bytes)"
    return escape(data).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Integers (C strtoull on the whole field)
# ---------------------------------------------------------------------------------------------

_C_SPACE = b"\t\n\v\f\r "
_DIGITS = {8: b"01234567", 10: b"0123456789"}
# Above these digit counts (after leading zeros) a value is certainly > 2**64 - 1.
_MAX_DIGITS = {8: 22, 10: 20}


def _strtoull(field: bytes, base: int, what: str) -> int:
    """``strtoull(field, &end, base)`` requiring the whole non-empty field to be consumed.

    Leading C whitespace and one ``+``/``-`` are accepted; overflow saturates to 2**64 - 1 (also
    for negative numbers); ``-N`` wraps to 2**64 - N. Raises _LineError("Invalid integer ...")."""
    s = field.lstrip(_C_SPACE)
    negative = False
    if s[:1] in (b"+", b"-"):
        negative = s[:1] == b"-"
        s = s[1:]
    if not s or s.translate(None, _DIGITS[base]):
        raise _LineError(f"Invalid integer {_show(field)} in {what}")
    s = s.lstrip(b"0")
    if len(s) > _MAX_DIGITS[base]:
        return U64_MAX
    value = int(s, base) if s else 0
    if value > U64_MAX:
        return U64_MAX
    if negative:
        value = -value & U64_MAX
    return value


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

def _parent_slow(root: Node, path: bytes) -> tuple[Node, bytes, bytes]:
    """Find the parent directory of ``path`` with the C rules (module docstring,
    "Paths"); return (parent, name, key).

    Runs of slashes are skipped and a leading slash is optional; the text after the last slash is
    the name (empty for a trailing slash). ``key`` is the normalized path ``/a/b``."""
    comps = path.split(b"/")
    name = comps[-1]
    node: Node | HardLink = root
    walked = []
    for comp in comps[:-1]:
        if not comp:
            continue
        children = node.children if isinstance(node, Node) else None
        child = children.get(comp) if children is not None else None
        if child is None:
            raise _LineError(f"Parent directory missing for {_show(path)}")
        node = child
        walked.append(comp)
    if not isinstance(node, Node) or node.children is None:
        raise _LineError(f"Parent must be a directory for {_show(path)}")
    walked.append(name)
    return node, name, b"/" + b"/".join(walked)


def _lookup_target(root: Node, dirs: dict[bytes, Node], target: bytes) -> Node | HardLink | None:
    """The entry at ``target`` (C ``lookup_path``): slashes runs skipped, trailing slashes allowed,
    ``""`` and ``/`` are the root; hard links are not traversed."""
    if target[:1] == b"/" and b"//" not in target and target[-1:] != b"/":
        i = target.rfind(b"/")
        parent = dirs.get(target[:i])
        if parent is None:
            return None
        return parent.children.get(target[i + 1:])  # type: ignore[union-attr]
    node: Node | HardLink = root
    for comp in target.split(b"/"):
        if not comp:
            continue
        children = node.children if isinstance(node, Node) else None
        child = children.get(comp) if children is not None else None
        if child is None:
            return None
        node = child
    return node


def _parse_xattrs(text: bytes) -> dict[bytes, bytes]:
    """The xattrs after the 11th field: ``KEY=VALUE`` separated by single spaces (module
    docstring, "Xattrs")."""
    if len(text) > XATTR_TEXT_MAX:
        raise _LineError(f"Too many xattrs (the xattr text is {len(text)} bytes, more than "
                         f"{XATTR_TEXT_MAX})")
    xattrs: dict[bytes, bytes] = {}
    pieces = text.split(b" ")
    if not pieces[-1]:
        pieces.pop()  # one trailing space ends the list
    used = 0
    for piece in pieces:
        key, eq, value = piece.partition(b"=")
        if not eq:
            raise _LineError(f"Missing = in xattr {_show(piece)}" if piece else
                             "Missing = in xattr (empty xattr: two spaces in a row?)")
        if b"\\" in key:
            key = _unescape_field(key, "xattr key", True)
        if b"\\" in value:
            value = _unescape_field(value, "xattr value", False)
        klen = len(key)
        if klen == 0:
            raise _LineError("Can't set xattr: empty key")
        if klen > XATTR_NAME_MAX:
            raise _LineError(f"Can't set xattr: key of {klen} bytes (at most {XATTR_NAME_MAX})")
        if len(value) > XATTR_VALUE_MAX:
            raise _LineError(f"Can't set xattr '{_show(key)}': value of {len(value)} bytes (at "
                             f"most {XATTR_VALUE_MAX})")
        old = xattrs.pop(key, None)
        if old is not None:  # a later duplicate wins
            used = used - (_XATTR_ENTRY_COST + klen + len(old)) if xattrs else 0
        cost = _XATTR_ENTRY_COST + klen + len(value) + (0 if xattrs else _XATTR_HEADER_COST)
        if used + cost > XATTR_BUDGET:
            raise _LineError(f"Can't set xattr '{_show(key)}': the inode's xattrs would need "
                             f"{used + cost} bytes (at most {XATTR_BUDGET})")
        xattrs[key] = value
        used += cost
    return xattrs


_PAD = [[b""] * (12 - n) for n in range(13)]
#: Entries kept in a memo table of field texts that need not repeat (mtimes): a real tree has
#: some thousands of distinct mtimes; the cap bounds the table to a few MB when all differ.
_CACHE_MAX = 1 << 16


def _parse_mode(field: bytes) -> tuple[int, bool]:
    """MODE: optional ``@`` (hard link), then octal; the type must be valid. (mode, hardlink)."""
    hardlink = field[:1] == b"@"
    if hardlink:
        field = field[1:]
    mode = _strtoull(field, 8, "MODE")
    if (mode & S_IFMT) not in VALID_TYPES:
        raise _LineError(f"Invalid mode {mode & U32_MAX:o}")
    return mode & 0o177777, hardlink


def _parse_u32(field: bytes, what: str, cache: dict[bytes, int]) -> int:
    value = cache[field] = _strtoull(field, 10, what) & U32_MAX
    return value


def _parse_u64(field: bytes, what: str, cache: dict[bytes, int]) -> int:
    value = cache[field] = _strtoull(field, 10, what)
    return value


def _parse_mtime(field: bytes, cache: dict[bytes, tuple[int, int]]) -> tuple[int, int]:
    """MTIME ``SECONDS.NANOSECONDS``: seconds u64 read as signed 64-bit, nanoseconds cut to u32."""
    sec_s, dot, nsec_s = field.partition(b".")
    sec = _strtoull(sec_s, 10, "MTIME seconds")
    nsec = _strtoull(nsec_s, 10, "MTIME nanoseconds" if dot else
                     "MTIME (must be SECONDS.NANOSECONDS)")
    if sec > 0x7FFFFFFFFFFFFFFF:
        sec -= 1 << 64
    value = (sec, nsec & U32_MAX)
    if len(cache) < _CACHE_MAX:
        cache[field] = value
    return value


def _place(root: Node | None, path: bytes, ftype: int) -> tuple[Node | None, bytes, bytes]:
    """Where a line's entry goes, for every path off the parser's fast path: (parent, name, key),
    with parent None for the root line. Raises the C parser's errors in its order."""
    if path == b"/":
        if ftype != S_IFDIR:
            raise _LineError("Root must be a directory")
        if root is not None:
            raise _LineError("Can't have multiple roots")
        return None, b"", b""
    if root is None:
        raise _LineError("Root node not present (the first line must be /)")
    parent, name, key = _parent_slow(root, path)
    _check_name(parent, name, path)
    return parent, name, key


def _check_name(parent: Node, name: bytes, path: bytes) -> None:
    if name == b"." or name == b"..":
        raise _LineError(f"Invalid . or .. in path: {_show(path)}")
    if not name:
        raise _LineError(f"Can't add child: empty file name in path {_show(path)}")
    if len(name) > NAME_MAX:
        raise _LineError(f"Can't add child: file name of {len(name)} bytes (more than "
                         f"{NAME_MAX}) in path {_show(path)}")
    if name in parent.children:  # type: ignore[operator]
        raise _LineError(f"Can't add child: {_show(path)} already exists")


def parse_dumpfile(data: bytes | BinaryIO, *, strict: bool = False, source: str = "",
                   share_xattrs: bool = False) -> Node:
    """Parse composefs-dump(5) text into a tree and return its root.

    ``data`` is the text, or a binary file to read it from (read in blocks: the text is never
    held whole). ``strict`` is ``CFS_PARSE_STRICT`` (module docstring, "Strict mode").
    ``source`` names the input in error messages. Raises :class:`~mkcfs.errors.DumpfileError`
    (with the 1-based line number) on bad input; errors reading a file are the file's
    ``OSError``. ``share_xattrs``: nodes with the same xattrs text get one shared dict (none: one
    shared empty dict), which saves a dict per node, for a tree that nobody changes
    (``mkcomposefs`` builds an image from it and drops it)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        stream: BinaryIO = io.BytesIO(data)
    else:
        stream = data
    with gc_paused():
        return _parse(stream, strict, source, share_xattrs)


#: the text is read and split into lines this many bytes at a time
_READ_BLOCK = 1 << 20


class _TextEnd:
    """How the text ended, once ``_line_blocks`` has read it: an error to raise after the
    lines before it are parsed (line number, message), or None; and the lines given."""

    __slots__ = ("error", "lines")

    def __init__(self) -> None:
        self.error: tuple[int, str] | None = None
        self.lines = 0


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _line_blocks(stream: _Reader, strict: bool, end: _TextEnd,
                 first: int = 0) -> Iterator[list[bytes]]:
    """The lines of the text (without their newlines), a block at a time. Stops before a line
    holding a NUL byte, and (strict) before a last line without a newline, setting ``end``
    (line numbers counted from ``first`` + 1)."""
    read = stream.read
    rest = b""
    count = first   # lines given so far
    pieces: list[bytes] = []   # of a line longer than a block
    while True:
        chunk = read(_READ_BLOCK)
        if not chunk:
            break
        if b"\n" not in chunk:
            pieces.append(chunk)
            continue
        if pieces:
            buf = b"".join((rest, *pieces, chunk))
            pieces.clear()
        else:
            buf = rest + chunk if rest else chunk
        lines = buf.split(b"\n")
        rest = lines.pop()
        if b"\0" in buf:   # in a complete line (stop there), or in the rest (seen later)
            for i, line in enumerate(lines):
                nul = line.find(b"\0")
                if nul >= 0:
                    end.error = (count + i + 1, f"Invalid embedded NUL character at position {nul}")
                    end.lines = count + i
                    yield lines[:i]
                    return
        count += len(lines)
        if lines:
            yield lines
    if pieces:
        rest = b"".join((rest, *pieces))
    end.lines = count
    if rest:
        nul = rest.find(b"\0")
        if strict:
            end.error = (count + 1, "Missing trailing newline")
        elif nul >= 0:
            end.error = (count + 1, f"Invalid embedded NUL character at position {nul}")
        else:
            end.lines = count + 1
            yield [rest]


def _rows(lines: Iterable[bytes], strict: bool) -> Iterator[tuple]:
    """Each line's fields, parsed and checked, as a row for ``_parse`` to place in the tree:
    ``(path, mode, hardlink, payload, size, nlink, uid, gid, rdev, mtime sec, nsec, content,
    digest, xattr text, error)``, the payload of a hard link being its target. ``error`` is
    the message of the first field that is wrong, raised once the entry's place is found (as
    in C, a bad place is reported first); a line wrong in its path or mode, which come before
    the place, gives ``(None, message)``. The lines' own order and nothing else: the helper
    process of a large file (``mkcfs.sources.split_parse``) makes these rows too."""
    # Memo tables for fields that repeat (modes, owners, link counts, mtimes).
    mode_cache: dict[bytes, int] = {}
    u32_cache: dict[bytes, int] = {}
    u64_cache: dict[bytes, int] = {}
    mtime_cache: dict[bytes, tuple[int, int]] = {}
    mode_get = mode_cache.get
    u32_get = u32_cache.get
    u64_get = u64_cache.get
    mtime_get = mtime_cache.get
    unesc = _unescape_field
    strtoull = _strtoull
    pad = _PAD
    S_IFMT_, S_IFREG_, S_IFLNK_, S_IFCHR_, S_IFBLK_ = S_IFMT, S_IFREG, S_IFLNK, S_IFCHR, S_IFBLK
    PATH_MAX_, U32_MAX_ = PATH_MAX, U32_MAX

    for line in lines:
        parts = line.split(b" ", 11)
        n = len(parts)
        if n == 11:  # the common line without xattrs
            fpath, fsize, fmode, fnlink, fuid, fgid, frdev, fmtime, fpayload, fcontent, \
                fdigest = parts
            xattr_text = b""
        else:
            if n < 11:
                parts += pad[n]  # missing fields are empty
            fpath, fsize, fmode, fnlink, fuid, fgid, frdev, fmtime, fpayload, fcontent, \
                fdigest, xattr_text = parts

        try:
            if b"\\" in fpath:
                path = unesc(fpath, "PATH", True)
                if not path:
                    raise _LineError("Invalid empty path")
            elif fpath:
                path = fpath
            else:
                raise _LineError("Invalid empty path")
            mode = mode_get(fmode)
            if mode is None:
                mode, hardlink = _parse_mode(fmode)
                if not hardlink:
                    mode_cache[fmode] = mode
            else:
                hardlink = False
        except _LineError as exc:
            yield (None, str(exc))
            continue
        ftype = mode & S_IFMT_

        if hardlink:
            # only the mode and the target path: (path, mode, True, target, ..., error)
            target = error = None
            if ftype == S_IFDIR:
                error = "Directories can't be hardlinked"
            elif fpayload == b"-":
                pass
            elif b"\\" in fpayload:
                try:
                    target = unesc(fpayload, "PAYLOAD", True)
                except _LineError as exc:
                    error = str(exc)
            else:
                target = fpayload
            yield (path, mode, True, target, 0, 0, 0, 0, 0, 0, 0, None, None, b"", error)
            continue

        try:
            size = int(fsize) if len(fsize) < 20 and fsize.isdigit() else \
                strtoull(fsize, 10, "SIZE")
            nlink = u32_get(fnlink)
            if nlink is None:
                nlink = _parse_u32(fnlink, "NLINK", u32_cache)
            uid = u32_get(fuid)
            if uid is None:
                uid = _parse_u32(fuid, "UID", u32_cache)
            gid = u32_get(fgid)
            if gid is None:
                gid = _parse_u32(fgid, "GID", u32_cache)
            rdev = u64_get(frdev)
            if rdev is None:
                rdev = _parse_u64(frdev, "RDEV", u64_cache)
            mtime = mtime_get(fmtime)
            if mtime is None:
                text_sec, _dot, text_nsec = fmtime.partition(b".")
                if (len(text_sec) < 19 and len(text_nsec) < 10 and text_sec.isdigit()
                        and text_nsec.isdigit()):
                    sec = int(text_sec)
                    nsec = int(text_nsec)
                    if len(mtime_cache) < _CACHE_MAX:
                        mtime_cache[fmtime] = (sec, nsec)
                else:
                    sec, nsec = _parse_mtime(fmtime, mtime_cache)
            else:
                sec, nsec = mtime

            if fpayload == b"-":
                payload = None
            elif b"\\" in fpayload:
                payload = unesc(fpayload, "PAYLOAD", True)
            else:
                payload = fpayload
            if fcontent == b"-":
                content = None
            else:
                content = unesc(fcontent, "CONTENT", False) if b"\\" in fcontent else fcontent
                if len(content) != size:
                    raise _LineError(f"Invalid content size {len(content)}, must match size "
                                     f"{size}")
            if fdigest == b"-":
                digest = None
            elif b"\\" in fdigest:
                digest = unesc(fdigest, "DIGEST", True)
            else:
                digest = fdigest

            if rdev:
                if ftype == S_IFCHR_ or ftype == S_IFBLK_:
                    rdev &= U32_MAX_
                elif strict:
                    raise _LineError(f"Non-zero devnum on non-device (RDEV {rdev})")
                else:
                    rdev = 0
            if ftype == S_IFLNK_:
                if not payload:
                    raise _LineError("Invalid symlink: no target")
                if len(payload) >= PATH_MAX_:
                    raise _LineError(f"Invalid symlink: target of {len(payload)} bytes (at most "
                                     f"{PATH_MAX - 1})")
                if strict:
                    if size != len(payload):
                        raise _LineError(f"Invalid symlink size {len(payload)}, must match size "
                                         f"{size}")
                    if content:
                        raise _LineError("Symlink cannot have content")
            else:
                if payload is not None and len(payload) >= PATH_MAX_:
                    raise _LineError(f"Invalid payload: {len(payload)} bytes (at most "
                                     f"{PATH_MAX - 1})")
                if content is not None and len(content) > INLINE_CONTENT_MAX:
                    raise _LineError(f"Inline content size {len(content)} exceeds maximum "
                                     f"{INLINE_CONTENT_MAX}")
            if digest is not None and ftype == S_IFREG_ and size and not content:
                # Only an external file uses the digest (in its metacopy xattr); C fills in a bad
                # one from uninitialized memory, so we refuse it. Elsewhere C ignores it (the
                # upstream asset honggfuzz-longlink-unterminated has an empty DIGEST field).
                try:
                    if len(digest) != 64:
                        raise ValueError
                    digest = unhexlify(digest)
                except ValueError:  # binascii.Error is a ValueError
                    raise _LineError(f"Invalid digest '{_show(digest)}': must be 64 hex digits") \
                        from None
        except _LineError as exc:
            yield (path, mode, False, None, 0, 0, 0, 0, 0, 0, 0, None, None, b"", str(exc))
            continue
        yield (path, mode, False, payload, size, nlink, uid, gid, rdev, sec, nsec, content,
               digest, xattr_text, None)


def _row_list(lines: list[bytes], strict: bool) -> list[tuple]:
    """``_rows`` of ``lines``, as the helper process of a large file makes them."""
    return list(_rows(lines, strict))


def _all_rows(stream: BinaryIO, strict: bool, text_end: _TextEnd
              ) -> Generator[tuple, None, None]:
    """The rows (``_rows``) of every line of ``stream``: those of a large file partly made by a
    helper process (``mkcfs.sources.split_parse``), the same rows in the same order."""
    helper = None
    if not isinstance(stream, io.BytesIO):
        from functools import partial
        from mkcfs.sources.split_parse import HelperParse
        helper = HelperParse.start(stream, partial(_row_list, strict=strict))
    if helper is None:
        yield from _rows(chain.from_iterable(_line_blocks(stream, strict, text_end)), strict)
        return
    try:
        yield from _rows(chain.from_iterable(_line_blocks(helper.head(), strict, text_end)),
                         strict)
        if text_end.error is not None:
            return
        lines = text_end.lines
        for rows, count in helper.blocks():
            yield from rows
            lines += count
        if helper.resume_offset is not None:   # the helper stopped there: the rest is ours
            stream.seek(helper.resume_offset)
            yield from _rows(chain.from_iterable(_line_blocks(stream, strict, text_end, lines)),
                             strict)
        else:
            stream.seek(0, os.SEEK_END)
    finally:
        helper.close()


def _parse(stream: BinaryIO, strict: bool, source: str, share_xattrs: bool) -> Node:
    text_end = _TextEnd()
    rows = _all_rows(stream, strict, text_end)
    try:
        return _place_rows(rows, text_end, source, share_xattrs)
    finally:
        rows.close()


def _place_rows(rows: Iterator[tuple], text_end: _TextEnd, source: str,
                share_xattrs: bool) -> Node:
    """The tree of the entries of ``rows``, each placed below its parent."""

    root: Node | None = None
    dirs: dict[bytes, Node] = {}  # normalized path ("" for the root, "/a/b") -> directory
    fixups: list[tuple[int, HardLink, bytes | None]] = []
    xattr_cache: dict[bytes, dict[bytes, bytes]] = {}
    xattr_cache_get = xattr_cache.get
    no_xattrs: dict[bytes, bytes] = {}
    dirs_get = dirs.get
    lineno = 0
    S_IFMT_, S_IFDIR_, S_IFREG_, S_IFLNK_ = S_IFMT, S_IFDIR, S_IFREG, S_IFLNK
    NAME_MAX_ = NAME_MAX
    Node_, HardLink_ = Node, HardLink

    try:
        for lineno, row in enumerate(rows, 1):
            path = row[0]
            if path is None:
                raise _LineError(row[1])
            (path, mode, hardlink, payload, size, nlink, uid, gid, rdev, sec, nsec, content,
             digest, xattr_text, error) = row
            ftype = mode & S_IFMT_

            # Where the entry goes (checked before the other fields, as in C). Fast path: the
            # parent's normalized path is a key of dirs; "//", a trailing "/", a missing
            # parent, the root line and every error take _place().
            if path[0] == 47:
                i = path.rfind(b"/")
                parent = dirs_get(path[:i])
                name = path[i + 1:]
                if parent is None or not name or len(name) > NAME_MAX_ or \
                        (name[0] == 46 and (name == b"." or name == b"..")) or \
                        name in parent.children:  # type: ignore[operator]
                    parent, name, key = _place(root, path, ftype)
                else:
                    key = path
            else:
                parent, name, key = _place(root, path, ftype)
            if error is not None:
                raise _LineError(error)

            if hardlink:
                link = HardLink_()
                parent.children[name] = link  # type: ignore[union-attr,index]
                fixups.append((lineno, link, payload))
                continue

            if not xattr_text:
                xattrs = no_xattrs if share_xattrs else {}
            elif share_xattrs or b" " in xattr_text or b"\\" in xattr_text \
                    or len(xattr_text) > 32000:
                # real trees repeat the same few label sets: parse each text once (and unless
                # the caller lets nodes share the dict, each node still gets a copy)
                cached = xattr_cache_get(xattr_text)
                if cached is None:
                    cached = _parse_xattrs(xattr_text)
                    if len(xattr_cache) < 4096 and len(xattr_text) < 1024:
                        xattr_cache[xattr_text] = cached
                xattrs = cached if share_xattrs else cached.copy()
            else:  # one plain KEY=VALUE, well within the budget
                xkey, eq, xvalue = xattr_text.partition(b"=")
                if eq and xkey and len(xkey) <= XATTR_NAME_MAX:
                    xattrs = {xkey: xvalue}
                else:
                    xattrs = _parse_xattrs(xattr_text)  # raises the right error

            if ftype == S_IFREG_:
                if content:
                    node = Node_(mode, nlink, uid, gid, 0, size, sec, nsec, None, content, None,
                                xattrs)
                elif size:
                    node = Node_(mode, nlink, uid, gid, 0, size, sec, nsec, payload or None, None,
                                digest, xattrs)
                else:
                    node = Node_(mode, nlink, uid, gid, 0, 0, sec, nsec, None, None, None, xattrs)
            elif ftype == S_IFLNK_:
                node = Node_(mode, nlink, uid, gid, 0, len(payload), sec, nsec,  # type: ignore
                            payload, None, None, xattrs)
            else:
                node = Node_(mode, nlink, uid, gid, rdev, size, sec, nsec, None, None, None,
                            xattrs)

            if parent is None:
                root = node
                dirs[b""] = node
            else:
                parent.children[name] = node  # type: ignore[index]
                if ftype == S_IFDIR_:
                    dirs[key] = node

        if text_end.error is not None:
            lineno, message = text_end.error
            raise _LineError(message)
    except _LineError as exc:
        raise DumpfileError(str(exc), line=lineno, source=source) from None

    if root is None:
        raise DumpfileError("No files in dump file", source=source)

    _resolve_hardlinks(root, dirs, fixups, source)
    return root


def _resolve_hardlinks(root: Node, dirs: dict[bytes, Node],
                       fixups: list[tuple[int, HardLink, bytes | None]], source: str) -> None:
    """Point each placeholder at its target, from the last one in the file back to the first."""
    for lineno, link, target in reversed(fixups):
        if target is None:
            raise DumpfileError("No target path for the hardlink (PAYLOAD is -)", line=lineno,
                                source=source)
        found = _lookup_target(root, dirs, target)
        if found is None:
            raise DumpfileError(f"No target at {_show(target)} for hardlink", line=lineno,
                                source=source)
        if found is link:
            raise DumpfileError(f"Self-referential hardlink {_show(target)}", line=lineno,
                                source=source)
        link.target = found
    # Chains of placeholders are allowed; a cycle would only fail later in the C writer (ELOOP).
    reaches_node: set[int] = set()
    for lineno, link, target in reversed(fixups):
        chain: list[int] = []
        entry: Node | HardLink | None = link
        while isinstance(entry, HardLink) and id(entry) not in reaches_node:
            if id(entry) in chain:
                raise DumpfileError(f"Too many levels of symbolic links: the hardlink to "
                                    f"{_show(target or b'')} is part of a cycle of hardlinks",
                                    line=lineno, source=source)
            chain.append(id(entry))
            entry = entry.target
        reaches_node.update(chain)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def format_dumpfile(root: Node) -> bytes:
    """The tree as ``composefs-info dump`` prints a tree (module docstring, "Printing").

    Pre-order, children in bytewise name order; every field is printed from the node as stored
    (``composefs-info`` prints what its image reader put in the tree: directory sizes and nlinks
    from the image, 0 as the SIZE of devices, fifos and sockets). A hard link prints ``@`` + the
    target's mode, the absolute path of the node it reaches as PAYLOAD (``""`` for the root), and
    the target's other fields. Xattrs are printed in the node's dict order."""
    with gc_paused():
        return b"".join(dump_blocks(tree_records(root)))


class BytesSink(Protocol):
    """Anything with a binary ``write`` (a file, ``sys.stdout.buffer``, a ``FullWriter``)."""

    def write(self, data: bytes, /) -> object: ...


def write_dumpfile(root: Node, fileobj: BytesSink) -> None:
    """Write :func:`format_dumpfile` of ``root`` to a binary file object."""
    write = fileobj.write
    with gc_paused():
        for block in dump_blocks(tree_records(root)):
            write(block)


#: One printed entry: ``(path, at, mode, nlink, uid, gid, rdev, size, mtime_sec, mtime_nsec,
#: payload, content, digest, xattrs)``: the raw path, ``b"@"`` for a hard link (else ``b""``)
#: and the fields of the node as :class:`~mkcfs.tree.Node` takes them, a hard link's payload
#: being its target's path. Tuples, so that a source can make one from a node's field tuple in
#: one step and the printer unpacks it in one.
DumpRecord = tuple[bytes, bytes, int, int, int, int, int, int, int, int, bytes | None,
                   bytes | None, bytes | None, dict[bytes, bytes]]


def _paths_of(root: Node, wanted: set[int]) -> dict[int, bytes]:
    """``id(node) -> path`` for the nodes in ``wanted`` (the root's path is empty, as
    ``node_build_path()`` makes it)."""
    found: dict[int, bytes] = {}
    if id(root) in wanted:
        found[id(root)] = b""
    for path, entry in iter_tree(root):
        if id(entry) in wanted and isinstance(entry, Node) and entry is not root:
            found[id(entry)] = path
    return found


def tree_records(root: Node) -> Iterator[DumpRecord]:
    """The records :func:`dump_blocks` prints for the tree ``root`` (module docstring,
    "Printing"): depth first, children in name order, hard links resolved to their node and
    its path."""
    # Only hard-link targets need their path remembered: memory stays proportional to the
    # depth of the tree and the number of targets, not to the sum of all path lengths.
    targets = link_targets(root)
    paths: dict[int, bytes] = {id(root): b""} if id(root) in targets else {}
    for path, entry in iter_tree(root):
        if isinstance(entry, HardLink):
            try:
                node = resolve(entry)
            except HardLinkLoopError as exc:
                raise ValueError(f"{path!r}: {exc}") from None
            target_path = paths.get(id(node))
            if target_path is None:
                # the target comes later in the printed order: look all targets up once
                paths = _paths_of(root, targets)
                target_path = paths.get(id(node))
            if target_path is None:
                raise ValueError(f"hard link {path!r} points at a node that is not in the tree")
            yield (path, b"@", node.mode, node.nlink, node.uid, node.gid, node.rdev, node.size,
                   node.mtime_sec, node.mtime_nsec, target_path, node.content, node.digest,
                   node.xattrs)
        else:
            node = entry
            if targets and id(node) in targets and node is not root:
                paths[id(node)] = path
            yield (path, b"", node.mode, node.nlink, node.uid, node.gid, node.rdev, node.size,
                   node.mtime_sec, node.mtime_nsec, node.payload, node.content, node.digest,
                   node.xattrs)


#: at most this many distinct escaped xattrs are remembered while printing
_XATTR_TEXTS_MAX = 4096
#: lines per block :func:`dump_blocks` yields
_LINES_PER_BLOCK = 4096


def dump_blocks(records: Iterable[DumpRecord]) -> Iterator[bytes]:
    """The dump text of ``records``, in blocks of many lines (module docstring, "Escapes" and
    "Printing"). The one dump printer: trees (:func:`tree_records`) and images
    (``mkcfs.inspect.unflatten.dump_records``) are both printed by it."""
    safe_std, safe_eq = _SAFE_STD, _SAFE_EQ
    escaped, escaped_equal = _escaped, _escaped_equal
    hexlify = binascii.hexlify
    u32 = U32_MAX
    # (key, value) -> " key=value" escaped: trees repeat a few xattrs (SELinux labels) a lot
    xattr_texts: dict[tuple[bytes, bytes], bytes] = {}
    lines: list[bytes] = []
    add = lines.append
    for (path, at, mode, nlink, uid, gid, rdev, size, mtime, mtime_nsec, payload, content,
         digest, xattrs) in records:
        if path.translate(None, safe_std):
            path = escaped(path)
        if payload is None:
            payload = b"-"
        elif payload == b"-":
            payload = b"\\x2d"
        elif payload.translate(None, safe_std):
            payload = escaped(payload)
        if content is None:
            content = b"-"
        elif content == b"-":
            content = b"\\x2d"
        elif content.translate(None, safe_std):
            content = escaped(content)
        fields = (path, size, at, mode, nlink & u32, uid & u32, gid & u32, rdev, mtime,
                  mtime_nsec & u32, payload, content, b"-" if digest is None else hexlify(digest))
        if not xattrs:
            add(b"%s %d %s%o %d %d %d %d %d.%d %s %s %s\n" % fields)
        else:
            parts = [b"%s %d %s%o %d %d %d %d %d.%d %s %s %s" % fields]
            for item in xattrs.items():
                text = xattr_texts.get(item)
                if text is None:
                    key, value = item
                    if key.translate(None, safe_eq):
                        key = escaped_equal(key)
                    if value.translate(None, safe_eq):
                        value = escaped_equal(value)
                    text = b" " + key + b"=" + value
                    if len(xattr_texts) < _XATTR_TEXTS_MAX:
                        xattr_texts[item] = text
                parts.append(text)
            parts.append(b"\n")
            add(b"".join(parts))
        if len(lines) >= _LINES_PER_BLOCK:
            yield b"".join(lines)
            lines.clear()
    if lines:
        yield b"".join(lines)
