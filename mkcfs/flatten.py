"""Tree -> flat inode records in the order and form the EROFS writer needs.

This is where the tree meets composefs policy (``mkcfs.overlay``): the format version is chosen,
overlay xattrs are escaped and added, chardev 0/0 whiteouts become escaped whiteout files, the
root gets its 256 ``00``..``ff`` whiteouts, and every directory gets ``.`` and ``..``. Inodes are
numbered breadth first from the root, children in bytewise name order, hard links skipped (they
become extra dirents to their target). The tree itself is never modified.
"""

from __future__ import annotations

import errno
import os

from erofs.format import LCFS_MAX_NONINLINE_CHUNKS, chunk_params
from erofs.layout import InodeRecord

from . import overlay
from .errors import BuildInputError
from .overlay import XattrBudget, XattrLimitError
from .tree import (
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    VALID_TYPES,
    HardLink,
    HardLinkLoopError,
    Node,
    iter_tree,
    resolve,
)

_U32 = 0xFFFFFFFF
#: format versions this writer produces.
MIN_FORMAT_VERSION = 0
MAX_FORMAT_VERSION = 1
_ROOT_WHITEOUT_NAMES = [b"%02x" % i for i in range(256)]


class WriteError(BuildInputError):
    """The tree cannot be written (mkcomposefs: ``cannot write file: <strerror>``)."""

    def __init__(self, err: int, detail: str = "") -> None:
        self.errno = err
        text = f"cannot write file: {os.strerror(err)}"
        super().__init__(f"{text} ({detail})" if detail else text)


def _is_whiteout(node: Node) -> bool:
    return (node.mode & S_IFMT) == S_IFCHR and (node.rdev & _U32) == 0


def choose_version(root: Node, min_version: int, max_version: int) -> int:
    """The format version mkcomposefs 1.0.8 picks: ``min``, raised to 1 if allowed and the tree
    holds an overlay whiteout (chardev 0/0)."""
    if not (MIN_FORMAT_VERSION <= min_version <= MAX_FORMAT_VERSION
            and MIN_FORMAT_VERSION <= max_version <= MAX_FORMAT_VERSION):
        raise WriteError(errno.EINVAL, f"format version must be {MIN_FORMAT_VERSION} or {MAX_FORMAT_VERSION}")
    if max_version < min_version:
        max_version = min_version
    version = min_version
    if version < 1 <= max_version:
        stack = [root]
        while stack:
            node = stack.pop()
            for child in node.children.values():  # type: ignore[union-attr]
                if isinstance(child, Node):
                    if _is_whiteout(child):
                        return 1
                    if child.children:
                        stack.append(child)
    return version


def _path_of(root: Node, target: Node) -> str:
    """Path of ``target`` for error messages (slow; only used on failure)."""
    for path, entry in iter_tree(root):
        if entry is target:
            return os.fsdecode(path)
    return "?"


def _set(budget: XattrBudget, key: bytes, value: bytes, root: Node, node: Node) -> None:
    try:
        budget.set(key, value)
    except XattrLimitError as exc:
        raise WriteError(exc.errno, f"xattr {key.decode(errors='backslashreplace')} on "
                                    f"{_path_of(root, node)}") from None


def flatten(root: Node, version: int) -> list[InodeRecord]:
    """Inode records in BFS order (record 0 is the root) for writing ``root`` at ``version``."""
    if not root.is_dir():
        raise WriteError(errno.ENOTDIR, "the root must be a directory")
    queue: list[Node] = [root]
    parents: list[int] = [0]
    records: list[InodeRecord] = []
    pending_dirents: list[tuple[int, list[tuple[bytes, object]]]] = []
    index_of: dict[int, int] = {id(root): 0}
    budgets: dict[int, XattrBudget] = {}   # record index -> budget, for nodes changed later

    root_whiteouts: list[tuple[bytes, Node]] = []
    root_children = root.children or {}
    selinux = root.xattrs.get(overlay.SELINUX)
    for name in _ROOT_WHITEOUT_NAMES:
        if name not in root_children:
            wo = Node(S_IFCHR | 0o644, 1, root.uid, root.gid, 0, 0, root.mtime_sec,
                      root.mtime_nsec)
            if selinux is not None:
                wo.xattrs = {overlay.SELINUX: selinux}
            root_whiteouts.append((name, wo))
    synthetic = {id(node) for _, node in root_whiteouts}

    i = 0
    while i < len(queue):
        node = queue[i]
        parent_index = parents[i]
        mode = node.mode
        ftype = mode & S_IFMT
        if ftype not in VALID_TYPES:
            raise WriteError(errno.EINVAL, f"invalid mode {mode:o} at {_path_of(root, node)}")
        size = node.size
        data: bytes | None = None
        external = False
        budget: XattrBudget | None = None

        if id(node) in synthetic:
            xattrs_dict = node.xattrs
            if selinux is not None:
                budget = XattrBudget({})
                _set(budget, overlay.SELINUX, selinux, root, root)
        else:
            src = node.xattrs
            if any(k.startswith(overlay.OVERLAY_PREFIX) for k in src):
                xattrs_dict = overlay.escape_overlay_xattrs(src)
            else:
                xattrs_dict = src
            if ftype == S_IFREG:
                content = node.content
                if content:
                    data = content
                    size = len(content)
                elif size > 0:
                    external = True
                    if chunk_params(size)[1] > LCFS_MAX_NONINLINE_CHUNKS:
                        raise WriteError(errno.EFBIG, _path_of(root, node))
                    budget = XattrBudget(dict(xattrs_dict))
                    _set(budget, overlay.METACOPY, overlay.metacopy_value(node.digest), root, node)
                    if node.payload:
                        _set(budget, overlay.REDIRECT, overlay.redirect_value(node.payload), root, node)
            elif ftype == S_IFLNK:
                data = node.payload
                if not data:
                    raise WriteError(errno.EINVAL, f"symlink without target at {_path_of(root, node)}")
                size = len(data)
            elif ftype == S_IFCHR and (node.rdev & _U32) == 0:
                mode = S_IFREG | (mode & ~S_IFMT)
                ftype = S_IFREG
                size = 0
                budget = XattrBudget(dict(xattrs_dict))
                _set(budget, overlay.ESCAPED_WHITEOUT, b"", root, node)
                _set(budget, overlay.USER_WHITEOUT, b"", root, node)
        if budget is not None:
            xattrs_dict = budget.xattrs

        index = len(records)
        dirents = None
        nlink = node.nlink
        if ftype == S_IFDIR:
            if budget is None:
                budget = XattrBudget(dict(xattrs_dict))
                xattrs_dict = budget.xattrs
            entries: list[tuple[bytes, object]] = list((node.children or {}).items())
            if node is root:
                entries.extend(root_whiteouts)
            entries.append((b".", node))
            entries.append((b"..", queue[parent_index]))
            entries.sort(key=lambda e: e[0])
            nlink = 2
            whiteout_children = 0
            for name, child in entries:
                if isinstance(child, Node) and name != b"." and name != b"..":
                    if id(child) in index_of and child is not node:
                        raise WriteError(errno.EINVAL, f"node reachable twice at {_path_of(root, child)}")
                    index_of[id(child)] = len(queue)
                    queue.append(child)
                    parents.append(index)
                    cmode = child.mode & S_IFMT
                    if cmode == S_IFDIR:
                        nlink += 1
                    elif cmode == S_IFCHR and (child.rdev & _U32) == 0 and id(child) not in synthetic:
                        whiteout_children += 1
            for _ in range(whiteout_children):
                _set(budget, overlay.ESCAPED_WHITEOUTS, b"", root, node)
                _set(budget, overlay.USER_WHITEOUTS, b"", root, node)
                if version >= 1:
                    _set(budget, overlay.ESCAPED_OPAQUE, b"x", root, node)
                    _set(budget, overlay.USER_OPAQUE, b"x", root, node)
            budgets[index] = budget
            pending_dirents.append((index, entries))
            dirents = []

        records.append(InodeRecord(
            mode, nlink, node.uid, node.gid, node.rdev, size, node.mtime_sec, node.mtime_nsec,
            [] if not xattrs_dict else sorted(xattrs_dict.items()), dirents, data, external))
        i += 1

    # root opaque, set after the rewrite of the whole tree
    root_budget = budgets[0]
    _set(root_budget, overlay.OPAQUE, b"y", root, root)
    records[0].xattrs = sorted(root_budget.xattrs.items())

    # dirents: names -> record indexes (hard links follow their chain to the node)
    for index, entries in pending_dirents:
        resolved: list[tuple[bytes, int]] = []
        for name, child in entries:
            if isinstance(child, HardLink):
                try:
                    target = resolve(child)
                except HardLinkLoopError:
                    raise WriteError(errno.ELOOP, "hard link cycle") from None
            else:
                target = child  # type: ignore[assignment]
            target_index = index_of.get(id(target))
            if target_index is None:
                raise WriteError(errno.ENOENT, "hard link target is not in the tree")
            resolved.append((name, target_index))
        records[index].dirents = resolved
    return records
