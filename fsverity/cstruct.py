"""``struct`` packers derived from flat ``construct`` declarations, and the generated modules
that hold them.

On-disk structures are declared once, with ``construct`` (a doc string per field), in a
package's ``structs.py``. Hot loops must not call construct per record (it costs ~15 µs each),
and the commands must not even import it (~40 ms and ~10 MB per process), so the layout of each
flat declaration (little-endian integers and fixed-size byte strings) is turned into a
``struct.Struct`` format and written, by ``tools/gen_packers.py``, into the package's
``packers.py``: ``render_packers`` gives that module's text, which the tests compare with the
file. Used at build and test time only; it lives here because ``fsverity`` is the package with
no dependency on the others.
"""

from __future__ import annotations

import struct
from types import ModuleType

import construct as cs  # type: ignore[import-untyped]

__all__ = ["derive_format", "derive_packer", "field_offsets", "render_packers"]


def _codes(declaration: cs.Struct) -> list[tuple[str, str]]:
    """``(field name, struct code)`` of each field of a flat declaration."""
    codes = []
    for field in declaration.subcons:
        sub = field
        while isinstance(sub, cs.Renamed):
            sub = sub.subcon
        if isinstance(sub, cs.FormatField) and sub.fmtstr[0] == "<":
            codes.append((field.name, sub.fmtstr[1:]))
        elif isinstance(sub, cs.Bytes) and isinstance(sub.length, int):
            codes.append((field.name, f"{sub.length}s"))
        else:
            raise TypeError(f"field {field.name!r} of kind {sub!r} has no struct equivalent")
    return codes


def derive_format(declaration: cs.Struct) -> str:
    """The ``struct`` format string with the same layout as a flat construct declaration.

    Integer fields map to their little-endian codes; ``Bytes(n)`` maps to ``{n}s`` (packing ``b""``
    there writes n zeros, which is what every reserved field holds)."""
    return "<" + "".join(code for _name, code in _codes(declaration))


def derive_packer(declaration: cs.Struct) -> struct.Struct:
    """A ``struct.Struct`` equivalent to ``declaration``; its size is checked against construct's."""
    packer = struct.Struct(derive_format(declaration))
    if packer.size != declaration.sizeof():
        raise AssertionError(f"derived size {packer.size} != construct size {declaration.sizeof()}")
    return packer


def field_offsets(declaration: cs.Struct) -> dict[str, int]:
    """Field name -> byte offset, in declaration order."""
    offsets, offset = {}, 0
    for name, code in _codes(declaration):
        offsets[name] = offset
        offset += struct.calcsize("<" + code)
    return offsets


def render_packers(structs: ModuleType) -> str:
    """The text of the generated ``packers.py`` beside ``structs`` (a package's ``structs.py``,
    whose ``STRUCT_SIZES`` maps each C struct name to its declaration and kernel size): per
    struct, ``NAME = struct.Struct(format)`` and ``NAME_FIELDS = {field: offset}``."""
    source = structs.__name__.replace(".", "/") + ".py"
    lines = [
        f'"""Generated from ``{source}`` by ``tools/gen_packers.py``: do not edit.',
        "",
        "The ``struct`` packers of the structures declared there (fields in declaration order) and",
        "each structure's field offsets. After changing a declaration, regenerate with",
        "``python3 tools/gen_packers.py``; ``tests/erofs/test_format.py`` fails while this file is",
        'stale."""',
        "",
        "import struct",
        "",
    ]
    for c_name, (declaration, size) in structs.STRUCT_SIZES.items():
        packer = derive_packer(declaration)
        if packer.size != size:
            raise AssertionError(f"{c_name}: derived size {packer.size} != {size}")
        const = c_name.upper()
        lines.append("")
        lines.append(f"#: struct {c_name} ({size} bytes)")
        lines.append(f'{const} = struct.Struct("{packer.format}")')
        lines.append(f"{const}_FIELDS = {{")
        lines.extend(f'    "{name}": {offset},' for name, offset in field_offsets(declaration).items())
        lines.append("}")
    return "\n".join(lines) + "\n"
