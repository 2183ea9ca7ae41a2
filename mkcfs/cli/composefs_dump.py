"""``composefs-dump SRC DST``: read a composefs image and write it again (composefs 1.0.8's tool).

The image is loaded (overlay xattrs, whiteouts and hard links mapped back to the tree, as
``composefs-info`` sees it) and written again with the format version recorded in its header.
For every image mkcomposefs writes, DST is byte-identical to SRC.

Difference from the C tool: composefs-dump 1.0.8 keeps a hard-linked inode at its first name in
depth-first order, so when mkcomposefs had placed it under another name (its first name in
breadth-first order) the rewritten image numbers inodes differently (84 of the 133 conformance
images change that way). This tool puts every inode back where the writer had it
(``load_tree(..., hardlinks="writer")``), so DST equals SRC.

Exit status 0 on success, 1 on any error, with one line on stderr.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import NoReturn
from collections.abc import Sequence

from mkcfs.errors import CfsError
from mkcfs.cli import common

PROG = "composefs-dump"
USAGE = f"usage: {PROG} SRC DEST\n"


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(PROG, "", _main, argv)


HELP = f"""\
{USAGE}
Read the composefs image SRC and write it again as DEST, with the format version recorded in
SRC's header and every hard-linked inode where the writer numbered it: for every image
mkcomposefs writes, DEST is byte-identical to SRC. DEST is written to a temporary file and
renamed into place. See composefs-dump(1).
"""


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--help"]:
        sys.stdout.write(HELP)
        return 0
    if not argv:
        sys.stderr.write("No source path specified\n" + USAGE)
        raise common.ExitStatus(1)
    src = argv[0]
    if len(argv) < 2:
        sys.stderr.write("No destination path specified\n" + USAGE)
        raise common.ExitStatus(1)
    dst = argv[1]

    from erofs.errors import ImageFormatError
    from erofs.reader import read_header

    from mkcfs.build.image import build_image

    try:
        with open(src, "rb") as f:
            data = f.read()
    except OSError as exc:
        common.fail(f"Failed to open '{src}'", exc.errno or errno.EIO)
    # lcfs_version_from_fd: the 32-byte header must carry the composefs magic and version 1
    try:
        version = read_header(data).composefs_version
    except ImageFormatError:
        common.fail(f"Failed to get image version '{src}'", errno.EINVAL)
    if version >= 1 << 31:          # a negative int in the C tool
        common.fail(f"Failed to get image version '{src}'", errno.EINVAL)
    root = common.load_image_tree(src, data, hardlinks="writer")
    del data
    try:
        image = build_image(root, min_version=version, max_version=version)
    except CfsError as exc:
        common.fail(str(exc))
    except MemoryError:
        raise
    except Exception as exc:  # pragma: no cover - a writer bug on an odd tree
        common.fail(f"cannot write file: internal error (please report): {type(exc).__name__}: {exc}")
    _write(dst, image.data)
    return 0


def _write(path: str, data: bytes | bytearray) -> None:
    """Write the image to ``path``: through a temporary file and a rename for regular files
    (never a partial image), directly for anything else (``/dev/stdout``, a pipe)."""
    from mkcfs.fsutil import write_atomically

    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            common.fail(f"failed to open '{path}'", errno.ENOENT)
    except OSError as exc:
        common.fail(f"failed to open '{path}'", exc.errno or errno.EIO)
    try:
        if st is None or stat.S_ISREG(st.st_mode):
            write_atomically(os.path.realpath(path), data)
        else:
            with open(path, "wb") as f:
                common.write_all(f, data)
    except IsADirectoryError as exc:
        common.fail(f"failed to open '{path}'", exc.errno)
    except OSError as exc:
        common.fail("cannot write file", exc.errno or errno.EIO)


def console() -> NoReturn:
    """The installed command (and ``python -m``): ``main()``, then a fast exit on success."""
    common.console(PROG, main)


if __name__ == "__main__":  # pragma: no cover
    console()
