"""mkcfs: a Python implementation of the composefs tools (mkcomposefs and friends).

Public API::

    from mkcfs import parse_dumpfile, build_image
    image = build_image(parse_dumpfile(text))   # bytes identical to mkcomposefs 1.0.8
"""

from .image import BuiltImage, build_image, write_atomically
from .tree import HardLink, Node

__all__ = ["BuiltImage", "HardLink", "Node", "build_image", "write_atomically", "parse_dumpfile"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "parse_dumpfile":
        from .dumpfile import parse_dumpfile
        return parse_dumpfile
    raise AttributeError(name)
