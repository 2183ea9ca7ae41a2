"""``mkcfs debug-structs``: every structure of an image, with its offset and fields."""

from __future__ import annotations

import argparse

HELP = """\
Print the struct-level map of a composefs image: every structure (composefs header, superblock,
inodes, xattr bodies and entries, dirents, shared xattr table), its offset, size and owner, each
field with its value, and the raw regions and padding between them, so that every byte is
accounted for. With --diff EXPECTED, print only where IMAGE first differs from EXPECTED, named by
struct and field.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--diff", metavar="EXPECTED", default=None,
                        help="report the first struct and field where IMAGE differs from EXPECTED")
    parser.add_argument("image", metavar="IMAGE")


def run(args: argparse.Namespace) -> int:
    from erofs.debug import first_difference, format_regions

    from mkcfs.cli import common

    data = common.read_input(args.image)
    out = common.stdout()
    if args.diff is not None:
        report = first_difference(common.read_input(args.diff), data)
        out.write(((report or "the images are identical") + "\n").encode())
        return 0 if report is None else 1
    batch: list[str] = []
    for line in format_regions(data):
        batch.append(line)
        if len(batch) >= 4096:
            out.write(("\n".join(batch) + "\n").encode())
            batch.clear()
    out.write(("\n".join(batch) + "\n").encode() if batch else b"")
    return 0
