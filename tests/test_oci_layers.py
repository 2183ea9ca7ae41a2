"""OCI layer merging and tar reading on generated images: every rule of the OCI layer spec
(replacement, whiteouts, opaque directories wherever the marker is, hard links), every tar
dialect (ustar, GNU long names, PAX with xattrs and nanoseconds), all three compressions, and
the images they give (pinned sha256 of what mkcomposefs 1.0.8 writes for the same tree)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

import fsverity
from mkcfs.build.image import build_image
from mkcfs.sources.dumpfile import format_dumpfile, parse_dumpfile
from mkcfs.sources.oci import OciOptions, load_image_tree
from mkcfs.sources.tarlayer import TarError, TarReader, normalise_name
from mkcfs.sources.transport import ImageSource, parse_source
from mkcfs.store.objects import ObjectStore
from mkcfs.tree import HardLink, Node
from tests.ocigen import M, add_image, add_index, docker_archive, make_tar, tar_directory

T = 1_700_000_000
BIG = bytes(range(256)) * 40          # 10240 bytes: external
BIG2 = b"x" * 5000


def lines(root: Node) -> dict[str, str]:
    """path -> the rest of its dumpfile line."""
    out = {}
    for line in format_dumpfile(root).decode().splitlines():
        path, rest = line.split(" ", 1)
        out[path] = rest
    return out


def layout(tmp_path, layers, compression="gzip", **kw):
    root = tmp_path / "img"
    add_image(root, [make_tar(layer) for layer in layers], compression, **kw)
    return f"oci:{root}"


def tree(tmp_path, layers, compression="gzip", options=None):
    return load_image_tree(layout(tmp_path, layers, compression), options).root


# -- merge rules -------------------------------------------------------------------------------

def test_replacement_file_dir_and_dir_over_dir(tmp_path):
    root = tree(tmp_path, [
        [M("./", "dir", mode=0o755, mtime=T), M("a", "dir"), M("a/x", data=b"x"),
         M("b", data=b"file b"), M("c", "dir", mode=0o700, uid=5), M("c/keep", data=b"k")],
        [M("a", data=b"now a file"),          # file over a directory: subtree gone
         M("b", "dir"), M("b/y", data=b"y"),  # directory over a file
         M("c", "dir", mode=0o750, uid=7, mtime=T + 5)],   # dir over dir: children stay
    ])
    got = lines(root)
    assert set(got) == {"/", "/a", "/b", "/b/y", "/c", "/c/keep"}
    assert got["/a"].startswith("10 100644 ")
    assert got["/b"].split()[1] == "40755"
    assert got["/c"].split()[1:4] == ["40750", "1", "7"]
    assert got["/c"].split()[6] == f"{T + 5}.0"


def test_whiteout_removes_lower_subtree_only(tmp_path):
    root = tree(tmp_path, [
        [M("d", "dir"), M("d/f", data=b"f"), M("d/sub", "dir"), M("d/sub/g", data=b"g"),
         M("e", data=b"e")],
        [M("d/.wh.sub"), M("d/new", data=b"n"), M(".wh.e"), M("e", data=b"same layer")],
    ])
    got = lines(root)
    assert set(got) == {"/", "/d", "/d/f", "/d/new", "/e"}
    assert "same\\x20layer" in got["/e"]


def test_opaque_marker_hides_lower_children_wherever_it_appears(tmp_path):
    # the marker comes AFTER same-layer entries of the directory: they must survive
    root = tree(tmp_path, [
        [M("d", "dir"), M("d/lower", data=b"l"), M("d/sub", "dir"), M("d/sub/deep", data=b"z"),
         M("d/both", data=b"lower")],
        [M("d/before", data=b"b"), M("d/sub", "dir"), M("d/both", data=b"upper"),
         M("d/.wh..wh..opq"), M("d/after", data=b"a")],
    ])
    got = lines(root)
    assert set(got) == {"/", "/d", "/d/after", "/d/before", "/d/both", "/d/sub"}
    assert "upper" in got["/d/both"]


def test_opaque_marker_first_in_layer(tmp_path):
    root = tree(tmp_path, [
        [M("d", "dir"), M("d/lower", data=b"l")],
        [M("d/.wh..wh..opq"), M("d/new", data=b"n")],
        [M("d/third", data=b"t")],
    ])
    assert set(lines(root)) == {"/", "/d", "/d/new", "/d/third"}


def test_hard_links_share_one_inode(tmp_path):
    root = tree(tmp_path, [[M("a", data=BIG), M("dir", "dir"), M("dir/b", "link", link="a"),
                            M("s", data=b"short"), M("t", "link", link="./s")]])
    a, b = root.children[b"a"], root.children[b"dir"].children[b"b"]
    assert isinstance(a, Node) and a.nlink == 2
    assert isinstance(b, HardLink) and b.target is a
    assert isinstance(root.children[b"t"], HardLink)
    assert root.children[b"s"].nlink == 2


def test_hard_link_whose_first_name_is_whited_out_keeps_content(tmp_path):
    root = tree(tmp_path, [
        [M("a", data=BIG), M("b", "link", link="a"), M("c", "link", link="a")],
        [M(".wh.a")],
    ])
    b = root.children[b"b"]
    c = root.children[b"c"]
    assert b"a" not in root.children
    assert isinstance(b, Node) and b.nlink == 2 and b.digest == fsverity.digest_bytes(BIG)
    assert isinstance(c, HardLink) and c.target is b


def test_hard_link_replaced_name_keeps_old_content_for_the_other(tmp_path):
    root = tree(tmp_path, [
        [M("a", data=BIG), M("b", "link", link="a")],
        [M("a", data=BIG2)],
    ])
    assert root.children[b"a"].digest == fsverity.digest_bytes(BIG2)
    assert root.children[b"b"].digest == fsverity.digest_bytes(BIG)
    assert root.children[b"a"].nlink == 1 and root.children[b"b"].nlink == 1


def test_implicit_parents_are_reproducible(tmp_path):
    root = tree(tmp_path, [[M("x/y/z", data=b"deep", mtime=T)]])
    got = lines(root)
    for path in ("/", "/x", "/x/y"):
        assert got[path].split()[1:7] == ["40755", "1", "0", "0", "0", "0.0"], path


def test_overlay_whiteouts_and_xattrs_inside_a_layer_are_escaped(tmp_path):
    root = tree(tmp_path, [[
        M("d", "dir", pax={"SCHILY.xattr.trusted.overlay.custom": "y"}),
        M("d/wh", "chr", dev=(0, 0)),
    ]])
    image = build_image(root)
    assert image.version == 1
    from mkcfs.cli.common import load_image_tree
    back = load_image_tree("x", bytes(image.data))
    d = back.children[b"d"]
    assert d.xattrs[b"trusted.overlay.custom"] == b"y"
    assert d.children[b"wh"].rdev == 0 and d.children[b"wh"].mode & 0o170000 == 0o020000


def test_options_filter_like_the_directory_source(tmp_path):
    members = [[M("f", data=b"v", mtime=T + 0.5,
                  pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.security.b": "2"}),
                M("n", "chr", dev=(1, 3))]]
    root = tree(tmp_path, members, options=OciOptions(use_epoch=True, skip_devices=True,
                                                      user_xattrs=True))
    got = lines(root)
    assert "/n" not in got and got["/f"].split()[6] == "0.0"
    assert root.children[b"f"].xattrs == {b"user.a": b"1"}
    root = load_image_tree(f"oci:{tmp_path / 'img'}", OciOptions(skip_xattrs=True)).root
    assert root.children[b"f"].xattrs == {}


# -- tar dialects -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats(tmp_path, fmt):
    long = "d/" + "n" * 150 + "/" + "f" * 120
    members = [M("d", "dir"), M(long.rsplit("/", 1)[0], "dir"), M(long, data=BIG),
               M("l", "sym", link="t" * (99 if fmt == tarfile.USTAR_FORMAT else 300)),
               M("dev", "blk", dev=(8, 1)), M("p", "fifo")]
    if fmt == tarfile.USTAR_FORMAT:
        members[1:3] = [M("d/short", data=BIG)]
    root = tree(tmp_path, [members])
    got = lines(root)
    if fmt != tarfile.USTAR_FORMAT:
        assert "/" + long in got
    assert got["/dev"].split()[5] == str(os.makedev(8, 1))
    assert got["/p"].split()[1] == "10644"


def test_pax_xattrs_and_nanoseconds(tmp_path):
    import base64
    root = tree(tmp_path, [[M("f", data=b"data", pax={
        "mtime": "1700000000.123456789", "SCHILY.xattr.user.s": "schily",
        "LIBARCHIVE.xattr.user.b%20x": base64.b64encode(b"\x00\xffbin").decode().rstrip("="),
        "uid": "4000000000", "gid": "70000"})]])
    f = root.children[b"f"]
    assert (f.mtime_sec, f.mtime_nsec) == (1700000000, 123456789)
    assert f.xattrs == {b"user.s": b"schily", b"user.b x": b"\x00\xffbin"}
    assert (f.uid, f.gid) == (4000000000, 70000)


def test_pax_global_header_applies_to_later_members(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"SCHILY.xattr.user.g": "global", "comment": "x"}) as tar:
        info = tarfile.TarInfo("f")
        tar.addfile(info)
    entries = list(TarReader(io.BytesIO(out.getvalue()), "t"))
    assert entries[0].xattrs == {b"user.g": b"global"}


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_compressions_give_the_same_tree(tmp_path, compression):
    members = [[M("a", data=BIG), M("b", data=b"b" * 64), M("c", data=b"c" * 65)]]
    root = tree(tmp_path, members, compression)
    assert root.children[b"b"].content == b"b" * 64
    assert root.children[b"c"].digest == fsverity.digest_bytes(b"c" * 65)
    assert root.children[b"a"].payload == fsverity.object_path(
        fsverity.digest_bytes(BIG)).encode()


@pytest.mark.parametrize("raw,expected", [
    (b"./a/b/", b"a/b"), (b"/a", b"a"), (b"././a", b"a"), (b"./", b""), (b".", b""),
    (b"a/../b", None), (b"..", None), (b"a//b", None), (b"a/./b", None), (b"a\0b", None),
    (b"", None)])
def test_name_normalisation(raw, expected):
    assert normalise_name(raw) == expected


def _raw_tar(name: bytes, typeflag: bytes = b"0", size: int = 0) -> bytes:
    info = tarfile.TarInfo("placeholder")
    info.size = size
    info.type = typeflag
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    header[0:100] = name.ljust(100, b"\0")
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"\0" * (-(-size // 512) * 512) + b"\0" * 1024


@pytest.mark.parametrize("data,pattern", [
    (_raw_tar(b"../evil"), "refused member name"),
    (_raw_tar(b"a//b"), "refused member name"),
    (_raw_tar(b"sp", b"S"), "GNU sparse"),
    (_raw_tar(b"v", b"V"), "volume label"),
    (_raw_tar(b"q", b"Z"), "unknown entry type"),
    (_raw_tar(b"f", b"0", 1000)[:1024], "truncated"),
    (_raw_tar(b"f")[:300], "truncated"),
    (_raw_tar(b"f")[:512], "truncated"),
    (b"\x01" * 512 + b"\0" * 1024, "checksum"),
])
def test_hostile_tars_are_refused(data, pattern):
    with pytest.raises(TarError, match=pattern):
        list(TarReader(io.BytesIO(data), "layer.tar"))


def test_pax_sparse_keys_and_huge_pax_are_refused():
    members = [M("f", data=b"x", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})]
    with pytest.raises(TarError, match="sparse"):
        list(TarReader(io.BytesIO(make_tar(members)), "t"))
    bad = make_tar([M("f", data=b"x")])
    with pytest.raises(TarError, match="checksum"):
        list(TarReader(io.BytesIO(bad[:100] + b"\xff" + bad[101:]), "t"))


# -- sources ------------------------------------------------------------------------------------

def test_transport_parsing(tmp_path):
    (tmp_path / "a:b").mkdir()
    assert parse_source(f"oci:{tmp_path}/a:b") == ImageSource("oci", f"{tmp_path}/a:b")
    assert parse_source(f"oci:{tmp_path}/a:b:tag") == ImageSource("oci", f"{tmp_path}/a:b", "tag")
    assert parse_source(f"oci:{tmp_path}:x") == ImageSource("oci", str(tmp_path), "x")
    assert parse_source("oci:/nowhere/x:y:z") == ImageSource("oci", "/nowhere/x:y", "z")
    (tmp_path / "d.tar").write_bytes(b"")
    assert parse_source(f"docker-archive:{tmp_path}/d.tar:name:tag") == ImageSource(
        "docker-archive", f"{tmp_path}/d.tar", "name:tag")
    assert parse_source("tar:-") == ImageSource("tar", "-", None, ("-",))


def test_refs_and_platforms(tmp_path):
    root = tmp_path / "img"
    add_image(root, [make_tar([M("one", data=b"1")])], ref="one")
    add_image(root, [make_tar([M("two", data=b"2")])], ref="two")
    assert b"two" in load_image_tree(f"oci:{root}:two").root.children
    with pytest.raises(Exception, match="several images.*one.*two"):
        load_image_tree(f"oci:{root}")
    with pytest.raises(Exception, match="no image named 'three'.*one, two"):
        load_image_tree(f"oci:{root}:three")
    amd = add_image(root, [make_tar([M("amd", data=b"a")])], ref=None, write_index=False)
    arm = add_image(root, [make_tar([M("arm", data=b"r")])], ref=None,
                    platform=("linux", "arm64"), write_index=False)
    add_index(root, [amd, arm], ref="multi")
    assert b"arm" in load_image_tree(f"oci:{root}:multi",
                                     OciOptions(platform="linux/arm64")).root.children
    assert b"amd" in load_image_tree(f"oci:{root}:multi",
                                     OciOptions(platform="linux/amd64")).root.children
    with pytest.raises(Exception, match="no image for platform linux/s390x.*amd64, linux/arm64"):
        load_image_tree(f"oci:{root}:multi", OciOptions(platform="linux/s390x"))


def test_archives_give_the_same_tree(tmp_path):
    layers = [make_tar([M("a", data=BIG), M("d", "dir"), M("d/x", data=b"x")]),
              make_tar([M("d/.wh.x"), M("b", data=b"b")])]
    add_image(tmp_path / "img", layers, ref="r")
    tar_directory(tmp_path / "img", tmp_path / "img.tar")
    docker_archive(tmp_path / "d.tar", layers, ["example/img:r"])
    (tmp_path / "l1.tar").write_bytes(layers[0])
    (tmp_path / "l2.tar.gz").write_bytes(__import__("gzip").compress(layers[1]))
    expected = format_dumpfile(load_image_tree(f"oci:{tmp_path}/img:r").root)
    for source in (f"oci-archive:{tmp_path}/img.tar:r", f"oci-archive:{tmp_path}/img.tar",
                   f"docker-archive:{tmp_path}/d.tar", f"docker-archive:{tmp_path}/d.tar:example/img:r",
                   f"docker-archive:{tmp_path}/d.tar:@0",
                   ImageSource("tar", layers=(f"{tmp_path}/l1.tar", f"{tmp_path}/l2.tar.gz"))):
        assert format_dumpfile(load_image_tree(source).root) == expected, source


def test_digest_store_gets_every_object(tmp_path):
    source = layout(tmp_path, [[M("a", data=BIG), M("b", data=BIG2), M("c", data=b"tiny")]])
    store = tmp_path / "store"
    root = load_image_tree(source, OciOptions(digest_store=str(store))).root
    objects = ObjectStore(str(store))
    for name, data in ((b"a", BIG), (b"b", BIG2)):
        digest = root.children[name].digest
        assert digest in objects
        assert open(objects.object_file(digest), "rb").read() == data
    assert sorted(p.name for p in store.iterdir()) == sorted(
        {fsverity.object_path(fsverity.digest_bytes(d))[:2] for d in (BIG, BIG2)})


# -- pinned images -----------------------------------------------------------------------------

# PINNED_SHA256: the image mkcomposefs 1.0.8 writes for the directory `umoci unpack` makes of
# these layers (gzip layout; `umoci unpack --image img:latest b && mkcomposefs b/rootfs ref.img`)
PINNED_LAYERS = [
    [M("./", "dir", mode=0o755, mtime=T), M("etc", "dir", mtime=T), M("etc/a", data=b"alpha", mtime=T),
     M("etc/big", data=BIG, mtime=T, pax={"SCHILY.xattr.user.k": "v"}),
     M("usr", "dir", mtime=T), M("usr/l", "sym", link="../etc/a", mtime=T),
     M("usr/dev", "chr", dev=(1, 3), mode=0o666, mtime=T), M("gone", "dir", mtime=T),
     M("gone/x", data=b"x", mtime=T), M("op", "dir", mtime=T), M("op/low", data=b"l", mtime=T)],
    [M("./", "dir", mode=0o755, mtime=T + 1), M(".wh.gone", mtime=T + 1),
     M("op/mine", data=BIG2, mtime=T + 1.25), M("op/.wh..wh..opq", mtime=T + 1),
     M("etc/a", data=b"replaced", mtime=T + 1, uid=3, gid=4)],
]


def pinned_tree(tmp_path, compression):
    return tree(tmp_path, PINNED_LAYERS, compression)


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_pinned_image_matches_mkcomposefs_1_0_8(tmp_path, compression):
    root = pinned_tree(tmp_path, compression)
    assert set(lines(root)) == {"/", "/etc", "/etc/a", "/etc/big", "/usr", "/usr/l", "/usr/dev",
                                "/op", "/op/mine"}
    data = bytes(build_image(root).data)
    assert hashlib.sha256(data).hexdigest() == PINNED_SHA256
    # and the tree survives a dumpfile round trip to the same image
    assert bytes(build_image(parse_dumpfile(format_dumpfile(root))).data) == data


PINNED_SHA256 = "c46a4eb2ef6f3db96d64f79766b90f708d99c279519828aee3160aac32ebe2a6"


def test_existing_objects_are_not_rewritten(tmp_path):
    source = layout(tmp_path, [[M("a", data=BIG), M("huge", data=os.urandom(3 << 20))]])
    store = tmp_path / "store"
    root = load_image_tree(source, OciOptions(digest_store=str(store))).root
    files = {p: p.stat() for p in store.rglob("*") if p.is_file()}
    assert len(files) == 2
    again = load_image_tree(source, OciOptions(digest_store=str(store))).root
    assert format_dumpfile(again) == format_dumpfile(root)
    for p, st in files.items():
        now = p.stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), p
    assert [p for p in store.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("size", [100, 3 << 20])
def test_add_stream_refuses_a_wrong_size_and_leaves_no_temporary(tmp_path, size):
    store = ObjectStore(str(tmp_path / "s"))
    data = os.urandom(size)
    with pytest.raises(OSError, match="member x: .* bytes instead of"):
        store.add_stream(iter([data]), size + 1, "member x")
    digest = store.add_stream(iter([data[:size // 2], data[size // 2:]]), size, "member x")
    assert digest == fsverity.digest_bytes(data)
    assert open(store.object_file(digest), "rb").read() == data
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(".tmp")] == []


def test_symlinked_parents_are_followed_inside_the_tree(tmp_path):
    root = tree(tmp_path, [
        [M("usr", "dir"), M("usr/lib", "dir"), M("usr/lib/a", data=b"a"),
         M("lib", "sym", link="usr/lib"),
         M("abs", "sym", link="/usr/lib"), M("up", "sym", link="../../../usr"),
         M("loop", "sym", link="loop")],
        [M("abs/b", data=b"b"), M("up/c", data=b"c"),
         M("lib/.wh.a"), M("l", "link", link="abs/b")],
    ])
    got = lines(root)
    assert {"/usr/lib/b", "/usr/c", "/l"} <= set(got) and "/usr/lib/a" not in got
    assert isinstance(root.children[b"l"], HardLink) or isinstance(
        root.children[b"usr"].children[b"lib"].children[b"b"], HardLink)
    with pytest.raises(TarError, match="too many levels of symbolic links"):
        tree(tmp_path / "2", [[M("loop", "sym", link="loop"), M("loop/x", data=b"x")]])
    with pytest.raises(TarError, match="parent directory is not a directory"):
        tree(tmp_path / "3", [[M("f", data=b"f"), M("f/x", data=b"x")]])


def test_image_digest_reads_no_layer(tmp_path):
    from mkcfs.sources.oci import image_digest
    source = layout(tmp_path, [[M("a", data=BIG)]])
    expected = load_image_tree(source).manifest_digest
    for blob in (tmp_path / "img" / "blobs" / "sha256").iterdir():
        if blob.read_bytes()[:2] == b"\x1f\x8b":
            blob.unlink()          # the layer is gone: the digest is still found
    assert image_digest(source) == expected
    assert image_digest(ImageSource("tar", layers=("x",))) is None


def test_mutated_layers_fail_cleanly_or_merge(tmp_path):
    """Random byte flips and cuts in a layer: the result is a tree or one of the project's
    errors, never another exception (no crash, no hang)."""
    import random
    from mkcfs.errors import CfsError
    from mkcfs.sources.layers import LayerMerger
    base = make_tar([M("d", "dir"), M("d/f", data=BIG), M("l", "link", link="d/f"),
                     M("s", "sym", link="x" * 200), M("d/.wh..wh..opq"),
                     M("p", data=b"p", pax={"SCHILY.xattr.user.x": "1", "mtime": "1.5"})],
                    tarfile.PAX_FORMAT)
    rng = random.Random(8)
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data) // 2)    # the headers are in the first half
            data[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        merger = LayerMerger()
        merger.begin_layer("t")
        try:
            reader = TarReader(io.BytesIO(bytes(data)), "t")
            for entry in reader:
                node = merger.add(entry)
                if node is not None:
                    b"".join(reader.data())
            merger.end_layer()
            merger.finish()
        except CfsError:
            pass


@pytest.mark.parametrize("order", ["whiteout-first", "whiteout-last"])
def test_whiteout_of_a_directory_the_same_layer_writes_into(tmp_path, order):
    wh = [M(".wh.a")]
    new = [M("a/new", data=b"n")]
    root = tree(tmp_path, [
        [M("a", "dir", mode=0o700), M("a/old", data=b"o"), M("a/sub", "dir"), M("a/sub/x", data=b"x")],
        wh + new if order == "whiteout-first" else new + wh,
    ])
    assert set(lines(root)) == {"/", "/a", "/a/new"}
