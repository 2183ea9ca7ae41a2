"""mkcfs: a Python implementation of the composefs tools (mkcomposefs and friends).

Public API::

    from mkcfs import parse_dumpfile, build_image
    image = build_image(parse_dumpfile(text))   # bytes identical to mkcomposefs 1.0.8
    tree = load_image_tree("oci:/path/to/layout:tag")   # .root, .manifest_digest

Names are imported on first use, so the command-line tools load only what they need.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BuiltImage": "build.image", "build_image": "build.image", "write_atomically": "fsutil",
    "HardLink": "tree", "Node": "tree",
    "parse_dumpfile": "sources.dumpfile", "format_dumpfile": "sources.dumpfile",
    "ImageTree": "sources.oci", "OciOptions": "sources.oci", "load_image_tree": "sources.oci",
    "image_digest": "sources.oci",
    "build_oci_image": "sources.oci", "ImageSource": "sources.transport",
    "parse_source": "sources.transport",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mkcfs' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
