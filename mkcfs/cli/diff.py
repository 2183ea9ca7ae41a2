"""``mkcfs diff``: what differs between two trees, each an image, a dumpfile or a directory
(see ``mkcfs.inspect.diff``)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = """\
Compare A and B, each a composefs image, a composefs-dump(5) file ('-': standard input) or a
directory (read as mkcomposefs would, with the build options below), as trees, path by path.
The image's overlay xattrs are undone first, so an image compares equal to the directory it was
built from with the same options.

Output: one line per entry: 'added PATH (TYPE[, N entries])', 'removed PATH ...', or
'changed PATH: FIELD A -> B; ...' with FIELD one of type, mode, owner, size, mtime, digest,
payload, inline, target, rdev, xattr:NAME, hardlinks; then a summary line on stderr that groups
the changes ('3,120 differ only in mtime'). Paths and values are escaped as in dumpfiles.

exit status: 0 equal, 1 different, 2 trouble (unreadable input, bad arguments), like diff(1)."""

#: status for trouble: 1 means "different"
ERROR_STATUS = 2


def configure(parser: argparse.ArgumentParser) -> None:
    from mkcfs.inspect.diff import FIELDS

    parser.add_argument("a", metavar="A", help="image, dumpfile or directory")
    parser.add_argument("b", metavar="B", help="image, dumpfile or directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--ignore", action="append", default=[], metavar="FIELD[,FIELD]",
                        help=f"do not compare these fields ({', '.join(FIELDS)})")
    group = parser.add_argument_group("directory sources (as mkcomposefs)")
    group.add_argument("--use-epoch", action="store_true", help="read every mtime as 0")
    group.add_argument("--skip-devices", action="store_true", help="leave out devices")
    group.add_argument("--skip-xattrs", action="store_true", help="read no xattrs")
    group.add_argument("--user-xattrs", action="store_true", help="read only user.* xattrs")
    group.add_argument("--hardlinks", action="store_true", help="keep hard links as such")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="parallel hashing workers")


def run(args: argparse.Namespace) -> int:
    from mkcfs.cli import common
    from mkcfs.errors import CfsError
    from mkcfs.inspect.diff import FIELDS, diff_trees, load_side, summary
    from mkcfs.sources.walk import WalkOptions

    ignore = {name for item in args.ignore for name in item.split(",") if name}
    unknown = ignore - set(FIELDS)
    if unknown:
        raise CfsError(f"unknown field(s) for --ignore: {', '.join(sorted(unknown))}")
    if args.user_xattrs and args.skip_xattrs:
        raise CfsError("--user-xattrs and --skip-xattrs cannot be used together")
    if args.threads is not None and args.threads < 1:
        raise CfsError(f"invalid threads count {args.threads}")
    options = WalkOptions(use_epoch=args.use_epoch, skip_devices=args.skip_devices,
                          skip_xattrs=args.skip_xattrs, user_xattrs=args.user_xattrs,
                          hardlinks=args.hardlinks, threads=args.threads, progress=False)
    trees = []
    for path in (args.a, args.b):
        try:
            trees.append(load_side(path, options, common.read_input))
        except OSError as exc:
            if isinstance(exc, CfsError):
                raise
            raise CfsError(f"{path}: {exc.strerror or exc}") from None
        except CfsError:
            raise
        except Exception as exc:   # ImageFormatError: name the file
            from erofs.errors import ImageFormatError

            if isinstance(exc, ImageFormatError):
                raise CfsError(f"{path}: {exc}") from None
            raise
    diff = diff_trees(trees[0], trees[1], ignore)
    if args.json:
        json.dump({
            "equal": diff.equal,
            "added": [{"path": _text(p), "type": t, "entries": n} for p, t, n in diff.added],
            "removed": [{"path": _text(p), "type": t, "entries": n} for p, t, n in diff.removed],
            "changed": [{"path": _text(c.path),
                         "fields": {k: {"a": va, "b": vb} for k, (va, vb) in c.fields.items()}}
                        for c in diff.changed],
            "summary": summary(diff),
        }, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        out: list[str] = []
        for verb, entries in (("removed", diff.removed), ("added", diff.added)):
            for path, kind, count in entries:
                more = f", {count:,} entries" if count > 1 else ""
                out.append(f"{verb} {_text(path)} ({kind}{more})\n")
        for change in diff.changed:
            fields = "; ".join(f"{k} {va} -> {vb}" for k, (va, vb) in change.fields.items())
            out.append(f"changed {_text(change.path)}: {fields}\n")
        sys.stdout.writelines(out)
        sys.stdout.flush()
        sys.stderr.write(f"mkcfs diff: {summary(diff)}\n")
    return 0 if diff.equal else 1


def _text(path: bytes) -> str:
    from mkcfs.sources.dumpfile import escape

    return escape(path).decode("ascii")
