"""The construct declarations and the struct packers derived from them must agree byte for byte
(the EROFS structures of ``erofs/structs.py`` and the fs-verity ones of ``fsverity/structs.py``),
and the generated packer modules (``erofs/packers.py``, ``fsverity/packers.py``) must be what
``tools/gen_packers.py`` writes from the declarations today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import construct as cs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs import format as fmt
from erofs import structs
from fsverity import format as vfmt
from fsverity import structs as vstructs
from fsverity.cstruct import field_offsets, render_packers

REPO = Path(__file__).resolve().parents[2]
SIZES = {**structs.STRUCT_SIZES, **vstructs.STRUCT_SIZES}
DECLS = {name: decl for name, (decl, _) in SIZES.items()}
PACKERS = {
    "composefs_header": fmt.COMPOSEFS_HEADER.packer,
    "erofs_super_block": fmt.SUPER_BLOCK.packer,
    "erofs_inode_compact": fmt.INODE_COMPACT,
    "erofs_inode_extended": fmt.INODE_EXTENDED,
    "erofs_xattr_ibody_header": fmt.XATTR_IBODY_HEADER,
    "erofs_xattr_entry": fmt.XATTR_ENTRY,
    "erofs_dirent": fmt.DIRENT,
    "fsverity_descriptor": vfmt.DESCRIPTOR,
    "fsverity_enable_arg": vfmt.ENABLE_ARG,
}


def _leaf(field):
    while isinstance(field, cs.Renamed):
        field = field.subcon
    return field


def _field_strategy(field):
    leaf = _leaf(field)
    if isinstance(leaf, cs.FormatField):
        return st.integers(0, (1 << (8 * leaf.length)) - 1)
    return st.binary(min_size=leaf.length, max_size=leaf.length)


@pytest.mark.parametrize("module", [structs, vstructs], ids=lambda m: m.__name__)
def test_generated_packers_are_current(module):
    path = REPO / module.__name__.rpartition(".")[0] / "packers.py"
    assert path.read_text() == render_packers(module), \
        f"{path.name} is stale: run python3 tools/gen_packers.py"


def test_gen_packers_check_fails_on_a_stale_file(tmp_path):
    # the tool itself, on a copy of the checkout whose erofs/packers.py was edited by hand
    for package in ("erofs", "fsverity", "mkcfs"):   # (mkcfs: the tool writes with its fsutil)
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "gen_packers.py").write_bytes((REPO / "tools" / "gen_packers.py").read_bytes())
    tool = [sys.executable, str(tmp_path / "tools" / "gen_packers.py")]
    assert subprocess.run([*tool, "--check"], capture_output=True).returncode == 0
    packers = tmp_path / "erofs" / "packers.py"
    packers.write_text(packers.read_text().replace('"i_u": 16', '"i_u": 20'))
    check = subprocess.run([*tool, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "erofs/packers.py is stale" in check.stderr
    assert subprocess.run(tool, capture_output=True).returncode == 0
    assert packers.read_text() == (REPO / "erofs" / "packers.py").read_text()


def test_runtime_modules_do_not_import_construct():
    # the commands' modules use the generated packers only: construct is for build and test time
    code = ("import sys, erofs.format, erofs.layout, erofs.writer, erofs.reader, fsverity.format, "
            "fsverity.merkle, fsverity.kernel; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'construct' or m.endswith('.structs') or m.endswith('cstruct')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_field_offsets_follow_the_declaration():
    assert fmt.INODE_COMPACT_FIELDS == field_offsets(structs.ErofsInodeCompact)
    assert fmt.INODE_COMPACT_FIELDS["i_u"] == 16 and fmt.INODE_EXTENDED_FIELDS["i_u"] == 16
    assert fmt.SUPER_BLOCK.names == tuple(field_offsets(structs.ErofsSuperBlock))


def test_sizes_match_kernel():
    structs.check_layout()
    for name, (decl, size) in SIZES.items():
        assert decl.sizeof() == size
        assert PACKERS[name].size == size


def test_every_declared_struct_has_a_packer():
    assert set(PACKERS) == set(DECLS)


def test_every_field_is_documented():
    for name, decl in DECLS.items():
        for field in decl.subcons:
            assert field.name and field.docs, f"{name}.{field.name} has no doc"


@pytest.mark.parametrize("name", sorted(DECLS))
@given(data=st.data())
def test_packer_equals_construct(name, data):
    decl = DECLS[name]
    values = {f.name: data.draw(_field_strategy(f)) for f in decl.subcons}
    expected = decl.build(values)
    got = PACKERS[name].pack(*[values[f.name] for f in decl.subcons])
    assert got == expected
    parsed = decl.parse(got)
    assert [parsed[f.name] for f in decl.subcons] == list(PACKERS[name].unpack(got))


@pytest.mark.parametrize("named", [fmt.COMPOSEFS_HEADER, fmt.SUPER_BLOCK], ids=lambda n: n.name)
@given(data=st.data())
def test_named_packer_equals_construct(named, data):
    decl = DECLS[named.name]
    values = {f.name: data.draw(_field_strategy(f)) for f in decl.subcons}
    # a random subset given by name; the rest must pack as zeros
    given_names = data.draw(st.sets(st.sampled_from([f.name for f in decl.subcons])))
    expected = decl.build({f.name: values[f.name] if f.name in given_names
                           else (bytes(_leaf(f).length) if isinstance(_leaf(f), cs.Bytes) else 0)
                           for f in decl.subcons})
    got = named.pack(**{n: values[n] for n in given_names})
    assert got == expected
    assert named.unpack_from(got) == {f.name: decl.parse(got)[f.name] for f in decl.subcons}


def test_named_packer_refuses_unknown_fields():
    with pytest.raises(TypeError, match="root_nids"):
        fmt.SUPER_BLOCK.pack(root_nids=1)


def test_reserved_fields_pack_as_zeros():
    # packing b"" into an Ns field writes N zeros: that is how the writer fills reserved fields
    raw = fmt.INODE_EXTENDED.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b"")
    assert raw == bytes(64)


@pytest.mark.parametrize("suffix,index,expected", [
    (b"overlay.opaque", 4, 0x4CE0A7F4),
    (b"overlay.metacopy", 4, 0xDBE5E05F),
    (b"overlay.redirect", 4, 0x887EC271),
    (b"selinux", 6, 0x9490146B),
    (b"", 2, 0x0857597E),
    (b"", 3, 0x59EEABB5),
    (b"tag", 1, 0xA29F7FF1),
    (b"overlay.overlay.whiteout", 4, 0x54A3E364),
    (b"overlay.whiteout", 1, 0xED142E09),
    (b"overlay.overlay.whiteouts", 4, 0x46DD3E0C),
    (b"overlay.whiteouts", 1, 0xD11B80B4),
    (b"overlay.overlay.opaque", 4, 0x207B5265),
    (b"overlay.opaque", 1, 0xF8DC99EA),
])
def test_xxh32_filter_vectors(suffix, index, expected):
    assert fmt.xxh32(suffix, fmt.EROFS_XATTR_FILTER_SEED + index) == expected


@pytest.mark.parametrize("data,seed,expected", [
    # published xxHash32 test vectors
    (b"", 0, 0x02CC5D05),
    (b"a", 0, 0x550D7456),
    (b"abc", 0, 0x32D153FF),
    (b"Nobody inspects the spammish repetition", 0, 0xE2293B2F),
])
def test_xxh32_known_vectors(data, seed, expected):
    assert fmt.xxh32(data, seed) == expected


@pytest.mark.parametrize("key,index,suffix", [
    (b"user.foo", 1, b"foo"),
    (b"system.posix_acl_access", 2, b""),
    (b"system.posix_acl_default", 3, b""),
    (b"system.posix_acl_accessX", 2, b"X"),
    (b"trusted.overlay.opaque", 4, b"overlay.opaque"),
    (b"security.selinux", 6, b"selinux"),
    (b"lustre.x", 0, b"lustre.x"),
    (b"system.nfs4_acl", 0, b"system.nfs4_acl"),
])
def test_xattr_prefix_split(key, index, suffix):
    assert fmt.xattr_prefix_split(key) == (index, suffix)


@pytest.mark.parametrize("size,bits,count", [
    (1, 12, 1), (4096, 12, 1), (4097, 13, 1), (8192, 13, 1), (1 << 32, 32, 1),
    ((1 << 43), 43, 1), ((1 << 43) + 1, 43, 2), (1 << 53, 43, 1024), ((1 << 53) + 1, 43, 1025),
])
def test_chunk_params(size, bits, count):
    assert fmt.chunk_params(size) == (bits, count)
