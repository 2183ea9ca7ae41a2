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
from collections.abc import Callable
from operator import attrgetter
from typing import cast
from bisect import bisect_left
from itertools import repeat

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
    link_targets,
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
#: at most this many external files' xattr lists are interned by payload (bounds the memory a
#: tree without duplicate files spends on the lookup)
_MAX_INTERNED = 1 << 18
#: the xattrs of a record without any (one shared empty list: the planner only reads them)
_NO_XATTRS: list[tuple[bytes, bytes]] = []
#: the xattrs of a node of a consumed tree once it has its record (never an xattrs dict of a node)
_TAKEN: dict[bytes, bytes] = {b"": b""}
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
    holds an overlay whiteout (chardev 0/0). (``flatten_choosing_version`` finds it while it
    flattens, without a pass of its own.)"""
    min_version, max_version = _version_range(min_version, max_version)
    if min_version < 1 <= max_version and _has_whiteout(root):
        return 1
    return min_version


def _version_range(min_version: int, max_version: int) -> tuple[int, int]:
    """``(min, max)`` checked, ``max`` raised to ``min``."""
    if not (MIN_FORMAT_VERSION <= min_version <= MAX_FORMAT_VERSION
            and MIN_FORMAT_VERSION <= max_version <= MAX_FORMAT_VERSION):
        raise WriteError(errno.EINVAL, f"format version must be {MIN_FORMAT_VERSION} or {MAX_FORMAT_VERSION}")
    return min_version, max(min_version, max_version)


_type_of_mode = S_IFMT.__and__
_mode_of = attrgetter("mode")
_children_of = attrgetter("children")


def _has_whiteout(root: Node) -> bool:
    """Whether the tree below ``root`` holds a chardev 0/0 (an overlay whiteout). Each
    directory's children are looked at in C (``map``); only a directory with a hard link or a
    character device takes a Python loop."""
    stack = [root.children or {}]
    while stack:
        children = stack.pop().values()
        try:
            types = set(map(_type_of_mode, map(_mode_of, children)))
        except AttributeError:   # a hard link: no mode
            nodes = [child for child in children if isinstance(child, Node)]
            types = set(map(_type_of_mode, map(_mode_of, nodes)))
        else:
            nodes = children   # type: ignore[assignment]
        if S_IFCHR in types and any(map(_is_whiteout, nodes)):
            return True
        if S_IFDIR in types:
            stack.extend(filter(None, map(_children_of, nodes)))
    return False


def _path_of(root: Node, target: Node) -> str:
    """Path of ``target`` for error messages (slow; only used on failure)."""
    for path, entry in iter_tree(root):
        if entry is target:
            return os.fsdecode(path)
    return "?"


def _path_at(records: list[InodeRecord], parents: list[int], index: int) -> str:
    """Path of the node of record ``index`` (its parent's record must be made), from the
    records alone, for error messages: a consumed tree cannot be searched."""
    names: list[bytes] = []
    while index:
        parent = parents[index]
        names.append(next(name for name, child in records[parent].dirents or ()
                          if child == index and name != b"." and name != b".."))
        index = parent
    return os.fsdecode(b"/" + b"/".join(reversed(names)))


def _apply(xattrs: dict[bytes, bytes], additions: list[tuple[bytes, bytes]],
           where: Callable[[], str]) -> dict[bytes, bytes]:
    """``xattrs`` (never modified) plus the writer's ``additions``, in order (``where()``: the
    node's path, for an error).

    A fresh key cannot fail: the additions are small and libcomposefs measures them from 0. Only
    when an addition replaces a key the node already has does the exact accounting matter (the
    counter can wrap and refuse the write: ``mkcfs.build.overlay``, "Xattr size accounting"),
    so only then is it replayed."""
    if any(key in xattrs for key, _ in additions):
        budget = XattrBudget(dict(xattrs))
        for key, value in additions:
            try:
                budget.set(key, value)
            except XattrLimitError as exc:
                raise WriteError(exc.errno, f"xattr {key.decode(errors='backslashreplace')} "
                                            f"on {where()}") from None
        return budget.xattrs
    result = dict(xattrs)
    result.update(additions)
    return result


_METACOPY, _REDIRECT = overlay.METACOPY, overlay.REDIRECT
#: the metacopy xattr value without its digest
_METACOPY_HEAD = overlay.metacopy_value(b"\0" * 32)[:-32]


class _ExternalAdds:
    """The overlay xattrs the writer adds to external files (metacopy with the digest, redirect
    to the payload). Files with the same digest and payload share one list (and so one pair
    object per xattr): the writer then compares and packs them by identity."""

    __slots__ = ("by_payload",)

    def __init__(self) -> None:
        #: payload -> the list of the last file with it
        self.by_payload: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def xattrs_of(self, node: Node, own: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The sorted xattr list of the external file ``node`` whose own sorted list is
        ``own``: ``own`` with the overlay xattrs added (without xattrs of its own, the shared
        list of the overlay xattrs)."""
        # trusted.overlay.* keys of the source were escaped, so these are always new keys (no
        # accounting can fail): they are added directly
        digest = node.digest
        metacopy_data = b"" if digest is None else _METACOPY_HEAD + digest
        payload = node.payload
        adds: list[tuple[bytes, bytes]] | None
        if not payload:
            adds = [(_METACOPY, metacopy_data)]
        else:
            adds = self.by_payload.get(payload)
            if adds is None or adds[0][1] != metacopy_data:
                adds = [(_METACOPY, metacopy_data), (_REDIRECT, b"/" + payload)]
                if len(self.by_payload) < _MAX_INTERNED:
                    self.by_payload[payload] = adds
        # METACOPY < REDIRECT: without xattrs of its own the list is in order already
        return sorted(own + adds) if own else adds


class LateFiles:
    """``flatten``'s regular files whose contents are not read yet: their records, made
    without them, and their nodes, which get them later; ``fill`` completes the records."""

    __slots__ = ("_files", "_xattrs_of")

    def __init__(self) -> None:
        #: ``id`` of the node -> (its record, the node)
        self._files: dict[int, tuple[InodeRecord, Node]] = {}
        self._xattrs_of = _ExternalAdds().xattrs_of

    def __len__(self) -> int:
        return len(self._files)

    def add(self, record: InodeRecord, node: Node) -> None:
        self._files[id(node)] = (record, node)

    def fill(self, nodes: list[Node] | None = None) -> None:
        """Complete the records of the files whose nodes now have their contents (as
        ``flatten`` would have made them): those of ``nodes`` (others are ignored), or all
        that are left. Each file is forgotten once its record is made (its node goes, and
        its memory is reused)."""
        take = self._files.pop
        xattrs_of = self._xattrs_of
        for key in list(self._files) if nodes is None else list(map(id, nodes)):
            entry = take(key, None)
            if entry is None:
                continue
            record, node = entry
            del entry
            content = node.content
            if content:
                record.size = len(content)
                record.data = content
                continue
            record.xattrs = xattrs_of(node, record.xattrs)
            record.external = True


def flatten(root: Node, version: int, *, consume: bool = False,
            late: LateFiles | None = None) -> list[InodeRecord]:
    """Inode records in BFS order (record 0 is the root) for writing ``root`` at ``version``
    (see ``flatten_choosing_version``)."""
    return _flatten(root, version, version, consume, late)[0]


def flatten_choosing_version(root: Node, min_version: int, max_version: int, *,
                             consume: bool = False, late: LateFiles | None = None,
                             hard_links: bool = True) -> tuple[list[InodeRecord], int]:
    """``(flatten(root, version), version)`` for the version ``choose_version`` picks, which
    only the root's last additions depend on: found in the same pass (the whiteouts flatten
    turns into files), where ``choose_version`` would walk the tree once more (~0.2 s for
    2M entries).

    ``consume``: the tree is nobody else's and is taken apart while it is flattened (each
    directory's children are dropped once queued, each file once its record is made), so its
    memory is reused for the records instead of adding to them; the tree is left unusable.

    ``late``: the regular files larger than 0 bytes may not have their contents yet (a walk
    still reading them: ``mkcfs.sources.walk.start_walk``); the records of those that have
    neither ``content`` nor ``digest`` yet are made without and added to ``late`` with their
    nodes, which ``late.fill`` completes once they have them (a file known from the digest
    cache is complete already).

    ``hard_links``: False when the caller knows the tree holds no ``HardLink`` (a directory
    walked without ``hardlinks``): a consumed tree is then not searched for their targets
    first (~20 ms for /usr); a link met anyway fails as one whose target is not in the tree."""
    min_version, max_version = _version_range(min_version, max_version)
    return _flatten(root, min_version, max_version, consume, late, hard_links)


def _flatten(root: Node, min_version: int, max_version: int, consume: bool,
             late: LateFiles | None, hard_links: bool = True) -> tuple[list[InodeRecord], int]:
    """``flatten_choosing_version`` without the check of the versions."""
    if not root.is_dir():
        raise WriteError(errno.ENOTDIR, "the root must be a directory")
    # the queue grows while it is walked (breadth first): a directory appends its children, whose
    # record indices are their queue positions; parents[i] is the record index of queue[i]'s parent
    queue: list[Node | None] = [root]
    parents: list[int] = [0]
    records: list[InodeRecord] = []
    # hard links to resolve once every node has its index: (dirents, position, link)
    links: list[tuple[list[tuple[bytes, int]], int, HardLink]] = []
    seen_dirs: set[int] = set()   # a directory queued twice would make the walk endless
    # the writer's xattr additions, found while walking: whiteout marks per directory index, and
    # the indices of the whiteouts (chardev 0/0 turned into files)
    whiteout_marks: dict[int, int] = {0: 0}
    whiteouts: list[int] = []

    selinux = root.xattrs.get(overlay.SELINUX)
    whiteout_xattrs = {overlay.SELINUX: selinux} if selinux is not None else {}
    root_children = root.children or {}
    root_whiteouts = {
        name: Node(S_IFCHR | 0o644, 1, root.uid, root.gid, 0, 0, root.mtime_sec,
                   root.mtime_nsec, xattrs=whiteout_xattrs)
        for name in _ROOT_WHITEOUT_NAMES if name not in root_children}
    synthetic = {id(node) for node in root_whiteouts.values()}
    append_record = records.append
    queue_extend = queue.extend
    parents_extend = parents.extend
    # id(xattrs dict) -> (dict, its sorted escaped items): nodes that share one xattrs dict (a
    # parsed dumpfile's labels) share the list too; the entry keeps the dict, and so its id
    sorted_lists: dict[int, tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]] = {}
    external_xattrs = _ExternalAdds().xattrs_of
    Node_, Record = Node, InodeRecord
    S_IFMT_, S_IFDIR_, S_IFREG_, S_IFLNK_, S_IFCHR_ = S_IFMT, S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR

    # consume: the ids of the nodes that hard links reach -> their index (found before the nodes
    # are dropped). A node that is not a directory is dropped from the queue as it is reached
    # and its xattrs set to _TAKEN (reached again: it is reachable twice); a directory keeps its
    # place (its xattrs may be needed at the end) and its children become None once queued.
    targets = link_targets(root) if consume and hard_links else set()
    index_of: dict[int, int] = {}
    whiteout_xattrs_of: dict[int, dict[bytes, bytes]] = {}

    # the same list, typed for the walk: a slot is None only once its node has its record
    for index, node in enumerate(cast("list[Node]", queue)):
        mode = node.mode
        ftype = mode & S_IFMT_
        xattrs = node.xattrs
        if consume:
            if targets and id(node) in targets:
                index_of[id(node)] = index
            if ftype != S_IFDIR_:
                queue[index] = None
                node.xattrs = _TAKEN
        if not xattrs:
            xlist = _NO_XATTRS
        else:
            known = sorted_lists.get(id(xattrs))
            if known is not None and known[0] is xattrs:
                xlist = known[1]
            else:
                if xattrs is _TAKEN:
                    raise WriteError(errno.EINVAL, "node reachable twice at "
                                     f"{_path_at(records, parents, index)}")
                xlist = sorted(_own_xattrs(xattrs).items())
                if len(sorted_lists) < 4096:
                    sorted_lists[id(xattrs)] = (xattrs, xlist)

        if ftype == S_IFREG_:
            content = node.content
            size = node.size
            if (size > _MAX_SINGLE_CHUNK_SIZE and not content
                    and chunk_params(size)[1] > LCFS_MAX_NONINLINE_CHUNKS):
                raise WriteError(errno.EFBIG, _path_at(records, parents, index))  # not inline
            if late is not None and size > 0 and content is None and node.digest is None:
                record = Record(mode, node.nlink, node.uid, node.gid, node.rdev, size,
                                node.mtime_sec, node.mtime_nsec, xlist, None, None, False)
                append_record(record)
                late.add(record, node)
                continue
            if content:
                append_record(Record(mode, node.nlink, node.uid, node.gid, node.rdev,
                                     len(content), node.mtime_sec, node.mtime_nsec, xlist, None,
                                     content, False))
                continue
            if size > 0:
                append_record(Record(mode, node.nlink, node.uid, node.gid, node.rdev, size,
                                     node.mtime_sec, node.mtime_nsec, external_xattrs(node, xlist),
                                     None, None, True))
                continue
            append_record(Record(mode, node.nlink, node.uid, node.gid, node.rdev, size,
                                 node.mtime_sec, node.mtime_nsec, xlist, None, None, False))
            continue

        if ftype == S_IFDIR_:
            if node.children is None if consume else id(node) in seen_dirs:
                where = _path_at(records, parents, index) if consume else _path_of(root, node)
                raise WriteError(errno.EINVAL, f"node reachable twice at {where}")
            if not consume:
                seen_dirs.add(id(node))
            parent = parents[index]
            if index:
                records[parent].nlink += 1   # this directory's ".." links its parent
            children: dict[bytes, Node | HardLink] = \
                node.children if index else {**root_children, **root_whiteouts}  # type: ignore
            names = sorted(children)
            kids = list(map(children.__getitem__, names))
            if consume:
                node.children = None
            start = len(queue)
            # "." and ".." go to their sorted places (not always neighbours: ".-" sorts between)
            dot = bisect_left(names, b".")
            dotdot = bisect_left(names, b"..")
            if list(map(type, kids)).count(Node_) == len(kids):   # no hard links here
                dirents = list(zip(names, range(start, start + len(kids))))
                queue_extend(kids)  # type: ignore[arg-type]
            else:
                dirents = []
                for position, (name, kid) in enumerate(zip(names, kids)):
                    if kid.__class__ is Node_:
                        dirents.append((name, len(queue)))
                        queue.append(kid)   # type: ignore[arg-type]
                    else:   # its place once "." and ".." are in
                        position += (position >= dot) + (position >= dotdot)
                        links.append((dirents, position, kid))  # type: ignore[arg-type]
                        dirents.append((name, -1))
            parents_extend(repeat(index, len(queue) - start))
            dirents.insert(dotdot, (b"..", parent))
            dirents.insert(dot, (b".", index))
            append_record(Record(mode, 2, node.uid, node.gid, node.rdev, node.size,
                                 node.mtime_sec, node.mtime_nsec, xlist, dirents, None, False))
            continue

        size = node.size
        if ftype == S_IFLNK_:
            data = node.payload
            if not data:
                raise WriteError(errno.EINVAL, "symlink without target at "
                                 f"{_path_at(records, parents, index)}")
            append_record(Record(mode, node.nlink, node.uid, node.gid, node.rdev, len(data),
                                 node.mtime_sec, node.mtime_nsec, xlist, None, data, False))
            continue
        if ftype not in VALID_TYPES:
            raise WriteError(errno.EINVAL, f"invalid mode {mode:o} at "
                             f"{_path_at(records, parents, index)}")
        if ftype == S_IFCHR_ and not node.rdev & _U32 and id(node) not in synthetic:
            # an overlay whiteout: an empty file with the whiteout marks, its parent marked too
            mode = S_IFREG | (mode & ~S_IFMT_)
            size = 0
            whiteouts.append(index)
            whiteout_xattrs_of[index] = xattrs
            parent = parents[index]
            whiteout_marks[parent] = whiteout_marks.get(parent, 0) + 1
        append_record(Record(mode, node.nlink, node.uid, node.gid, node.rdev, size,
                             node.mtime_sec, node.mtime_nsec, xlist, None, None, False))

    # a node reachable twice, if it is not a directory (consume: all were caught above)
    if consume:
        twice = False
    elif links:
        index_of = {id(node): i for i, node in enumerate(queue)}
        twice = len(index_of) != len(queue)
    else:
        twice = len(set(map(id, queue))) != len(queue)
    if twice:
        seen: set[int] = set()
        for again in cast("list[Node]", queue):
            if id(again) in seen:
                raise WriteError(errno.EINVAL, f"node reachable twice at {_path_of(root, again)}")
            seen.add(id(again))

    # the writer's xattrs, in libcomposefs's order: each node's own, then its whiteout children's
    # marks (both gathered above), and last the root's opaque flag
    version = 1 if min_version < 1 <= max_version and whiteouts else min_version
    whiteout_parent_adds = [(overlay.ESCAPED_WHITEOUTS, b""), (overlay.USER_WHITEOUTS, b"")]
    if version >= 1:
        whiteout_parent_adds += [(overlay.ESCAPED_OPAQUE, b"x"), (overlay.USER_OPAQUE, b"x")]
    whiteout_adds = [(overlay.ESCAPED_WHITEOUT, b""), (overlay.USER_WHITEOUT, b"")]
    additions = {index: whiteout_parent_adds * count for index, count in whiteout_marks.items()}
    additions.update((index, whiteout_adds) for index in whiteouts)
    additions[0] = additions[0] + [(overlay.OPAQUE, b"y")]
    for index in sorted(additions):
        own = whiteout_xattrs_of.get(index)
        if own is None:
            own = cast(Node, queue[index]).xattrs   # a directory's
        records[index].xattrs = sorted(_apply(
            _own_xattrs(own), additions[index],
            lambda: _path_at(records, parents, index)).items())  # noqa: B023 (called at once)
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
    return records, version


def _own_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """A node's xattrs as the image stores them: its ``trusted.overlay.*`` keys escaped."""
    prefix = overlay.OVERLAY_PREFIX
    for key in xattrs:
        if key.startswith(prefix):
            return overlay.escape_overlay_xattrs(xattrs)
    return xattrs
