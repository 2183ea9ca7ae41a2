"""Hypothesis strategies for random composefs trees (every file type, xattrs, hard links)."""

from __future__ import annotations

import stat

from hypothesis import strategies as st

from mkcfs.tree import HardLink, Node, iter_tree

NAME_BYTES = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
XATTR_KEYS = st.sampled_from([
    b"user.a", b"user.b", b"user.overlay.x", b"trusted.overlay.opaque", b"trusted.overlay.redirect",
    b"trusted.overlay.overlay.y", b"trusted.x", b"security.selinux", b"security.ima",
    b"system.posix_acl_access", b"lustre.z", b"os2.weird"])
XATTR_VALUES = st.one_of(st.sampled_from([b"", b"y", b"x", b"shared-value"]),
                         st.binary(max_size=40))
XATTRS = st.dictionaries(XATTR_KEYS, XATTR_VALUES, max_size=4)
TIMES = st.tuples(st.sampled_from([0, 1, 1700000000, -5]), st.sampled_from([0, 1, 999999999]))
IDS = st.sampled_from([0, 1, 1000, 65535, 65536, 4294967295])


@st.composite
def leaf_nodes(draw) -> Node:
    kind = draw(st.sampled_from(["inline", "external", "empty", "symlink", "chr", "blk", "fifo",
                                 "sock", "whiteout"]))
    sec, nsec = draw(TIMES)
    common = dict(uid=draw(IDS), gid=draw(IDS), mtime_sec=sec, mtime_nsec=nsec,
                  xattrs=draw(XATTRS), nlink=draw(st.sampled_from([1, 2, 70000])))
    perm = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o600, 0o000]))
    if kind == "inline":
        content = draw(st.binary(min_size=1, max_size=5000))
        return Node(stat.S_IFREG | perm, size=len(content), content=content, **common)
    if kind == "external":
        size = draw(st.sampled_from([1, 65, 4096, 4097, 1 << 32, (1 << 43) + 1]))
        digest = draw(st.one_of(st.none(), st.binary(min_size=32, max_size=32)))
        payload = None if digest is None else digest.hex()[:2].encode() + b"/" + digest.hex()[2:].encode()
        return Node(stat.S_IFREG | perm, size=size, payload=payload, digest=digest, **common)
    if kind == "empty":
        return Node(stat.S_IFREG | perm, **common)
    if kind == "symlink":
        target = draw(st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b))
        return Node(stat.S_IFLNK | 0o777, size=len(target), payload=target, **common)
    if kind == "whiteout":
        return Node(stat.S_IFCHR, **common)
    ftype = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK}[kind]
    rdev = draw(st.sampled_from([1, 259, 0x12345678])) if kind in ("chr", "blk") else 0
    return Node(ftype | perm, rdev=rdev, **common)


@st.composite
def trees(draw, max_entries: int = 30) -> Node:
    """A random tree; about one entry in ten is a hard link to an earlier leaf."""
    sec, nsec = draw(TIMES)
    root = Node(stat.S_IFDIR | 0o755, uid=draw(IDS), gid=draw(IDS), mtime_sec=sec,
                mtime_nsec=nsec, xattrs=draw(XATTRS))
    dirs = [root]
    leaves: list[Node] = []
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from(dirs))
        name = draw(NAME_BYTES)
        if name in parent.children:  # type: ignore[operator]
            continue
        choice = draw(st.integers(0, 9))
        if choice < 2:
            sec, nsec = draw(TIMES)
            child: Node | HardLink = Node(stat.S_IFDIR | 0o755, uid=draw(IDS), mtime_sec=sec,
                                          mtime_nsec=nsec, xattrs=draw(XATTRS))
            dirs.append(child)  # type: ignore[arg-type]
        elif choice == 2 and leaves:
            child = HardLink(draw(st.sampled_from(leaves)))
        else:
            child = draw(leaf_nodes())
            leaves.append(child)  # type: ignore[arg-type]
        parent.children[name] = child  # type: ignore[index]
    return root


def tree_paths(root: Node) -> list[bytes]:
    return [path for path, _ in iter_tree(root)]
