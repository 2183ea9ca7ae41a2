"""``mkcomposefs oci:...`` end to end: the image equals the API's, and every kind of bad input
ends in one line naming the blob or member, exit 1, no image and nothing half-written in the
store."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mkcfs.build.image import build_image
from mkcfs.sources import layerstream
from mkcfs.sources.layerstream import LayerError
from mkcfs.sources.oci import OciOptions, load_image_tree
from tests.ocigen import M, add_image, make_tar, sha

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))
BIG = os.urandom(20000)


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkcfs.cli.mkcomposefs", *args], cwd=REPO,
                          env=ENV, capture_output=True, timeout=120, **kw)


def good_layers():
    return [make_tar([M("d", "dir"), M("d/big", data=BIG), M("d/small", data=b"s")]),
            make_tar([M("d/.wh.small"), M("e", data=BIG[:5000])])]


@pytest.fixture
def img(tmp_path):
    root = tmp_path / "img"
    add_image(root, good_layers(), ref="r")
    return root


def test_cli_image_and_digest_store(img, tmp_path):
    out = tmp_path / "out.img"
    store = tmp_path / "store"
    result = run("--print-digest", f"--digest-store={store}", f"oci:{img}:r", str(out))
    assert result.returncode == 0, result.stderr
    expected = build_image(load_image_tree(f"oci:{img}:r").root)
    assert out.read_bytes() == bytes(expected.data)
    assert result.stdout.decode() == expected.fsverity_digest().hex() + "\n"
    assert sum(1 for _ in store.rglob("*") if _.is_file()) == 2
    # several --layer files, one from stdin
    layers = good_layers()
    (tmp_path / "l1.tar").write_bytes(layers[0])
    out2 = tmp_path / "out2.img"
    result = run("--layer", str(tmp_path / "l1.tar"), "--layer=-", str(out2),
                 input=gzip.compress(layers[1]))
    assert result.returncode == 0, result.stderr
    assert out2.read_bytes() == out.read_bytes()


def _blob(img: Path, digest: str) -> Path:
    return img / "blobs" / "sha256" / digest[7:]


def _manifest(img: Path) -> tuple[dict, dict]:
    index = json.loads((img / "index.json").read_text())
    desc = index["manifests"][0]
    return desc, json.loads(_blob(img, desc["digest"]).read_text())


def _layer_desc(img: Path, n: int = 0) -> dict:
    return _manifest(img)[1]["layers"][n]


def _rewrite_manifest(img: Path, change) -> None:
    """Change the manifest and fix index.json so the manifest itself still verifies."""
    desc, manifest = _manifest(img)
    change(manifest)
    data = json.dumps(manifest).encode()
    _blob(img, sha(data)).write_bytes(data)
    index = json.loads((img / "index.json").read_text())
    index["manifests"][0].update(digest=sha(data), size=len(data))
    (img / "index.json").write_text(json.dumps(index))


def corrupt_truncated(img):
    p = _blob(img, _layer_desc(img)["digest"])
    p.write_bytes(p.read_bytes()[:-10])
    return _layer_desc(img)["digest"][7:19] + ".*truncated"


def corrupt_digest(img):
    p = _blob(img, _layer_desc(img)["digest"])
    data = bytearray(p.read_bytes())
    data[-12] ^= 1   # in the gzip trailer's crc: the size stays, the digest changes
    p.write_bytes(bytes(data))
    return _layer_desc(img)["digest"][7:19] + ".*(digest mismatch|corrupt gzip)"


def corrupt_missing(img):
    _blob(img, _layer_desc(img, 1)["digest"]).unlink()
    return _layer_desc(img, 1)["digest"][7:19] + ".*missing"


def corrupt_json(img):
    (img / "index.json").write_text("{not json")
    return r"index\.json: bad JSON"


def corrupt_media_type(img):
    _rewrite_manifest(img, lambda m: m["layers"][0].update(mediaType="application/x-foo"))
    return "unknown layer media type application/x-foo"


def corrupt_ref(img):
    (img / "index.json").write_text((img / "index.json").read_text().replace('"r"', '"other"'))
    return "no image named 'r'.*other"


def _replace_layer(img, members, n=0):
    data = gzip.compress(make_tar(members), mtime=0)
    path = _blob(img, sha(data))
    path.write_bytes(data)
    raw = make_tar(members)

    def change(m):
        m["layers"][n].update(digest=sha(data), size=len(data))
    _rewrite_manifest(img, change)
    # fix the diff_id too, so only the tar content is wrong
    _, manifest = _manifest(img)
    config = json.loads(_blob(img, manifest["config"]["digest"]).read_text())
    config["rootfs"]["diff_ids"][n] = sha(raw)
    cdata = json.dumps(config).encode()
    _blob(img, sha(cdata)).write_bytes(cdata)
    _rewrite_manifest(img, lambda m: m["config"].update(digest=sha(cdata), size=len(cdata)))


def corrupt_path(img):
    _replace_layer(img, [M("ok", data=BIG), M("a/../../etc/passwd", data=b"x")])
    return r"member a/\.\./\.\./etc/passwd: refused member name"


def corrupt_dangling_link(img):
    _replace_layer(img, [M("ok", data=BIG), M("l", "link", link="nowhere")])
    return "member l: hard link to a missing path nowhere"


def corrupt_diff_id(img):
    _, manifest = _manifest(img)
    config = json.loads(_blob(img, manifest["config"]["digest"]).read_text())
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    cdata = json.dumps(config).encode()
    _blob(img, sha(cdata)).write_bytes(cdata)
    _rewrite_manifest(img, lambda m: m["config"].update(digest=sha(cdata), size=len(cdata)))
    return "does not match the config's diff_id"


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_digest, corrupt_missing,
                                     corrupt_json, corrupt_media_type, corrupt_ref, corrupt_path,
                                     corrupt_dangling_link, corrupt_diff_id])
def test_bad_input_is_one_line_and_leaves_nothing(img, tmp_path, corrupt):
    pattern = corrupt(img)
    out = tmp_path / "out.img"
    store = tmp_path / "store"
    result = run(f"--digest-store={store}", f"oci:{img}:r", str(out))
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err.startswith("mkcomposefs: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(pattern, err), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.img")] == []
    if store.exists():   # complete objects may stay, temporaries may not
        for p in store.rglob("*"):
            assert not p.name.startswith(".tmp"), p
            if p.is_file():
                from fsverity import digest_file
                assert digest_file(p).hex() == p.parent.name + p.name


def test_decompression_bomb_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(layerstream, "SLACK", 1 << 20)
    zeros = make_tar([M("zeros", data=bytes(64 << 20))])
    add_image(tmp_path / "img", [zeros], "zstd", ref="r")   # gzip cannot exceed ~1032:1
    with pytest.raises(LayerError, match="decompresses to more than 1100 times"):
        load_image_tree(f"oci:{tmp_path}/img", OciOptions(threads=1))
    with pytest.raises(LayerError, match="decompresses to more than 1100 times"):
        load_image_tree(f"oci:{tmp_path}/img", OciOptions(threads=2))
    tree = load_image_tree(f"oci:{tmp_path}/img", OciOptions(ratio_limit=100000))
    assert tree.root.children[b"zeros"].size == 64 << 20


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_truncated_or_garbage_compressed_layer(tmp_path, how):
    from tests.ocigen import compress
    raw = make_tar([M("f", data=os.urandom(100000))])
    data = compress(raw, how)
    cases = [(data[: len(data) // 2], "truncated|corrupt"),
             (data + b"garbage!", "after the end|corrupt|unknown")]
    if how == "gzip":   # (zstd keeps random data in raw blocks, without a checksum by default)
        cases.append((data[:100] + bytes(100) + data[200:], "corrupt|truncated|mismatch"))
    for bad, pattern in cases:
        p = tmp_path / f"l.tar.{how}"
        p.write_bytes(bad)
        result = run(f"tar:{p}", str(tmp_path / "o.img"))
        err = result.stderr.decode()
        assert result.returncode == 1 and err.count("\n") == 1, err
        assert str(p) in err and re.search(pattern, err), err


def test_manifest_digest_is_reported(img):
    tree = load_image_tree(f"oci:{img}:r")
    desc, _ = _manifest(img)
    assert tree.manifest_digest == desc["digest"]
    assert tree.config_digest == _manifest(img)[1]["config"]["digest"]
    assert hashlib.sha256(_blob(img, desc["digest"]).read_bytes()).hexdigest() == desc["digest"][7:]


def test_a_missing_or_non_directory_layout_is_named_with_the_reason(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    for path, reason in ((tmp_path / "missing", "No such file or directory"),
                         (tmp_path / "file", "not a directory")):
        proc = run(f"oci:{path}:latest", str(tmp_path / "out.img"))
        assert proc.returncode == 1 and proc.stdout == b""
        assert proc.stderr.decode() == f"mkcomposefs: {path}: {reason}\n"
        assert not (tmp_path / "out.img").exists()
