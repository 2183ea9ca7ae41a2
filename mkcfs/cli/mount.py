"""``mkcfs mount``: mount an OCI image (or a composefs image file) through the managed store."""

from __future__ import annotations

import argparse
import sys

from mkcfs.store.images import DEFAULT_STORE

HELP = f"""\
Mount SOURCE on the directory MNT as a composefs image.

SOURCE is an OCI image: OCI_DIR:REF (as LXC's lxc-oci template passes it; the last ':'
separates REF, so OCI_DIR may contain ':'), oci:PATH[:REF], oci-archive:PATH[:REF],
docker-archive:PATH[:REF]; or an existing composefs image file (its file data in the store's
objects/, or in -o basedir=). An OCI image is built into the store once (STORE/objects,
STORE/images); later mounts of the same image use the built one.

Without --persist the mount is read-only. With --persist PERSIST it is writable and the changes
are kept in PERSIST/persist (the overlay upper layer; PERSIST/work is overlayfs's work
directory), created when missing: they are there again at the next mount with the same PERSIST.
Undo with: mkcfs umount MNT.

store: {DEFAULT_STORE} unless --store is given.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", default=DEFAULT_STORE,
                        help=f"the managed store (default {DEFAULT_STORE})")
    parser.add_argument("--persist", metavar="PERSIST",
                        help="writable mount; changes kept in PERSIST/persist")
    parser.add_argument("-o", dest="options", metavar="MOUNT_OPTIONS", action="append",
                        default=[], help="mount.composefs options: verity, tryverity, "
                        "noverity, digest=HEX, idmap=PATH, ro, nosuid, nodev, noexec, ...")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="say what was built and how it was mounted")
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("mountpoint", metavar="MNT")


def run(args: argparse.Namespace) -> int:
    from mkcfs.mount import parse_options
    from mkcfs.mount.helper import mount_source

    options = parse_options(args.options)
    mounted = mount_source(args.source, args.mountpoint, store=args.store,
                           persist=args.persist, options=options)
    if args.verbose:
        built = "built" if mounted.image.built else "found"
        sys.stdout.write(f"mkcfs mount: {args.source}: image {mounted.image.path} ({built}) "
                         f"mounted on {args.mountpoint}: {mounted.result.describe()}\n")
    return 0
