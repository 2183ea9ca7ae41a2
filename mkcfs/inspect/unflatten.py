"""Image -> tree: undo what mkcomposefs did to a tree, as ``composefs-info`` 1.0.8 does.

``load_tree`` walks an image with :mod:`erofs.reader` and builds the :class:`~mkcfs.tree.Node` tree
libcomposefs's reader (``lcfs_load_node_from_image``) builds, so that ``format_dumpfile`` of the
result is what ``composefs-info dump`` prints and writing it again gives the same image:

* ``trusted.overlay.metacopy`` becomes the node's ``digest`` (when its value is 36 bytes) and
  ``trusted.overlay.redirect`` its ``payload``; other real ``trusted.overlay.*`` xattrs (the root's
  ``opaque``) are dropped;
* ``trusted.overlay.overlay.X`` is shown as ``trusted.overlay.X`` again;
* a regular file carrying ``trusted.overlay.overlay.whiteout`` becomes a character device 0/0, and
  the markers ``trusted.overlay.overlay.whiteouts``, ``user.overlay.whiteout`` and
  ``user.overlay.whiteouts`` are dropped;
* real character devices 0/0 (the 256 ``00``..``ff`` root whiteouts) are left out;
* an inode reached a second time becomes a :class:`~mkcfs.tree.HardLink` to the node built at its
  first place, in the reader's depth-first order (directories in stored dirent order);
* compact inodes take the superblock's build time as mtime.

With ``hardlinks="writer"`` the node of a hard-linked inode is put where mkcomposefs had it
instead, so that writing the tree again reproduces the image (``composefs-dump``).

Quirks of the C reader that change what is printed are copied on purpose (see ``_redirect_payload``).
Malformed images raise :class:`~erofs.errors.ImageFormatError`; the walk visits every inode once
and its total work is bounded by :class:`~erofs.reader.WorkBudget`, so hostile images (directory
cycles, shared blocks, huge counts) cannot make it loop or allocate beyond the image size.
"""

from __future__ import annotations

import mmap
import os
from array import array
from bisect import bisect_left, bisect_right
from itertools import compress, islice
from operator import lt as _less
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterable, Iterator, Sequence

from erofs.errors import ImageFormatError
from erofs.format import (EROFS_FT_CHRDEV, EROFS_FT_DIR, EROFS_INODE_CHUNK_BASED, EROFS_INODE_FLAT_INLINE,
                          EROFS_INODE_FLAT_PLAIN)
from erofs.reader import INLINE_CONTENT_MAX, PATH_MAX, Image, WorkBudget, xattr_key

from mkcfs.build import overlay
from mkcfs.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, HardLink, Node

if TYPE_CHECKING:
    from mkcfs.sources.dumpfile import DumpRecord

__all__ = ["load_tree", "load_tree_from_file", "dump_records", "dump_split", "split_pays",
           "NeedsTree", "SplitConflict", "ImageFormatError"]

_OVERLAY = overlay.OVERLAY_PREFIX
_ESCAPED = overlay.ESCAPED_PREFIX
_REDIRECT = overlay.REDIRECT
_METACOPY = overlay.METACOPY
_ESCAPED_WHITEOUT = overlay.ESCAPED_WHITEOUT
_ESCAPED_WHITEOUTS = overlay.ESCAPED_WHITEOUTS
#: markers the writer adds and the reader drops without a trace.
_DROPPED = frozenset((overlay.ESCAPED_WHITEOUTS, overlay.USER_WHITEOUT, overlay.USER_WHITEOUTS))
_TRUSTED_LEN = len(b"trusted.")
_OVERLAY_LEN = len(_OVERLAY)
_NAME_MAX = 255          # LCFS_MAX_NAME_LENGTH
_XATTR_NAME_MAX = 255    # XATTR_NAME_MAX
_XATTR_SIZE_LIMIT = 65535  # per-node accounted xattr size when reading an image (UINT16_MAX)
_METACOPY_SIZE = 4 + 32
_IFMT = S_IFMT


_A_SET, _A_REDIRECT, _A_METACOPY, _A_WHITEOUT, _A_DROP, _A_BAD = range(6)


def _xattr_action(name_index: int, suffix: bytes, offset: int) -> tuple[int, bytes]:
    """What libcomposefs's reader does with a stored xattr: ``(action, key)``.

    Mirrors ``lcfs_build_node_erofs_xattr``: the full name is prefix + suffix, cut at the first
    NUL (it is a C string there)."""
    name = xattr_key(name_index, suffix, offset)
    nul = name.find(b"\0")
    if nul >= 0:
        name = name[:nul]
    if name == _REDIRECT:
        return _A_REDIRECT, name
    if name == _METACOPY:
        return _A_METACOPY, name
    if name == _ESCAPED_WHITEOUT:
        # a whiteout marker on a regular file; on anything else it is unescaped and kept
        return _A_WHITEOUT, name[:_TRUSTED_LEN] + name[_OVERLAY_LEN:]
    if name in _DROPPED:
        return _A_DROP, name
    if name.startswith(_OVERLAY):
        if not name.startswith(_ESCAPED):
            return _A_DROP, name
        name = name[:_TRUSTED_LEN] + name[_OVERLAY_LEN:]
    if not name or len(name) > _XATTR_NAME_MAX:
        return _A_BAD, name
    return _A_SET, name


#: xattr bodies up to this size (header + 16 shared ids) are looked up by their bytes
_BODY_BYTES_MAX = 12 + 4 * 16
#: at most this many distinct such bodies are remembered
_BODIES_MAX = 4096


class _Walk:
    """State of one image -> tree walk: the image, the work budget, nid -> Node, and caches."""

    __slots__ = ("image", "budget", "nodes", "actions", "shared", "shared_sets", "bodies")

    def __init__(self, image: Image) -> None:
        self.image = image
        self.budget = WorkBudget(image.size)
        #: nid -> the Node built at its first place (None for a skipped whiteout)
        self.nodes: dict[int, Node | None] = {}
        #: per name index: suffix -> (action, key)
        self.actions: list[dict[bytes, tuple[int, bytes]]] = [{} for _ in range(256)]
        #: shared xattr id -> (action, key, value, value_end)
        self.shared: dict[int, tuple[int, bytes, bytes, int]] = {}
        #: shared xattr ids of a body -> their mapped entries, and the xattrs they set when
        #: they only set xattrs (None otherwise: they depend on the file type)
        self.shared_sets: dict[tuple[int, ...],
                               tuple[list[tuple[int, bytes, bytes, int]],
                                     dict[bytes, bytes] | None]] = {}
        #: the bytes of an xattr body of shared ids only -> its shared_sets entry
        self.bodies: dict[bytes, tuple[list[tuple[int, bytes, bytes, int]],
                                       dict[bytes, bytes] | None]] = {}


def load_tree(image: Image | bytes | bytearray | memoryview,
              toplevel: Iterable[bytes] | None = None, *, hardlinks: str = "first",
              share_xattrs: bool = False) -> Node:
    """The tree stored in ``image``.

    ``toplevel``, when given, keeps only the root entries with these names (``--filter``).

    ``hardlinks`` says which of several entries naming one inode holds the :class:`Node` (the
    others become :class:`HardLink`\\ s):

    * ``"first"``: the first one in depth-first order, as libcomposefs 1.0.8 does; this is what
      ``composefs-info dump`` prints;
    * ``"writer"``: the one where mkcomposefs put the inode (recovered from the breadth-first
      order of the inode table), so that writing the tree again gives the same image. With
      ``"first"``, an inode whose first depth-first place is not its breadth-first place moves
      in the rewritten image (the C ``composefs-dump`` and ``composefs-info dump | mkcomposefs``
      round trips change such images).

    ``share_xattrs``: nodes with the same xattrs (an SELinux label, or none) get one shared
    dict, which saves a dict per node, for callers that do not change the tree (printing it,
    writing an image from it)."""
    if hardlinks not in ("first", "writer"):
        raise ValueError(f"hardlinks must be 'first' or 'writer', not {hardlinks!r}")
    if not isinstance(image, Image):
        image = Image(image)
    walk = _Walk(image)
    keep = None if toplevel is None else frozenset(toplevel)
    build = _make_builder(walk, share_xattrs)
    nodes = walk.nodes
    fields, root_dir = build(image.root_nid)
    if fields is None:
        raise ImageFormatError(image.meta_base + image.root_nid * 32,
                               "the root inode is a whiteout (character device 0/0)")
    root = nodes[image.root_nid] = Node(*fields)
    if root_dir is None:
        return root
    writer_mode = hardlinks == "writer"
    #: nid -> (parent node, name) of the entry holding the Node ("writer" mode only)
    first_place: dict[int, tuple[Node, bytes]] = {}
    linked: set[int] = set()
    # depth first, pre-order, children in stored dirent order (the C reader's recursion)
    stack = [(root, iter(_dir_entries(walk, root_dir)), keep)]
    while stack:
        parent, entries, keep = stack[-1]
        children = parent.children
        assert children is not None     # only directories are pushed
        for name, nid in entries:
            if name == b"." or name == b".." or (keep is not None and name not in keep):
                continue
            if nid in nodes:
                target = nodes[nid]
                if target is None:      # a whiteout seen again: skipped again
                    continue
                if name and len(name) <= _NAME_MAX and name not in children:
                    children[name] = HardLink(target)
                else:
                    _add_child(children, name, None, nid, image)
                if writer_mode:
                    linked.add(nid)
                continue
            fields, dir_extents = build(nid)
            if fields is None:          # real whiteout (00..ff): not shown
                nodes[nid] = None
                continue
            node = nodes[nid] = Node(*fields)
            if name and len(name) <= _NAME_MAX and name not in children:
                children[name] = node
            else:
                _add_child(children, name, None, nid, image)
            if writer_mode:
                first_place[nid] = (parent, name)
            if dir_extents is not None:
                stack.append((node, iter(_dir_entries(walk, dir_extents)), None))
                break
        else:
            stack.pop()
    if linked:
        _move_to_writer_places(walk, linked, first_place)
    return root


class NeedsTree(Exception):
    """:func:`dump_records` met what only :func:`load_tree` handles exactly: a directory whose
    entries are not stored in name order (or a bad or repeated name), or a malformed image
    (``load_tree`` names the first problem as the C reader meets it)."""


#: ``first_dir`` value of a real whiteout (skipped wherever it appears)
_WHITEOUT = 0xFFFFFFFF


class SplitConflict(Exception):
    """The parts of a dump split by :func:`dump_split` do not join: an inode is named in both
    (a hard link across the split) or together they exceed the work budget. Print the dump in
    one piece instead."""


#: what the second part of a split dump tells the first: the nids it printed by their first
#: name, and the directory entries and bytes of its work budget it used
PartReport = tuple[Sequence[int], int, int]


def dump_records(image: Image, toplevel: Iterable[bytes] | None = None, *,
                 start: Sequence[bytes] | None = None, stop: Sequence[bytes] | None = None,
                 met: array | None = None, budget_used: list[int] | None = None,
                 offer: Callable[[bytes], Sequence[bytes] | None] | None = None,
                 rest: Callable[[], PartReport | None] | None = None) -> Iterator[DumpRecord]:
    """What ``composefs-info dump`` prints for ``image`` (``load_tree`` with
    ``hardlinks="first"`` then ``tree_records``), record by record, without building the tree.

    libcomposefs places a hard-linked inode at its first name in stored directory order and
    prints in name order; mkcomposefs stores every directory in name order, so the two orders
    agree and each inode is built when first met, exactly as ``load_tree`` builds it. For each
    inode only the directory of its first name is remembered (4 bytes per inode slot); a
    second name finds the first one there and builds the inode's fields again.
    Anything that needs the tree raises :class:`NeedsTree`, possibly after some records were
    yielded: callers print nothing until the walk has finished.

    A dump can be printed in two parts (by two processes) at a path from :func:`dump_split`,
    given as its names from the root: ``stop=path`` gives the records before it, ``start=path``
    the records from it on. The second part fills ``met`` with the nids it printed by their
    first name and ``budget_used`` with the directory entries and bytes of its work; the
    first part, at its end, calls ``rest()`` for those (None: there was no second part) and
    raises :class:`SplitConflict` if an inode was met in both parts (its first name is in the
    first part: the second printed it wrongly) or the two together used more than the image's
    work budget. Instead of ``stop``, the first part can be given ``offer``, called with the
    path of each directory it is about to enter until it returns a split path (the records
    from there on are left to the second part; ``offer`` accepts only a path after the given
    one) or ``()`` (no split: the rest is printed here)."""
    walk = _Walk(image)
    keep = None if toplevel is None else frozenset(toplevel)
    build = _make_builder(walk, share_xattrs=True)
    root_nid = image.root_nid
    try:
        fields, root_dir = build(root_nid)
    except ImageFormatError:
        raise NeedsTree from None
    if fields is None:
        raise NeedsTree
    if not start:
        yield (b"/", b"") + fields
    if root_dir is None:
        return
    n_slots = max(0, (image.size - image.meta_base) // 32) + 1
    if root_nid >= n_slots:
        raise NeedsTree
    #: nid -> 1 + the nid of the directory holding its first name (0: not met yet)
    first_dir = array("I", bytes(4 * n_slots))
    first_dir[root_nid] = root_nid + 1
    #: directory nid -> (path, where its entries are)
    dirs: dict[int, tuple[bytes, _Extents]] = {root_nid: (b"", root_dir)}
    #: nid -> (path, fields) of inodes met again (hard links)
    linked: dict[int, tuple[bytes, NodeFields]] = {}
    #: directory nid -> {nid: name} of its entries, for finding first names
    names_of: dict[int, dict[int, bytes]] = {}
    note_first = met.append if met is not None else None
    #: "directory path/" -> (name, whether that entry is printed too): where the first part
    #: ends in each directory on the split path
    stops: dict[bytes, tuple[bytes, bool]] = {}

    def stop_at(split: Sequence[bytes]) -> None:
        """End this part before ``split`` in the directories entered from now on."""
        base = b"/"
        for depth, name in enumerate(split):
            stops[base] = (name, depth + 1 < len(split))
            base += name + b"/"

    if stop:
        stop_at(stop)

    def first_name(nid: int) -> tuple[bytes, NodeFields]:
        """The path and fields of the inode ``nid`` met earlier."""
        dir_nid = first_dir[nid] - 1
        if nid in dirs:
            path = dirs[nid][0]
        else:
            names = names_of.get(dir_nid)
            if names is None:
                where = dirs[dir_nid][1]
                names = {}
                for offset, length in image.extents_of(*where):
                    block_names, block_nids, _types = image.dirent_columns(offset, length)
                    for name, child in zip(block_names, block_nids):
                        nul = name.find(b"\0")
                        if nul >= 0:
                            name = name[:nul]
                        if name != b"." and name != b"..":
                            names.setdefault(child, name)
                names_of[dir_nid] = names
            path = dirs[dir_nid][0] + b"/" + names[nid]
        fields = build(nid)[0]
        assert fields is not None
        entry = linked[nid] = (path, fields)
        return entry

    def entries_of(base: bytes, names: list[bytes], nids: list[int]
                   ) -> Iterator[tuple[bytes, int]]:
        """The entries of the directory ``base`` (its path and ``/``) this part prints."""
        cut = stops.get(base) if stops else None
        if cut is None:
            return zip(names, nids)
        name, inclusive = cut
        end = (bisect_right if inclusive else bisect_left)(names, name)
        return zip(names[:end], nids[:end])

    try:
        names, nids = _sorted_columns(walk, root_dir)
        if keep is not None:
            kept = [i for i, name in enumerate(names) if name in keep]
            names = [names[i] for i in kept]
            nids = [nids[i] for i in kept]
        stack: list[tuple[bytes, int, Iterator[tuple[bytes, int]]]] = []
        if start:
            # the second part: down to the split path's directory, each level resuming after
            # the entry the path goes through (the first part printed that one)
            base, here = b"/", root_nid + 1
            for depth, name in enumerate(start):
                last = depth + 1 == len(start)
                i = (bisect_left if last else bisect_right)(names, name)
                stack.append((base, here, zip(names[i:], nids[i:])))
                if last:
                    break
                nid = nids[i - 1] if i else -1
                if not i or names[i - 1] != name or first_dir[nid]:
                    raise NeedsTree
                fields, dir_extents = build(nid)
                if fields is None or dir_extents is None:
                    raise NeedsTree
                first_dir[nid] = here
                dirs[nid] = (base + name, dir_extents)
                base, here = base + name + b"/", nid + 1
                names, nids = _sorted_columns(walk, dir_extents)
        else:
            stack.append((b"/", root_nid + 1, entries_of(b"/", names, nids)))
        while stack:
            base, here, entries = stack[-1]
            for name, nid in entries:
                try:
                    seen = first_dir[nid]
                except IndexError:      # beyond the inode table: build() says why
                    seen = 0
                if seen:
                    if seen == _WHITEOUT:
                        continue
                    target_path, fields = linked.get(nid) or first_name(nid)
                    yield (base + name, b"@") + fields[:8] + (target_path,) + fields[9:]
                    continue
                fields, dir_extents = build(nid)
                if fields is None:            # real whiteout (00..ff): not shown
                    first_dir[nid] = _WHITEOUT
                    continue
                first_dir[nid] = here
                if note_first is not None:
                    note_first(nid)
                path = base + name
                yield (path, b"") + fields
                if dir_extents is not None:
                    dirs[nid] = (path, dir_extents)
                    if offer is not None:
                        split = offer(path)
                        if split is not None:
                            offer = None
                            if split:
                                stop_at(split)
                                # directories already entered end early too
                                for i, (up, up_here, up_entries) in enumerate(stack):
                                    cut = stops.get(up)
                                    if cut is not None:
                                        stack[i] = (up, up_here,
                                                    _entries_until(up_entries, *cut))
                    path += b"/"
                    stack.append((path, nid + 1,
                                  entries_of(path, *_sorted_columns(walk, dir_extents))))
                    break
            else:
                stack.pop()
    except ImageFormatError:
        raise NeedsTree from None
    budget = walk.budget
    if budget_used is not None:
        fresh = WorkBudget(image.size)
        budget_used[:] = [fresh.dirents_left - budget.dirents_left,
                          fresh.bytes_left - budget.bytes_left]
    report = rest() if rest is not None else None
    if report is not None:
        their_nids, their_dirents, their_bytes = report
        if (budget.dirents_left < their_dirents or budget.bytes_left < their_bytes
                or any(first_dir[nid] for nid in their_nids)):
            raise SplitConflict


def _entries_until(entries: Iterator[tuple[bytes, int]], name: bytes, inclusive: bool
                   ) -> Iterator[tuple[bytes, int]]:
    """The rest of a directory's sorted ``entries`` up to ``name`` (included or not)."""
    for entry in entries:
        if entry[0] > name or (entry[0] == name and not inclusive):
            return
        yield entry


#: below this many inode slots a dump is not split (a fork costs more than it saves)
SPLIT_MIN_SLOTS = 20000


def split_pays(image: Image) -> bool:
    """Whether ``image`` is large enough for its dump to be printed in two parts."""
    return (image.size - image.meta_base) // 32 + 1 >= SPLIT_MIN_SLOTS


def dump_split(image: Image, toplevel: Iterable[bytes] | None = None,
               min_slots: int | None = None, share: float = 0.5) -> tuple[bytes, ...] | None:
    """The path (names from the root) that cuts ``image``'s dump into two parts, the first
    with about ``share`` of the entries, for :func:`dump_records` ``stop=``/``start=``; None when the image is
    small (fewer than ``min_slots`` inode slots, default :data:`SPLIT_MIN_SLOTS`), has hard
    links (a part would not know the names the other printed) or its
    directories are not as mkcomposefs writes them (the dump is then printed in one piece,
    which also names any problem).

    It reads the directories only (the dirent file types say which entries are directories),
    counts the entries below each, and goes down from the root to the entry in the middle."""
    n_slots = (image.size - image.meta_base) // 32 + 1
    if n_slots < (SPLIT_MIN_SLOTS if min_slots is None else min_slots):
        return None
    budget = WorkBudget(image.size)
    decode = image.inode_decoder()
    is_dir = EROFS_FT_DIR
    is_chr = EROFS_FT_CHRDEV
    #: nids met so far (a second meeting is a hard link, or a malformed image)
    met: set[int] = set()

    def directory(nid: int) -> tuple[list[bytes], list[int], list[int]]:
        """The names, nids and file types of a directory's entries, ``.`` and ``..``
        left out (in stored order, which the dump checks is name order)."""
        (_nid, offset, _extended, layout, mode, _nlink, fsize, i_u, _ino, _uid, _gid, _mtime,
         _mtime_nsec, _icount, xoff, xsize) = decode(nid)
        if mode & _IFMT != S_IFDIR:
            raise NeedsTree
        names, nids, types = _dir_columns(image, budget,
                                          (nid, offset, layout, fsize, i_u, xoff + xsize))
        for special in (b".", b".."):
            if special in names:
                i = names.index(special)
                del names[i], nids[i], types[i]
        return names, nids, types

    try:
        root_nid = image.root_nid
        names, nids, types = directory(root_nid)
        if toplevel is not None:
            keep = frozenset(toplevel)
            kept = [i for i, name in enumerate(names) if name in keep]
            names, nids, types = ([names[i] for i in kept], [nids[i] for i in kept],
                                  [types[i] for i in kept])
        # entries below each directory, counted bottom up without recursion; character
        # devices count for nothing (most are whiteouts, which are not printed)
        below: dict[int, int] = {}
        order: list[tuple[int, list[int]]] = []
        pending = [(root_nid, nids, types)]
        while pending:
            nid, child_nids, child_types = pending.pop()
            known = len(met)
            met.update(child_nids)
            if len(met) - known != len(child_nids):
                return None     # a hard link (or a directory reached twice)
            subdirs = list(compress(child_nids, map(is_dir.__eq__, child_types)))
            order.append((nid, subdirs))
            below[nid] = len(child_nids) - child_types.count(is_chr)
            for child in subdirs:
                _names, grand_nids, grand_types = directory(child)
                pending.append((child, grand_nids, grand_types))
        for nid, subdirs in reversed(order):
            if subdirs:
                below[nid] += sum(map(below.__getitem__, subdirs))
        # down from the root to the entry that has half of all entries before it
        todo = int(below[root_nid] * share)
        path: list[bytes] = []
        while True:
            for name, nid, ftype in zip(names, nids, types):
                size = 1 + below[nid] if ftype == is_dir else int(ftype != is_chr)
                if todo < size:
                    path.append(name)
                    if todo == 0 or ftype != is_dir:
                        return tuple(path)
                    todo -= 1
                    names, nids, types = directory(nid)
                    break
                todo -= size
            else:
                return None
    except (ImageFormatError, NeedsTree, IndexError):
        return None


def _sorted_columns(walk: _Walk, where: _Extents) -> tuple[list[bytes], list[int]]:
    """The names and nids of a directory's entries without ``.`` and ``..``, when they are
    stored in strictly increasing name order and every name is valid (else
    :class:`NeedsTree`)."""
    names, nids, _types = _dir_columns(walk.image, walk.budget, where)
    if names:
        if (not all(map(_less, names, islice(names, 1, None))) or not names[0]
                or max(map(len, names)) > _NAME_MAX):
            raise NeedsTree
        # sorted: each of "." and ".." is where bisect finds it, if present
        for special in (b"..", b"."):
            i = bisect_left(names, special)
            if i < len(names) and names[i] == special:
                del names[i]
                del nids[i]
    return names, nids


def _move_to_writer_places(walk: _Walk, linked: set[int],
                           first_place: dict[int, tuple[Node, bytes]]) -> None:
    """Put each hard-linked Node at the entry where the writer placed its inode.

    mkcomposefs numbers inodes breadth first (children in name order, hard links skipped), so
    replaying that walk over the image and taking, for each inode, the entry at which the
    running count equals the inode's ``i_ino`` finds the place it had in the writer's tree.
    Entries met while that inode is still the last one counted are equally good for the inode
    order; among them the parent decides what else the writer wrote: a directory's ``..``
    names its parent, and a whiteout's parent carries the escaped ``whiteouts`` marker.
    Images whose ``i_ino`` do not follow that order keep the depth-first choice."""
    image = walk.image
    nodes = walk.nodes
    candidates: dict[int, list[tuple[int, bytes]]] = {}
    budget = WorkBudget(image.size)
    seen = {image.root_nid}
    queue = [image.root_nid]
    counter = 1
    last = -1
    qi = 0
    while qi < len(queue):
        dir_nid = queue[qi]
        qi += 1
        for offset, length in image.extents(image.inode(dir_nid)):
            names, nids, _types = image.dirent_columns(offset, length)
            budget.dirents(len(names), offset)
            for name, nid in zip(names, nids):
                if name == b"." or name == b"..":
                    continue
                if b"\0" in name:
                    name = name[:name.index(b"\0")]
                if nid == last:
                    candidates[nid].append((dir_nid, name))
                if nid in seen:
                    continue
                child = image.inode(nid)
                if child.ino != counter:
                    continue
                seen.add(nid)
                counter += 1
                last = nid
                candidates[nid] = [(dir_nid, name)]
                if child.mode & _IFMT == S_IFDIR:
                    queue.append(nid)
    moves: dict[int, tuple[int, bytes]] = {}
    ambiguous_whiteouts: list[int] = []
    for nid in sorted(linked):
        places = candidates.get(nid)
        if not places or nid not in first_place:
            continue
        if len(places) > 1 and _is_whiteout(nodes[nid]):
            ambiguous_whiteouts.append(nid)
        else:
            moves[nid] = places[0] if len(places) == 1 else _pick_dir_place(image, nid, places)
    if ambiguous_whiteouts:
        _place_whiteouts(image, nodes, candidates, first_place, moves, ambiguous_whiteouts)
    for nid, (parent_nid, name) in moves.items():
        parent = nodes.get(parent_nid)
        node = nodes[nid]
        old_parent, old_name = first_place[nid]
        if parent is None or parent.children is None or (parent is old_parent and name == old_name):
            continue
        entry = parent.children.get(name)
        if not isinstance(entry, HardLink) or entry.target is not node:
            continue
        old_children = old_parent.children
        if node is None or old_children is None:
            continue
        parent.children[name] = node
        old_children[old_name] = entry


def _is_whiteout(node: Node | None) -> bool:
    return node is not None and node.mode & _IFMT == S_IFCHR and node.rdev == 0


def _pick_dir_place(image: Image, nid: int, places: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    """Among entries equally placed in the writer's order, a directory goes where its ``..``
    points."""
    ino = image.inode(nid)
    if ino.mode & _IFMT == S_IFDIR:
        for offset, length in image.extents(ino):
            names, nids, _types = image.dirent_columns(offset, length)
            for name, parent in zip(names, nids):
                if name == b"..":
                    return next((p for p in places if p[0] == parent), places[0])
    return places[0]


def _place_whiteouts(image: Image, nodes: dict, candidates: dict, first_place: dict,
                     moves: dict, ambiguous: list[int]) -> None:
    """Give each ambiguous whiteout a parent so that every directory the writer marked with
    the escaped ``whiteouts`` xattr gets at least one whiteout child, and unmarked ones none."""
    node_nid = {id(n): nid for nid, n in nodes.items() if n is not None}
    count: dict[int, int] = {}
    pending = set(ambiguous)
    for nid, node in nodes.items():
        if nid in pending or not _is_whiteout(node) or nid not in first_place:
            continue
        if nid in moves:
            parent_nid = moves[nid][0]
        else:
            parent_nid = node_nid.get(id(first_place[nid][0]), -1)
        count[parent_nid] = count.get(parent_nid, 0) + 1
    marked_cache: dict[int, bool] = {}

    def marked(dir_nid: int) -> bool:
        if dir_nid not in marked_cache:
            marked_cache[dir_nid] = any(x.key == _ESCAPED_WHITEOUTS
                                        for x in image.xattrs(image.inode(dir_nid)))
        return marked_cache[dir_nid]

    for nid in ambiguous:
        places = candidates[nid]
        choice = (next((p for p in places if marked(p[0]) and not count.get(p[0])), None)
                  or next((p for p in places if marked(p[0])), None) or places[0])
        count[choice[0]] = count.get(choice[0], 0) + 1
        moves[nid] = choice


def load_tree_from_file(path: str | bytes | os.PathLike,
                        toplevel: Iterable[bytes] | None = None, *,
                        hardlinks: str = "first") -> tuple[Node, Image]:
    """Read the image file at ``path``; returns ``(tree, image)``."""
    image = Image.open(path)
    return load_tree(image, toplevel, hardlinks=hardlinks), image


def _add_child(children: dict, name: bytes, child: Node | HardLink | None, nid: int,
               image: Image) -> None:
    """Add a directory entry as ``lcfs_node_add_child`` does, refusing bad or duplicate names."""
    if not name:
        raise ImageFormatError(image.meta_base + nid * 32, "empty file name in a directory")
    if len(name) > _NAME_MAX:
        raise ImageFormatError(image.meta_base + nid * 32,
                               f"file name of {len(name)} bytes (at most {_NAME_MAX})")
    if name in children:
        raise ImageFormatError(image.meta_base + nid * 32,
                               f"duplicate name {name!r} in a directory")
    children[name] = child


#: where a directory's entries are: the arguments of ``Image.extents_of``
_Extents = tuple[int, int, int, int, int, int]


def _dir_columns(image: Image, budget: WorkBudget, where: _Extents
                 ) -> tuple[list[bytes], list[int], list[int]]:
    """The names, nids and dirent file types of a directory's entries (``.`` and ``..``
    included), in stored order, each block counted on ``budget``; names cut at the first NUL
    like C strings. A name is at most a block long, so the C reader's ``PATH_MAX - 1`` cut
    never applies."""
    all_names: list[bytes] = []
    all_nids: list[int] = []
    all_types: list[int] = []
    for offset, length in image.extents_of(*where):
        budget.bytes(length, offset)
        names, nids, types = image.dirent_columns(offset, length)
        budget.dirents(len(names), offset)
        all_names += names
        all_nids += nids
        all_types += types
    if b"\0" in b"".join(all_names):
        # a NUL before the last name's end: some name may hold one (slow path)
        all_names = [n[:n.index(b"\0")] if b"\0" in n else n for n in all_names]
    return all_names, all_nids, all_types


def _dir_entries(walk: _Walk, where: _Extents) -> list[tuple[bytes, int]]:
    """``(name, nid)`` of a directory's entries (:func:`_dir_columns`; the caller skips ``.``
    and ``..``)."""
    names, nids, _types = _dir_columns(walk.image, walk.budget, where)
    return list(zip(names, nids))


#: a node's fields in the order of ``Node``'s arguments: mode, nlink, uid, gid, rdev, size,
#: mtime_sec, mtime_nsec, payload, content, digest, xattrs
NodeFields = tuple[int, int, int, int, int, int, int, int, bytes | None, bytes | None,
                   bytes | None, dict[bytes, bytes]]

#: one xattr as the node builder applies it: (action, key, value, value_end); the value of a
#: redirect is already the payload, that of a metacopy the digest.
_Xattr = tuple[int, bytes, bytes, int]


def _make_builder(walk: _Walk, share_xattrs: bool = False
                  ) -> Callable[[int], tuple[NodeFields | None, _Extents | None]]:
    """``build(nid) -> (fields, dir_extents)``: the fields of inode ``nid``'s node (without its
    children), in the order of :class:`~mkcfs.tree.Node`'s arguments.

    ``fields`` is None for a whiteout (character device 0/0); ``dir_extents`` is, for a
    directory, the argument tuple of ``Image.extents_of`` that locates its entries, else None.
    The reader decodes (with every offset checked); this only maps what it gives onto a node,
    as ``lcfs_build_node_from_image`` does. With ``share_xattrs``, nodes whose xattrs come from
    the same shared set (and nodes without xattrs) get one dict."""
    no_xattrs: dict[bytes, bytes] = {}
    image = walk.image
    data = image.data
    actions = walk.actions
    shared = walk.shared
    shared_sets = walk.shared_sets
    bodies = walk.bodies
    body_max = _BODY_BYTES_MAX
    budget = walk.budget
    inode_fields = image.inode_decoder()
    data_of = image.data_of
    xattr_body_at = image.xattr_body_at
    xattr_action = _xattr_action
    A_SET, A_REDIRECT, A_METACOPY, A_DROP = _A_SET, _A_REDIRECT, _A_METACOPY, _A_DROP
    IFMT, IFREG, IFDIR, IFLNK, IFCHR, IFBLK = _IFMT, S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, S_IFBLK
    FLAT_PLAIN, FLAT_INLINE = EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE
    metacopy_size = _METACOPY_SIZE
    redirect_payload = _redirect_payload
    set_xattr = _set_xattr

    def shared_entry(xid: int) -> _Xattr:
        """A shared xattr, mapped once."""
        name_index, suffix, value_start, value_end = image.shared_xattr_at(xid)
        budget.bytes(value_end - value_start + len(suffix), value_start)
        act = actions[name_index].get(suffix)
        if act is None:
            act = actions[name_index][suffix] = xattr_action(name_index, suffix, value_end)
        action, key = act
        if action == A_REDIRECT:
            value = redirect_payload(data, value_start, value_end)
        elif action == A_METACOPY:
            if value_end - value_start != metacopy_size:
                action = A_DROP
            value = data[value_start + 4:value_end]
        else:
            value = data[value_start:value_end]
        entry = shared[xid] = (action, key, value, value_end)
        return entry

    def shared_set(ids: tuple[int, ...]) -> tuple[list[_Xattr], dict[bytes, bytes] | None]:
        """The mapped entries of a body's shared ids and, when all they do is set xattrs, the
        xattrs they set (checked once here: many inodes share one set, e.g. an SELinux
        label)."""
        entries = [shared.get(xid) or shared_entry(xid) for xid in ids]
        only_set: dict[bytes, bytes] | None = {}
        used = 0
        for action, key, value, value_end in entries:
            if action == A_SET:
                used = set_xattr(only_set, key, value, used, value_end)  # type: ignore[arg-type]
            elif action != A_DROP:
                only_set = None
                break
        result = shared_sets[ids] = (entries, only_set)
        return result

    def build(nid: int) -> tuple[NodeFields | None, _Extents | None]:
        (_nid, offset, _extended, layout, mode, nlink, fsize, i_u, _ino, uid, gid, mtime,
         mtime_nsec, _icount, xoff, xsize) = inode_fields(nid)
        payload: bytes | None = None
        content: bytes | None = None
        digest: bytes | None = None
        dir_extents = None
        ftype = mode & IFMT
        rdev = 0
        if ftype == IFREG:
            if fsize:
                if layout == FLAT_PLAIN or layout == FLAT_INLINE:
                    if fsize > INLINE_CONTENT_MAX:
                        raise ImageFormatError(offset + 8, f"inline file of {fsize} bytes "
                                                           f"(at most {INLINE_CONTENT_MAX})")
                    budget.bytes(fsize, offset)
                    content = data_of(nid, offset, layout, fsize, i_u, xoff + xsize)
                elif layout != EROFS_INODE_CHUNK_BASED:
                    raise ImageFormatError(offset, "regular file with unsupported data layout "
                                                   f"{layout}")
        elif ftype == IFDIR:
            dir_extents = (nid, offset, layout, fsize, i_u, xoff + xsize)
        elif ftype == IFLNK:
            if fsize >= PATH_MAX:
                raise ImageFormatError(offset + 8, f"symlink target of {fsize} bytes")
            budget.bytes(fsize, offset)
            target = data_of(nid, offset, layout, fsize, i_u, xoff + xsize)
            nul = target.find(b"\0")
            if nul >= 0:
                target = target[:nul]
            if not target:
                raise ImageFormatError(offset, "empty symlink target")
            payload = target
            fsize = len(target)
        elif ftype == IFCHR:
            if i_u == 0:
                return None, None   # a real whiteout: skipped, here and wherever it appears
            rdev = i_u
        elif ftype == IFBLK:
            rdev = i_u
        xattrs: dict[bytes, bytes] = no_xattrs if share_xattrs else {}
        if xsize:
            budget.bytes_left -= xsize
            if budget.bytes_left < 0:
                budget.bytes(0, xoff)
            # bodies of shared ids only (an SELinux label) repeat: their mapping is looked
            # up by their bytes
            body = data[xoff:xoff + xsize] if xsize <= body_max else None
            known = bodies.get(body) if body is not None else None
            inline: Sequence[tuple[int, bytes, int, int]]
            if known is not None:
                inline = ()
                entries, only_set = known
            else:
                inline, shared_ids = xattr_body_at(xoff, xsize)
                # inline entries in stored order, then the shared ones (libcomposefs's order)
                entries, only_set = shared_sets.get(shared_ids) or shared_set(shared_ids)
                if body is not None and not inline and len(bodies) < _BODIES_MAX:
                    bodies[body] = (entries, only_set)
            if inline:
                shared_entries = entries
                entries = []
                add = entries.append
                sets = False    # does an inline entry set an xattr (else: only payload/digest)
                redirect = metacopy = None      # the last ones, for that case
                for name_index, suffix, value_start, value_end in inline:
                    act = actions[name_index].get(suffix)
                    if act is None:
                        act = actions[name_index][suffix] = xattr_action(name_index, suffix,
                                                                         value_end)
                    action = act[0]
                    if action == A_REDIRECT:
                        redirect = redirect_payload(data, value_start, value_end)
                        add((A_REDIRECT, act[1], redirect, value_end))
                    elif action == A_METACOPY:
                        if value_end - value_start == metacopy_size:
                            metacopy = data[value_start + 4:value_end]
                            add((A_METACOPY, act[1], metacopy, value_end))
                    elif action == A_SET:
                        add((A_SET, act[1], data[value_start:value_end], value_end))
                        sets = True
                    elif action != A_DROP:
                        add((action, act[1], data[value_start:value_end], value_end))
                        sets = True
                if sets or only_set is None:
                    entries += shared_entries
                    xattrs = {}
                else:
                    # redirect/metacopy only (an external file): the xattrs are the shared set's
                    xattrs = only_set if share_xattrs else only_set.copy()
                    if ftype == IFREG:
                        payload = redirect
                        digest = metacopy
                    entries = []
            elif only_set is not None:
                entries = []
                xattrs = only_set if share_xattrs else only_set.copy()
            else:
                xattrs = {}
            used = 0
            for action, key, value, value_end in entries:
                if action == A_SET:
                    used = set_xattr(xattrs, key, value, used, value_end)
                elif action == A_REDIRECT:
                    if ftype == IFREG:
                        payload = value
                elif action == A_METACOPY:
                    if ftype == IFREG:
                        digest = value
                elif action == _A_WHITEOUT:
                    if ftype == IFREG:
                        # a whiteout stored as a regular file: a character device 0/0 again
                        mode = (mode & ~IFMT) | IFCHR
                        ftype = IFCHR
                        rdev = fsize = 0
                        if content is not None:
                            content = b""   # C keeps the buffer but prints 0 bytes of it
                    else:
                        used = set_xattr(xattrs, key, value, used, value_end)
                elif action == _A_BAD:
                    raise ImageFormatError(value_end, f"xattr name of {len(key)} bytes")
        return (mode, nlink, uid, gid, rdev, fsize, mtime, mtime_nsec, payload, content, digest,
                xattrs), dir_extents

    return build


def _set_xattr(xattrs: dict[bytes, bytes], key: bytes, value: bytes, used: int,
               offset: int) -> int:
    """``lcfs_node_set_xattr`` on a node being read: replace or add ``key`` and return the
    node's accounted xattr size, which may not exceed 65535 bytes (``offset`` names the value
    in errors). A replaced key is unset first, the last xattr moving into its place."""
    if key in xattrs:
        keys = list(xattrs)
        i = keys.index(key)
        old = xattrs[key]
        keys[i] = keys[-1]
        keys.pop()
        kept = {k: xattrs[k] for k in keys}
        xattrs.clear()
        xattrs.update(kept)
        used = used - (7 + len(key) + len(old)) if xattrs else 0
    used += 7 + len(key) + len(value) + (0 if xattrs else 12)
    if used > _XATTR_SIZE_LIMIT:
        raise ImageFormatError(offset, "xattrs of one inode exceed 65535 bytes")
    xattrs[key] = value
    return used


def _redirect_payload(data: bytes | mmap.mmap, value_start: int, value_end: int) -> bytes:
    """The payload libcomposefs 1.0.8 derives from a redirect value stored at
    ``data[value_start:value_end]``.

    It drops the leading ``/`` but then copies ``len(value)`` bytes from after it (an off-by-two:
    ``value_size++`` where ``--`` was meant), so the two bytes after the value in the image are
    included, up to the first NUL. They are zero padding unless the xattr entry ended exactly
    on a 4-byte boundary."""
    if value_end - value_start > 1 and data[value_start] == 0x2F:
        raw = data[value_start + 1:value_end + 2]
    else:
        raw = data[value_start:value_end]
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]
