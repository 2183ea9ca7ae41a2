"""Byte-exact conformance with mkcomposefs 1.0.8: every case of ../shared/conformance.

Each case runs the real command-line entry point in-process: once writing an image (its sha256
must match) and once with --print-digest-only (its output must match). Must-fail cases must exit
1 with exactly one line on stderr and leave no image behind. Skips, with the reason, only when the
shared folder is not there.
"""

from __future__ import annotations


import pytest

from mkcfs.cli.mkcomposefs import main

from .conftest import (CONFORMANCE, ConformanceCase, assert_image_sha256, fsck_erofs,
                       load_conformance_cases, reference_image)

CASES = load_conformance_cases()

pytestmark = pytest.mark.skipif(not CASES, reason=f"conformance corpus not found at {CONFORMANCE}")


def _run(case: ConformanceCase, extra: list[str], tmp_path, monkeypatch, capsysbinary):
    src = tmp_path / "input.dump"
    src.write_bytes(case.read_input())
    if case.strict:
        monkeypatch.setenv("CFS_PARSE_STRICT", "1")
    else:
        monkeypatch.delenv("CFS_PARSE_STRICT", raising=False)
    rc = main([*case.args, *extra, "--from-file", str(src)] + ([] if "--print-digest-only" in extra
                                                                else [str(tmp_path / "out.img")]))
    out, err = capsysbinary.readouterr()
    return rc, out, err


def test_corpus_is_complete():
    assert len(CASES) == 147


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: ConformanceCase, tmp_path, monkeypatch, capsysbinary):
    rc, out, err = _run(case, [], tmp_path, monkeypatch, capsysbinary)
    image = tmp_path / "out.img"
    if case.must_fail:
        assert rc == 1
        lines = err.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mkcomposefs: "), err
        assert "Traceback" not in err.decode()
        assert not image.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["input.dump"], "temporary files left behind"
        return
    assert rc == 0, err.decode()
    assert err == b""
    assert_image_sha256(image.read_bytes(), case.image_sha256,
                        lambda: reference_image(case.read_input(), case.args))
    fsck_erofs(image)

    rc, out, err = _run(case, ["--print-digest-only"], tmp_path, monkeypatch, capsysbinary)
    assert rc == 0, err.decode()
    assert out.decode() == case.digest + "\n"
