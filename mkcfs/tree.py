"""The in-memory filesystem tree that every source (dumpfile, directory walk, image reader) produces.

The model knows nothing about EROFS or overlayfs: it holds what composefs-dump(5) can express.
Names, paths, symlink targets, payloads and xattrs are ``bytes`` (Linux file names are bytes).

* ``Node`` is one inode: a directory (``children`` is a dict), a regular file (inline ``content``
  or an external file described by ``size``/``payload``/``digest``), a symlink (``payload`` is the
  target), a device, a fifo or a socket.
* ``HardLink`` is a directory entry that names another entry (a ``Node`` or, in a chain, another
  ``HardLink``); it owns no inode. The node it reaches is stored in the image once, at its own
  (non-hard-link) place in the tree.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import attrgetter

# the file type bits, from their one home (POSIX's, as in ``stat``); re-exported for the tree's users
from erofs.format import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK  # noqa: F401

from mkcfs.errors import BuildInputError

#: The file types a composefs image can hold.
VALID_TYPES = frozenset((S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK))


class Node:
    """One inode of the tree.

    ``mode`` holds the type bits and the permission bits (as ``st_mode``). ``size`` is the file size
    for regular files (content length for inline files), the target length for symlinks, and
    whatever the source said for other types. ``payload`` is the symlink target, or for a regular
    file the backing path inside the object store (``ab/cdef…``). ``content`` holds inline data of a
    regular file. ``digest`` is the 32-byte fs-verity digest of an external file's data.
    ``children`` maps names to entries for directories and is ``None`` for everything else.
    """

    __slots__ = ("mode", "nlink", "uid", "gid", "rdev", "size", "mtime_sec", "mtime_nsec",
                 "payload", "content", "digest", "xattrs", "children")

    def __init__(self, mode: int, nlink: int = 1, uid: int = 0, gid: int = 0, rdev: int = 0,
                 size: int = 0, mtime_sec: int = 0, mtime_nsec: int = 0,
                 payload: bytes | None = None, content: bytes | None = None,
                 digest: bytes | None = None, xattrs: dict[bytes, bytes] | None = None) -> None:
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = size
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        self.payload = payload
        self.content = content
        self.digest = digest
        self.xattrs: dict[bytes, bytes] = {} if xattrs is None else xattrs
        self.children: dict[bytes, Entry] | None = {} if (mode & S_IFMT) == S_IFDIR else None

    @property
    def file_type(self) -> int:
        """The ``S_IFMT`` bits of the mode."""
        return self.mode & S_IFMT

    def is_dir(self) -> bool:
        return (self.mode & S_IFMT) == S_IFDIR

    def __repr__(self) -> str:
        count = None if self.children is None else len(self.children)
        return f"Node(mode={self.mode:o}, size={self.size}, children={count})"


class HardLink:
    """A directory entry that points at another entry. ``target`` is set once resolved."""

    __slots__ = ("target",)

    def __init__(self, target: Entry | None = None) -> None:
        self.target = target

    def __repr__(self) -> str:
        return f"HardLink({self.target!r})"


Entry = Node | HardLink


class HardLinkLoopError(BuildInputError):
    """A chain of hard links that never reaches a node."""


def resolve(entry: Entry) -> Node:
    """Follow hard links (and chains of them) to the node they reach."""
    if isinstance(entry, Node):
        return entry
    seen: set[int] = set()
    while isinstance(entry, HardLink):
        if id(entry) in seen:
            raise HardLinkLoopError("Too many levels of symbolic links (hard link cycle)")
        seen.add(id(entry))
        target = entry.target
        if target is None:
            raise HardLinkLoopError("unresolved hard link")
        entry = target
    return entry


def iter_tree(root: Node) -> Iterator[tuple[bytes, Entry]]:
    """Yield ``(path, entry)`` depth first in pre-order: the root as ``b"/"``, then every entry below
    it, each directory before its children, siblings in bytewise name order. Hard links are yielded
    but not descended into."""
    yield b"/", root
    stack: list[tuple[bytes, Iterator[tuple[bytes, Entry]]]] = [
        (b"", iter(sorted((root.children or {}).items())))]
    while stack:
        base, it = stack[-1]
        for name, child in it:
            path = base + b"/" + name
            yield path, child
            if isinstance(child, Node) and child.children is not None:
                stack.append((path, iter(sorted(child.children.items()))))
                break
        else:
            stack.pop()


_children_of = attrgetter("children")


def link_targets(root: Node) -> set[int]:
    """The ``id()`` of every node that a hard link below ``root`` reaches. Links that reach no
    node (a cycle, an unresolved link) are left out: the caller names their error where it
    meets them. A directory reachable twice is walked once. Directories without hard links
    (most) are looked at in C."""
    targets: set[int] = set()
    seen: set[int] = set()
    stack = [root.children or {}]
    while stack:
        children = stack.pop()
        if id(children) in seen:
            continue
        seen.add(id(children))
        entries = children.values()
        if list(map(type, entries)).count(Node) == len(entries):
            stack.extend(filter(None, map(_children_of, entries)))
            continue
        for entry in entries:
            if entry.__class__ is Node:
                if entry.children:
                    stack.append(entry.children)
            else:
                try:
                    targets.add(id(resolve(entry)))
                except HardLinkLoopError:
                    pass
    return targets
