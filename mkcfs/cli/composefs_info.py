"""``composefs-info``: look inside composefs images (drop-in for composefs-info 1.0.8).

Usage::

    composefs-info [--basedir=PATH] [--filter=NAME]... {ls|dump|objects|missing-objects} IMAGE...
    composefs-info measure-file FILE...

* ``ls``: one line per entry below the root: the path (``/`` appended and a TAB for directories),
  ``TAB -> target`` for symlinks, ``TAB @ backing-path`` for files stored in the object store;
  hard links (second and later names of an inode) are printed as the bare path.
* ``dump``: the tree as composefs-dump(5) text; ``mkcomposefs --from-file`` reads it back.
* ``objects``: the sorted, de-duplicated backing paths of all images' external files.
* ``missing-objects``: the same, minus those present under ``--basedir`` (without
  ``--basedir``, paths are looked up relative to the directory open as standard input, as the C
  tool does).
* ``measure-file``: the fs-verity digest of each FILE: from the kernel when the file has fs-verity
  enabled, computed otherwise (an empty file digests as libcomposefs computes it).
* ``--filter=NAME`` (repeatable) keeps only the root entries called NAME.

Output is byte-identical to composefs-info 1.0.8, including the quirks of its reader (see
``mkcfs.inspect.unflatten``). A damaged or hostile image ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import BinaryIO, NoReturn
from collections.abc import Callable, Sequence

from mkcfs.sources.dumpfile import escape, escape_table, escape_with
from mkcfs.cli import common
from mkcfs.errors import CfsError

PROG = "composefs-info"
USAGE = (f"usage: {PROG} [--basedir=path] [ls|objects|dump|missing-objects|measure-file] "
         "IMAGES...\n")
_LONG_OPTIONS = ("basedir", "filter", "writer-order", "help")
#: options that take no argument (extensions of ours: 1.0.8 has none)
_FLAG_OPTIONS = ("writer-order", "help")
HELP = f"""\
usage: {PROG} [OPTIONS] {{ls|dump|objects|missing-objects}} IMAGE...
       {PROG} measure-file FILE...

  ls               every entry below the root: path (directories end in '/'), '-> TARGET' for
                   symlinks, '@ BACKING-PATH' for files whose data is in the object store
  dump             the tree as a composefs-dump(5) file (mkcomposefs --from-file reads it)
  objects          the backing paths of all the images' external files, sorted, each once
  missing-objects  the same, without those present under --basedir
  measure-file     the fs-verity digest of each FILE (the kernel's, else computed)

options:
  --basedir=PATH   the object store missing-objects looks in
  --filter=NAME    only the root entries called NAME (repeatable)
  --writer-order   hard-linked inodes where the writer numbered them (dump rebuilds the
                   identical image)
  --help           show this help

Output is byte-identical to composefs-info 1.0.8. See composefs-info(1).
"""



def _usage_exit(message: str | None) -> NoReturn:
    if message is not None:
        sys.stderr.write(message)
    sys.stderr.write(USAGE)
    raise common.ExitStatus(1)


def _getopt_error(message: str) -> NoReturn:
    """getopt_long's '?' case: the C tool prints ``Def`` on stdout, then the usage."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stdout.write("Def\n")
    sys.stdout.flush()
    _usage_exit(None)


def _parse_args(argv: list[str]) -> tuple[str | None, list[bytes], list[str], bool]:
    """getopt_long(argc, argv, "", {basedir, filter}) with GNU argument permutation, plus our
    ``--writer-order`` flag."""
    writer_order = False
    basedir: str | None = None
    filters: list[bytes] = []
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if arg.startswith("--"):
            body = arg[2:]
            name, eq, value = body.partition("=")
            matches = [o for o in _LONG_OPTIONS if o.startswith(name)] if name else []
            if name in _LONG_OPTIONS:
                matches = [name]
            if len(matches) != 1:
                if len(matches) > 1:
                    _getopt_error(f"option '--{name}' is ambiguous; possibilities: "
                                  + " ".join("'--" + m + "'" for m in matches))
                _getopt_error(f"unrecognized option '--{body}'")
            option = matches[0]
            if option in _FLAG_OPTIONS:
                if eq:
                    _getopt_error(f"option '--{option}' doesn't allow an argument")
                if option == "help":
                    sys.stdout.write(HELP)
                    raise common.ExitStatus(0)
                writer_order = True
                continue
            if not eq:
                if i >= len(argv):
                    _getopt_error(f"option '--{option}' requires an argument")
                value = argv[i]
                i += 1
            if option == "basedir":
                basedir = value
            else:
                if "/" in value:
                    common.fail(f"Filter must be a single name: {value}", 0)
                filters.append(os.fsencode(value))
        elif arg.startswith("-") and arg != "-":
            _getopt_error(f"invalid option -- '{arg[1]}'")
        else:
            positional.append(arg)
    return basedir, filters, positional, writer_order


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(PROG, "", _main, argv)


def _main(argv: list[str]) -> int:
    basedir, filters, args, writer_order = _parse_args(argv)
    if not args:
        _usage_exit("No command specified\n")
    command = args[0]
    paths = args[1:]
    if command == "measure-file":
        return _measure_files(paths)
    handlers: dict[str, Callable] = {"ls": _Ls, "dump": _Dump, "objects": _Objects,
                                     "missing-objects": _Objects}
    handler_cls = handlers.get(command)
    if handler_cls is None:
        common.fail(f"Unknown command '{command}'\n")
    basedir_fd = 0   # the C tool's global opt_basedir_fd starts at 0 (standard input)
    if basedir is not None:
        try:
            basedir_fd = os.open(basedir, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY
                                 | getattr(os, "O_PATH", 0))
        except OSError as exc:
            common.fail(f"Can't open basedir `{basedir}`\n", exc.errno)
    try:
        if not paths:
            _usage_exit("No image path specified\n")
        if command == "objects":
            handler = _Objects(None)
        elif command == "missing-objects":
            handler = _Objects(basedir_fd)
        else:
            handler = handler_cls()
        toplevel = filters if filters else None
        for path in paths:
            if command == "dump" and not writer_order:
                _dump_image(path, toplevel)
                continue
            root = _load(path, toplevel, "writer" if writer_order else "first")
            handler(root)
            del root
        handler.end()
    finally:
        if basedir is not None:
            os.close(basedir_fd)
    return 0


def _read_image(path: str) -> bytes:
    """The image file's bytes; errors end the program like the C tool."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        common.fail(f"Failed to open '{path}'", exc.errno or errno.EIO)


def _load(path: str, toplevel: list[bytes] | None, hardlinks: str = "first"):
    """The image's tree as libcomposefs loads it (``hardlinks="first"``: a hard-linked inode sits
    at the first name met depth first), or with every inode where the writer numbered it
    (``"writer"``, so that a dump rebuilds the identical image); errors end the program like the
    C tool."""
    return common.load_image_tree(path, _read_image(path), toplevel=toplevel,
                                  hardlinks=hardlinks)


def _dump_image(path: str, toplevel: list[bytes] | None) -> None:
    """``dump`` of one image: printed straight from its inodes (``dump_records``) when the
    image allows, else from the tree ``load_tree`` builds (which also names any problem).
    A large image is printed by two processes when a CPU is idle (:func:`_dump_in_two`).
    Like the C tool, nothing is printed unless the whole image could be read: the text waits
    in a :class:`_Spool`."""
    from erofs.errors import ImageFormatError
    from erofs.reader import Image

    from mkcfs import forksafe
    from mkcfs.inspect.unflatten import NeedsTree, SplitConflict, dump_records, split_pays
    from mkcfs.sources.dumpfile import dump_blocks, tree_records

    data = _read_image(path)
    spool = _Spool()
    second: BinaryIO | None = None
    try:
        image = Image(data)
        in_one = True
        if split_pays(image) and forksafe.processes_usable() and forksafe.spare_cpu():
            try:
                second = _dump_in_two(image, toplevel, spool)
                in_one = False
            except SplitConflict:
                spool.close()
                spool = _Spool()
        if in_one:
            for block in dump_blocks(dump_records(image, toplevel)):
                spool.write(block)
    except (NeedsTree, ImageFormatError):
        spool.close()
        if second is not None:
            second.close()
        root = common.load_image_tree(path, data, toplevel=toplevel)
        del data
        write = common.stdout().write
        for block in dump_blocks(tree_records(root)):
            write(block)
        return
    del data
    out = common.stdout()
    spool.copy_to(out)
    if second is not None:
        second.seek(0)
        while chunk := second.read(_SPOOL_CHUNK):
            out.write(chunk)
        second.close()


#: the share of the entries the parent prints: the child first reads the directories to find
#: the split (about an eighth of the work of printing them all)
_PARENT_SHARE = 0.56
#: bytes shared with the child for the split path it found
_BOARD_SIZE = 16384


def _dump_in_two(image, toplevel: list[bytes] | None, spool: _Spool) -> BinaryIO | None:
    """Print the dump of ``image`` into ``spool`` with the help of a forked child, which finds
    the path where the parent's share ends (``dump_split``) and, if the parent has not passed
    it yet, prints the records from there on into an unnamed temporary file, returned to be
    copied after the spool (None: the parent printed everything). Raises
    :class:`SplitConflict` when the parts do not join (a hard link across the split, the
    child failed): the caller prints the dump in one piece, which also names any problem.
    The image is read-only and shared by the fork, so only the split path (in a shared page),
    the child's text and a report of the inodes it met come back."""
    import mmap
    import tempfile
    from array import array

    from mkcfs import forksafe
    from mkcfs.inspect.unflatten import SplitConflict, dump_records, dump_split
    from mkcfs.sources.dumpfile import dump_blocks

    try:
        text = tempfile.TemporaryFile()
        report = tempfile.TemporaryFile()
    except OSError as exc:
        raise SplitConflict from exc
    #: byte 0: 1 once the child wrote the split path; bytes 1-4 its length (0: no split)
    board = mmap.mmap(-1, _BOARD_SIZE)
    answer_r, answer_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:    # the child: find the split, print from there on, report, leave
        status = 1
        try:
            os.close(answer_w)
            forksafe.die_with_parent(parent)   # a killed dump leaves no child printing on
            split = dump_split(image, toplevel, min_slots=0, share=_PARENT_SHARE)
            encoded = b"/".join(split) if split else b""
            if len(encoded) > _BOARD_SIZE - 5:
                encoded = b""
            board[5:5 + len(encoded)] = encoded
            board[1:5] = len(encoded).to_bytes(4, "little")
            board[0] = 1
            if encoded and os.read(answer_r, 1) == b"y":
                met = array("I")
                used: list[int] = []
                for block in dump_blocks(dump_records(image, toplevel, start=split, met=met,
                                                      budget_used=used)):
                    text.write(block)
                text.flush()
                report.write(array("Q", used).tobytes() + met.tobytes())
                report.flush()
            status = 0
        except BaseException:       # noqa: BLE001 (any failure: the parent prints it all)
            pass
        finally:
            os._exit(status)
    os.close(answer_r)
    accepted = reaped = False

    def offer(path: bytes) -> tuple[bytes, ...] | None:
        """The child's split path once it is known and still ahead of ``path``."""
        nonlocal accepted
        if not board[0]:
            return None
        length = int.from_bytes(board[1:5], "little")
        split = tuple(board[5:5 + length].split(b"/")) if length else ()
        if split and split > tuple(path[1:].split(b"/")):
            os.write(answer_w, b"y")
            accepted = True
            return split
        return ()

    def rest() -> tuple[array, int, int] | None:
        nonlocal reaped
        if not accepted:
            return None
        status = os.waitpid(pid, 0)[1]
        reaped = True
        if status != 0:
            raise SplitConflict
        report.seek(0)
        raw = report.read()
        used = array("Q", raw[:16])
        met = array("I")
        met.frombytes(raw[16:])
        return met, used[0], used[1]

    try:
        for block in dump_blocks(dump_records(image, toplevel, offer=offer, rest=rest)):
            spool.write(block)
    except BaseException:
        text.close()
        raise
    finally:
        os.close(answer_w)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        report.close()
        board.close()
    if not accepted:
        text.close()
        return None
    return text


#: dump text kept in memory; beyond this it waits in a temporary file
_SPOOL_MEMORY = 4 << 20
_SPOOL_CHUNK = 1 << 20


class _Spool:
    """Output held back until an image has been read to the end: in memory up to
    ``_SPOOL_MEMORY`` bytes, then in an unnamed temporary file, so that peak memory does not
    grow with the text (the page cache holds it). If no temporary file can be made, the text
    stays in memory; if one fails later (a full disk), that is the error reported."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self.size = 0
        self.file: BinaryIO | None = None
        self.in_memory = False      # no temporary file could be made

    def write(self, block: bytes) -> None:
        if self.file is not None:
            try:
                self.file.write(block)
            except OSError as exc:
                self.close()
                raise CfsError("cannot keep the dump in a temporary file: "
                               f"{exc.strerror or exc}") from None
            return
        self.blocks.append(block)
        self.size += len(block)
        if self.size > _SPOOL_MEMORY and not self.in_memory:
            import tempfile

            try:
                self.file = tempfile.TemporaryFile()
                for kept in self.blocks:
                    self.file.write(kept)
            except OSError:
                self.close()
                self.in_memory = True
            else:
                self.blocks.clear()

    def copy_to(self, out: common.FullWriter) -> None:
        for block in self.blocks:
            out.write(block)
        if self.file is not None:
            self.file.seek(0)
            while chunk := self.file.read(_SPOOL_CHUNK):
                out.write(chunk)
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# --- escaping as print_escaped() does ---------------------------------------------------------

_LS_PATH, _LS_PATH_SAFE = escape_table(space=True)


# --- handlers ---------------------------------------------------------------------------------

class _Ls:
    """``print_node``: every entry below the root, pre-order, children in name order.

    Paths are joined from the names on the stack for each line, so memory stays proportional
    to the depth (not to the sum of all ancestors' path lengths)."""

    def __call__(self, root) -> None:
        from mkcfs.tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Node

        out: list[bytes] = []
        write = common.stdout().write
        names: list[bytes] = [b""]
        stack = [iter(sorted((root.children or {}).items()))]
        join = b"/".join
        while stack:
            for name, entry in stack[-1]:
                names.append(name)
                line = escape_with(join(names), _LS_PATH, _LS_PATH_SAFE)
                if isinstance(entry, Node):
                    ftype = entry.mode & S_IFMT
                    if ftype == S_IFDIR:
                        line += b"/\t"
                    elif ftype == S_IFLNK:
                        line += b"\t-> " + escape(entry.payload or b"")
                    elif ftype == S_IFREG and entry.payload is not None:
                        line += b"\t@ " + escape(entry.payload)
                out.append(line + b"\n")
                if len(out) >= 4096:
                    write(b"".join(out))
                    out.clear()
                if isinstance(entry, Node) and entry.children:
                    stack.append(iter(sorted(entry.children.items())))
                    break
                names.pop()
            else:
                stack.pop()
                names.pop()
        write(b"".join(out))

    def end(self) -> None:
        sys.stdout.buffer.flush()


class _Dump:
    """``dump_node``: the composefs-dump(5) text of the tree."""

    def __call__(self, root) -> None:
        from mkcfs.sources.dumpfile import write_dumpfile

        write_dumpfile(root, common.stdout())

    def end(self) -> None:
        sys.stdout.buffer.flush()


class _Objects:
    """``get_objects``: backing paths of regular files, de-duplicated over all images, printed
    sorted at the end. With a directory fd, only the paths not found under it."""

    def __init__(self, basedir_fd: int | None) -> None:
        self.basedir_fd = basedir_fd
        self.paths: set[bytes] = set()

    def __call__(self, root) -> None:
        from mkcfs.inspect.objects import tree_objects

        self.paths.update(ref.path for ref in tree_objects(root))

    def end(self) -> None:
        from mkcfs.inspect.objects import missing_objects

        paths = (sorted(self.paths) if self.basedir_fd is None
                 else missing_objects(self.paths, [self.basedir_fd]))
        common.write_stdout(b"".join(p + b"\n" for p in paths))


# --- measure-file -----------------------------------------------------------------------------

def _measure_files(paths: list[str]) -> int:
    from fsverity.kernel import fd_digest

    if not paths:
        _usage_exit("No files specified\n")
    out = common.stdout()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            common.fail(f"Failed to open '{path}'", exc.errno or errno.EIO)
        try:
            digest = fd_digest(fd)
        except OSError as exc:
            out.flush()
            sys.stderr.write(f"failed to measure '{path}': "
                             f"{os.strerror(exc.errno or errno.EIO)}")
            raise common.ExitStatus(1) from None
        finally:
            os.close(fd)
        out.write(digest.hex().encode() + b"\n")
    out.flush()
    return 0


def console() -> NoReturn:
    """The installed command (and ``python -m``): ``main()``, then a fast exit on success."""
    common.console(PROG, main)


if __name__ == "__main__":  # pragma: no cover
    console()
