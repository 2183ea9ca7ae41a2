"""A strict, one-pass tar reader for image layers (no extraction, no seeking needed).

``TarReader(stream, source)`` reads tar entries from ``stream`` (anything with ``read(n)``,
e.g. a decompressing reader) and yields ``TarEntry`` objects; the data of a regular file is
read with ``reader.data()`` (chunks, at most ``CHUNK`` bytes each) before asking for the next
entry, or skipped when not read. Nothing is kept but the current header.

Dialects: POSIX ustar (the ``prefix`` field), GNU (``L``/``K`` long names and link names,
base-256 numbers), PAX extended headers (``x``) and global headers (``g``) with ``path``,
``linkpath``, ``size``, ``uid``, ``gid``, ``mtime`` (with a fraction: nanoseconds),
``SCHILY.xattr.NAME`` (raw value) and ``LIBARCHIVE.xattr.NAME`` (URL-encoded name, base64
value). Other PAX keys (``atime``, ``uname``, ``comment``...) are ignored, as POSIX says.

Entry types: regular files (``0``, NUL, contiguous ``7``), hard links (``1``), symlinks
(``2``), character and block devices (``3``, ``4``), directories (``5``) and FIFOs (``6``).
Everything else is refused with a ``TarError`` naming the member: GNU sparse files (``S`` and
``GNU.sparse.*`` PAX keys), multi-volume parts, volume labels, unknown types. So are a bad
header checksum, a truncated archive, a negative or unparsable number, oversized PAX/GNU
headers (limit ``META_MAX``) and member names that cannot be put in a tree safely.

Names are normalised: leading ``/`` and ``./`` and a trailing ``/`` are removed (``./`` alone
is the root, ``b""``). A name with a ``..``, ``.`` or empty component, or a NUL, is refused;
so are hard link targets of that kind.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Iterator
from typing import Protocol
from urllib.parse import unquote_to_bytes

from mkcfs.errors import BuildInputError

__all__ = ["TarError", "TarEntry", "TarReader", "normalise_name", "REG", "LNK", "SYM", "CHR",
           "BLK", "DIR", "FIFO", "CHUNK", "META_MAX"]

BLOCK = 512
#: largest data chunk ``TarReader.data()`` yields.
CHUNK = 1 << 20
#: largest PAX header or GNU long name/link body accepted (xattr values are at most 64 KiB).
META_MAX = 8 << 20
#: longest path accepted (Linux PATH_MAX).
PATH_MAX = 4096

# entry kinds (the ustar type flags of the kinds kept)
REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_KINDS = {b"0": REG, b"\0": REG, b"7": REG, b"1": LNK, b"2": SYM, b"3": CHR, b"4": BLK,
          b"5": DIR, b"6": FIFO}
_REFUSED = {b"S": "a GNU sparse file", b"M": "a GNU multi-volume part",
            b"V": "a volume label", b"D": "a GNU dump directory", b"N": "an old GNU long name"}
_NS = 1_000_000_000


class TarError(BuildInputError):
    """Bad tar input; the message names the source and the member."""


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class TarEntry:
    """One member: ``name`` (normalised), ``kind`` (``REG``...), permission bits ``mode``
    (``0o7777`` part), owner, ``size`` (regular files), mtime in seconds and nanoseconds,
    ``linkname`` (symlink target as written, or the normalised hard link target), ``rdev``
    and ``xattrs``. ``member`` is the name as the archive wrote it, for messages."""

    __slots__ = ("name", "member", "kind", "mode", "uid", "gid", "size", "mtime_sec",
                 "mtime_nsec", "linkname", "rdev", "xattrs")

    def __init__(self, name: bytes, member: bytes, kind: bytes, mode: int, uid: int, gid: int,
                 size: int, mtime_sec: int, mtime_nsec: int, linkname: bytes, rdev: int,
                 xattrs: dict[bytes, bytes]) -> None:
        self.name = name
        self.member = member
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        self.linkname = linkname
        self.rdev = rdev
        self.xattrs = xattrs

    def __repr__(self) -> str:
        return f"TarEntry({self.name!r}, kind={self.kind!r}, size={self.size})"


def normalise_name(raw: bytes) -> bytes | None:
    """The tree path of a member name (no leading/trailing slash, ``b""`` for the root), or
    None when the name is refused (``..``/``.``/empty component, NUL, too long)."""
    if b"\0" in raw or len(raw) > PATH_MAX:
        return None
    name = raw
    while True:
        if name.startswith(b"/"):
            name = name[1:]
        elif name.startswith(b"./"):
            name = name[2:]
        else:
            break
    if name == b"." or name == b"":
        return b"" if raw else None
    if name.endswith(b"/"):
        name = name[:-1]
    for part in name.split(b"/"):
        if part in (b"", b".", b".."):
            return None
    return name


def _shown(raw: bytes) -> str:
    return os.fsdecode(raw).encode("utf-8", "backslashreplace").decode("utf-8")


class TarReader:
    """Iterate over the members of one tar stream (see the module docstring)."""

    def __init__(self, stream: Readable, source: str) -> None:
        self._read = stream.read
        self.source = source
        self._buf = b""
        self._pos = 0
        self._left = 0        # data bytes of the current member not yet consumed
        self._pad = 0         # padding after them
        self._member = b""
        self._globals: dict[bytes, bytes] = {}
        self.ended = False

    # -- raw input ------------------------------------------------------------------------------

    def _error(self, message: str, member: bytes | None = None) -> TarError:
        member = self._member if member is None else member
        where = f"{self.source}: member {_shown(member)}: " if member else f"{self.source}: "
        return TarError(where + message)

    def _fill(self, need: int) -> bool:
        """Make at least ``need`` bytes available at ``_pos``; False at the end of input."""
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        parts = [self._buf[self._pos:]] if have else []
        while have < need:
            chunk = self._read(max(CHUNK, need - have))
            if not chunk:
                self._buf, self._pos = b"".join(parts), 0
                return False
            parts.append(chunk)
            have += len(chunk)
        self._buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos = 0
        return True

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise self._error(f"truncated archive (end of data in {what})")
        pos = self._pos
        self._pos = pos + n
        return self._buf[pos:pos + n]

    def _skip(self, n: int) -> None:
        while n:
            have = len(self._buf) - self._pos
            if have:
                step = min(have, n)
                self._pos += step
                n -= step
                continue
            if not self._fill(1):
                raise self._error("truncated archive (end of data inside a member)")

    def data(self) -> Iterator[memoryview]:
        """The data of the current regular file, in chunks (views valid until the next one)."""
        while self._left:
            have = len(self._buf) - self._pos
            if not have:
                if not self._fill(1):
                    raise self._error("truncated archive (end of data inside a member)")
                continue
            step = min(have, self._left, CHUNK)
            pos = self._pos
            self._pos = pos + step
            self._left -= step
            yield memoryview(self._buf)[pos:pos + step]

    def read_all(self) -> bytes:
        """The whole data of the current member (callers use it for small ones only)."""
        return b"".join(bytes(chunk) for chunk in self.data())

    def drain(self) -> int:
        """Consume whatever follows the end-of-archive marker (zero padding); return its length."""
        total = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while True:
            chunk = self._read(CHUNK)
            if not chunk:
                return total
            total += len(chunk)

    # -- headers --------------------------------------------------------------------------------

    def _number(self, field: bytes, what: str) -> int:
        if field and field[0] & 0x80:      # GNU base-256
            if field[0] == 0xFF:
                raise self._error(f"negative {what} in header")
            value = field[0] & 0x3F
            for byte in field[1:]:
                value = (value << 8) | byte
            return value
        text = field.split(b"\0", 1)[0].strip(b" ")
        if not text:
            return 0
        try:
            return int(text, 8)
        except ValueError:
            raise self._error(f"bad {what} field {text!r} in header") from None

    def _pax_records(self, body: bytes, member: bytes) -> dict[bytes, bytes]:
        records: dict[bytes, bytes] = {}
        pos, end = 0, len(body)
        while pos < end:
            if body[pos] == 0:        # some writers pad the body with NULs
                if body[pos:].strip(b"\0"):
                    raise self._error("bad PAX header (data after NUL padding)", member)
                break
            space = body.find(b" ", pos, min(end, pos + 21))
            try:
                length = int(body[pos:space]) if space > pos else -1
            except ValueError:
                length = -1
            if length <= space - pos or pos + length > end or body[pos + length - 1] != 0x0A:
                raise self._error("bad PAX header record", member)
            record = body[space + 1:pos + length - 1]
            key, eq, value = record.partition(b"=")
            if not eq or not key:
                raise self._error("bad PAX header record", member)
            records[key] = value
            pos += length
        return records

    def _pax_int(self, value: bytes, key: bytes, member: bytes) -> int:
        if not value.isdigit():
            raise self._error(f"bad PAX {key.decode()} {value!r}", member)
        return int(value)

    def _pax_mtime(self, value: bytes, member: bytes) -> tuple[int, int]:
        whole, dot, frac = value.partition(b".")
        if not whole.isdigit() or (dot and frac and not frac.isdigit()):
            raise self._error(f"bad or negative PAX mtime {value!r}", member)
        nsec = int((frac[:9] or b"0").ljust(9, b"0")) if dot else 0
        return int(whole), nsec

    def _meta_body(self, size: int, what: str, member: bytes) -> bytes:
        if size > META_MAX:
            raise self._error(f"{what} of {size} bytes is larger than {META_MAX}", member)
        body = self._take(size, what)
        self._skip(-size % BLOCK)
        return body

    def __iter__(self) -> Iterator[TarEntry]:
        return self

    def __next__(self) -> TarEntry:
        if self._left or self._pad:
            self._skip(self._left + self._pad)
            self._left = self._pad = 0
        if self.ended:
            raise StopIteration
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        self._member = b""
        while True:
            if not self._fill(BLOCK):
                if len(self._buf) - self._pos:
                    raise self._error("truncated archive (partial header block)")
                if pax or long_name is not None or long_link is not None:
                    raise self._error("truncated archive (extended header without its member)")
                raise self._error("truncated archive (no end-of-archive marker)")
            header = self._take(BLOCK, "a header")
            if header.count(0) == BLOCK:
                if pax or long_name is not None or long_link is not None:
                    raise self._error("truncated archive (extended header without its member)")
                self.ended = True
                raise StopIteration
            raw_name = header[0:100].split(b"\0", 1)[0]
            self._member = long_name if long_name is not None else raw_name
            stored = self._number(header[148:156], "checksum")
            unsigned = sum(header) - sum(header[148:156]) + 8 * 32
            if stored != unsigned and stored != unsigned - 256 * sum(
                    1 for b in header[:148] + header[156:] if b > 127):
                raise self._error("bad header checksum (not a tar archive, or corrupt)",
                                  raw_name)
            typeflag = header[156:157]
            size = self._number(header[124:136], "size")
            magic = header[257:265]
            if typeflag in (b"x", b"g"):
                body = self._meta_body(size, "PAX header", self._member)
                records = self._pax_records(body, self._member)
                if typeflag == b"g":
                    for key in (b"path", b"linkpath", b"size"):
                        if key in records:
                            raise self._error(f"PAX global header sets {key.decode()}")
                    self._globals.update(records)
                else:
                    pax.update(records)
                continue
            if typeflag in (b"L", b"K"):
                body = self._meta_body(size, "GNU long name", self._member).split(b"\0", 1)[0]
                if typeflag == b"L":
                    long_name = body
                else:
                    long_link = body
                continue
            break

        if magic == b"ustar\x0000" and header[345] and long_name is None:
            raw_name = header[345:500].split(b"\0", 1)[0] + b"/" + raw_name
        records = {**self._globals, **pax} if self._globals else pax
        member = records.get(b"path", long_name if long_name is not None else raw_name)
        self._member = member
        kind = _KINDS.get(typeflag)
        if kind is None:
            what = _REFUSED.get(typeflag, f"an unknown entry type {typeflag!r}")
            raise self._error(f"{what} is not supported")
        if any(key.startswith(b"GNU.sparse.") for key in records):
            raise self._error("a GNU sparse file is not supported")
        name = normalise_name(member)
        if name is None:
            raise self._error("refused member name (empty, '.' or '..' component, or NUL)")

        mode = self._number(header[100:108], "mode") & 0o7777
        uid = self._number(header[108:116], "uid")
        gid = self._number(header[116:124], "gid")
        mtime_sec, mtime_nsec = self._number(header[136:148], "mtime"), 0
        linkname = header[157:257].split(b"\0", 1)[0] if long_link is None else long_link
        if records:
            if b"size" in records:
                size = self._pax_int(records[b"size"], b"size", member)
            if b"uid" in records:
                uid = self._pax_int(records[b"uid"], b"uid", member)
            if b"gid" in records:
                gid = self._pax_int(records[b"gid"], b"gid", member)
            if b"mtime" in records:
                mtime_sec, mtime_nsec = self._pax_mtime(records[b"mtime"], member)
            linkname = records.get(b"linkpath", linkname)
        if uid > 0xFFFFFFFF or gid > 0xFFFFFFFF:
            raise self._error("uid or gid does not fit 32 bits")
        xattrs = self._xattrs(records) if records else {}

        rdev = 0
        if kind == CHR or kind == BLK:
            major = self._number(header[329:337], "devmajor")
            minor = self._number(header[337:345], "devminor")
            if major > 0xFFFFFFFF or minor > 0xFFFFFFFF:
                raise self._error("device number out of range")
            rdev = os.makedev(major, minor)
        if kind == LNK:
            target = normalise_name(linkname)
            if not target:
                raise self._error(f"refused hard link target {_shown(linkname)}")
            linkname = target
        elif kind == SYM:
            if not linkname or b"\0" in linkname or len(linkname) > PATH_MAX:
                raise self._error("bad symlink target (empty, too long or with NUL)")
        if kind == REG:
            self._left = size
            self._pad = -size % BLOCK
        else:
            size = 0   # other members carry no data, whatever their size field says (as Go's
            # archive/tar and Python's tarfile read them)
        return TarEntry(name, member, kind, mode, uid, gid, size, mtime_sec, mtime_nsec,
                        linkname, rdev, xattrs)

    def _xattrs(self, records: dict[bytes, bytes]) -> dict[bytes, bytes]:
        xattrs: dict[bytes, bytes] = {}
        schily: dict[bytes, bytes] = {}
        for key, value in records.items():
            if key.startswith(b"SCHILY.xattr."):
                schily[key[13:]] = value
            elif key.startswith(b"LIBARCHIVE.xattr."):
                name = unquote_to_bytes(key[17:])
                try:
                    xattrs[name] = base64.b64decode(value + b"=" * (-len(value) % 4),
                                                    validate=True)
                except (binascii.Error, ValueError):
                    raise self._error(f"bad base64 in PAX key {_shown(key)}") from None
        xattrs.update(schily)   # the same xattr in both forms: the SCHILY one wins
        for name in xattrs:
            if not name or b"\0" in name:
                raise self._error("bad xattr name in PAX header")
        return xattrs


def read_members(stream: Readable, source: str,
                 visit: Callable[[TarEntry, TarReader], None]) -> TarReader:
    """Call ``visit(entry, reader)`` for every member, in order; return the reader (ended)."""
    reader = TarReader(stream, source)
    for entry in reader:
        visit(entry, reader)
    return reader
