"""``struct`` packers derived from flat ``construct`` declarations.

On-disk structures are declared once, with ``construct`` (a doc string per field). Hot loops must
not call construct per record (it costs ~15 µs each), so ``derive_packer`` turns a flat
declaration (little-endian integers and fixed-size byte strings) into a ``struct.Struct`` with the
same layout. Both ``fsverity/format.py`` and ``erofs/format.py`` use it; it lives here because
``fsverity`` is the package with no dependency on the others.
"""

from __future__ import annotations

import struct

import construct as cs  # type: ignore[import-untyped]

__all__ = ["derive_format", "derive_packer"]


def derive_format(declaration: cs.Struct) -> str:
    """The ``struct`` format string with the same layout as a flat construct declaration.

    Integer fields map to their little-endian codes; ``Bytes(n)`` maps to ``{n}s`` (packing ``b""``
    there writes n zeros, which is what every reserved field holds)."""
    parts = ["<"]
    for field in declaration.subcons:
        sub = field
        while isinstance(sub, cs.Renamed):
            sub = sub.subcon
        if isinstance(sub, cs.FormatField) and sub.fmtstr[0] == "<":
            parts.append(sub.fmtstr[1:])
        elif isinstance(sub, cs.Bytes) and isinstance(sub.length, int):
            parts.append(f"{sub.length}s")
        else:
            raise TypeError(f"field {field.name!r} of kind {sub!r} has no struct equivalent")
    return "".join(parts)


def derive_packer(declaration: cs.Struct) -> struct.Struct:
    """A ``struct.Struct`` equivalent to ``declaration``; its size is checked against construct's."""
    packer = struct.Struct(derive_format(declaration))
    if packer.size != declaration.sizeof():
        raise AssertionError(f"derived size {packer.size} != construct size {declaration.sizeof()}")
    return packer
