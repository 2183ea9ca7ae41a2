"""``mkcfs diff``: one test per field (trees that differ in exactly that field), equal trees,
added/removed subtrees, the summary line, and an image against the directory it was built
from (equal) and against that directory changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mkcfs.cli import mkcfs as group
from mkcfs.cli import mkcomposefs
from mkcfs.inspect.diff import FIELDS, diff_trees, summary
from mkcfs.sources.dumpfile import parse_dumpfile

DIGEST = "ab" + "cd" * 31
BASE = f"""\
/ 0 40755 3 0 0 0 1000.0 - - -
/dev 0 20644 1 0 0 259 1000.0 - - -
/file 100 100644 1 0 0 0 1000.0 ab/{DIGEST[2:]} - {DIGEST}
/h1 5 100644 2 0 0 0 1000.0 - world -
/h2 5 @100644 2 0 0 0 1000.0 /h1 - -
/inline 5 100644 1 0 0 0 1000.0 - hello -
/link 3 120777 1 0 0 0 1000.0 big - -
/sub 0 40755 2 0 0 0 1000.0 - - -
/sub/x 5 100644 1 0 0 0 1000.0 - hello - user.a=1
"""

#: field -> (line of BASE, the same line differing in that field only), changed paths
ONE_FIELD = {
    "type": ("/dev 0 20644", "/dev 0 60644", ["/dev"]),
    "mode": ("/inline 5 100644", "/inline 5 100600", ["/inline"]),
    "owner": ("/link 3 120777 1 0 0", "/link 3 120777 1 7 0", ["/link"]),
    "size": ("/file 100 100644", "/file 101 100644", ["/file"]),
    "mtime": ("/sub/x 5 100644 1 0 0 0 1000.0", "/sub/x 5 100644 1 0 0 0 1000.5", ["/sub/x"]),
    "digest": (f"- {DIGEST}", f"- {'ee' * 32}", ["/file"]),
    "payload": (f"ab/{DIGEST[2:]} -", f"ab/{'ff' * 31} -", ["/file"]),
    "inline": ("- hello -\n/link", "- hellp -\n/link", ["/inline"]),
    "target": (" big - -", " bag - -", ["/link"]),
    "rdev": ("0 0 259", "0 0 260", ["/dev"]),
    "xattr:user.a": ("user.a=1", "user.a=2", ["/sub/x"]),
    "hardlinks": ("/h2 5 @100644 2 0 0 0 1000.0 /h1 - -", "/h2 5 100644 1 0 0 0 1000.0 - world -",
                  ["/h1", "/h2"]),
}


def test_every_field_has_a_test():
    assert {f.partition(":")[0] for f in ONE_FIELD} == set(FIELDS)


def dumps(tmp_path: Path, a: str, b: str) -> tuple[str, str]:
    (tmp_path / "a.dump").write_text(a)
    (tmp_path / "b.dump").write_text(b)
    return str(tmp_path / "a.dump"), str(tmp_path / "b.dump")


def mkcfs_diff(*args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = group.main(["diff", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("field", sorted(ONE_FIELD))
def test_one_field_differs(field, tmp_path, capsys):
    old, new, paths = ONE_FIELD[field]
    assert BASE.count(old) == 1
    a, b = dumps(tmp_path, BASE, BASE.replace(old, new))
    status, out, _ = mkcfs_diff("--json", a, b, capsys=capsys)
    report = json.loads(out)
    assert status == 1 and not report["added"] and not report["removed"]
    assert [c["path"] for c in report["changed"]] == paths
    for change in report["changed"]:
        assert list(change["fields"]) == [field]
        assert change["fields"][field]["a"] != change["fields"][field]["b"]
    # the same field ignored: equal
    status, _, err = mkcfs_diff("--ignore", field.partition(":")[0], a, b, capsys=capsys)
    assert status == 0 and err == "mkcfs diff: equal\n"


def test_equal_trees_and_text_output(tmp_path, capsys):
    a, b = dumps(tmp_path, BASE, BASE)
    assert mkcfs_diff(a, b, capsys=capsys) == (0, "", "mkcfs diff: equal\n")
    changed = BASE.replace("/sub/x 5 100644", "/sub/x 5 100755").replace("user.a=1", "user.b=1")
    a, b = dumps(tmp_path, BASE, changed)
    status, out, err = mkcfs_diff(a, b, capsys=capsys)
    assert status == 1
    assert out == "changed /sub/x: mode 0644 -> 0755; xattr:user.a 1 -> -; xattr:user.b - -> 1\n"
    assert err == "mkcfs diff: 1 changed (1 in mode, xattrs)\n"


def test_added_and_removed_subtrees(tmp_path, capsys):
    grown = BASE + "/sub/y 0 40755 2 0 0 0 1000.0 - - -\n/sub/y/z 0 100644 1 0 0 0 1000.0 - - -\n"
    shrunk = BASE.replace("/link 3 120777 1 0 0 0 1000.0 big - -\n", "")
    a, b = dumps(tmp_path, shrunk, grown)
    status, out, err = mkcfs_diff(a, b, capsys=capsys)
    assert status == 1
    assert out == "added /link (symlink)\nadded /sub/y (directory, 2 entries)\n"
    assert err == "mkcfs diff: 3 added\n"
    status, out, _ = mkcfs_diff(b, a, capsys=capsys)
    assert out == "removed /link (symlink)\nremoved /sub/y (directory, 2 entries)\n"


def test_summary_groups_patterns():
    lines = [BASE.splitlines()[0]] + [f"/f{i} 1 100644 1 0 0 0 1000.0 - x -" for i in range(5)]
    later = [lines[0]] + [f"/f{i} 1 100644 1 0 0 0 {2000 if i < 3 else 1000}.0 - {'y' if i >= 2 else 'x'} -"
                          for i in range(5)]
    diff = diff_trees(parse_dumpfile("\n".join(lines).encode() + b"\n"),
                      parse_dumpfile("\n".join(later).encode() + b"\n"))
    assert summary(diff) == ("5 changed (2 differ only in inline; 2 differ only in mtime; "
                             "1 in mtime, inline)")


def test_errors_are_status_2(tmp_path, capsys):
    status, out, err = mkcfs_diff(str(tmp_path / "missing"), str(tmp_path), capsys=capsys)
    assert (status, out) == (2, "") and err == f"mkcfs diff: {tmp_path / 'missing'}: No such file or directory\n"
    (tmp_path / "bad.dump").write_text("/ garbage\n")
    status, _, err = mkcfs_diff(str(tmp_path / "bad.dump"), str(tmp_path), capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and "bad.dump:1" in err
    assert mkcfs_diff("--ignore", "colour", str(tmp_path), str(tmp_path), capsys=capsys)[0] == 2


def make_dir(root: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "big").write_bytes(os.urandom(10_000))
    (root / "small").write_bytes(b"tiny\n")
    (root / "empty").write_bytes(b"")
    (root / "sub" / "deep" / "f").write_bytes(b"f" * 300)
    os.symlink("../big", root / "sub" / "link")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "small", "user.note", b"v")
    if os.geteuid() == 0:   # escaped on write, shown as the tree had it on read
        os.setxattr(root / "sub", "trusted.overlay.opaque", b"y")
        os.mknod(root / "null", 0o20644, os.makedev(1, 3))


@pytest.mark.parametrize("options", [[], ["--use-epoch", "--hardlinks"], ["--skip-xattrs"],
                                     ["--user-xattrs", "--skip-devices"]])
def test_image_against_the_directory_it_was_built_from(options, tmp_path, capsys):
    src = tmp_path / "src"
    make_dir(src)
    os.link(src / "small", src / "sub" / "small-link")
    assert mkcomposefs.main([*options, str(src), str(tmp_path / "image")]) == 0
    assert mkcfs_diff(*options, str(tmp_path / "image"), str(src), capsys=capsys)[0] == 0

    (src / "sub" / "deep" / "f").write_bytes(b"g" * 300)   # same size, new content
    os.unlink(src / "fifo")
    status, out, _ = mkcfs_diff(*options, "--ignore", "mtime", str(tmp_path / "image"), str(src),
                                capsys=capsys)
    assert status == 1
    assert out == ("removed /fifo (fifo)\nchanged /sub/deep/f: digest "
                   + out.split("digest ")[1].split("\n")[0] + "\n")
    assert "; payload " in out


def test_image_against_dumpfile_and_directory_hardlink_grouping(tmp_path, capsys):
    src = tmp_path / "src"
    make_dir(src)
    os.link(src / "small", src / "sub" / "small-link")
    assert mkcomposefs.main(["--hardlinks", str(src), str(tmp_path / "linked")]) == 0
    status, out, _ = mkcfs_diff(str(tmp_path / "linked"), str(src), capsys=capsys)
    assert status == 1
    assert out == ("changed /small: hardlinks /sub/small-link -> -\n"
                   "changed /sub/small-link: hardlinks /small -> -\n")
    capsys.readouterr()
    from mkcfs.cli import composefs_info

    assert composefs_info.main(["dump", str(tmp_path / "linked")]) == 0
    (tmp_path / "linked.dump").write_text(capsys.readouterr().out)
    assert mkcfs_diff(str(tmp_path / "linked.dump"), str(tmp_path / "linked"), capsys=capsys)[0] == 0
