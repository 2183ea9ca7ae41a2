"""Hand-made dumpfiles in testdata/golden/ -> images whose sha256 and fs-verity digest are pinned.

The pinned values were produced by mkcomposefs 1.0.8 (see tools/make_golden_dumps.py), so the
suite checks bytes even where ../shared is not available.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from mkcfs.sources.dumpfile import parse_dumpfile
from mkcfs.build.image import build_image

from .conftest import TESTDATA, assert_image_sha256, fsck_erofs, reference_image

GOLDEN = TESTDATA / "golden"


def _rows():
    rows = []
    for line in (GOLDEN / "expected.tsv").read_text().splitlines():
        name, args, sha, digest = line.split("\t")
        rows.append(pytest.param(name, args.split(), sha, digest, id=f"{name}[{args or 'default'}]"))
    return rows


def _versions(args: list[str]) -> dict[str, int]:
    opts = dict(a[2:].split("=") for a in args)
    if not opts:
        return {}
    return {"min_version": int(opts.get("min-version", 0)), "max_version": int(opts.get("max-version", 0))}


@pytest.mark.parametrize("name,args,sha,digest", _rows())
def test_golden_image(name, args, sha, digest, tmp_path):
    root = parse_dumpfile((GOLDEN / name).read_bytes(), strict=True)
    image = build_image(root, **_versions(args))
    assert_image_sha256(image.data, sha, lambda: reference_image((GOLDEN / name).read_bytes(), args))
    assert image.fsverity_digest().hex() == digest
    path = tmp_path / "image.img"
    path.write_bytes(image.data)
    fsck_erofs(path)


def test_every_golden_dump_is_pinned():
    pinned = {line.split("\t")[0] for line in (GOLDEN / "expected.tsv").read_text().splitlines()}
    assert pinned == {p.name for p in GOLDEN.glob("*.dump")}


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises erofs-utils")
def test_fsck_is_installed_in_ci():
    assert shutil.which("fsck.erofs"), "CI must install erofs-utils (see .ci/run)"


def test_readme_sample_builds_to_the_pinned_image(tmp_path):
    """The README's quick-start command, in-process: testdata/sample.dump as mkcomposefs 1.0.8
    builds it."""
    from mkcfs.cli.mkcomposefs import main

    out = tmp_path / "sample.img"
    assert main(["--from-file", str(TESTDATA / "sample.dump"), str(out)]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == \
        "9bb0c127e2e2d0d07a566bec6900cd2f7c389a7e5a80f3a8126e82e38f88ab79"
    fsck_erofs(out)


@pytest.mark.parametrize("name,args,sha,digest", _rows())
def test_pinned_struct_hashes_describe_the_golden_image(name, args, sha, digest):
    """The per-field hashes pinned from 1.0.8's image equal those of ours (whose sha256 is the
    pinned one): so every golden image has its struct map, and the map is the right one."""
    from erofs.debug import field_hashes

    from .conftest import pinned_field_hashes

    image = build_image(parse_dumpfile((GOLDEN / name).read_bytes(), strict=True), **_versions(args))
    assert field_hashes(image.data) == pinned_field_hashes(sha)


def test_a_corrupted_golden_case_names_the_first_differing_struct_and_field():
    """A golden case whose image no longer matches its pinned hash (here: one owner changed in
    the dump) fails naming the struct and field, without the reference tool at hand."""
    text = (GOLDEN / "ex2-mixed.dump").read_bytes()
    line = next(x for x in text.splitlines() if x.startswith(b"/dir "))
    fields = line.split(b" ")
    fields[4] = b"4242"   # UID
    changed = text.replace(line, b" ".join(fields))
    sha = next(r.values[2] for r in _rows() if r.values[0] == "ex2-mixed.dump" and not r.values[1])
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_image_sha256(build_image(parse_dumpfile(changed, strict=True)).data, sha)
    message = str(failure.value)
    assert "first differing struct: erofs_inode_" in message and " /dir at " in message
    assert "field i_uid" in message and "got 4242" in message
