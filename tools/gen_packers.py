#!/usr/bin/env python3
"""Write ``erofs/packers.py`` and ``fsverity/packers.py`` from the construct declarations of
``erofs/structs.py`` and ``fsverity/structs.py`` (``fsverity.cstruct.render_packers``).

The declarations are the one definition of every on-disk structure; the commands import only the
generated ``struct`` packers (importing construct costs more than building a small image). Run
it after changing a declaration; ``--check`` only reports stale files (exit 1), as the tests do::

    python3 tools/gen_packers.py [--check]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fsverity.cstruct import render_packers  # noqa: E402
from mkcfs.fsutil import write_atomically  # noqa: E402

#: the declaring modules; each one's packers go to ``packers.py`` in its package
STRUCT_MODULES = ("erofs.structs", "fsverity.structs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    opts = parser.parse_args()
    stale = 0
    for name in STRUCT_MODULES:
        text = render_packers(importlib.import_module(name))
        path = REPO / name.rpartition(".")[0] / "packers.py"
        if path.exists() and path.read_text() == text:
            continue
        stale += 1
        if opts.check:
            print(f"{path.relative_to(REPO)} is stale: run tools/gen_packers.py", file=sys.stderr)
        else:
            write_atomically(str(path), text.encode())
            print(f"wrote {path.relative_to(REPO)}")
    return 1 if stale and opts.check else 0


if __name__ == "__main__":
    sys.exit(main())
