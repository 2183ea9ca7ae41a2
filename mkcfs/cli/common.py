"""What every command-line front end shares: GNU-style long option parsing, reading input,
the single place where errors become one line on stderr and an exit status, and the end of an
installed command's process (``console``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import os
import select
import signal
import sys
from typing import BinaryIO, NoReturn
from collections.abc import Callable, Sequence

from erofs.errors import ImageFormatError, InternalError

from mkcfs.errors import CfsError
from mkcfs.forksafe import only_thread
from mkcfs.fsutil import WRITE_CHUNK
from mkcfs.gcpause import gc_paused


class ExitStatus(Exception):
    """Leave with this status; whatever had to be said was already written."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class UsageError(CfsError):
    """A bad command line; ``usage`` asks for the usage text after the message."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def parse_long_options(argv: Sequence[str], options: dict[str, bool | None],
                       repeated: dict[str, list[str]] | None = None
                       ) -> tuple[dict[str, str], list[str]]:
    """Parse ``--name``, ``--name=value`` and ``--name value`` like ``getopt_long``.

    ``options`` maps each name to whether it takes a value: True (required), False (none) or
    None (optional: only as ``--name=value``, like getopt's ``optional_argument``).

    Unique abbreviations are accepted; options may follow positional arguments; ``--`` ends
    option parsing; a lone ``-`` is a positional argument. Returns ``(options, positionals)``;
    a later value replaces an earlier one, except for the names in ``repeated``, whose values
    are appended to its lists in order."""
    opts: dict[str, str] = {}
    args: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            args.extend(argv[i:])
            break
        if not arg.startswith("--"):
            if arg.startswith("-") and arg != "-":
                raise UsageError(f"unrecognized option '{arg}'", usage=True)
            args.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        if name in options:
            matches = [name]
        else:
            matches = [o for o in options if o.startswith(name)] if name else []
        if not matches:
            raise UsageError(f"unrecognized option '--{name}'", usage=True)
        if len(matches) > 1:
            raise UsageError(f"option '--{name}' is ambiguous; possibilities: "
                             + " ".join("--" + m for m in sorted(matches)), usage=True)
        full = matches[0]
        if options[full] is None:
            opts[full] = value
        elif options[full]:
            if not eq:
                if i >= len(argv):
                    raise UsageError(f"option '--{full}' needs a value", usage=True)
                value = argv[i]
                i += 1
            opts[full] = value
            if repeated is not None and full in repeated:
                repeated[full].append(value)
        else:
            if eq:
                raise UsageError(f"option '--{full}' doesn't allow an argument", usage=True)
            opts[full] = ""
    return opts, args


def fail(message: str, err: int | None = None) -> NoReturn:
    """Like C ``err``/``errx``: end with ``prog: message[: strerror(err)]`` and exit 1."""
    if err is not None:
        message = f"{message}: {os.strerror(err)}"
    raise CfsError(message)


def load_image_tree(path: str, data: bytes, *, toplevel: list[bytes] | None = None,
                    hardlinks: str = "first"):
    """The tree of the image ``data`` read from ``path`` (see ``mkcfs.inspect.unflatten.load_tree``);
    a damaged image ends the program with one line, ``Failed to load 'PATH': …``."""
    from erofs.reader import Image

    from mkcfs.inspect.unflatten import load_tree

    try:
        # the tools only print the tree or write an image from it: nodes may share xattr dicts
        return load_tree(Image(data), toplevel, hardlinks=hardlinks, share_xattrs=True)
    except ImageFormatError as exc:
        fail(f"Failed to load '{path}': {exc}")
    except MemoryError:
        raise
    except Exception as exc:  # pragma: no cover - a reader bug: still one line, no traceback
        fail(f"Failed to load '{path}': internal error (please report): "
             f"{type(exc).__name__}: {exc}")


def read_input(source: str) -> bytes:
    """All bytes of ``source`` (``-`` = standard input), with errors naming the path."""
    try:
        if source == "-":
            return sys.stdin.buffer.read()
        with open(source, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise CfsError(f"Error reading from file {source}: Is a directory") from None
    except OSError as exc:
        raise CfsError(f"open `{source}': {exc.strerror or exc}") from None


def open_input(source: str) -> BinaryIO:
    """``source`` opened for reading in binary (``-`` = standard input), with the errors of
    ``read_input``; read errors later are ``OSError`` for ``read_error`` to word."""
    try:
        if source == "-":
            return sys.stdin.buffer
        return open(source, "rb")
    except IsADirectoryError:
        raise CfsError(f"Error reading from file {source}: Is a directory") from None
    except OSError as exc:
        raise CfsError(f"open `{source}': {exc.strerror or exc}") from None


def read_error(source: str, exc: OSError) -> CfsError:
    """The error for a failed read of ``source`` after it was opened."""
    return CfsError(f"Error reading from file {source}: {exc.strerror or exc}")


def check_output_dir(path: str) -> None:
    """Fail early (before any work) when the image's directory does not exist or is not one."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise CfsError(f"failed to open output file {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise CfsError(f"failed to open output file {path}: Is a directory")


def write_all(stream: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``stream`` or raise.

    A buffered stream over a pipe returns a short count (and raises nothing) when the reader
    goes away in the middle of a large write; writing the rest then raises
    ``BrokenPipeError``, so a cut output never passes for a complete one."""
    view = memoryview(data).cast("B")
    while view:
        n = stream.write(view[:WRITE_CHUNK])   # (see ``mkcfs.fsutil.WRITE_CHUNK``)
        if n is None:   # a non-blocking stream that could take nothing: wait for it
            select.select([], [stream], [])
            continue
        view = view[n:]


class FullWriter:
    """A binary output stream whose ``write`` writes everything (see :func:`write_all`)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> int:
        write_all(self._stream, data)
        return len(data)

    def flush(self) -> None:
        self._stream.flush()


def stdout() -> FullWriter:
    """Standard output, binary, with complete writes: the one way the tools print."""
    return FullWriter(sys.stdout.buffer)


def write_stdout(data: bytes | bytearray) -> None:
    """Write all of ``data`` to standard output and flush."""
    out = stdout()
    out.write(data)
    out.flush()


def _die_of_sigpipe(prog: str) -> int:
    """Standard output's reader went away: end as the C tools do, killed by SIGPIPE (status
    141 in a shell), so that ``set -o pipefail`` sees the cut output as a failure.

    Only the real process does that; inside a test harness that replaced ``sys.stdout`` it is
    one line and status 1 instead (never 0 either way)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    if sys.stdout is sys.__stdout__ and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.raise_signal(signal.SIGPIPE)
    # still alive (SIGPIPE blocked, or not the real stdout): say so, and skip the exit-time flush
    sys.stdout = None  # type: ignore[assignment]
    sys.stderr.write(f"{prog}: standard output: Broken pipe\n")
    return 1


def _flush_stdout() -> None:
    """Flush what the text layer still holds, so that a broken pipe is seen here (and not by
    the interpreter's exit-time flush, which would print a traceback-like warning)."""
    if sys.stdout is not None:
        sys.stdout.flush()


def run(prog: str, usage: str, body: Callable[[list[str]], int],
        argv: Sequence[str] | None = None) -> int:
    """Run a CLI body; turn the project's errors (and I/O errors) into one line + exit 1."""
    if argv is None:
        argv = sys.argv[1:]
    # These tools build large acyclic object graphs: the cyclic garbage collector would only
    # rescan them again and again (it tripled build times on 64k-entry trees).
    with gc_paused():
        return _run(prog, usage, body, argv)


def _run(prog: str, usage: str, body: Callable[[list[str]], int], argv: Sequence[str]) -> int:
    try:
        try:
            status = body(list(argv))
        finally:
            _flush_stdout()
        return status
    except BrokenPipeError:
        return _die_of_sigpipe(prog)
    except ExitStatus as exc:
        return exc.status
    except UsageError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        if exc.usage:
            sys.stderr.write(usage)
        return 1
    except (CfsError, ImageFormatError) as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1
    except InternalError as exc:   # a bug of ours, not the user's input
        sys.stderr.write(f"{prog}: internal error (please report): {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 128 + signal.SIGINT
    except MemoryError:
        sys.stderr.write(f"{prog}: out of memory\n")
        return 1
    except OSError as exc:
        name = f" {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"{prog}:{name} {exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}\n")
        return 1


#: what ``keep_to_exit`` was given, while ``console`` runs a command
_kept_to_exit: list[object] | None = None


def keep_to_exit(garbage: object) -> None:
    """Let ``garbage`` (large, not needed any more) live until the process ends when it is
    going to end by ``console``'s ``os._exit``, which frees nothing: freeing it one object at
    a time is work for nobody (a build's inode records: ~25 ms of a 54k-entry build). Anywhere
    else (``main(argv)`` in-process) it is simply dropped."""
    if _kept_to_exit is not None:
        _kept_to_exit.append(garbage)


def console(prog: str, main: Callable[[], int]) -> NoReturn:
    """Run an installed command's ``main()`` and end the process with its status.

    A successful run ends with ``os._exit`` once everything is written, instead of letting the
    interpreter tear itself down: that teardown frees every object and module one at a time
    (~20 ms after a 64k-entry build, ~4 ms after a one-line dumpfile) and has nothing left to
    do. So only when nothing else would run at exit: the status is 0, only this thread runs (no
    thread to wait for), and the exit functions have run here (``atexit``: multiprocessing
    joins its workers and removes its temporary directory, ``weakref.finalize`` removes
    temporary files). Standard output and error are flushed first, so output that could not all
    be written still ends the process as ``run`` ends it (SIGPIPE death, or one line and status
    1), never with status 0. No other buffered data is lost: every file a command keeps is
    written through ``mkcfs.fsutil`` (closed before it is renamed into place). Any other case
    exits normally. Only the console entry points and ``python -m`` call this; ``main(argv)``
    called in-process (the tests) returns its status.

    The cyclic garbage collector stays off for the whole run (``run`` pauses it for the
    command's body anyway): turned back on after the body, its first pass would walk every
    object the run made, all still young, only to find nothing to free before the process
    ends (0.64 s after a 2M-line ``--from-file`` build)."""
    global _kept_to_exit
    _kept_to_exit = []
    gc.disable()
    status = main()
    if status == 0 and only_thread():   # else the interpreter must wait for the others
        atexit._run_exitfuncs()   # what the interpreter runs at exit, before its teardown
        os._exit(_flush_std_streams(prog))
    sys.exit(status)


def _flush_std_streams(prog: str) -> int:
    """Flush standard output and error; 0 if all of it was written, else the status of the
    failure (a reader that went away: SIGPIPE as in ``run``)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        return _die_of_sigpipe(prog)
    except OSError as exc:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{prog}: standard output: {exc.strerror or exc}\n")
            sys.stderr.flush()
        return 1
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except OSError:
        return 1
    return 0
