"""A large dumpfile parsed with a helper process (mkcfs.sources.split_parse) gives the tree, or
the error, that parsing it in one process gives: same entries, same message, same line.

The tests make every dumpfile "large" (SPLIT_MIN 0), small blocks so the helper sends many,
and the CPU check true, so the helper runs whatever the machine's load; a spy checks that it
did. The reference is the same text parsed from bytes (never split).
"""

from __future__ import annotations

import errno
import os

import pytest

from mkcfs import forksafe
from mkcfs.errors import DumpfileError
from mkcfs.sources import split_parse
from mkcfs.sources.dumpfile import format_dumpfile, parse_dumpfile

DIGEST = "ab" * 32


@pytest.fixture(autouse=True)
def split_everything(monkeypatch):
    monkeypatch.setattr(split_parse, "SPLIT_MIN", 0)
    monkeypatch.setattr(split_parse, "_BLOCK", 2048)
    monkeypatch.setattr(forksafe, "spare_cpu", lambda: True)


@pytest.fixture
def helpers(monkeypatch):
    """The helpers started, with the blocks each sent."""
    started: list[list[int]] = []
    real_start = split_parse.HelperParse.start.__func__   # type: ignore[attr-defined]
    real_blocks = split_parse.HelperParse.blocks

    def start(cls, *args, **kwargs):
        helper = real_start(cls, *args, **kwargs)
        if helper is not None:
            started.append([])
        return helper

    def blocks(self):
        for rows, lines in real_blocks(self):
            started[-1].append(lines)
            yield rows, lines

    monkeypatch.setattr(split_parse.HelperParse, "start", classmethod(start))
    monkeypatch.setattr(split_parse.HelperParse, "blocks", blocks)
    return started


def dumpfile(lines: int = 3000) -> list[str]:
    out = ["/ 4096 40755 2 0 0 0 1700000000.0 - - - user.root=1"]
    for d in range(lines // 30):
        out.append(f"/d{d:03d} 4096 40755 2 {d} 0 0 1700000000.{d} - - - security.selinux=x\\x00")
        for f in range(28):
            if f == 0:
                out.append(f"/d{d:03d}/link 5 120777 1 0 0 0 0.0 ../d0 - -")
            elif f == 1 and d:   # a hard link to a file in the first directory
                out.append(f"/d{d:03d}/hard 100 @100644 2 0 0 0 0.0 /d000/f{d % 20 + 2:02d} - -")
            elif f % 7 == 0:
                out.append(f"/d{d:03d}/f{f:02d} 4 100644 1 0 0 0 0.0 - h\\x20i\\n -")
            else:
                out.append(f"/d{d:03d}/f{f:02d} {100 + f} 100644 1 {f} {d} 0 {d}.{f} "
                           f"ab/{DIGEST[2:]} - {DIGEST}" + (" user.k=v user.x=y" if f % 5 == 0
                                                          else ""))
    return out


def parse_both(tmp_path, text: bytes, strict: bool = False):
    """``(result in one process, result with the helper)``: a tree's dump, or the error."""
    path = tmp_path / "in.dump"
    path.write_bytes(text)

    def result(parse):
        try:
            return format_dumpfile(parse())
        except DumpfileError as exc:
            return (str(exc), exc.line)

    alone = result(lambda: parse_dumpfile(text, strict=strict, source="in.dump"))
    with open(path, "rb") as stream:
        helped = result(lambda: parse_dumpfile(stream, strict=strict, source="in.dump"))
        if isinstance(helped, bytes):   # read to the end, as a parse in one process reads it
            assert stream.read() == b""
    return alone, helped


def no_child_left() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_same_tree_with_the_helper(tmp_path, helpers):
    text = ("\n".join(dumpfile()) + "\n").encode()
    alone, helped = parse_both(tmp_path, text)
    assert isinstance(alone, bytes) and helped == alone
    assert len(helpers) == 1 and len(helpers[0]) > 10    # the helper sent many blocks
    no_child_left()


BAD_LINES = {
    "size": "/d070/bad x 100644 1 0 0 0 0.0 - - -",
    "digest": "/d070/bad 100 100644 1 0 0 0 0.0 ab/cd - abc",
    "missing parent": "/nowhere/bad 0 100644 1 0 0 0 0.0 - - -",
    "duplicate": "/d070/f03 0 100644 1 0 0 0 0.0 - - -",
    "mode": "/d070/bad 0 1x0644 1 0 0 0 0.0 - - -",
    "escape": "/d070/b\\q 0 100644 1 0 0 0 0.0 - - -",
    "xattr": "/d070/bad 0 100644 1 0 0 0 0.0 - - - novalue",
    "hard link to nothing": "/d070/bad 0 @100644 1 0 0 0 0.0 /d070/none - -",
    "hardlinked directory": "/d070/bad 0 @40755 1 0 0 0 0.0 /d000 - -",
    "content size": "/d070/bad 3 100644 1 0 0 0 0.0 - ab -",
    "NUL": "/d070/bad 0 100644 1 0 0 0 0.0 - - -\0",
}


@pytest.mark.parametrize("where", ["helper", "ours"])
@pytest.mark.parametrize("bad", sorted(BAD_LINES))
def test_same_error_with_the_helper(tmp_path, helpers, bad, where):
    lines = dumpfile()
    at = len(lines) * (8 if where == "helper" else 1) // 10
    if where == "ours":
        lines.insert(at, BAD_LINES[bad].replace("/d070", "/d002"))
    else:
        lines.insert(at, BAD_LINES[bad])
    alone, helped = parse_both(tmp_path, ("\n".join(lines) + "\n").encode())
    assert isinstance(alone, tuple), alone
    assert helped == alone
    assert helpers
    no_child_left()


@pytest.mark.parametrize("strict", [False, True])
def test_last_line_without_newline(tmp_path, helpers, strict):
    text = "\n".join(dumpfile()).encode()
    alone, helped = parse_both(tmp_path, text, strict=strict)
    assert helped == alone
    assert isinstance(alone, tuple) == strict   # "Missing trailing newline" only in strict mode
    assert helpers


def test_helper_that_dies_leaves_the_rest_to_this_process(tmp_path, helpers, monkeypatch):
    real_helper = split_parse._helper
    calls = {"rows": 0}

    def dying_helper(fd, start, make_rows, memfd, messages):
        def rows_then_die(lines):
            calls["rows"] += 1
            if calls["rows"] > 3:
                os._exit(7)
            return make_rows(lines)
        real_helper(fd, start, rows_then_die, memfd, messages)

    monkeypatch.setattr(split_parse, "_helper", dying_helper)
    text = ("\n".join(dumpfile()) + "\n").encode()
    alone, helped = parse_both(tmp_path, text)
    assert isinstance(alone, bytes) and helped == alone
    assert len(helpers[0]) == 3   # three blocks from the helper, the rest parsed here
    no_child_left()


def test_no_helper_for_a_pipe_or_a_small_file(tmp_path, helpers, monkeypatch):
    text = ("\n".join(dumpfile(300)) + "\n").encode()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, text)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        assert format_dumpfile(parse_dumpfile(stream)) == format_dumpfile(parse_dumpfile(text))
    os.waitpid(pid, 0)
    monkeypatch.setattr(split_parse, "SPLIT_MIN", len(text) + 1)
    (tmp_path / "small.dump").write_bytes(text)
    with open(tmp_path / "small.dump", "rb") as stream:
        parse_dumpfile(stream)
    assert helpers == []


def test_read_error_in_our_part_is_the_files_error(tmp_path, helpers):
    """An error reading the text is the file's OSError, helper or not, and stops the helper."""
    text = ("\n".join(dumpfile()) + "\n").encode()
    path = tmp_path / "in.dump"
    path.write_bytes(text)

    class Failing:
        def __init__(self, stream):
            self.stream, self.reads = stream, 0

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def read(self, size=-1):
            self.reads += 1
            if self.reads >= 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return self.stream.read(size)

    with open(path, "rb") as stream, pytest.raises(OSError, match=os.strerror(errno.EIO)):
        parse_dumpfile(Failing(stream))   # type: ignore[arg-type]
    assert helpers
    no_child_left()


def test_rows_read_are_freed_from_the_memory_file(tmp_path, monkeypatch):
    """The memory file holds only the rows the helper is ahead by: each block read is freed."""
    allocated: list[int] = []
    real_blocks = split_parse.HelperParse.blocks

    def blocks(self):
        for block in real_blocks(self):
            yield block
            allocated.append(os.fstat(self._memfd).st_blocks)
    monkeypatch.setattr(split_parse.HelperParse, "blocks", blocks)
    text = ("\n".join(dumpfile()) + "\n").encode()
    alone, helped = parse_both(tmp_path, text)
    assert helped == alone
    assert len(allocated) > 10 and allocated[-1] * 512 <= 4096   # at most the last page
