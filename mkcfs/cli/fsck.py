"""``mkcfs fsck``: check an object store (see ``mkcfs.store.fsck``) and print what is wrong."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mkcfs.progress import Progress

HELP = """\
Check the object store STORE: every object's content must match its name (its fs-verity
digest), the store must hold nothing but objects and build temporaries, and every object the
IMAGEs refer to must be present. STORE is a plain object store (mkcomposefs --digest-store)
or a managed store (objects/ + images/), whose images/* are checked when no IMAGE is given.

One line per problem: KIND PATH: DETAIL, KIND one of corrupt, misnamed, unreadable,
stray, missing, bad-image. --repair moves corrupt objects and stray entries into STORE's .quarantine/ (nothing
is deleted) so that the next build stores those objects again.

exit status: 0 clean, 1 problems found (also when repaired), 2 the check could not run."""

#: status when the check itself failed (the store cannot be read, bad arguments)
ERROR_STATUS = 2


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="object store or managed store")
    parser.add_argument("images", metavar="IMAGE", nargs="*",
                        help="images whose objects must be present")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repair", action="store_true",
                        help="move bad objects and stray entries into STORE's .quarantine/")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="parallel readers (default: the CPUs this process may use)")


def run(args: argparse.Namespace) -> int:
    from mkcfs.store.fsck import fsck
    from mkcfs.store.layout import resolve_store

    workers = args.threads if args.threads else len(os.sched_getaffinity(0))
    if workers < 1:
        raise SystemExit(ERROR_STATUS)
    layout = resolve_store(args.store)
    # drawn from a thread started only once the listing is done (after the worker processes
    # are forked: fork and threads do not mix)
    progress = None if args.json or not sys.stderr.isatty() else _FsckProgress(sys.stderr)
    try:
        report = fsck(layout, args.images or None, repair=args.repair, workers=workers,
                      on_progress=None if progress is None else progress.add_files,
                      on_scanned=None if progress is None else progress.set_total)
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        json.dump({
            "store": args.store, "objects": report.objects, "bytes": report.bytes,
            "images": report.images, "temporaries": report.temporaries,
            "seconds": round(report.seconds, 3), "clean": report.clean,
            "problems": [{"kind": p.kind, "path": p.path, "detail": p.detail}
                         for p in report.problems],
            "moved": [{"path": path, "to": to} for path, to in report.moved],
        }, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        out = sys.stdout
        for problem in report.problems:
            out.write(problem.line() + "\n")
        for path, to in report.moved:
            out.write(f"moved {path} to {to}\n")
        summary = (f"{report.objects} objects ({report.bytes} bytes) checked, "
                   f"{report.images} images, {len(report.problems)} problems")
        sys.stderr.write(f"mkcfs fsck: {summary}\n")
    return 0 if report.clean else 1


class _FsckProgress(Progress):
    """The build's progress line, counting objects checked out of those listed."""

    total_files = 0
    total_bytes = 0

    def set_total(self, files: int, nbytes: int) -> None:
        self.total_files, self.total_bytes = files, nbytes
        self.start()

    def line(self) -> str:
        percent = 100 * self.bytes / self.total_bytes if self.total_bytes else 0.0
        return (f"mkcfs fsck: {self.files}/{self.total_files} objects checked "
                f"({percent:.0f}% of the bytes)")
