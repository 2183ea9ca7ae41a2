"""``mkcomposefs --stats[=json]``: the counts against the tree built, new objects against a
store filled twice, stdout untouched (``-`` still carries exactly the image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def mkcomposefs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkcfs.cli.mkcomposefs", *args], env=ENV,
                          capture_output=True, timeout=120)


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    (s / "d" / "e").mkdir(parents=True)
    (s / "a").write_bytes(b"A" * 1000)
    (s / "d" / "same-as-a").write_bytes(b"A" * 1000)     # shares a's object
    (s / "d" / "e" / "b").write_bytes(b"B" * 5000)
    (s / "inline").write_bytes(b"tiny")
    (s / "empty").write_bytes(b"")
    os.symlink("a", s / "link")
    os.mkfifo(s / "fifo")
    return s


def test_stats_json_counts_and_new_objects(src, tmp_path):
    store = tmp_path / "store"
    first = mkcomposefs("--stats=json", f"--digest-store={store}", str(src), str(tmp_path / "i1"))
    assert first.returncode == 0 and first.stdout == b"", first.stderr
    stats = json.loads(first.stderr)
    assert stats["entries"] == 10
    assert stats["types"] == {"directories": 3, "files": 5, "symlinks": 1, "char_devices": 0,
                              "block_devices": 0, "fifos": 1, "sockets": 0}
    assert (stats["inline_files"], stats["empty_files"], stats["external_files"]) == (1, 1, 3)
    assert (stats["external_bytes"], stats["distinct_objects"], stats["distinct_bytes"]) == (
        7000, 2, 6000)
    assert (stats["new_objects"], stats["new_bytes"], stats["deduplicated_bytes"]) == (2, 6000, 1000)
    assert stats["image_bytes"] == (tmp_path / "i1").stat().st_size
    assert stats["format_version"] == 0 and stats["seconds"] >= 0

    (src / "c").write_bytes(b"C" * 3000)
    second = json.loads(mkcomposefs("--stats=json", f"--digest-store={store}", str(src),
                                    str(tmp_path / "i2")).stderr)
    assert (second["new_objects"], second["new_bytes"]) == (1, 3000)
    assert second["deduplicated_bytes"] == 7000   # a twice, b already stored


def test_stats_text_on_stderr_and_image_on_stdout(src, tmp_path):
    plain = mkcomposefs(str(src), "-")
    with_stats = mkcomposefs("--stats", "--print-digest", str(src), "-")
    digest = mkcomposefs("--print-digest-only", str(src)).stdout
    assert with_stats.returncode == 0
    assert with_stats.stdout == plain.stdout + digest
    lines = with_stats.stderr.decode().splitlines()
    assert lines[0] == "mkcomposefs: 10 entries: 3 directories, 5 files, 1 symlinks, 1 fifos"
    assert lines[1].startswith("mkcomposefs: files: 1 inline, 3 external (7,000 bytes), 1 empty; "
                               "2 distinct objects (6,000 bytes)")
    assert lines[2] == "mkcomposefs: 1,000 bytes deduplicated (files sharing an object)"
    assert lines[3].startswith(f"mkcomposefs: image: {len(plain.stdout):,} bytes, format version 0, ")


def test_stats_off_by_default_and_bad_format(src, tmp_path):
    assert mkcomposefs(str(src), str(tmp_path / "img")).stderr == b""
    bad = mkcomposefs("--stats=yaml", str(src), str(tmp_path / "img"))
    assert bad.returncode == 1
    assert bad.stderr.decode().splitlines() == [
        "mkcomposefs: Invalid --stats format 'yaml' (--stats or --stats=json)"]
