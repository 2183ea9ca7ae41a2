"""``mkcfs gc``: remove the objects no kept image refers to (see ``mkcfs.store.gc``)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = """\
Remove from the object store STORE every object that none of the kept images refers to, and
the temporary files of builds that died. Kept images: each --keep IMAGE, every file of each
--keep-dir DIR (hidden names excepted), and for a managed store (objects/ + images/) every
file of STORE/images. At least one --keep or --keep-dir is needed for a plain object store.

Safe while builds run: builds hold the store's shared lock until their image is in place and
gc waits for the exclusive one, then reads the kept images (see mkcfs(1), LOCKING).

Prints what it removed: objects and bytes, stale temporaries.
exit status: 0 done, 1 error (nothing is removed when a kept image cannot be read)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="object store or managed store")
    parser.add_argument("--keep", action="append", default=[], metavar="IMAGE",
                        help="keep the objects of IMAGE (repeatable)")
    parser.add_argument("--keep-dir", action="append", default=[], metavar="DIR",
                        help="keep the objects of every image in DIR (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="remove nothing; print what would be removed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true",
                        help="also print the path of each object removed")


def run(args: argparse.Namespace) -> int:
    from mkcfs.errors import CfsError
    from mkcfs.store.gc import collect
    from mkcfs.store.layout import resolve_store

    layout = resolve_store(args.store)
    if not args.keep and not args.keep_dir and layout.images is None:
        raise CfsError(f"{args.store} is a plain object store: say which images to keep "
                       "(--keep IMAGE or --keep-dir DIR)")

    def waiting() -> None:
        if sys.stderr.isatty():
            sys.stderr.write("mkcfs gc: waiting for running builds to finish...\n")

    report = collect(layout, args.keep, args.keep_dir, dry_run=args.dry_run, on_wait=waiting)
    if args.json:
        result = {"store": args.store, "dry_run": report.dry_run, "images": report.images,
                  "referenced_objects": report.referenced, "kept_objects": report.kept_objects,
                  "removed_objects": len(report.removed), "removed_bytes": report.removed_bytes,
                  "temporaries_removed": report.temporaries_removed,
                  "seconds": round(report.seconds, 3)}
        if args.list:
            result["removed"] = [path for path, _ in report.removed]
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if args.list:
        sys.stdout.writelines(path + "\n" for path, _ in report.removed)
    verb = "would remove" if report.dry_run else "removed"
    sys.stdout.write(f"{verb} {len(report.removed)} objects ({report.removed_bytes} bytes), "
                     f"{report.temporaries_removed} stale temporaries; kept "
                     f"{report.kept_objects} objects of {report.images} images\n")
    return 0
