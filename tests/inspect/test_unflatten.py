"""mkcfs.inspect.unflatten: sharing xattr dicts changes nothing a reader of the tree sees, and
``dump_records`` prints exactly what ``load_tree`` + the tree printer print."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from erofs.errors import ImageFormatError
from erofs.reader import Image
from mkcfs.build.image import build_image
from mkcfs.cli import composefs_info
from mkcfs.inspect.unflatten import NeedsTree, dump_records, load_tree
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
