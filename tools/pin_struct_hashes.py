#!/usr/bin/env python3
"""Pin the per-field hashes (``erofs.debug.field_hashes``) of every golden image, as written by a
reference mkcomposefs 1.0.8, into testdata/golden/struct-hashes/SHA16.txt.gz.

The golden tests keep only hashes of 1.0.8's results; when an image hash differs, these finer
hashes let the test name the first differing structure and field. Run it (outside the tests,
which never need the reference) whenever a golden case is added::

    python3 tools/pin_struct_hashes.py --reference /path/to/mkcomposefs-1.0.8
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from erofs.debug import field_hashes  # noqa: E402

GOLDEN = REPO / "testdata" / "golden"
OUT = GOLDEN / "struct-hashes"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="an mkcomposefs 1.0.8 binary")
    opts = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image"
        for line in (GOLDEN / "expected.tsv").read_text().splitlines():
            name, args, sha, _digest = line.split("\t")
            subprocess.run([opts.reference, *args.split(), "--from-file", str(GOLDEN / name),
                            str(image)], check=True)
            data = image.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                raise SystemExit(f"{name} {args}: the reference's image is not the pinned one")
            text = ("\n".join(field_hashes(data)) + "\n").encode()
            (OUT / f"{sha[:16]}.txt.gz").write_bytes(gzip.compress(text, 9, mtime=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
