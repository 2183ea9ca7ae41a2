"""The build summary of ``mkcomposefs --stats``: what went into an image and into the store.

``BuildStats.count_tree`` counts a tree before it is flattened (entries by type, inline and
external files, distinct objects); ``count_store`` then finds which of those objects this build
added to the object store; ``finish`` records the image size and the wall time.

New objects are recognised by their inode change time: every object ``ObjectStore`` adds is
created, written and renamed during the build, which sets its ctime, while an object that was
already there keeps its older one. The reference is read from the kernel's coarse clock (the
one file timestamps come from) when the build starts. An object that another build added while
this one ran counts as new to both.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from mkcfs.tree import (S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK,
                        HardLink, Node, iter_tree)

__all__ = ["BuildStats"]

_TYPE_KEYS = {S_IFDIR: "directories", S_IFREG: "files", S_IFLNK: "symlinks",
              S_IFCHR: "char_devices", S_IFBLK: "block_devices", S_IFIFO: "fifos",
              S_IFSOCK: "sockets"}
#: ``CLOCK_REALTIME_COARSE`` (Linux): the clock inode timestamps are taken from
_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def _coarse_now_ns() -> int:
    try:
        return time.clock_gettime_ns(_COARSE)
    except OSError:  # pragma: no cover - not Linux
        return time.time_ns()


@dataclass
class BuildStats:
    """Counters of one build (see the module doc); ``as_dict()`` is the ``--stats=json``
    object."""

    entries: int = 0
    types: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TYPE_KEYS.values(), 0))
    hardlinks: int = 0
    inline_files: int = 0
    empty_files: int = 0
    external_files: int = 0
    external_bytes: int = 0
    distinct_objects: int = 0
    distinct_bytes: int = 0
    new_objects: int | None = None
    new_bytes: int | None = None
    image_bytes: int = 0
    version: int = 0
    seconds: float = 0.0
    _objects: dict[bytes, int] = field(default_factory=dict, repr=False)
    _start: float = field(default_factory=time.monotonic, repr=False)
    _start_ns: int = field(default_factory=_coarse_now_ns, repr=False)

    def count_tree(self, root: Node) -> None:
        """Count the entries and files of ``root`` (call before the tree is flattened)."""
        types = self.types
        objects = self._objects
        for _path, entry in iter_tree(root):
            self.entries += 1
            if isinstance(entry, HardLink):
                self.hardlinks += 1
                continue
            ftype = entry.mode & S_IFMT
            key = _TYPE_KEYS.get(ftype)
            if key is not None:
                types[key] += 1
            if ftype != S_IFREG:
                continue
            if entry.payload is not None:
                self.external_files += 1
                self.external_bytes += entry.size
                objects.setdefault(entry.payload, entry.size)
            elif entry.content:
                self.inline_files += 1
            else:
                self.empty_files += 1
        self.distinct_objects = len(objects)
        self.distinct_bytes = sum(objects.values())

    def count_store(self, store: str | bytes) -> None:
        """Count the objects of the tree that this build added to the object store ``store``."""
        root = os.fsencode(store)
        new = new_bytes = 0
        for payload, size in self._objects.items():
            try:
                st = os.lstat(os.path.join(root, payload))
            except OSError:
                continue
            if st.st_ctime_ns >= self._start_ns:
                new += 1
                new_bytes += size
        self.new_objects, self.new_bytes = new, new_bytes

    def finish(self, image_bytes: int, version: int) -> None:
        self.image_bytes = image_bytes
        self.version = version
        self.seconds = time.monotonic() - self._start

    @property
    def deduplicated_bytes(self) -> int:
        """External file bytes not stored again: files sharing an object, and (with a store)
        objects that were already there."""
        stored = self.new_bytes if self.new_bytes is not None else self.distinct_bytes
        return self.external_bytes - stored

    def as_dict(self) -> dict[str, object]:
        return {
            "entries": self.entries, "types": dict(self.types), "hardlinks": self.hardlinks,
            "inline_files": self.inline_files, "empty_files": self.empty_files,
            "external_files": self.external_files, "external_bytes": self.external_bytes,
            "distinct_objects": self.distinct_objects, "distinct_bytes": self.distinct_bytes,
            "new_objects": self.new_objects, "new_bytes": self.new_bytes,
            "deduplicated_bytes": self.deduplicated_bytes, "image_bytes": self.image_bytes,
            "format_version": self.version, "seconds": round(self.seconds, 3),
        }

    def lines(self) -> list[str]:
        """The human-readable summary, a few lines."""
        kinds = ", ".join(f"{n:,} {key.replace('_', ' ')}" for key, n in self.types.items() if n)
        links = f", {self.hardlinks:,} hard links" if self.hardlinks else ""
        out = [f"{self.entries:,} entries: {kinds or 'none'}{links}",
               f"files: {self.inline_files:,} inline, {self.external_files:,} external "
               f"({self.external_bytes:,} bytes), {self.empty_files:,} empty; "
               f"{self.distinct_objects:,} distinct objects ({self.distinct_bytes:,} bytes)"]
        if self.new_objects is not None:
            out.append(f"store: {self.new_objects:,} new objects ({self.new_bytes:,} bytes), "
                       f"{self.deduplicated_bytes:,} bytes deduplicated")
        else:
            out.append(f"{self.deduplicated_bytes:,} bytes deduplicated (files sharing an object)")
        out.append(f"image: {self.image_bytes:,} bytes, format version {self.version}, "
                   f"{self.seconds:.2f} s")
        return out
