"""Tree -> flat inode records in the order and form the EROFS writer needs.

This is where the tree meets composefs policy (``mkcfs.build.overlay``): the format version is chosen,
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

from mkcfs.build import overlay
from mkcfs.errors import BuildInputError
from mkcfs.build.overlay import XattrBudget, XattrLimitError
from mkcfs.tree import (
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
#: files up to this size always fit one chunk (chunkbits is at most 43)
_MAX_SINGLE_CHUNK_SIZE = 1 << 43
#: a root security.selinux longer than this makes libcomposefs refuse the root whiteouts' copy:
#: 12 + 7 + len("security.selinux") + len(value) must stay within 32767
_SELINUX_MAX = overlay.XATTR_BUDGET_MAX - 12 - 7 - len(overlay.SELINUX)
#: the xattrs of a record without any (one shared empty list: the planner only reads them)
_NO_XATTRS: list[tuple[bytes, bytes]] = []
assert overlay.METACOPY < overlay.REDIRECT


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


def _apply(xattrs: dict[bytes, bytes], additions: list[tuple[bytes, bytes]], root: Node,
           node: Node) -> dict[bytes, bytes]:
    """``xattrs`` (never modified) plus the writer's ``additions``, in order.

    A fresh key cannot fail: the additions are small and libcomposefs measures them from 0. Only
    when an addition replaces a key the node already has does the exact accounting matter (the
    counter can wrap and refuse the write: ``mkcfs.build.overlay``, "Xattr size accounting"),
    so only then is it replayed."""
    if any(key in xattrs for key, _ in additions):
        budget = XattrBudget(dict(xattrs))
        for key, value in additions:
            _set(budget, key, value, root, node)
        return budget.xattrs
    result = dict(xattrs)
    result.update(additions)
    return result


def flatten(root: Node, version: int) -> list[InodeRecord]:
    """Inode records in BFS order (record 0 is the root) for writing ``root`` at ``version``."""
    if not root.is_dir():
        raise WriteError(errno.ENOTDIR, "the root must be a directory")
    queue: list[Node] = [root]
    parents: list[int] = [0]
    records: list[InodeRecord] = []
    index_of: dict[int, int] = {id(root): 0}
    # record index -> (node, additions) for nodes whose xattrs the writer changes
    additions: dict[int, tuple[Node, list[tuple[bytes, bytes]]]] = {}
    # hard links to resolve once every node has its index: (dirents, position, link)
    links: list[tuple[list[tuple[bytes, int]], int, HardLink]] = []

    selinux = root.xattrs.get(overlay.SELINUX)
    whiteout_xattrs = {overlay.SELINUX: selinux} if selinux is not None else {}
    root_whiteouts = [
        (name, Node(S_IFCHR | 0o644, 1, root.uid, root.gid, 0, 0, root.mtime_sec,
                    root.mtime_nsec, xattrs=whiteout_xattrs))
        for name in _ROOT_WHITEOUT_NAMES if name not in (root.children or {})]
    synthetic = {id(node) for _, node in root_whiteouts}
    overlay_prefix = overlay.OVERLAY_PREFIX
    escape = overlay.escape_overlay_xattrs
    metacopy_head = overlay.metacopy_value(b"\0" * 32)[:-32]
    METACOPY, REDIRECT = overlay.METACOPY, overlay.REDIRECT
    external_adds: list[tuple[bytes, bytes]] = []
    whiteout_parent_adds = [(overlay.ESCAPED_WHITEOUTS, b""), (overlay.USER_WHITEOUTS, b"")]
    if version >= 1:
        whiteout_parent_adds += [(overlay.ESCAPED_OPAQUE, b"x"), (overlay.USER_OPAQUE, b"x")]
    whiteout_adds = [(overlay.ESCAPED_WHITEOUT, b""), (overlay.USER_WHITEOUT, b"")]
    append_record = records.append
    sorted_lists: dict[int, tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]] = {}

    # record index -> the (escaped) xattrs of a node in ``additions``, until they are final
    pending_xattrs: dict[int, dict[bytes, bytes]] = {}
    for node in queue:  # the queue grows while it is walked: breadth first
        index = len(records)
        mode = node.mode
        ftype = mode & S_IFMT
        if ftype not in VALID_TYPES:
            raise WriteError(errno.EINVAL, f"invalid mode {mode:o} at {_path_of(root, node)}")
        size = node.size
        nlink = node.nlink
        data: bytes | None = None
        external = False
        xattrs = node.xattrs
        if xattrs and id(node) not in synthetic:
            for key in xattrs:
                if key.startswith(overlay_prefix):
                    xattrs = escape(xattrs)
                    break
        dirents = None

        if ftype == S_IFDIR:
            entries: list[tuple[bytes, Node | HardLink]] = list(node.children.items())  # type: ignore[union-attr]
            if index == 0:
                entries += root_whiteouts
            entries.append((b".", node))
            entries.append((b"..", node))  # placeholder: resolved to the parent below
            entries.sort()   # names are unique, so only names are compared
            nlink = 2
            n_whiteouts = 0
            dirents = []
            for name, child in entries:
                if child.__class__ is Node:
                    if child is node:  # "." or ".."
                        dirents.append((name, index if name == b"." else parents[index]))
                        continue
                    cid = id(child)
                    if cid in index_of:
                        raise WriteError(errno.EINVAL, f"node reachable twice at {_path_of(root, child)}")
                    child_index = len(queue)
                    index_of[cid] = child_index
                    queue.append(child)
                    parents.append(index)
                    dirents.append((name, child_index))
                    cmode = child.mode & S_IFMT
                    if cmode == S_IFDIR:
                        nlink += 1
                    elif cmode == S_IFCHR and not child.rdev & _U32 and cid not in synthetic:
                        n_whiteouts += 1
                else:
                    links.append((dirents, len(dirents), child))  # type: ignore[arg-type]
                    dirents.append((name, -1))
            if n_whiteouts or index == 0:  # the root gets its opaque flag at the end
                additions[index] = (node, whiteout_parent_adds * n_whiteouts)
        elif ftype == S_IFREG:
            content = node.content
            if content:
                data = content
                size = len(content)
            elif size > 0:
                external = True
                if size > _MAX_SINGLE_CHUNK_SIZE and chunk_params(size)[1] > LCFS_MAX_NONINLINE_CHUNKS:
                    raise WriteError(errno.EFBIG, _path_of(root, node))
                # trusted.overlay.* keys of the source were escaped, so these are always new
                # keys (no accounting can fail): add them directly
                digest = node.digest
                metacopy = (METACOPY, b"" if digest is None else metacopy_head + digest)
                if node.payload:
                    external_adds = [metacopy, (REDIRECT, b"/" + node.payload)]
                else:
                    external_adds = [metacopy]
        elif ftype == S_IFLNK:
            data = node.payload
            if not data:
                raise WriteError(errno.EINVAL, f"symlink without target at {_path_of(root, node)}")
            size = len(data)
        elif ftype == S_IFCHR and not node.rdev & _U32 and id(node) not in synthetic:
            mode = S_IFREG | (mode & ~S_IFMT)
            size = 0
            additions[index] = (node, whiteout_adds)

        xlist: list[tuple[bytes, bytes]]
        if index in additions:
            xlist = []   # set below, once every addition to ``xattrs`` is known
            pending_xattrs[index] = xattrs
        elif external:
            # METACOPY < REDIRECT: without xattrs of its own the list is in order already
            xlist = sorted([*xattrs.items(), *external_adds]) if xattrs else external_adds
        elif not xattrs:
            xlist = _NO_XATTRS
        else:
            # nodes that share one xattrs dict (a parsed dumpfile's labels) share the list too
            known = sorted_lists.get(id(xattrs))
            if known is not None and known[0] is xattrs:
                xlist = known[1]
            else:
                xlist = sorted(xattrs.items())
                if len(sorted_lists) < 4096:
                    sorted_lists[id(xattrs)] = (xattrs, xlist)   # keeps the dict, and its id
        append_record(InodeRecord(mode, nlink, node.uid, node.gid, node.rdev, size,
                                  node.mtime_sec, node.mtime_nsec, xlist, dirents, data,
                                  external))

    # the writer's xattrs, in libcomposefs's order: each node's own, then its whiteout children's
    # marks (both gathered above), and last the root's opaque flag
    additions[0][1].append((overlay.OPAQUE, b"y"))
    for index, (node, adds) in additions.items():
        records[index].xattrs = sorted(_apply(pending_xattrs[index], adds, root, node).items())
    if root_whiteouts and selinux is not None and len(selinux) > _SELINUX_MAX:
        raise WriteError(errno.ERANGE, "security.selinux of the root is too long")

    # hard links: follow their chain to the node, which now has its index
    for dirents, position, link in links:
        try:
            target = resolve(link)
        except HardLinkLoopError:
            raise WriteError(errno.ELOOP, "hard link cycle") from None
        target_index = index_of.get(id(target))
        if target_index is None:
            raise WriteError(errno.ENOENT, "hard link target is not in the tree")
        dirents[position] = (dirents[position][0], target_index)
    return records
