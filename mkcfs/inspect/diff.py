"""Compare two filesystem trees path by path (``mkcfs diff``).

Each side is loaded with the existing readers into the logical tree of ``mkcfs.tree`` (``load_side``):
an image through ``mkcfs.inspect.unflatten`` (overlay xattrs undone: metacopy/redirect become the
content digest and backing path, escaped ``trusted.overlay.overlay.*`` names are shown as the
tree had them), a composefs-dump(5) file through the dumpfile parser, and a directory through the
walker (files hashed by the digest pool, nothing stored). So an image compares equal to the
directory it was built from, given the same build options.

``diff_trees`` walks both trees together, names in bytewise order, and reports entries added,
removed (the top of an added or removed subtree, with its size) and changed, with the fields
that differ:

``type`` ``mode`` (permission bits) ``owner`` (uid:gid) ``size`` (not for directories: an
image's directory size is its EROFS size) ``mtime`` ``digest`` (content digest of an external
file) ``payload`` (its backing path) ``inline`` (inline data) ``target`` (symlink) ``rdev``
(devices) ``xattr:NAME`` (each extended attribute by name) ``hardlinks`` (the other paths of the
same inode; directory link counts are derived, so not compared).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from erofs.format import LCFS_EROFS_MAGIC

from mkcfs.sources.dumpfile import escape
from mkcfs.tree import (S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, HardLink, Node,
                        iter_tree, resolve)

__all__ = ["FIELDS", "Change", "TreeDiff", "diff_trees", "load_side", "side_kind", "summary"]

#: the fields compared, in report order (``xattr:NAME`` fields follow ``rdev``)
FIELDS = ("type", "mode", "owner", "size", "mtime", "digest", "payload", "inline", "target",
          "rdev", "xattr", "hardlinks")

_TYPE_NAMES = {S_IFDIR: "directory", S_IFREG: "file", S_IFLNK: "symlink", S_IFCHR: "char-device",
               S_IFBLK: "block-device", 0o010000: "fifo", 0o140000: "socket"}


@dataclass(frozen=True)
class Change:
    """One changed entry: ``fields`` maps a field name to ``(value in A, value in B)``, both
    shown as text (``-`` for absent)."""

    path: bytes
    fields: dict[str, tuple[str, str]]


@dataclass
class TreeDiff:
    #: (path, type name, entries in the subtree) for the top of each added / removed subtree
    added: list[tuple[bytes, str, int]] = field(default_factory=list)
    removed: list[tuple[bytes, str, int]] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.added or self.removed or self.changed)


# -- loading -----------------------------------------------------------------------------------

def side_kind(path: str) -> str:
    """``directory``, ``image`` (composefs magic) or ``dumpfile`` (anything else; ``-`` is
    standard input)."""
    if path == "-":
        return "dumpfile"
    if os.path.isdir(path):
        return "directory"
    with open(path, "rb") as f:
        head = f.read(4)
    return "image" if head == LCFS_EROFS_MAGIC.to_bytes(4, "little") else "dumpfile"


def load_side(path: str, walk_options=None, read=None) -> Node:
    """The tree of ``path`` (see ``side_kind``). ``walk_options``: the ``WalkOptions`` for a
    directory; ``read(path) -> bytes`` reads a file (default: the whole file). Errors are the
    readers' (``WalkError``, ``DumpfileError``, ``ImageFormatError``, ``OSError``)."""
    kind = side_kind(path)
    if kind == "directory":
        from mkcfs.sources.walk import WalkOptions, walk_directory

        return walk_directory(path, walk_options or WalkOptions(progress=False))
    data = read(path) if read is not None else open(path, "rb").read()
    if kind == "image":
        from mkcfs.inspect.unflatten import load_tree

        return load_tree(data)
    from mkcfs.sources.dumpfile import parse_dumpfile

    return parse_dumpfile(data, source="<stdin>" if path == "-" else path)


# -- comparing ---------------------------------------------------------------------------------

def _show(value: bytes | None) -> str:
    return "-" if value is None else escape(value).decode("ascii")


def _link_groups(root: Node) -> dict[bytes, tuple[bytes, ...]]:
    """path -> every path of its inode, for the inodes (not directories) with several paths."""
    by_node: dict[int, list[bytes]] = {}
    for path, entry in iter_tree(root):
        node = resolve(entry)
        if not node.is_dir():
            by_node.setdefault(id(node), []).append(path)
    return {path: tuple(paths) for paths in by_node.values() if len(paths) > 1
            for path in paths}


def _fields(a: Node, b: Node) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    ta, tb = a.mode & S_IFMT, b.mode & S_IFMT
    if ta != tb:
        out["type"] = (_TYPE_NAMES.get(ta, oct(ta)), _TYPE_NAMES.get(tb, oct(tb)))
        return out
    if a.mode != b.mode:
        out["mode"] = (f"{a.mode & 0o7777:04o}", f"{b.mode & 0o7777:04o}")
    if (a.uid, a.gid) != (b.uid, b.gid):
        out["owner"] = (f"{a.uid}:{a.gid}", f"{b.uid}:{b.gid}")
    if ta != S_IFDIR and a.size != b.size:
        out["size"] = (str(a.size), str(b.size))
    if (a.mtime_sec, a.mtime_nsec) != (b.mtime_sec, b.mtime_nsec):
        out["mtime"] = (f"{a.mtime_sec}.{a.mtime_nsec:09d}", f"{b.mtime_sec}.{b.mtime_nsec:09d}")
    if ta == S_IFREG:
        if a.digest != b.digest:
            out["digest"] = (a.digest.hex() if a.digest else "-",
                             b.digest.hex() if b.digest else "-")
        if a.payload != b.payload:
            out["payload"] = (_show(a.payload), _show(b.payload))
        if (a.content or None) != (b.content or None):
            out["inline"] = (_show(a.content or None), _show(b.content or None))
    elif ta == S_IFLNK and a.payload != b.payload:
        out["target"] = (_show(a.payload), _show(b.payload))
    if ta in (S_IFCHR, S_IFBLK) and a.rdev != b.rdev:
        out["rdev"] = (str(a.rdev), str(b.rdev))
    if a.xattrs != b.xattrs:
        for name in sorted(a.xattrs.keys() | b.xattrs.keys()):
            va, vb = a.xattrs.get(name), b.xattrs.get(name)
            if va != vb:
                out["xattr:" + escape(name).decode("ascii")] = (_show(va), _show(vb))
    return out


def _subtree_size(entry: Node | HardLink) -> int:
    if isinstance(entry, Node) and entry.children:
        return sum(1 for _ in iter_tree(entry))
    return 1


def _type_name(entry: Node | HardLink) -> str:
    node = resolve(entry)
    return _TYPE_NAMES.get(node.mode & S_IFMT, "?")


def diff_trees(a: Node, b: Node, ignore: Iterable[str] = ()) -> TreeDiff:
    """What differs between the trees ``a`` and ``b``; fields named in ``ignore`` (``xattr``
    covers every ``xattr:NAME``) are not compared."""
    ignored = set(ignore)
    result = TreeDiff()
    links_a = _link_groups(a) if "hardlinks" not in ignored else {}
    links_b = _link_groups(b) if "hardlinks" not in ignored else {}
    stack: list[tuple[bytes, Node | HardLink, Node | HardLink]] = [(b"/", a, b)]
    while stack:
        path, ea, eb = stack.pop()
        na, nb = resolve(ea), resolve(eb)
        fields = _fields(na, nb)
        if ignored:
            fields = {k: v for k, v in fields.items()
                      if k not in ignored and not (k.startswith("xattr:") and "xattr" in ignored)}
        ga, gb = links_a.get(path, ()), links_b.get(path, ())
        if ga != gb and "type" not in fields:
            fields["hardlinks"] = (_show_group(path, ga), _show_group(path, gb))
        if fields:
            result.changed.append(Change(path, fields))
        if "type" in fields or not na.is_dir() or not nb.is_dir():
            continue
        if isinstance(ea, HardLink) or isinstance(eb, HardLink):
            continue   # directories are never hard links; a reader would not produce this
        ca, cb = na.children or {}, nb.children or {}
        base = b"" if path == b"/" else path
        below: list[tuple[bytes, Node | HardLink, Node | HardLink]] = []
        for name in sorted(ca.keys() | cb.keys()):
            child = base + b"/" + name
            if name not in cb:
                result.removed.append((child, _type_name(ca[name]), _subtree_size(ca[name])))
            elif name not in ca:
                result.added.append((child, _type_name(cb[name]), _subtree_size(cb[name])))
            else:
                below.append((child, ca[name], cb[name]))
        stack.extend(reversed(below))
    result.added.sort()
    result.removed.sort()
    result.changed.sort(key=lambda c: c.path)
    return result


def _show_group(path: bytes, group: tuple[bytes, ...]) -> str:
    others = [p for p in group if p != path]
    return "-" if not others else ",".join(escape(p).decode("ascii") for p in others)


# -- the summary -------------------------------------------------------------------------------

def _field_family(name: str) -> str:
    return "xattrs" if name.startswith("xattr:") else name


def summary(diff: TreeDiff) -> str:
    """One line: counts of added, removed and changed entries, the changed ones grouped by the
    set of fields they differ in, most common first ("3,120 differ only in mtime")."""
    if diff.equal:
        return "equal"
    parts = []
    if diff.added:
        parts.append(f"{sum(n for _, _, n in diff.added):,} added")
    if diff.removed:
        parts.append(f"{sum(n for _, _, n in diff.removed):,} removed")
    if diff.changed:
        groups = Counter(tuple(sorted({_field_family(f) for f in c.fields},
                                      key=_order)) for c in diff.changed)
        shown = []
        for fields, count in sorted(groups.items(), key=lambda item: (-item[1], item[0])):
            what = fields[0] if len(fields) == 1 else ", ".join(fields)
            shown.append(f"{count:,} differ only in {what}" if len(fields) == 1
                         else f"{count:,} in {what}")
        parts.append(f"{len(diff.changed):,} changed ({'; '.join(shown)})")
    return ", ".join(parts)


def _order(name: str) -> int:
    family = "xattr" if name == "xattrs" else name
    return FIELDS.index(family) if family in FIELDS else len(FIELDS)
