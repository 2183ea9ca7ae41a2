"""mkcfs.inspect.unflatten: sharing xattr dicts changes nothing a reader of the tree sees,
``dump_records`` prints exactly what ``load_tree`` + the tree printer print, and a dump printed
in two parts at any split path is the same text (or the parts refuse to join)."""

from __future__ import annotations

import os
import time

from array import array

import pytest
from hypothesis import given, settings

from erofs.errors import ImageFormatError
from erofs.reader import Image
from mkcfs.build.image import build_image
from mkcfs.cli import composefs_info
from mkcfs import forksafe
from mkcfs.inspect import unflatten
from mkcfs.inspect.unflatten import (NeedsTree, SplitConflict, dump_records, dump_split,
                                      load_tree)
from mkcfs.sources.dumpfile import dump_blocks, format_dumpfile, parse_dumpfile
from mkcfs.tree import Node, iter_tree

from ..conftest import TESTDATA
from ..strategies import trees
from ..treegen import generate

GOLDEN = sorted((TESTDATA / "golden").glob("*.dump"))


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
@pytest.mark.parametrize("hardlinks", ["first", "writer"])
def test_shared_xattr_dicts_print_the_same_tree(path, hardlinks):
    image = bytes(build_image(parse_dumpfile(path.read_bytes(), strict=True)).data)
    own = load_tree(image, hardlinks=hardlinks)
    shared = load_tree(image, hardlinks=hardlinks, share_xattrs=True)
    assert format_dumpfile(shared) == format_dumpfile(own)
    assert bytes(build_image(shared).data) == bytes(build_image(own).data)


def test_labelled_nodes_share_one_dict_and_own_ones_do_not():
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - - security.selinux=l"]
    lines += [b"/f%d 0 100644 1 0 0 0 0.0 - - - security.selinux=l" % i for i in range(5)]
    lines += [b"/e%d 10 100644 1 0 0 0 0.0 ab/cd%d - - security.selinux=l" % (i, i) for i in range(5)]
    lines += [b"/u 0 100644 1 0 0 0 0.0 - - - user.x=1"]
    image = bytes(build_image(parse_dumpfile(b"\n".join(lines) + b"\n")).data)
    for share in (False, True):
        root = load_tree(image, share_xattrs=share)
        nodes = [e for _, e in iter_tree(root) if isinstance(e, Node)]
        labelled = [n for n in nodes if n.xattrs == {b"security.selinux": b"l"}]
        assert len(labelled) == 11
        distinct = len({id(n.xattrs) for n in labelled})
        # one dict per distinct set of shared ids (external files also share an empty metacopy)
        assert distinct <= 2 if share else distinct == 11


# --- dump_records: composefs-info dump without building the tree ------------------------------

def _streamed(image: bytes, toplevel=None) -> bytes:
    return b"".join(dump_blocks(dump_records(Image(image), toplevel)))


def _via_tree(image: bytes, toplevel=None) -> bytes:
    return format_dumpfile(load_tree(image, toplevel))


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_streamed_dump_of_golden_images_is_the_tree_dump(path):
    image = bytes(build_image(parse_dumpfile(path.read_bytes(), strict=True)).data)
    assert _streamed(image) == _via_tree(image)


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_dump_of_generated_trees_is_the_tree_dump(seed):
    # every file type, whiteouts, overlay xattrs, ACLs, 255-byte names, hard links
    tree = generate(seed, bulk=300, large=10000)
    image = bytes(build_image(tree.root).data)
    assert _streamed(image) == _via_tree(image)
    names = sorted(tree.root.children or {})
    for toplevel in ([names[0]], names[1:3], [b"no such name"]):
        assert _streamed(image, toplevel) == _via_tree(image, toplevel)


@settings(max_examples=60, deadline=None)
@given(trees())
def test_streamed_dump_of_random_trees_is_the_tree_dump(root):
    image = bytes(build_image(root).data)
    assert _streamed(image) == _via_tree(image)


def test_second_names_of_nlink_1_inodes_and_whiteouts_are_found():
    # the dump's nlink is kept as written: hard links to inodes that claim nlink 1
    text = b"".join(line + b"\n" for line in [
        b"/ 4096 40755 2 0 0 0 0.0 - - -",
        b"/a 4096 40755 2 0 0 0 0.0 - - -",
        b"/a/f 3 100644 1 0 0 0 0.0 - abc - user.x=1",
        b"/a/w 0 20000 1 0 0 0 0.0 - - -",
        b"/b 0 @120777 0 0 0 0 0.0 /a/f - -",
        b"/c 0 @20000 0 0 0 0 0.0 /a/w - -",
        b"/d 4096 40755 2 0 0 0 0.0 - - -",
        b"/d/g 0 @100644 0 0 0 0 0.0 /a/f - -",
    ])
    image = bytes(build_image(parse_dumpfile(text)).data)
    out = _streamed(image)
    assert out == _via_tree(image)
    assert b"/d/g 3 @100644 1 0 0 0 0.0 /a/f abc - user.x=1\n" in out


def test_unsorted_directories_need_the_tree():
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    lines += [b"/%s 0 100644 1 0 0 0 0.0 - - -" % name for name in (b"aq1", b"aq2", b"aq3")]
    image = bytes(build_image(parse_dumpfile(b"\n".join(lines) + b"\n")).data)
    assert image.count(b"aq1") == 1
    unsorted = image.replace(b"aq1", b"aq9")      # stored order aq9, aq2, aq3
    with pytest.raises(NeedsTree):
        _streamed(unsorted)
    duplicate = image.replace(b"aq1", b"aq2")
    with pytest.raises(NeedsTree):
        _streamed(duplicate)
    with pytest.raises(ImageFormatError):
        load_tree(duplicate)


def test_info_dump_of_an_unsorted_directory_prints_the_tree(tmp_path, capsysbinary):
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -", b"/aq1 4096 40755 2 0 0 0 0.0 - - -",
             b"/aq1/x 0 100644 2 0 0 0 0.0 - - -", b"/aq2 0 @100644 1 0 0 0 0.0 /aq1/x - -"]
    image = bytes(build_image(parse_dumpfile(b"\n".join(lines) + b"\n")).data)
    unsorted = image.replace(b"aq1", b"aq9")
    path = tmp_path / "u.img"
    path.write_bytes(unsorted)
    assert composefs_info.main(["dump", str(path)]) == 0
    out = capsysbinary.readouterr().out
    assert out == _via_tree(unsorted)
    # libcomposefs places the inode at its first name in stored order: /aq9/x
    assert out.endswith(b"/aq9/x 0 100644 2 0 0 0 0.0 - - -\n")


# --- dump in two parts (composefs-info dump on two cores) --------------------------------------

def _no_links_image() -> bytes:
    """Nested directories, xattrs, symlinks, inline and external files, whiteouts; no hard
    links."""
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - - security.selinux=root"]
    for d in range(4):
        lines.append(b"/d%d 4096 40755 2 0 0 0 0.0 - - - security.selinux=l" % d)
        lines.append(b"/d%d/w 0 20000 1 0 0 0 0.0 - - -" % d)
        for s in range(3):
            base = b"/d%d/s%d" % (d, s)
            lines.append(base + b" 4096 40755 2 0 0 0 0.0 - - - user.d=%d" % s)
            for f in range(4):
                lines.append(base + b"/f%d 5 100644 1 0 0 0 0.0 - hello - security.selinux=l"
                             % f)
                lines.append(base + b"/g%d 9000 100644 1 7 7 0 9.1 ab/cd%d%d%d - - user.x=%d"
                             % (f, d, s, f, f))
            lines.append(base + b"/l 5 120777 1 0 0 0 0.0 ../f0 - -")
    lines.append(b"/z 0 100644 1 0 0 0 0.0 - - -")
    return bytes(build_image(parse_dumpfile(b"\n".join(lines) + b"\n", strict=True)).data)


def _in_two(image: bytes, split, toplevel=None) -> bytes:
    """The two parts of the dump printed one after the other, as the two processes do."""
    met = array("I")
    used: list[int] = []
    second = b"".join(dump_blocks(dump_records(Image(image), toplevel, start=split, met=met,
                                               budget_used=used)))
    first = b"".join(dump_blocks(dump_records(Image(image), toplevel, stop=split,
                                              rest=lambda: (met, used[0], used[1]))))
    return first + second


def _offered(image: bytes, split, calls: int) -> tuple[bytes, bool]:
    """The dump of a parent that learns the split path when entering its ``calls``-th
    directory (taking it only if still ahead), and of the child if it took it."""
    state = {"calls": 0, "taken": False, "second": b""}

    def offer(path):
        state["calls"] += 1
        if state["calls"] < calls:
            return None
        state["taken"] = split > tuple(path[1:].split(b"/"))
        return split if state["taken"] else ()

    def rest():
        if not state["taken"]:
            return None
        met = array("I")
        used: list[int] = []
        state["second"] = b"".join(dump_blocks(dump_records(Image(image), start=split, met=met,
                                                            budget_used=used)))
        return met, used[0], used[1]

    first = b"".join(dump_blocks(dump_records(Image(image), offer=offer, rest=rest)))
    return first + state["second"], bool(state["taken"])


def _split_paths(dump: bytes) -> list[tuple[bytes, ...]]:
    return [tuple(line.split(b" ", 1)[0][1:].split(b"/")) for line in dump.splitlines()[1:]]


def test_a_dump_in_two_parts_at_any_path_is_the_dump():
    image = _no_links_image()
    whole = _streamed(image)
    assert whole == _via_tree(image)
    for split in _split_paths(whole):
        assert _in_two(image, split) == whole, split
    toplevel = [b"d1", b"d2", b"z"]
    filtered = _streamed(image, toplevel)
    for split in _split_paths(filtered):
        assert _in_two(image, split, toplevel) == filtered, split


def test_a_split_path_offered_during_the_walk_is_taken_only_if_ahead():
    image = _no_links_image()
    whole = _streamed(image)
    taken = 0
    for split in _split_paths(whole)[::5]:
        for calls in (1, 3, 8, 14, 100):
            text, took = _offered(image, split, calls)
            assert text == whole, (split, calls)
            taken += took
    assert 0 < taken < len(_split_paths(whole)[::5]) * 5


def test_the_split_is_in_the_middle_and_refused_for_small_images_or_hard_links():
    image = _no_links_image()
    assert dump_split(Image(image)) is None      # below SPLIT_MIN_SLOTS
    split = dump_split(Image(image), min_slots=0)
    lines = _streamed(image).splitlines()
    before = _split_paths(b"\n".join(lines)).index(split)
    assert abs(before - len(lines) // 2) <= 2, (split, before, len(lines))
    assert _in_two(image, split) == _streamed(image)
    linked = bytes(build_image(generate(0, bulk=300, large=10000).root).data)
    assert dump_split(Image(linked), min_slots=0) is None


def test_parts_across_a_hard_link_do_not_join():
    tree = generate(1, bulk=300, large=10000)
    image = bytes(build_image(tree.root).data)
    whole = _streamed(image)
    assert b" @" in whole
    conflicts = 0
    for split in _split_paths(whole):
        try:
            assert _in_two(image, split) == whole, split
        except SplitConflict:
            conflicts += 1
    assert conflicts


def _info_dump(tmp_path, capsysbinary, image: bytes, *options: str) -> tuple[int, bytes, bytes]:
    path = tmp_path / "i.img"
    path.write_bytes(image)
    status = composefs_info.main([*options, "dump", str(path)])
    captured = capsysbinary.readouterr()
    return status, captured.out, captured.err


def test_info_dump_in_two_processes(tmp_path, capsysbinary, monkeypatch):
    monkeypatch.setattr(unflatten, "SPLIT_MIN_SLOTS", 0)
    monkeypatch.setattr(forksafe, "spare_cpu", lambda: True)
    image = _no_links_image()
    assert _info_dump(tmp_path, capsysbinary, image) == (0, _via_tree(image), b"")
    assert _info_dump(tmp_path, capsysbinary, image, "--filter=d2") == (
        0, _via_tree(image, [b"d2"]), b"")
    linked = bytes(build_image(generate(0, bulk=300, large=10000).root).data)
    assert _info_dump(tmp_path, capsysbinary, linked) == (0, _via_tree(linked), b"")


def test_info_dump_child_dies_with_its_parent(tmp_path, capsysbinary, monkeypatch):
    """The child of a dump in two processes asks to die with the dump (``forksafe``)."""
    monkeypatch.setattr(unflatten, "SPLIT_MIN_SLOTS", 0)
    monkeypatch.setattr(forksafe, "spare_cpu", lambda: True)
    marker = tmp_path / "asked"
    real = forksafe.die_with_parent

    def noting(parent: int) -> None:
        marker.write_text(str(parent))
        real(parent)
    monkeypatch.setattr(forksafe, "die_with_parent", noting)
    real_records = unflatten.dump_records

    def parent_waits(*args, **kwargs):
        """The parent's printing waits for the child's call: a parent done first kills the
        child, maybe before it ran at all (on a busy machine)."""
        if kwargs.get("offer") is not None:
            for _ in range(2000):
                if marker.exists() and marker.read_text():
                    break
                time.sleep(0.005)
        return real_records(*args, **kwargs)
    monkeypatch.setattr(unflatten, "dump_records", parent_waits)
    image = _no_links_image()
    assert _info_dump(tmp_path, capsysbinary, image) == (0, _via_tree(image), b"")
    assert marker.read_text() == str(os.getpid())


def test_info_dump_in_two_processes_of_a_bad_second_part(tmp_path, capsysbinary, monkeypatch):
    monkeypatch.setattr(unflatten, "SPLIT_MIN_SLOTS", 0)
    monkeypatch.setattr(forksafe, "spare_cpu", lambda: True)
    image = _no_links_image()
    split = dump_split(Image(image), min_slots=0)
    assert split is not None and split[0] == b"d2"
    # the child's part has a directory out of name order: the tree says what the C tool says
    names = b"f0f1f2f3g0g1g2g3l"
    last = image.rfind(names)      # the names of /d3/s2
    assert last > 0
    unsorted = image[:last] + b"f9" + image[last + 2:]
    with pytest.raises(NeedsTree):
        _streamed(unsorted)
    assert _info_dump(tmp_path, capsysbinary, unsorted) == (0, _via_tree(unsorted), b"")
    # a damaged image: one error line, nothing printed
    status, out, err = _info_dump(tmp_path, capsysbinary, image[:len(image) // 2])
    assert status != 0 and out == b"" and err.count(b"\n") == 1
