"""``mkcfs``: one command group for what composefs 1.0.8 has no tool for.

Usage::

    mkcfs SUBCOMMAND [OPTIONS] ARGS...
    mkcfs SUBCOMMAND --help

Each subcommand lives in its own module under ``mkcfs.cli`` (named in ``SUBCOMMANDS``) and is
imported only when it runs, so ``mkcfs --help`` and every subcommand start fast. A subcommand
module provides ``configure(parser)`` (adds its arguments to an ``argparse`` parser whose
description is the module's ``HELP``) and ``run(args) -> int`` (the exit status). Errors of the
project (``CfsError``, ``ImageFormatError``, ``OSError``...) become one line
``mkcfs SUBCOMMAND: message`` and exit 1 (or the module's ``ERROR_STATUS``, for subcommands
whose status 1 is an answer, like ``diff``), through ``common.run``; command-line mistakes are
argparse's usage line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn
from collections.abc import Sequence

from mkcfs.cli import common

PROG = "mkcfs"

#: subcommand -> (module under mkcfs.cli, one-line summary shown by ``mkcfs --help``)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "mount": ("mount", "mount an OCI image or a composefs image (LXC mount helper)"),
    "umount": ("umount", "unmount what `mkcfs mount` mounted"),
    "debug-structs": ("debug_structs", "print every struct of an image with its offset and fields"),
    "fsck": ("fsck", "check an object store: contents, stray files, missing objects"),
    "gc": ("gc", "remove the objects no kept image refers to"),
    "diff": ("diff", "compare two images, dumpfiles or directories, path by path"),
}


def _top_usage() -> str:
    width = max((len(name) for name in SUBCOMMANDS), default=0)
    lines = [f"usage: {PROG} SUBCOMMAND [OPTIONS] ARGS...",
             f"       {PROG} SUBCOMMAND --help", "",
             "The composefs tools that mkcomposefs 1.0.8 has no equivalent for.", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        status = 0 if argv else 2

        def usage(_: list[str]) -> int:
            sys.stdout.write(_top_usage())
            return status

        return common.run(PROG, "", usage, [])
    name = argv[0]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"{PROG}: unknown subcommand '{name}'\n{_top_usage()}")
        return 2
    module = importlib.import_module(f"mkcfs.cli.{SUBCOMMANDS[name][0]}")
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {name}", description=getattr(module, "HELP", SUBCOMMANDS[name][1]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.configure(parser)

    finished: list[int] = []

    def body(rest: list[str]) -> int:
        status: int = module.run(parser.parse_args(rest))
        finished.append(status)
        return status

    try:
        status = common.run(f"{PROG} {name}", "", body, argv[1:])
    except SystemExit as exc:   # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if not finished and status == 1:   # an error (one line already printed), not an answer
        status = getattr(module, "ERROR_STATUS", 1)
    return status


def console() -> NoReturn:
    """The installed command (and ``python -m``): ``main()``, then a fast exit on success."""
    common.console(PROG, main)


if __name__ == "__main__":  # pragma: no cover
    console()
