"""Parse the later part of a large dumpfile in a forked helper process.

A dumpfile's lines are parsed one by one (``mkcfs.sources.dumpfile``), but only placing each
entry in the tree needs the lines before it: reading a line's fields does not. For a large
dumpfile in a regular file, with a CPU to spare, ``HelperParse.start`` forks a helper that
turns the lines after a split point into rows (the caller's ``make_rows``: fields parsed and
checked, ``marshal``-able) while this process parses the lines before it; this process then
takes the helper's rows in order and only places them (about 40% of the work of a line).

The helper writes each block of rows to an anonymous memory file (``memfd``; no disk, no
pipe to fill while nobody reads it) and announces it on a pipe; this process frees each block
of the file once it has read it (``FALLOC_FL_PUNCH_HOLE``), so the file holds only the rows
the helper is ahead by. It handles only plain text:
at a NUL byte, at a last line without a newline, or if it fails or dies, it stops, and the
caller parses the rest itself from where the helper's last block ended
(``resume_offset``), so every error is found and reported exactly as without a helper.
"""

from __future__ import annotations

import marshal
import os
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from mkcfs.fsutil import write_fd

__all__ = ["HelperParse", "SPLIT_MIN"]

#: dumpfiles smaller than this (bytes left to read) are parsed in one process (measured
#: parses of parts of a real dump: 1.5 MB 19 ms alone, 26 ms with a helper; 3.2 MB 39 ms both
#: ways; 6.4 MB 76 against 62 ms; 12 MB 152 against 109 ms)
SPLIT_MIN = 4 << 20
#: the share of the text this process parses itself: it also places every row, the helper's
#: too, so the helper takes the larger part (measured on a 2M-line dump: 0.2 parsed it in
#: 2.86 s, 0.1 in 3.2 s, 0.3 in 3.1 s, one process in 4.5 s)
PARENT_SHARE = 0.2
#: the helper reads and parses this many bytes of text at a time
_BLOCK = 1 << 20
#: messages on the pipe: kind, and three numbers
_MESSAGE = struct.Struct("<QQQQ")
_ROWS, _STOP, _END = 1, 2, 3


class _Head:
    """The stream up to ``limit`` bytes from where it stands: the part this process parses."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        data = self._stream.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data


class HelperParse:
    """A helper process parsing the text of ``stream`` from ``split`` on (see the module
    docstring). Read ``head()`` first, then ``blocks()``; then, if ``resume_offset`` is not
    None, parse the stream from there on yourself. ``close()`` in any case."""

    def __init__(self, stream: BinaryIO, split: int, pid: int, messages: BinaryIO,
                 memfd: int) -> None:
        self._stream = stream
        self._split = split
        self._pid: int | None = pid
        self._messages = messages
        self._memfd = memfd
        #: where the text the helper did not turn into rows starts (None: it did it all)
        self.resume_offset: int | None = split

    @classmethod
    def start(cls, stream: BinaryIO, make_rows: Callable[[list[bytes]], list]
              ) -> HelperParse | None:
        """A helper for ``stream`` when that pays: a regular file with at least ``SPLIT_MIN``
        bytes left, this process alone in running threads, and a CPU idle now; else None."""
        from mkcfs import forksafe

        try:
            fd = stream.fileno()
            here = stream.tell()
            st = os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            return None
        import stat
        if not stat.S_ISREG(st.st_mode) or st.st_size - here < SPLIT_MIN:
            return None
        if not (forksafe.processes_usable() and forksafe.spare_cpu()):
            return None
        # the split: the start of the first line after the parent's share
        guess = here + int((st.st_size - here) * PARENT_SHARE)
        try:
            window = os.pread(fd, 1 << 16, guess)
        except OSError:
            return None
        newline = window.find(b"\n")
        if newline < 0:
            return None
        split = guess + newline + 1
        try:
            memfd = os.memfd_create("mkcfs-dumpfile-rows", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None
        read_end, write_end = os.pipe()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for end in (memfd, read_end, write_end):
                os.close(end)
            return None
        if pid == 0:   # the helper
            status = 1
            try:
                os.close(read_end)
                forksafe.die_with_parent(parent)
                _helper(fd, split, make_rows, memfd, write_end)
                status = 0
            except BaseException:   # noqa: BLE001 (the parent parses the rest itself)
                pass
            finally:
                os._exit(status)
        os.close(write_end)
        return cls(stream, split - here, pid, os.fdopen(read_end, "rb"), memfd)

    def head(self) -> _Head:
        """The text before the split (whole lines), to parse in this process."""
        return _Head(self._stream, self._split)

    def blocks(self) -> Iterator[tuple[list, int]]:
        """The helper's blocks of rows, in order, with their number of lines; it ends early
        when the helper stopped (``resume_offset`` then says where the rest starts)."""
        read = self._messages.read
        at = 0   # in the memory file
        punch = _hole_puncher()
        while True:
            message = read(_MESSAGE.size)
            if len(message) != _MESSAGE.size:   # the helper failed or died
                return
            kind, size, lines, resume = _MESSAGE.unpack(message)
            if kind == _END:
                self.resume_offset = None
                return
            if kind != _ROWS:
                return
            data = _pread_exactly(self._memfd, size, at)
            if punch is not None:
                punch(self._memfd, _PUNCH_HOLE, 0, at + size)   # (whole pages only)
            at += size
            rows = marshal.loads(data)
            del data
            self.resume_offset = resume
            yield rows, lines

    def close(self) -> None:
        """Stop the helper if it still runs, and free what it used."""
        pid, self._pid = self._pid, None
        if pid is None:
            return
        try:
            os.kill(pid, 9)
        except OSError:
            pass
        os.waitpid(pid, 0)
        self._messages.close()
        os.close(self._memfd)


#: fallocate's FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE: free a range of a file
_PUNCH_HOLE = 3


def _hole_puncher() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate(fd, mode, offset, length)``, or None where there is none."""
    try:
        import ctypes
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):   # pragma: no cover - not Linux
        return None
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate.restype = ctypes.c_int
    return fallocate   # type: ignore[no-any-return]


def _pread_exactly(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size:
        data = os.pread(fd, min(size, 1 << 30), offset)
        if not data:
            raise OSError("the helper's rows are cut short")
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


def _helper(fd: int, start: int, make_rows: Callable[[list[bytes]], list], memfd: int,
            messages: int) -> None:
    """In the helper: turn the text of ``fd`` from ``start`` on into rows, block by block."""
    def send(kind: int, size: int = 0, lines: int = 0, resume: int = 0) -> None:
        message = _MESSAGE.pack(kind, size, lines, resume)
        while message:
            message = message[os.write(messages, message):]

    at = start    # the file offset of the first line not turned into rows yet
    carry = b""   # the text read after ``at`` that does not end with a newline yet
    while True:
        chunk = os.pread(fd, _BLOCK, at + len(carry))
        if not chunk:
            break
        text = carry + chunk if carry else chunk
        end = text.rfind(b"\n")
        if end < 0:
            carry = text
            continue
        carry = text[end + 1:]
        if text.find(b"\0", 0, end) >= 0:   # the parent reports it, at its line
            send(_STOP, resume=at)
            return
        lines = text[:end].split(b"\n")
        data = marshal.dumps(make_rows(lines))
        write_fd(memfd, data)
        send(_ROWS, len(data), len(lines), at + end + 1)
        at += end + 1
    send(_STOP if carry else _END, resume=at)
