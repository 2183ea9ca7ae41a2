"""When this process may fork workers: the one rule every parallel step follows (digest and
fsck workers, ``composefs-info dump`` in two parts). Kept apart from the pools that use it so
that checking it imports nothing heavy."""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["processes_usable"]


def processes_usable() -> bool:
    """Fork worker processes only from a process that runs no other thread (the CLI): a fork
    copies the locks other threads hold (in OpenSSL, in stdio...), and a fork server or spawn
    would import the caller's ``__main__`` again. The environment variable
    ``MKCFS_DIGEST_THREADS`` turns forking off."""
    return (sys.platform.startswith("linux") and threading.active_count() == 1
            and os.environ.get("MKCFS_DIGEST_THREADS") is None)
