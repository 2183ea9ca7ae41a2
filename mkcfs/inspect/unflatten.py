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

Quirks of the C reader that change what is printed are copied on purpose (see ``_payload``).
Malformed images raise :class:`~erofs.errors.ImageFormatError`; the walk visits every inode once
and its total work is bounded by :class:`~erofs.reader.WorkBudget`, so hostile images (directory
cycles, shared blocks, huge counts) cannot make it loop or allocate beyond the image size.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from erofs.errors import ImageFormatError
from erofs.format import (EROFS_INODE_CHUNK_BASED, EROFS_INODE_FLAT_INLINE,
                          EROFS_INODE_FLAT_PLAIN, XATTR_INDEX_PREFIX)
from erofs.format import INODE_COMPACT, INODE_EXTENDED, XATTR_ENTRY
from erofs.reader import INLINE_CONTENT_MAX, PATH_MAX, Image, WorkBudget

from mkcfs.build import overlay
from mkcfs.tree import S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, HardLink, Node

__all__ = ["load_tree", "load_tree_from_file", "ImageFormatError"]

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
_UNPACK_COMPACT = INODE_COMPACT.unpack_from
_UNPACK_EXTENDED = INODE_EXTENDED.unpack_from
_UNPACK_XATTR = XATTR_ENTRY.unpack_from


_A_SET, _A_REDIRECT, _A_METACOPY, _A_WHITEOUT, _A_DROP, _A_BAD = range(6)


def _xattr_action(name_index: int, suffix: bytes, offset: int) -> tuple[int, bytes]:
    """What libcomposefs's reader does with a stored xattr: ``(action, key)``.

    Mirrors ``lcfs_build_node_erofs_xattr``: the full name is prefix + suffix, cut at the first
    NUL (it is a C string there)."""
    prefix = XATTR_INDEX_PREFIX.get(name_index)
    if prefix is None:
        raise ImageFormatError(offset, f"unknown xattr name index {name_index}")
    name = prefix + suffix
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


class _Walk:
    """State of one image -> tree walk: the image, the work budget, nid -> Node, and caches."""

    __slots__ = ("image", "budget", "nodes", "actions", "shared")

    def __init__(self, image: Image) -> None:
        self.image = image
        self.budget = WorkBudget(image.size)
        #: nid -> the Node built at its first place (None for a skipped whiteout)
        self.nodes: dict[int, Node | None] = {}
        #: per name index: suffix -> (action, key)
        self.actions: list[dict[bytes, tuple[int, bytes]]] = [{} for _ in range(256)]
        #: shared xattr id -> (action, key, value, value_end)
        self.shared: dict[int, tuple[int, bytes, bytes, int]] = {}


def load_tree(image: Image | bytes | bytearray | memoryview,
              toplevel: Iterable[bytes] | None = None, *, hardlinks: str = "first") -> Node:
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
      round trips change such images)."""
    if hardlinks not in ("first", "writer"):
        raise ValueError(f"hardlinks must be 'first' or 'writer', not {hardlinks!r}")
    if not isinstance(image, Image):
        image = Image(image)
    walk = _Walk(image)
    keep = None if toplevel is None else frozenset(toplevel)
    build = _make_builder(walk)
    root, root_dir = build(image.root_nid)
    if root is None:
        raise ImageFormatError(image.meta_base + image.root_nid * 32,
                               "the root inode is a whiteout (character device 0/0)")
    if root_dir is None:
        return root
    writer_mode = hardlinks == "writer"
    #: nid -> (parent node, name) of the entry holding the Node ("writer" mode only)
    first_place: dict[int, tuple[Node, bytes]] = {}
    linked: set[int] = set()
    # depth first, pre-order, children in stored dirent order (the C reader's recursion)
    stack = [(root, iter(_dir_entries(walk, root_dir)), keep)]
    nodes = walk.nodes
    while stack:
        parent, entries, keep = stack[-1]
        children = parent.children
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
            node, dirinfo = build(nid)
            if node is None:            # real whiteout (00..ff): not shown
                continue
            if name and len(name) <= _NAME_MAX and name not in children:
                children[name] = node
            else:
                _add_child(children, name, None, nid, image)
            if writer_mode:
                first_place[nid] = (parent, name)
            if dirinfo is not None:
                stack.append((node, iter(_dir_entries(walk, dirinfo)), None))
                break
        else:
            stack.pop()
    if linked:
        _move_to_writer_places(walk, linked, first_place)
    return root


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
        parent.children[name] = node
        old_parent.children[old_name] = entry  # type: ignore[index]


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


def _dir_entries(walk: _Walk, dirinfo: tuple[int, int, int, int, int, int]
                 ) -> list[tuple[bytes, int]]:
    """``(name, nid)`` of a directory's entries (``.`` and ``..`` included; the caller skips
    them), names cut at the first NUL like C strings. A name is at most a block long, so the
    C reader's ``PATH_MAX - 1`` cut never applies."""
    image = walk.image
    budget = walk.budget
    result: list[tuple[bytes, int]] = []
    for offset, length in image.extents_of(*dirinfo):
        budget.bytes(length, offset)
        names, nids, _types = image.dirent_columns(offset, length)
        budget.dirents(len(names), offset)
        if b"\0" in b"".join(names):
            # a NUL before the last name's end: some name may hold one (slow path)
            names = [n[:n.index(b"\0")] if b"\0" in n else n for n in names]
        result.extend(zip(names, nids))
    return result


_SIGN64 = 1 << 63
_WRAP64 = 1 << 64
_S_IFBLK = 0o060000


def _make_builder(walk: _Walk):
    """``build(nid) -> (node, dirinfo)``: the node of inode ``nid`` (without its children).

    ``node`` is None for a whiteout (character device 0/0); ``dirinfo`` is the argument tuple of
    ``Image.extents_of`` for a directory, else None. This is the per-inode hot path, so the
    inode, its xattr body and the xattr mapping are decoded inline with every offset checked."""
    image = walk.image
    data = image.data
    size = image.size
    meta_base = image.meta_base
    build_time = image.build_time
    build_time_nsec = image.build_time_nsec
    nodes = walk.nodes
    actions = walk.actions
    shared = walk.shared
    budget = walk.budget
    extents_of = image.extents_of
    unpack_compact = _UNPACK_COMPACT
    unpack_extended = _UNPACK_EXTENDED
    unpack_xattr = _UNPACK_XATTR
    xattr_action = _xattr_action
    A_SET, A_REDIRECT, A_METACOPY, A_DROP = _A_SET, _A_REDIRECT, _A_METACOPY, _A_DROP
    id_structs = _ID_STRUCTS
    IFMT, IFREG, IFDIR, IFLNK, IFCHR, IFBLK = _IFMT, S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, _S_IFBLK
    FLAT_PLAIN, FLAT_INLINE = EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE
    limit = _XATTR_SIZE_LIMIT
    metacopy_size = _METACOPY_SIZE

    def shared_entry(xid: int) -> tuple[int, bytes, bytes | None, int]:
        """A shared xattr, decoded once: redirect and metacopy carry their final payload and
        digest (metacopy values that are not 36 bytes long do nothing)."""
        e = image.shared_xattr(xid)
        act = actions[e.name_index].get(e.suffix)
        if act is None:
            act = actions[e.name_index][e.suffix] = xattr_action(e.name_index, e.suffix,
                                                                 e.value_end)
        action, key = act
        value: bytes | None = e.value
        if action == A_REDIRECT:
            value = _payload(image, e.value, e.value_end)
        elif action == A_METACOPY:
            if len(e.value) != metacopy_size:
                action = A_DROP
            value = e.value[4:]
        entry = shared[xid] = (action, key, value, e.value_end)
        return entry

    def build(nid: int):
        offset = meta_base + nid * 32
        if offset + 32 > size:
            raise ImageFormatError(offset, f"inode nid {nid} is beyond the image end")
        if data[offset] & 1:
            if offset + 64 > size:
                raise ImageFormatError(offset, f"extended inode nid {nid} is cut off by the "
                                               "image end")
            (i_format, icount, mode, _r, fsize, i_u, _ino, uid, gid, mtime, mtime_nsec, nlink,
             _r2) = unpack_extended(data, offset)
            if mtime >= _SIGN64:
                mtime -= _WRAP64
            xoff = offset + 64
        else:
            (i_format, icount, mode, nlink, fsize, _r, i_u, _ino, uid, gid,
             _r2) = unpack_compact(data, offset)
            mtime = build_time
            mtime_nsec = build_time_nsec
            xoff = offset + 32
        tail_offset = xoff + 4 * icount + 8 if icount else xoff
        payload = content = digest = dirinfo = None
        ftype = mode & IFMT
        rdev = 0
        if ftype == IFREG:
            if fsize:
                layout = (i_format >> 1) & 7
                if layout == FLAT_PLAIN or layout == FLAT_INLINE:
                    if fsize > INLINE_CONTENT_MAX:
                        raise ImageFormatError(offset + 8, f"inline file of {fsize} bytes "
                                                           f"(at most {INLINE_CONTENT_MAX})")
                    budget.bytes(fsize, offset)
                    content = b"".join([data[o:o + n] for o, n in extents_of(
                        nid, offset, layout, fsize, i_u, tail_offset)])
                elif layout != EROFS_INODE_CHUNK_BASED:
                    raise ImageFormatError(offset, "regular file with unsupported data layout "
                                                   f"{layout}")
        elif ftype == IFDIR:
            dirinfo = (nid, offset, (i_format >> 1) & 7, fsize, i_u, tail_offset)
        elif ftype == IFLNK:
            if fsize >= PATH_MAX:
                raise ImageFormatError(offset + 8, f"symlink target of {fsize} bytes")
            budget.bytes(fsize, offset)
            target = b"".join([data[o:o + n] for o, n in extents_of(
                nid, offset, (i_format >> 1) & 7, fsize, i_u, tail_offset)])
            nul = target.find(b"\0")
            if nul >= 0:
                target = target[:nul]
            if not target:
                raise ImageFormatError(offset, "empty symlink target")
            payload = target
            fsize = len(target)
        elif ftype == IFCHR:
            if i_u == 0:
                nodes[nid] = None   # a real whiteout: skipped, here and wherever it appears
                return None, None
            rdev = i_u
        elif ftype == IFBLK:
            rdev = i_u
        if tail_offset > size:
            raise ImageFormatError(offset + 2, f"xattr body of inode nid {nid} runs past the "
                                               "image end")
        xattrs: dict[bytes, bytes] = {}
        if icount:
            budget.bytes_left -= tail_offset - xoff
            if budget.bytes_left < 0:
                budget.bytes(0, xoff)
            shared_count = data[xoff + 4]
            pos = xoff + 12 + 4 * shared_count
            if pos > tail_offset:
                raise ImageFormatError(xoff + 4, f"{shared_count} shared xattr ids do not fit "
                                                 "in the xattr body")
            used = 0
            # libcomposefs stops when fewer than 5 bytes are left (``pos + 4 < end``)
            while pos + 4 < tail_offset:
                name_len, name_index, value_size = unpack_xattr(data, pos)
                value_start = pos + 4 + name_len
                value_end = value_start + value_size
                if value_end > tail_offset:
                    raise ImageFormatError(pos, f"xattr entry ({name_len}-byte name, "
                                                f"{value_size}-byte value) runs past the end "
                                                "of the xattr body")
                suffix = data[pos + 4:value_start]
                act = actions[name_index].get(suffix)
                if act is None:
                    act = actions[name_index][suffix] = xattr_action(name_index, suffix, pos)
                pos += (7 + name_len + value_size) & ~3
                action = act[0]
                if action == A_REDIRECT:
                    if ftype == IFREG:
                        if value_size > 1 and data[value_start] == 0x2F:
                            # libcomposefs's off-by-two: see _payload()
                            raw = data[value_start + 1:value_end + 2]
                        else:
                            raw = data[value_start:value_end]
                        nul = raw.find(b"\0")
                        payload = raw if nul < 0 else raw[:nul]
                    continue
                if action == A_METACOPY:
                    if ftype == IFREG and value_size == metacopy_size:
                        digest = data[value_start + 4:value_end]
                    continue
                if action == A_SET:
                    key = act[1]
                    value = data[value_start:value_end]
                    if key in xattrs:
                        used = _unset(xattrs, key, used)
                    used += 7 + len(key) + value_size + (0 if xattrs else 12)
                    if used > limit:
                        raise ImageFormatError(value_end, "xattrs of one inode exceed 65535 bytes")
                    xattrs[key] = value
                    continue
                if action == A_DROP:
                    continue
                state = [mode, ftype, rdev, fsize, content, payload, digest, used]
                _apply_rare(image, xattrs, state, action, act[1], data[value_start:value_end],
                            value_end)
                mode, ftype, rdev, fsize, content, payload, digest, used = state
            if shared_count:
                for xid in id_structs[shared_count].unpack_from(data, xoff + 12):
                    action, key, value, value_end = shared.get(xid) or shared_entry(xid)
                    if action == A_DROP:
                        continue
                    if action == A_METACOPY:    # value: the digest
                        if ftype == IFREG:
                            digest = value
                        continue
                    if action == A_REDIRECT:    # value: the payload
                        if ftype == IFREG:
                            payload = value
                        continue
                    if action == A_SET and key not in xattrs:
                        used += 7 + len(key) + len(value) + (0 if xattrs else 12)
                        if used > limit:
                            raise ImageFormatError(value_end, "xattrs of one inode exceed 65535 "
                                                              "bytes")
                        xattrs[key] = value
                        continue
                    state = [mode, ftype, rdev, fsize, content, payload, digest, used]
                    _apply_rare(image, xattrs, state, action, key, value, value_end)
                    mode, ftype, rdev, fsize, content, payload, digest, used = state
        node = Node(mode, nlink, uid, gid, rdev, fsize, mtime, mtime_nsec, payload, content,
                    digest, xattrs)
        nodes[nid] = node
        return node, dirinfo

    return build


#: unpackers of 0..255 shared xattr ids
_ID_STRUCTS = [struct.Struct(f"<{n}I") for n in range(256)]


def _apply_rare(image: Image, xattrs: dict[bytes, bytes], state: list, action: int, key: bytes,
                value: bytes, value_end: int) -> None:
    """Apply one xattr (``lcfs_build_node_erofs_xattr``) to a node under construction.

    ``state`` is ``[mode, ftype, rdev, size, content, payload, digest, used]`` and is updated in
    place (``used`` is libcomposefs's accounted xattr size of the node)."""
    ftype = state[1]
    if action == _A_REDIRECT:
        if ftype == S_IFREG:
            state[5] = _payload(image, value, value_end)
        return
    if action == _A_METACOPY:
        if ftype == S_IFREG and len(value) == _METACOPY_SIZE:
            state[6] = value[4:]
        return
    if action == _A_WHITEOUT:
        if ftype == S_IFREG:
            state[0] = (state[0] & ~_IFMT) | S_IFCHR
            state[1] = S_IFCHR
            state[2] = 0
            state[3] = 0
            if state[4] is not None:
                state[4] = b""   # C keeps the buffer but prints 0 bytes of it
            return
    elif action != _A_SET:
        if action == _A_BAD:
            raise ImageFormatError(value_end, f"xattr name of {len(key)} bytes")
        return                   # dropped
    used = state[7]
    if key in xattrs:
        used = _unset(xattrs, key, used)
    used += 7 + len(key) + len(value) + (0 if xattrs else 12)
    if used > _XATTR_SIZE_LIMIT:
        raise ImageFormatError(value_end, "xattrs of one inode exceed 65535 bytes")
    xattrs[key] = value
    state[7] = used


def _unset(xattrs: dict[bytes, bytes], key: bytes, used: int) -> int:
    """Remove ``key`` like ``lcfs_node_unset_xattr``: the last xattr moves into its place."""
    keys = list(xattrs)
    i = keys.index(key)
    old = xattrs[key]
    keys[i] = keys[-1]
    keys.pop()
    kept = {k: xattrs[k] for k in keys}
    xattrs.clear()
    xattrs.update(kept)
    return used - (7 + len(key) + len(old)) if xattrs else 0


def _payload(image: Image, value: bytes, value_end: int) -> bytes:
    """The payload libcomposefs 1.0.8 derives from a redirect value.

    It drops the leading ``/`` but then copies ``len(value)`` bytes from after it (an off-by-two:
    ``value_size++`` where ``--`` was meant), so the two bytes after the value in the image are
    included, up to the first NUL. They are zero padding unless the xattr entry ended exactly
    on a 4-byte boundary."""
    if len(value) > 1 and value[0] == 0x2F:
        raw = value[1:] + image.data[value_end:value_end + 2]
    else:
        raw = value
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]
