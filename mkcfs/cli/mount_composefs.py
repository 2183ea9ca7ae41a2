"""``mount.composefs``: mount a composefs image (drop-in for composefs 1.0.8's helper).

Usage::

    mount.composefs [-o OPTIONS] IMAGE MOUNTPOINT
    mount -t composefs -o basedir=OBJECTS IMAGE MOUNTPOINT     (mount(8) runs the helper as
    mount.composefs IMAGE MOUNTPOINT [-sfnv] [-N NS] -o OPTIONS [-t composefs])

Options may come anywhere; several ``-o`` accumulate. Exit status 0 on success, 1 on any error,
with one line ``mount.composefs: <message>`` on stderr and nothing left mounted.
"""

from __future__ import annotations

import sys
from typing import NoReturn
from collections.abc import Sequence

from mkcfs import mount as cfsmount
from mkcfs.cli import common

PROG = "mount.composefs"

USAGE = """\
usage: mount.composefs [-t composefs] [-o OPTION[,OPTION...]] IMAGE MOUNTPOINT
Example:
  mount.composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage
or, as a mount helper:
  mount -t composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage

Supported options:
  basedir=PATH[:PATH]    where the image's file data lives (the --digest-store of mkcomposefs)
  digest=DIGEST          refuse the image unless its fs-verity digest is DIGEST (implies verity
                         where the kernel has fs-verity)
  idmap=PATH             user namespace whose ID mapping is applied (e.g. /proc/PID/ns/user)
  verity                 require fs-verity digests on every file and backing object
  tryverity              like verity when the kernel supports it
  noverity               no fs-verity checks (also after digest=)
  ro                     read only
  rw                     read/write (overrides an earlier ro)
  upperdir=PATH          overlayfs upper dir: a writable layer on top of the image
  workdir=PATH           overlayfs work dir to go with upperdir
  nosuid, nodev, noexec, noatime, relatime, strictatime, nodiratime (and suid, dev, exec,
  atime, diratime)       generic mount flags
Flags from mount(8): -s (ignore unknown options), -f (check only, do not mount), -n (ignored),
-v (say how the image was mounted), -N NS (enter mount namespace NS first).
"""


def _fail(message: str) -> NoReturn:
    raise common.UsageError(message, usage=True)


def _parse_argv(argv: list[str]) -> tuple[dict[str, object], list[str]]:
    """getopt-style short options ``ht:o:sfnvN:`` anywhere in ``argv`` (``--`` ends them)."""
    flags: dict[str, object] = {"o": [], "s": False, "f": False, "v": False, "N": None}
    args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            args.extend(argv[i:])
            break
        if arg == "--help":
            flags["h"] = True
            continue
        if not arg.startswith("-") or arg == "-":
            args.append(arg)
            continue
        if arg.startswith("--"):
            _fail(f"unrecognized option '{arg}'")
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c in "toN":
                value = arg[j:]
                if not value:
                    if i >= len(argv):
                        _fail(f"option requires an argument -- '{c}'")
                    value = argv[i]
                    i += 1
                if c == "o":
                    options = flags["o"]
                    assert isinstance(options, list)
                    options.append(value)
                elif c == "t":
                    if value != "composefs" and not value.startswith("composefs."):
                        raise common.UsageError(f"Unsupported fs type '{value}'")
                else:
                    flags["N"] = value
                break
            if c in "sfvh":
                flags[c] = True
            elif c in "nri":
                pass    # mount(8): -n no mtab, -r/-i historical; nothing to do here
            else:
                _fail(f"invalid option -- '{c}'")
    return flags, args


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(PROG, USAGE, _main, argv)


def _main(argv: list[str]) -> int:
    flags, args = _parse_argv(argv)
    if flags.get("h"):
        sys.stdout.write(USAGE)
        return 0
    if not args:
        _fail("No source path specified")
    if len(args) < 2:
        _fail("No mount path specified")
    if len(args) > 2:
        _fail(f"too many arguments: {' '.join(args[2:])}")
    image, mountpoint = args
    options = cfsmount.parse_options(flags["o"], sloppy=bool(flags["s"]))  # type: ignore[arg-type]
    if not options.basedirs:
        _fail("No object dirs specified (option basedir=PATH)")
    options.validate()
    if flags["N"]:
        cfsmount.enter_mount_namespace(str(flags["N"]))
    if flags["f"]:
        return 0
    result = cfsmount.mount_image(image, mountpoint, options)
    if flags["v"]:
        sys.stdout.write(f"{PROG}: {image} mounted on {mountpoint}: {result.describe()}\n")
    return 0


def console() -> NoReturn:
    """The installed command (and ``python -m``): ``main()``, then a fast exit on success."""
    common.console(PROG, main)


if __name__ == "__main__":  # pragma: no cover
    console()
