"""flatten: dirent order around "." and "..", hard links beside them, nodes reachable twice, and
flattening a tree that is consumed on the way."""

from __future__ import annotations

import copy
import re

import pytest
from hypothesis import given, settings, strategies as st

from mkcfs.build.flatten import WriteError, choose_version, flatten, flatten_choosing_version
from mkcfs.tree import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, HardLink, Node

from .strategies import trees


def _tree() -> tuple[Node, Node]:
    root = Node(S_IFDIR | 0o755)
    sub = Node(S_IFDIR | 0o755)
    target = Node(S_IFREG | 0o644, content=b"x", size=1)
    root.children[b"sub"] = sub  # type: ignore[index]
    # names that sort before ".", between "." and "..", and after ".."; a hard link among them
    sub.children.update({b"-": Node(S_IFREG | 0o644), b".-x": HardLink(target),  # type: ignore[union-attr]
                         b"..a": Node(S_IFDIR | 0o700), b"t": target})
    return root, sub


def test_dot_entries_sort_in_place_and_links_keep_their_slot() -> None:
    root, _ = _tree()
    records = flatten(root, 1)
    sub = records[257]   # the root's 256 whiteouts come first
    assert sub.dirents is not None
    assert [name for name, _ in sub.dirents] == [b"-", b".", b".-x", b"..", b"..a", b"t"]
    by_name = dict(sub.dirents)
    assert by_name[b"."] == 257 and by_name[b".."] == 0
    assert by_name[b".-x"] == by_name[b"t"]   # the hard link names its target's record
    assert records[by_name[b"t"]].data == b"x"
    assert sub.nlink == 3 and records[0].nlink == 3   # one subdirectory each


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_node_reachable_twice_is_refused(kind: str) -> None:
    root, sub = _tree()
    again = sub.children[b"t"] if kind == "file" else sub.children[b"..a"]  # type: ignore[index]
    root.children[b"again"] = again  # type: ignore[index]
    with pytest.raises(WriteError, match="node reachable twice at /"):
        flatten(root, 1)


def _fields(records: list) -> list[tuple]:
    return [(r.mode, r.nlink, r.uid, r.gid, r.rdev, r.size, r.mtime_sec, r.mtime_nsec,
             list(r.xattrs), r.dirents, r.data, r.external) for r in records]


@settings(max_examples=150, deadline=None)
@given(trees(), st.integers(0, 1))
def test_consuming_a_tree_gives_the_same_records(root: Node, version: int) -> None:
    kept = _fields(flatten(copy.deepcopy(root), version))
    assert _fields(flatten(root, version, consume=True)) == kept


def test_errors_of_a_consumed_tree_name_the_path() -> None:
    root, sub = _tree()
    sub.children[b"..a"].children[b"bad"] = Node(S_IFLNK | 0o777)  # type: ignore[index,union-attr]
    with pytest.raises(WriteError, match=r"symlink without target at /sub/\.\.a/bad\)"):
        flatten(root, 1, consume=True)
    root, sub = _tree()
    root.children[b"again"] = sub.children[b"t"]  # type: ignore[index]
    with pytest.raises(WriteError, match="node reachable twice at /"):
        flatten(root, 1, consume=True)


def test_version_is_raised_by_a_whiteout_anywhere_but_not_by_other_devices() -> None:
    root, sub = _tree()
    deep = sub.children[b"..a"]  # type: ignore[index]  # below a directory with a hard link
    deep.children[b"dev"] = Node(S_IFCHR | 0o644, rdev=0x10001)  # type: ignore[index,union-attr]
    assert choose_version(root, 0, 1) == 0
    assert choose_version(root, 0, 0) == 0
    deep.children[b"wh"] = Node(S_IFCHR | 0o644, rdev=1 << 32)  # type: ignore[index,union-attr]
    assert choose_version(root, 0, 1) == 1    # rdev 0 in its low 32 bits: a whiteout
    assert choose_version(root, 0, 0) == 0
    only_link = Node(S_IFDIR | 0o755)
    only_link.children[b"l"] = HardLink(deep.children[b"wh"])  # type: ignore[index,union-attr]
    assert choose_version(Node(S_IFDIR | 0o755), 0, 1) == 0
    assert choose_version(only_link, 0, 1) == 0   # a link to a whiteout is not one


def test_duplicate_external_files_share_one_xattr_list() -> None:
    root = Node(S_IFDIR | 0o755)
    digest = bytes(range(32))
    for name in (b"a", b"b", b"c"):
        root.children[name] = Node(S_IFREG | 0o644, size=10, payload=b"ab/cd",  # type: ignore[index]
                                   digest=digest)
    root.children[b"d"] = Node(S_IFREG | 0o644, size=10, payload=b"ab/cd",  # type: ignore[index]
                               digest=bytes(32))
    records = flatten(root, 1)
    by_name = dict(records[0].dirents or ())
    a, b, c, d = (records[by_name[name]] for name in (b"a", b"b", b"c", b"d"))
    assert a.xattrs is b.xattrs is c.xattrs
    assert d.xattrs is not a.xattrs and d.xattrs[0][1].endswith(bytes(32))
    assert a.xattrs[0][1].endswith(digest) and a.xattrs[1] == (b"trusted.overlay.redirect", b"/ab/cd")


@pytest.mark.parametrize("versions", [(0, 1), (0, 0), (1, 1), (1, 0), (0, 2), (-1, 1)])
@pytest.mark.parametrize("whiteout", [None, "direct", "deep", "hard link only"])
def test_flatten_choosing_version_picks_what_choose_version_picks(versions, whiteout):
    """The version found while flattening is choose_version's, and the records are those of
    flatten at that version (or both refuse the versions alike)."""
    root = Node(S_IFDIR | 0o755)
    sub = root.children[b"sub"] = Node(S_IFDIR | 0o755)   # type: ignore[index]
    wh = Node(S_IFCHR | 0o644, rdev=0)
    if whiteout == "direct":
        root.children[b"wh"] = wh   # type: ignore[index]
    elif whiteout == "deep":
        sub.children[b"wh"] = wh   # type: ignore[index]
    elif whiteout == "hard link only":
        root.children[b"link"] = HardLink(wh)   # type: ignore[index]
    try:
        version = choose_version(root, *versions)
    except WriteError as exc:
        with pytest.raises(WriteError, match=re.escape(str(exc))):
            flatten_choosing_version(root, *versions)
        return
    if whiteout == "hard link only":   # a link to a node outside the tree: flatten refuses it
        with pytest.raises(WriteError):
            flatten_choosing_version(root, *versions)
        return
    records, chosen = flatten_choosing_version(copy.deepcopy(root), *versions)
    assert chosen == version
    assert _fields(records) == _fields(flatten(root, version))


def test_flatten_told_the_tree_has_no_hard_links_refuses_one_it_meets():
    """hard_links=False skips the search for link targets; a link met anyway is an error,
    never an image with a wrong entry."""
    def tree() -> Node:
        root = Node(S_IFDIR | 0o755)
        target = root.children[b"a"] = Node(S_IFREG | 0o644, size=3, content=b"abc")  # type: ignore[index]
        root.children[b"b"] = HardLink(target)   # type: ignore[index]
        return root
    records, _ = flatten_choosing_version(tree(), 0, 1, consume=True)
    assert _fields(records) == _fields(flatten(tree(), 0))
    with pytest.raises(WriteError, match="hard link target is not in the tree"):
        flatten_choosing_version(tree(), 0, 1, consume=True, hard_links=False)
