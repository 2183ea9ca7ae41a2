"""erofs.debug: the struct-level map of an image and the first-difference report."""

from __future__ import annotations

import hashlib

import pytest

from erofs.debug import field_at, first_difference, format_regions, image_regions
from erofs.reader import Image
from mkcfs.build.image import build_image
from mkcfs.sources.dumpfile import parse_dumpfile

from ..conftest import TESTDATA, assert_image_sha256, assert_same_image

GOLDEN = sorted((TESTDATA / "golden").glob("*.dump"))


def _image(path=TESTDATA / "sample.dump") -> bytes:
    return bytes(build_image(parse_dumpfile(path.read_bytes(), strict=True)).data)


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_regions_cover_every_byte_once(path):
    data = _image(path)
    regions = image_regions(data)
    pos = 0
    for region in regions:
        assert region.offset == pos, region
        assert region.size > 0
        pos = region.end
    assert pos == len(data)
    assert not [r for r in regions if r.kind == "unaccounted"]
    kinds = {r.kind for r in regions}
    assert {"composefs_header", "erofs_super_block", "erofs_dirent", "dirent_names"} <= kinds


def test_every_inode_is_mapped():
    data = _image()
    image = Image(data)
    inodes = [r for r in image_regions(data) if r.kind.startswith("erofs_inode_")]
    assert len(inodes) == image.inos


def test_format_regions_names_structs_and_fields():
    text = "\n".join(format_regions(_image()))
    for word in ("composefs_header", "erofs_super_block", "root_nid", "erofs_inode_extended",
                 "i_mtime_nsec", "erofs_xattr_ibody_header", "h_name_filter", "erofs_dirent",
                 "nameoff", "erofs_xattr_entry", "e_value_size", "padding", "chunk_indexes",
                 "nid 36 /"):
        assert word in text


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _field(data: bytes, kind: str, field: str, nth: int = 0) -> int:
    """The image offset of ``field`` in the ``nth`` struct of ``kind``."""
    region = [r for r in image_regions(data) if r.kind == kind][nth]
    for offset in range(region.offset, region.end):
        found = field_at(region, offset)
        if found and found[0] == field:
            return offset
    raise AssertionError(f"{kind} has no field {field}")


@pytest.mark.parametrize("kind,field,nth", [
    ("erofs_super_block", "build_time", 0),
    ("erofs_inode_compact", "i_uid", 3),
    ("erofs_inode_extended", "i_mtime", 0),
    ("erofs_xattr_ibody_header", "h_name_filter", 0),
    ("erofs_xattr_entry", "e_value_size", 2),
    ("erofs_dirent", "nid", 5),
    ("composefs_header", "composefs_version", 0),
])
def test_one_corrupted_byte_is_named_by_struct_and_field(kind, field, nth):
    data = _image()
    offset = _field(data, kind, field, nth)
    report = first_difference(data, _flip(data, offset))
    assert report is not None
    assert f": {kind} of " in report and f"field {field} " in report, report
    assert f"offset {offset:#x}" in report


def test_raw_regions_and_sizes():
    data = _image()
    names = [r for r in image_regions(data) if r.kind == "dirent_names"][0]
    report = first_difference(data, _flip(data, names.offset + 1))
    assert report and "dirent_names of nid" in report and "byte 1 of" in report
    assert first_difference(data, data) is None
    report = first_difference(data, data[:-4096])
    assert report and "sizes differ" in report


def test_a_corrupted_golden_case_reports_struct_and_field():
    """What a golden test prints when the writer gets one field wrong: the pinned hash differs,
    and against the reference image the report names the struct and the field."""
    good = _image(GOLDEN[0])
    sha = hashlib.sha256(good).hexdigest()
    offset = _field(good, "erofs_inode_compact", "i_nlink", 0) if any(
        r.kind == "erofs_inode_compact" for r in image_regions(good)) else \
        _field(good, "erofs_inode_extended", "i_nlink", 0)
    bad = _flip(good, offset)
    assert_image_sha256(good, sha, lambda: good)
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_image_sha256(bad, sha, lambda: good)
    message = str(failure.value)
    assert "erofs_inode_" in message and "field i_nlink" in message, message
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_same_image(bad, good)
    assert "field i_nlink" in str(failure.value)
    # without the reference tool: the per-field hashes pinned in testdata/golden/struct-hashes
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_image_sha256(bad, sha)
    assert "first differing struct: erofs_inode_" in str(failure.value)
    assert "field i_nlink" in str(failure.value)
    # a hash with neither a reference nor pinned struct hashes says how to get the detail
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_image_sha256(bad, "0" * 64)
    assert "MKCFS_REFERENCE_MKCOMPOSEFS" in str(failure.value)


def test_mkcfs_debug_structs_command(tmp_path, capsysbinary):
    from mkcfs.cli.mkcfs import main

    data = _image()
    good, bad = tmp_path / "good.img", tmp_path / "bad.img"
    good.write_bytes(data)
    bad.write_bytes(_flip(data, _field(data, "erofs_super_block", "inos")))
    assert main(["debug-structs", str(good)]) == 0
    out = capsysbinary.readouterr().out.decode()
    assert out.count("\n") > 100 and "erofs_super_block" in out
    assert main(["debug-structs", "--diff", str(good), str(bad)]) == 1
    out = capsysbinary.readouterr().out.decode()
    assert "erofs_super_block of image" in out and "field inos " in out
    assert main(["debug-structs", "--diff", str(good), str(good)]) == 0
    assert main(["debug-structs", str(tmp_path / "missing")]) == 1
    assert "missing" in capsysbinary.readouterr().err.decode()
