"""Shared fixtures: where ../shared is, and the conformance corpus loader."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFORMANCE = SHARED / "conformance"
TESTDATA = REPO / "testdata"


@dataclass(frozen=True)
class ConformanceCase:
    """One line of a conformance cases.tsv."""

    name: str
    input: Path
    args: tuple[str, ...]
    image_sha256: str          # or "FAIL"
    digest: str                # or "FAIL"
    strict: bool

    @property
    def must_fail(self) -> bool:
        return self.image_sha256 == "FAIL"

    def read_input(self) -> bytes:
        data = self.input.read_bytes()
        return gzip.decompress(data) if self.input.name.endswith(".gz") else data


def load_conformance_cases() -> list[ConformanceCase]:
    """Every case of ../shared/conformance (empty when the folder is absent)."""
    cases: list[ConformanceCase] = []
    for tsv in (CONFORMANCE / "cases.tsv", CONFORMANCE / "upstream" / "cases.tsv"):
        if not tsv.exists():
            continue
        for line in tsv.read_text().splitlines():
            if not line.strip():
                continue
            name, inp, args, sha, digest, strict = line.split("\t")
            cases.append(ConformanceCase(name, tsv.parent / inp, tuple(args.split()), sha, digest,
                                         strict.strip() == "strict=1"))
    return cases


def read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


@pytest.fixture
def no_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CFS_PARSE_STRICT", raising=False)


FSCK = shutil.which("fsck.erofs")


def fsck_erofs(path: Path) -> None:
    """Run ``fsck.erofs`` (walks every directory and inode) and assert it is clean.

    ``--extract`` is not used: erofs-utils 1.5 cannot decode the (reference-identical) layout of
    external files above ~8.9e15 bytes, which mkcomposefs 1.0.8 writes too (erofs/layout.py, "External files").

    Does nothing where erofs-utils is not installed; ``test_fsck_is_installed_in_ci`` makes sure
    CI always has it."""
    if FSCK is None:
        return
    proc = subprocess.run([FSCK, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"fsck.erofs rejected {path}: {proc.stdout}{proc.stderr}"


# --- image comparisons that say where two images differ -------------------------------------

#: an mkcomposefs 1.0.8 binary to rebuild a reference image with when a pinned hash differs (only
#: for the failure message: no test needs it)
REFERENCE_MKCOMPOSEFS = os.environ.get("MKCFS_REFERENCE_MKCOMPOSEFS")


def assert_same_image(actual: bytes | bytearray, expected: bytes | bytearray) -> None:
    """Equal images, or a failure naming the first differing struct and field."""
    if bytes(actual) != bytes(expected):
        from erofs.debug import first_difference

        pytest.fail(f"images differ: {first_difference(expected, actual)}", pytrace=False)


def reference_image(dumpfile: bytes, args: Sequence[str] = ()) -> bytes | None:
    """The image ``$MKCFS_REFERENCE_MKCOMPOSEFS`` builds from ``dumpfile`` (None without it)."""
    if not REFERENCE_MKCOMPOSEFS:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.dump", Path(tmp) / "out.img"
        src.write_bytes(dumpfile)
        proc = subprocess.run([REFERENCE_MKCOMPOSEFS, *args, "--from-file", str(src), str(out)],
                              capture_output=True)
        return out.read_bytes() if proc.returncode == 0 else None


#: per-field hashes of the golden images mkcomposefs 1.0.8 wrote (tools/pin_struct_hashes.py)
STRUCT_HASHES = TESTDATA / "golden" / "struct-hashes"


def pinned_field_hashes(sha256: str) -> list[str] | None:
    """The pinned ``erofs.debug.field_hashes`` of the image with that sha256, if kept."""
    path = STRUCT_HASHES / f"{sha256[:16]}.txt.gz"
    if not path.exists():
        return None
    return gzip.decompress(path.read_bytes()).decode().splitlines()


def assert_image_sha256(actual: bytes | bytearray, sha256: str,
                        reference: Callable[[], bytes | None] | None = None) -> None:
    """``actual`` hashes to the pinned ``sha256``; otherwise fail naming the first differing
    struct and field against the reference image (``reference()``, e.g. built by
    :func:`reference_image`) when one with that hash is available."""
    got = hashlib.sha256(actual).hexdigest()
    if got == sha256:
        return
    expected = reference() if reference is not None else None
    pinned = pinned_field_hashes(sha256)
    if expected is not None and hashlib.sha256(expected).hexdigest() == sha256:
        from erofs.debug import first_difference

        detail = first_difference(expected, actual)
    elif pinned is not None:
        from erofs.debug import first_hash_difference

        detail = f"first differing struct: {first_hash_difference(pinned, actual)}"
    else:
        detail = ("no reference image to compare with (set MKCFS_REFERENCE_MKCOMPOSEFS to an "
                  "mkcomposefs 1.0.8 binary to name the first differing struct and field)")
    pytest.fail(f"image sha256 {got} != pinned {sha256}: {detail}", pytrace=False)
