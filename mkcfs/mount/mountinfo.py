"""``/proc/self/mountinfo`` read into records: which mount is on top of a path.

Each line (proc(5)) is ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
SUPER_OPTIONS``; the kernel escapes space, tab, newline and backslash in the path fields as
``\\ooo`` octal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo (the fields this package uses)."""

    mount_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount of this mount namespace, in the kernel's order (a mount stacked on a path
    comes after the one it covers)."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(" "), right.split(" ")
            if not sep or len(fields) < 6 or len(tail) < 2:
                continue
            entries.append(MountEntry(int(fields[0]), int(fields[1]), _unescape(fields[4]),
                                      _unescape(tail[0]), _unescape(tail[1])))
    return entries


def top_mount(mountpoint: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount that is visible at ``mountpoint`` (an absolute path without symlinks), or None
    when nothing is mounted there: the last mount on that path whose parent is not covered by a
    later mount on the same path."""
    if entries is None:
        entries = read_mountinfo()
    on_path = [e for e in entries if e.mountpoint == mountpoint]
    if not on_path:
        return None
    # mounts stacked on one path form a chain: each one's parent is the mount it covers
    covered = {e.parent_id for e in on_path}
    tops = [e for e in on_path if e.mount_id not in covered]
    return tops[-1] if tops else on_path[-1]
