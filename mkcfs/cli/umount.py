"""``mkcfs umount``: undo ``mkcfs mount``."""

from __future__ import annotations

import argparse

HELP = """\
Unmount what `mkcfs mount` mounted on MNT and remove its run state. Refused when the mount on
MNT was not made by `mkcfs mount`. The store and the PERSIST directory stay.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", default=None,
                        help="the store the mount was made from (default: the one the mount "
                        "names, else /var/lib/mkcfs)")
    parser.add_argument("mountpoint", metavar="MNT")


def run(args: argparse.Namespace) -> int:
    from mkcfs.mount.helper import umount

    umount(args.mountpoint, store=args.store)
    return 0
