"""mkcfs.inspect.objects: the objects an image refers to, and which a set of stores lacks."""

from __future__ import annotations

import os

from mkcfs.build.image import build_image
from mkcfs.inspect.objects import (ObjectRef, collect_objects, image_objects, missing_objects,
                                   object_present)
from mkcfs.sources.dumpfile import parse_dumpfile

A = "aa" * 32
B = "bb" * 32
C = "cc" * 32
DUMP = f"""/ 4096 40755 3 0 0 0 0.0 - - -
/a 10 100644 2 0 0 0 0.0 aa/{A[2:]} - {A}
/a-link 10 @100644 2 0 0 0 0.0 /a - -
/d 4096 40755 2 0 0 0 0.0 - - -
/d/b 20 100644 1 0 0 0 0.0 bb/{B[2:]} - -
/d/c 30 100755 1 0 0 0 0.0 cc/{C[2:]} - {C}
/d/inline 3 100644 1 0 0 0 0.0 - abc -
/d/link 5 120777 1 0 0 0 0.0 aa/xx - -
""".encode()


def _image() -> bytes:
    return bytes(build_image(parse_dumpfile(DUMP)).data)


def test_image_objects_lists_each_external_file_once_with_its_digest():
    refs = sorted(image_objects(_image()), key=lambda r: r.path)
    assert refs == [
        ObjectRef(f"aa/{A[2:]}".encode(), bytes.fromhex(A)),
        ObjectRef(f"bb/{B[2:]}".encode(), None),
        ObjectRef(f"cc/{C[2:]}".encode(), bytes.fromhex(C)),
    ]


def test_image_objects_toplevel_filter():
    assert [r.path for r in image_objects(_image(), [b"a"])] == [f"aa/{A[2:]}".encode()]


def test_collect_objects_over_images_keeps_each_path_once():
    image = _image()
    merged = collect_objects([*image_objects(image), *image_objects(image, [b"d"])])
    assert sorted(merged) == sorted(f"{x[:2]}/{x[2:]}".encode() for x in (A, B, C))
    assert merged[f"cc/{C[2:]}".encode()] == bytes.fromhex(C)


def test_missing_objects_against_several_base_dirs(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    for base, digest in ((first, A), (second, C)):
        (base / digest[:2]).mkdir(parents=True)
        (base / digest[:2] / digest[2:]).write_bytes(b"x")
    paths = [r.path for r in image_objects(_image())]
    assert missing_objects(paths, [first, second]) == [f"bb/{B[2:]}".encode()]
    assert missing_objects(paths, [first]) == sorted([f"bb/{B[2:]}".encode(), f"cc/{C[2:]}".encode()])
    fd = os.open(first, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert missing_objects(paths, [fd, str(second)]) == [f"bb/{B[2:]}".encode()]
        assert object_present(b"/" + f"aa/{A[2:]}".encode(), fd)
        assert object_present(b"", fd)
    finally:
        os.close(fd)
    assert not object_present(b"aa", tmp_path / "absent")
