"""Apply tar layers, in order, to one ``Node`` tree, as the OCI image spec (``layer.md``) says.

``LayerMerger`` takes the members of each layer (``mkcfs.sources.tarlayer.TarEntry``) in
archive order and keeps the merged tree; ``finish()`` returns its root. File data is the
caller's business: ``add()`` returns the new regular-file ``Node`` and the caller fills in its
``content`` or ``digest``/``payload``.

Rules:

* A later entry replaces the entry at the same path. A non-directory over a directory removes
  the directory's subtree; a directory over a directory keeps the children and takes the new
  entry's metadata (mode, owner, mtime, xattrs).
* ``DIR/.wh.NAME`` removes NAME and its subtree from the *lower* layers: what the same layer
  put there (before or after the whiteout) stays, with the directories that hold it.
* ``DIR/.wh..wh..opq`` hides every lower-layer entry below DIR, wherever the marker appears in
  the layer: entries of the same layer (before or after it) stay. Other ``.wh..wh.*`` names
  (AUFS bookkeeping) are ignored; whiteout entries never reach the tree.
* Hard links are one inode: a ``link`` entry names an existing non-directory (in this or a lower
  layer) and shares its node; replacing or whiting out one name leaves the others with the
  content. In the finished tree the first name in depth-first, bytewise-sorted order holds the
  ``Node`` and the others are ``HardLink``s to it, nlink counting the names (the same tree
  ``mkcomposefs --hardlinks`` reads from the extracted directory). A link to a missing path or
  to a directory is an error.
* A parent directory that no layer lists (and the root when no layer has ``./``) is mode 0755,
  owner 0:0, mtime 0, so the image is reproducible. A symlink met among the parents of a path
  is followed, inside the tree (an absolute target or ``..`` never leaves the root), as
  ``umoci`` and docker resolve it; a parent that is some other non-directory is an error.
* Symlinks get permission bits 0777 whatever the tar says (Linux has no other kind, and that
  is what an extracted tree shows).
* Overlay-style whiteouts (character device 0/0) and ``trusted.overlay.*`` xattrs inside a layer
  are kept as they are; the image writer escapes them as it does for a directory source.

Options mirror the directory source: ``use_epoch`` (mtimes 0), ``skip_devices``,
``skip_xattrs``, ``user_xattrs``. Xattrs beyond libcomposefs's per-inode limit are refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from mkcfs.build.overlay import XattrBudget, XattrLimitError
from mkcfs.sources import tarlayer
from mkcfs.sources.tarlayer import TarEntry, TarError
from mkcfs.tree import HardLink, Node, iter_tree

__all__ = ["LayerMerger", "MergeOptions", "WHITEOUT_PREFIX", "OPAQUE_MARKER"]

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
_META_PREFIX = b".wh..wh."
_IMPLICIT_DIR_MODE = stat.S_IFDIR | 0o755
_MAX_SYMLINKS = 40
_TYPE_BITS = {tarlayer.REG: stat.S_IFREG, tarlayer.SYM: stat.S_IFLNK, tarlayer.CHR: stat.S_IFCHR,
              tarlayer.BLK: stat.S_IFBLK, tarlayer.DIR: stat.S_IFDIR, tarlayer.FIFO: stat.S_IFIFO}


@dataclass(frozen=True, slots=True)
class MergeOptions:
    """What the merged tree keeps (the mkcomposefs options of the same names)."""

    use_epoch: bool = False
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False


class LayerMerger:
    """The tree of the layers applied so far (see the module docstring)."""

    def __init__(self, options: MergeOptions | None = None) -> None:
        self.options = options or MergeOptions()
        self.root = Node(_IMPLICIT_DIR_MODE)
        #: names this layer created or declared, as (id of the parent's children dict, name):
        #: they survive its whiteouts (``_keep`` holds those dicts so their ids stay unique)
        self._mine: set[tuple[int, bytes]] = set()
        self._keep: list[dict] = []
        #: whiteouts and opaque markers of this layer, applied when it ends
        self._hide: list[tuple[bytes, bytes, bytes | None]] = []
        self._links = False
        self._source = ""
        self._modes: dict[int, int] = {}

    # -- layers ---------------------------------------------------------------------------------

    def begin_layer(self, source: str) -> None:
        """Start the next layer; ``source`` names it in messages."""
        self._mine = set()
        self._keep = []
        self._hide = []
        self._source = source

    def end_layer(self) -> None:
        """Apply the layer's whiteouts and opaque markers (to lower-layer entries only)."""
        for _member, parent_path, name in self._hide:
            parent = self._lookup_dir(parent_path)
            if parent is None:
                continue     # nothing below: nothing to hide
            children = parent.children
            assert children is not None
            if name is None:                       # opaque: every lower child of parent
                self._prune(parent)
                continue
            child = children.get(name)
            if child is None:
                continue
            if (id(children), name) in self._mine:
                if isinstance(child, Node) and child.children is not None:
                    self._prune(child)     # the layer's own directory: hide its lower part
            else:
                del children[name]
        self._mine = set()
        self._keep = []
        self._hide = []

    def _prune(self, directory: Node) -> None:
        """Remove every entry below ``directory`` that this layer did not put there."""
        mine = self._mine
        stack = [directory]
        while stack:
            node = stack.pop()
            children = node.children
            assert children is not None
            key = id(children)
            for name in [n for n in children if (key, n) not in mine]:
                del children[name]
            for child in children.values():
                if isinstance(child, Node) and child.children:
                    stack.append(child)

    # -- entries --------------------------------------------------------------------------------

    def _error(self, entry: TarEntry, message: str) -> TarError:
        shown = os.fsdecode(entry.member).encode("utf-8", "backslashreplace").decode()
        return TarError(f"{self._source}: member {shown}: {message}")

    def _lookup_dir(self, path: bytes) -> Node | None:
        return self._walk(path, None)

    def _parent(self, entry: TarEntry, path: bytes) -> Node:
        node = self._walk(path, entry)
        assert node is not None
        return node

    def _walk(self, path: bytes, create_for: TarEntry | None) -> Node | None:
        """The directory at ``path``, following symlinks on the way as an extractor does, but
        inside the tree (an absolute target or ``..`` never leaves the root). Missing
        directories are created (0755, 0:0, mtime 0) when ``create_for`` names the entry that
        needs them; otherwise a missing or non-directory component gives None."""
        stack = [self.root]
        parts = path.split(b"/")[::-1] if path else []
        hops = 0
        while parts:
            part = parts.pop()
            if part == b"" or part == b".":
                continue
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            children = stack[-1].children
            assert children is not None
            child = children.get(part)
            if child is None:
                if create_for is None:
                    return None
                child = children[part] = Node(_IMPLICIT_DIR_MODE)
                self._claim(children, part)
            elif isinstance(child, Node) and child.file_type == stat.S_IFLNK:
                hops += 1
                if hops > _MAX_SYMLINKS:
                    if create_for is None:
                        return None
                    raise self._error(create_for, "too many levels of symbolic links in the "
                                                  "parent directories")
                target = child.payload or b""
                if target.startswith(b"/"):
                    del stack[1:]
                parts.extend(target.split(b"/")[::-1])
                continue
            elif not isinstance(child, Node) or child.children is None:
                if create_for is None:
                    return None
                raise self._error(create_for, "a parent directory is not a directory in the "
                                              "layers below")
            elif create_for is not None:
                # the layer needs this directory for its entry: a whiteout or opaque marker
                # of the same layer hides only its lower-layer contents, not the directory
                self._claim(children, part)
            stack.append(child)
        return stack[-1]

    def _xattrs(self, entry: TarEntry) -> dict[bytes, bytes]:
        options = self.options
        if options.skip_xattrs or not entry.xattrs:
            return {}
        result: dict[bytes, bytes] = {}
        budget = XattrBudget(result)
        for key, value in entry.xattrs.items():
            if options.user_xattrs and not key.startswith(b"user."):
                continue
            try:
                budget.set(key, value)
            except XattrLimitError as exc:
                raise self._error(entry, f"xattr {os.fsdecode(key)}: "
                                         f"{os.strerror(exc.errno)}") from None
        return result

    def add(self, entry: TarEntry) -> Node | None:
        """Apply one member of the current layer. Returns the node of a regular file (whose
        data the caller fills in), else None."""
        name = entry.name
        parent_path, _, base = name.rpartition(b"/")
        if base.startswith(WHITEOUT_PREFIX):
            if base == OPAQUE_MARKER:
                self._hide.append((entry.member, parent_path, None))
            elif not base.startswith(_META_PREFIX):
                hidden = base[len(WHITEOUT_PREFIX):]
                if hidden in (b"", b".", b".."):
                    raise self._error(entry, "whiteout of an invalid name")
                self._hide.append((entry.member, parent_path, hidden))
            return None
        kind = entry.kind
        options = self.options
        if options.skip_devices and (kind == tarlayer.CHR or kind == tarlayer.BLK):
            return None
        if not name:                     # the root: metadata only, children stay
            if kind != tarlayer.DIR:
                raise self._error(entry, "the root of a layer must be a directory")
            self._update_dir(self.root, entry)
            return None
        parent = self._parent(entry, parent_path)
        children = parent.children
        assert children is not None
        old = children.get(base)

        if kind == tarlayer.LNK:
            target = self._find(entry.linkname)
            if target is None:
                raise self._error(entry, f"hard link to a missing path "
                                         f"{os.fsdecode(entry.linkname)}")
            if target.children is not None:
                raise self._error(entry, "hard link to a directory")
            if old is target:
                return None
            children[base] = target
            self._claim(children, base)
            self._links = True
            return None
        if kind == tarlayer.DIR and isinstance(old, Node) and old.children is not None:
            self._update_dir(old, entry)
            self._claim(children, base)
            return None
        # a symlink's permission bits are always 0777 on Linux (what an extracted tree shows)
        mode = _TYPE_BITS[kind] | (0o777 if kind == tarlayer.SYM else entry.mode)
        mode = self._modes.setdefault(mode, mode)
        sec, nsec = (0, 0) if options.use_epoch else (entry.mtime_sec, entry.mtime_nsec)
        node = Node(mode, 1, entry.uid, entry.gid, entry.rdev, entry.size, sec, nsec)
        xattrs = self._xattrs(entry)
        if xattrs:
            node.xattrs = xattrs
        if kind == tarlayer.SYM:
            node.payload = entry.linkname
            node.size = len(entry.linkname)
        children[base] = node
        self._claim(children, base)
        return node if kind == tarlayer.REG else None

    def _update_dir(self, node: Node, entry: TarEntry) -> None:
        mode = stat.S_IFDIR | entry.mode
        node.mode = self._modes.setdefault(mode, mode)
        node.uid, node.gid = entry.uid, entry.gid
        if self.options.use_epoch:
            node.mtime_sec = node.mtime_nsec = 0
        else:
            node.mtime_sec, node.mtime_nsec = entry.mtime_sec, entry.mtime_nsec
        node.xattrs = self._xattrs(entry)

    def _claim(self, children: dict, name: bytes) -> None:
        key = id(children)
        if (key, name) not in self._mine:
            self._mine.add((key, name))
            self._keep.append(children)

    def _find(self, path: bytes) -> Node | None:
        """The entry a hard link names (parents resolved like ``_walk``, the last component
        not followed, as ``link(2)`` does)."""
        parent_path, _, base = path.rpartition(b"/")
        parent = self._walk(parent_path, None)
        if parent is None or parent.children is None:
            return None
        child = parent.children.get(base)
        return child if isinstance(child, Node) else None

    # -- the result -----------------------------------------------------------------------------

    def finish(self) -> Node:
        """The merged tree: shared nodes become one ``Node`` plus ``HardLink``s."""
        if self._links:
            self._split_links()
        return self.root

    def _split_links(self) -> None:
        # iter_tree visits in depth-first bytewise order: the first name met is the primary
        first: dict[int, Node] = {}
        names: list[tuple[dict, bytes, Node]] = []
        count: dict[int, int] = {}
        parents: dict[bytes, dict] = {b"": self.root.children}  # type: ignore[dict-item]
        for path, entry in iter_tree(self.root):
            if path == b"/":
                continue
            assert isinstance(entry, Node)
            parent_path, _, base = path.rpartition(b"/")
            if entry.children is not None:
                parents[path] = entry.children
                continue
            key = id(entry)
            if key in first:
                names.append((parents[parent_path], base, entry))
            else:
                first[key] = entry
            count[key] = count.get(key, 0) + 1
        for children, base, node in names:
            children[base] = HardLink(node)
        for key, n in count.items():
            if n > 1:
                first[key].nlink = n
