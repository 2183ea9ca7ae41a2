"""mkcfs.inspect.unflatten: sharing xattr dicts changes nothing a reader of the tree sees."""

from __future__ import annotations

import pytest

from mkcfs.build.image import build_image
from mkcfs.inspect.unflatten import load_tree
from mkcfs.sources.dumpfile import format_dumpfile, parse_dumpfile
from mkcfs.tree import Node, iter_tree

from ..conftest import TESTDATA

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
