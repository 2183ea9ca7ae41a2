"""Image source names, as containers-transports(5) writes them, parsed into ``ImageSource``.

* ``oci:PATH[:REF]`` -- an OCI image layout directory;
* ``oci-archive:PATH[:REF]`` -- the same as one tar file;
* ``docker-archive:PATH[:REF]`` -- ``docker save`` output (REF: a tag ``name:tag``, or
  ``@N`` for the N-th image of the archive);
* ``tar:FILE`` -- one plain layer tar (gzip/zstd/uncompressed, found by magic); ``tar:-`` is
  standard input. Several layers are ``ImageSource("tar", layers=(...))`` (the CLI's repeated
  ``--layer``).

PATH may contain ``:`` itself (LXC passes ``OCI_DIR:NAME`` with a path that can hold one).
The rule: when the whole text after the transport names an existing file or directory, it
is PATH and there is no REF; otherwise PATH ends at the last ``:`` whose prefix exists (for
``docker-archive``, whose tags contain ``:``, the first such one), and when no prefix exists
at the last ``:`` (at the first for ``docker-archive``) so that the error names the missing
PATH. An empty REF (``oci:dir:``) is no REF.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from mkcfs.errors import BuildInputError

__all__ = ["ImageSource", "parse_source", "is_image_source", "TRANSPORTS"]

#: the transports this package reads, with the kind of PATH they name
TRANSPORTS = ("oci", "oci-archive", "docker-archive", "tar")


class ImageSource(NamedTuple):
    """A parsed source: ``transport`` (one of ``TRANSPORTS``), ``path`` and ``ref`` (None when
    not given); for ``tar`` the layer files in order in ``layers`` (``-`` = stdin)."""

    transport: str
    path: str = ""
    ref: str | None = None
    layers: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.transport == "tar":
            return "tar:" + ",".join(self.layers)
        return f"{self.transport}:{self.path}" + (f":{self.ref}" if self.ref else "")


def is_image_source(text: str) -> bool:
    """Whether ``text`` names a transport (``oci:...`` etc.) rather than a directory. A
    directory literally called ``oci:x`` is still taken as one when it exists."""
    transport, colon, _ = text.partition(":")
    return bool(colon) and transport in TRANSPORTS and not os.path.isdir(text)


def _split(rest: str, first: bool) -> tuple[str, str | None]:
    if os.path.lexists(rest) or ":" not in rest:
        return rest, None
    positions = [i for i, c in enumerate(rest) if c == ":"]
    order = positions if first else positions[::-1]
    for i in order:
        if os.path.lexists(rest[:i]):
            return rest[:i], rest[i + 1:] or None
    i = order[0]
    return rest[:i], rest[i + 1:] or None


def parse_source(text: str) -> ImageSource:
    """Parse ``TRANSPORT:PATH[:REF]`` (see the module docstring)."""
    transport, colon, rest = text.partition(":")
    if not colon or transport not in TRANSPORTS:
        raise BuildInputError(f"{text}: not an image source (expected one of "
                              + ", ".join(t + ":" for t in TRANSPORTS) + ")")
    if not rest:
        raise BuildInputError(f"{text}: no path given")
    if transport == "tar":
        return ImageSource("tar", rest, None, (rest,))
    path, ref = _split(rest, first=transport == "docker-archive")
    if not path:
        raise BuildInputError(f"{text}: no path given")
    return ImageSource(transport, path, ref)
