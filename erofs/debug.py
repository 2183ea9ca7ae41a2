"""Struct-level map of an image: every structure, its offset and its fields; padding accounted for.

``image_regions(data)`` cuts an image into consecutive :class:`Region`\\ s that cover every byte:
the composefs header, the superblock, each inode with its xattr body (ibody header, shared
ids, inline entries), its inline tail (dirents and names, file data, chunk indexes), the shared
xattr table, the data blocks, and the padding between them (flagged when it is not zeros).
Structures are parsed with the ``construct`` declarations of :mod:`erofs.structs`, so field names
and meanings are the declared ones. This is a debugging tool (construct is slow); it uses
:mod:`erofs.reader` to find the structures, so a damaged image stops the map at the first
structure the reader refuses.

``format_regions`` prints the map (``mkcfs debug-structs IMAGE``); ``first_difference(expected,
actual)`` names the first differing structure and field of two images. Where only hashes of the
expected image are kept (the golden tests pin mkcomposefs 1.0.8's results, not its images),
``field_hashes(image)`` is the map reduced to one short hash per field (one line per region) and
``first_hash_difference(pinned, actual)`` names the first structure and field whose hash differs.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import construct as cs

from .errors import ImageFormatError
from .format import (EROFS_INODE_CHUNK_BASED, EROFS_INODE_FLAT_INLINE, EROFS_SUPER_OFFSET, S_IFDIR, S_IFLNK,
                     S_IFMT)
from .reader import Image
from .structs import (
    STRUCT_SIZES,
    ComposefsHeader,
    ErofsDirent,
    ErofsInodeCompact,
    ErofsInodeExtended,
    ErofsSuperBlock,
    ErofsXattrEntry,
    ErofsXattrIbodyHeader,
)

__all__ = ["Region", "image_regions", "format_regions", "first_difference", "field_at",
           "field_hashes", "first_hash_difference"]

#: construct declaration -> the C name the kernel and libcomposefs give the struct
STRUCT_NAMES: dict[int, str] = {id(decl): name for name, (decl, _size) in STRUCT_SIZES.items()}


@dataclass(frozen=True, slots=True)
class Region:
    """``size`` bytes at ``offset``: a declared structure (``declaration`` set, ``kind`` its C
    name) or raw bytes (``kind`` says which: ``padding``, ``xattr_name``, ``dirent_names``…).
    ``owner`` says whose it is (``nid 36 /etc``, ``shared xattr 12``…)."""

    offset: int
    size: int
    kind: str
    owner: str
    declaration: cs.Struct | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size


def _struct(offset: int, declaration: cs.Struct, owner: str) -> Region:
    return Region(offset, declaration.sizeof(), STRUCT_NAMES[id(declaration)], owner, declaration)


def _raw(offset: int, size: int, kind: str, owner: str) -> Region:
    return Region(offset, size, kind, owner)


def _inode_paths(image: Image) -> dict[int, bytes]:
    """nid -> the first path met breadth first (``/`` for the root)."""
    paths = {image.root_nid: b"/"}
    queue = [image.root_nid]
    for nid in queue:
        ino = image.inode(nid)
        if ino.mode & S_IFMT != S_IFDIR:
            continue
        base = paths[nid].rstrip(b"/")
        for name, child, _type in image.dirents(ino):
            if name in (b".", b"..") or child in paths:
                continue
            paths[child] = base + b"/" + name
            queue.append(child)
    return paths


def _xattr_entry(data: bytes, pos: int, owner: str, out: list[Region]) -> int:
    """An xattr entry at ``pos``: header, name, value, padding; returns where the next starts."""
    name_len, value_size = data[pos], int.from_bytes(data[pos + 2:pos + 4], "little")
    out.append(_struct(pos, ErofsXattrEntry, owner))
    pos += 4
    if name_len:
        out.append(_raw(pos, name_len, "xattr_name", owner))
    pos += name_len
    if value_size:
        out.append(_raw(pos, value_size, "xattr_value", owner))
    pos += value_size
    return pos


def _dirent_block(image: Image, offset: int, length: int, owner: str, out: list[Region]) -> None:
    names, _nids, _types = image.dirent_columns(offset, length)
    for i, name in enumerate(names):
        out.append(_struct(offset + 12 * i, ErofsDirent, f"{owner} entry {name.decode(errors='replace')}"))
    if names:
        start = offset + 12 * len(names)
        out.append(_raw(start, offset + length - start, "dirent_names", owner))


def image_regions(data: bytes | bytearray) -> list[Region]:
    """Every byte of the image in consecutive regions (see the module docstring)."""
    data = bytes(data)
    image = Image(data)
    regions: list[Region] = [_struct(0, ComposefsHeader, "image"),
                             _struct(EROFS_SUPER_OFFSET, ErofsSuperBlock, "image")]
    paths = _inode_paths(image)
    shared_ids: set[int] = set()
    inode_table_end = 0
    for nid in sorted(paths):
        ino = image.inode(nid)
        inode_table_end = max(inode_table_end, ino.tail_offset)
        owner = f"nid {nid} {paths[nid].decode(errors='replace')}"
        regions.append(_struct(ino.offset, ErofsInodeExtended if ino.extended else ErofsInodeCompact,
                               owner))
        if ino.xattr_size:
            start = ino.xattr_offset
            regions.append(_struct(start, ErofsXattrIbodyHeader, owner))
            _inline, ids = image.xattr_body(ino)     # checks the entries' bounds
            if ids:
                regions.append(_raw(start + 12, 4 * len(ids), "xattr_shared_ids", owner))
                shared_ids.update(ids)
            pos = start + 12 + 4 * len(ids)
            end = ino.tail_offset
            while pos + 4 < end:
                pos = (_xattr_entry(data, pos, owner, regions) + 3) & ~3
        ftype = ino.mode & S_IFMT
        if ino.layout == EROFS_INODE_CHUNK_BASED:
            chunkbits = (ino.i_u & 0x1F) + 12
            count = (ino.size + (1 << chunkbits) - 1) >> chunkbits if ino.size else 0
            if count:
                regions.append(_raw(ino.tail_offset, 4 * count, "chunk_indexes", owner))
                inode_table_end = max(inode_table_end, ino.tail_offset + 4 * count)
            continue
        for offset, length in image.extents(ino):
            inline_tail = ino.layout == EROFS_INODE_FLAT_INLINE and offset == ino.tail_offset
            if inline_tail:
                inode_table_end = max(inode_table_end, offset + length)
            if ftype == S_IFDIR:
                _dirent_block(image, offset, length, owner, regions)
            else:
                kind = "symlink_target" if ftype == S_IFLNK else "file_data"
                regions.append(_raw(offset, length, kind + ("" if inline_tail else "_block"),
                                    owner))
    # the shared xattr table follows the inode table (32-byte aligned) and holds entries no
    # inode refers to as well (an inode refers to at most 128)
    blocks = [r.offset for r in regions if r.offset >= inode_table_end]
    limit = min(blocks + [len(data)])
    pos = (inode_table_end + 31) & ~31
    while pos + 4 <= limit and data[pos:pos + 4] != b"\0\0\0\0":
        end = pos + 4 + data[pos] + int.from_bytes(data[pos + 2:pos + 4], "little")
        if end > limit:
            break
        _xattr_entry(data, pos, f"shared xattr {(pos - image.xattr_base) // 4}", regions)
        pos = (end + 3) & ~3
    for xid in sorted(shared_ids):
        pos = image.xattr_base + 4 * xid
        _xattr_entry(data, pos, f"shared xattr {xid}", regions)
    return _fill_gaps(data, regions)


def _fill_gaps(data: bytes, regions: list[Region]) -> list[Region]:
    """Sort ``regions``, drop exact duplicates (shared blocks) and add the padding between."""
    regions = sorted(set(regions), key=lambda r: (r.offset, -r.size))
    result: list[Region] = []
    pos = 0
    for region in regions:
        if region.offset > pos:
            gap = data[pos:region.offset]
            result.append(_raw(pos, region.offset - pos,
                               "padding" if not gap.strip(b"\0") else "unaccounted", "image"))
        if region.offset < pos and region.end <= pos:
            continue            # inside the previous region (a hostile overlap): skip
        result.append(region)
        pos = max(pos, region.end)
    if pos < len(data):
        gap = data[pos:]
        result.append(_raw(pos, len(data) - pos,
                           "padding" if not gap.strip(b"\0") else "unaccounted", "image"))
    return result


def _fields(region: Region) -> Iterator[tuple[str, int, int, str]]:
    """``(name, offset in the struct, size, doc)`` of each field of a struct region."""
    assert region.declaration is not None
    offset = 0
    for sub in region.declaration.subcons:
        size = sub.sizeof()
        yield sub.name, offset, size, getattr(sub, "docs", "") or ""
        offset += size


def _value(raw: bytes) -> str:
    if len(raw) in (1, 2, 4, 8):
        value = int.from_bytes(raw, "little")
        return f"{value} ({value:#x})"
    return raw.hex() if raw.strip(b"\0") else f"{len(raw)} zero bytes"


def field_at(region: Region, offset: int) -> tuple[str, int, int] | None:
    """``(field name, field offset in the image, field size)`` of the struct field holding the
    image byte ``offset`` (None for a raw region)."""
    if region.declaration is None:
        return None
    for name, start, size, _doc in _fields(region):
        if region.offset + start <= offset < region.offset + start + size:
            return name, region.offset + start, size
    return None


def format_regions(data: bytes | bytearray) -> Iterator[str]:
    """The struct-level dump: one line per region, then one per field of each struct."""
    data = bytes(data)
    for region in image_regions(data):
        yield f"{region.offset:#010x} +{region.size:<5d} {region.kind:26s} {region.owner}"
        if region.declaration is not None:
            for name, start, size, _doc in _fields(region):
                raw = data[region.offset + start:region.offset + start + size]
                yield f"{'':18s}{name:24s} {_value(raw)}"
        elif region.kind == "unaccounted":
            yield f"{'':18s}nonzero bytes where only padding should be"


def first_difference(expected: bytes | bytearray, actual: bytes | bytearray) -> str | None:
    """Where ``actual`` first differs from ``expected``, named by the structure and field of
    ``expected`` that holds that byte; None when the images are equal."""
    expected, actual = bytes(expected), bytes(actual)
    if expected == actual:
        return None
    n = min(len(expected), len(actual))
    offset = next((i for i in range(n) if expected[i] != actual[i]), n)
    sizes = "" if len(expected) == len(actual) else \
        f" (sizes differ: expected {len(expected)} bytes, got {len(actual)})"
    if offset >= len(expected):
        return f"first difference at offset {offset:#x}: past the end of the expected image{sizes}"
    try:
        regions = image_regions(expected)
    except ImageFormatError as exc:
        return f"first difference at offset {offset:#x}{sizes}; the expected image cannot be " \
               f"mapped: {exc}"
    index = bisect.bisect_right([r.offset for r in regions], offset) - 1
    region = regions[index]
    where = f"first difference at offset {offset:#x}: {region.kind} of {region.owner}"
    field = field_at(region, offset)
    if field is None:
        got = f"{actual[offset]:#04x}" if offset < len(actual) else "end of image"
        return (f"{where}, byte {offset - region.offset} of {region.size}: expected "
                f"{expected[offset]:#04x}, got {got}{sizes}")
    name, start, size = field
    exp_raw = expected[start:start + size]
    act_raw = actual[start:start + size]
    return (f"{where} at {region.offset:#x}, field {name} (+{start - region.offset}, {size} "
            f"bytes): expected {_value(exp_raw)}, got {_value(act_raw)}{sizes}")


def _short_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:8]


def field_hashes(data: bytes | bytearray) -> list[str]:
    """The struct map as pinned hashes: one line per region, ``OFFSET SIZE KIND 'OWNER'`` then a
    tab and the first 8 hex digits of the sha256 of each field (of the whole region for raw
    bytes). Equal images give equal lines; the first differing line and hash name the first
    differing structure and field."""
    data = bytes(data)
    lines = []
    for region in image_regions(data):
        # ascii(): file names may hold tabs, newlines and bytes that are not UTF-8
        head = f"{region.offset:#x} {region.size} {region.kind} {ascii(region.owner)}"
        if region.declaration is None:
            hashes = [_short_hash(data[region.offset:region.offset + region.size])]
        else:
            hashes = [_short_hash(data[region.offset + start:region.offset + start + size])
                      for _name, start, size, _doc in _fields(region)]
        lines.append(head + "\t" + " ".join(hashes))
    return lines


def first_hash_difference(pinned: list[str], actual: bytes | bytearray) -> str | None:
    """Where ``actual`` first departs from the image whose ``field_hashes`` are ``pinned``:
    the structure (kind, owner, offset) and, for a declared structure, the field with its value
    in ``actual``; None when every line matches."""
    try:
        regions = image_regions(bytes(actual))
        ours = field_hashes(actual)
    except ImageFormatError as exc:
        return f"the image cannot be mapped: {exc}"
    for index, (want, got) in enumerate(zip(pinned, ours)):
        if want == got:
            continue
        want_head, _, want_hashes = want.partition("\t")
        got_head, _, got_hashes = got.partition("\t")
        if want_head != got_head:
            return f"region {index}: expected {want_head!r}, got {got_head!r}"
        region = regions[index]
        if region.declaration is None:
            return f"{region.kind} of {region.owner} at {region.offset:#x}: bytes differ"
        fields = list(_fields(region))
        for (name, start, size, _doc), w, g in zip(fields, want_hashes.split(),
                                                   got_hashes.split()):
            if w != g:
                raw = bytes(actual)[region.offset + start:region.offset + start + size]
                return (f"{region.kind} of {region.owner} at {region.offset:#x}, field {name} "
                        f"(+{start}, {size} bytes): got {_value(raw)}, the pinned image has "
                        f"another value")
    if len(pinned) != len(ours):
        return f"the image has {len(ours)} regions, the pinned one {len(pinned)}"
    return None
