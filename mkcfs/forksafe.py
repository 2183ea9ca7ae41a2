"""When this process may fork workers: the one rule every parallel step follows (digest and
fsck workers, ``composefs-info dump`` in two parts). Kept apart from the pools that use it so
that checking it imports nothing heavy."""

from __future__ import annotations

import os
import sys

__all__ = ["die_with_parent", "only_thread", "processes_usable", "spare_cpu"]


def only_thread() -> bool:
    """Whether this process runs no thread but the calling one. A process that never imported
    ``threading`` started none (the tools that run no threads do not import it: ~1 ms)."""
    threading = sys.modules.get("threading")
    return threading is None or threading.active_count() == 1


def processes_usable() -> bool:
    """Fork worker processes only from a process that runs no other thread (the CLI): a fork
    copies the locks other threads hold (in OpenSSL, in stdio...), and a fork server or spawn
    would import the caller's ``__main__`` again. The environment variable
    ``MKCFS_DIGEST_THREADS`` turns forking off."""
    return (sys.platform.startswith("linux") and only_thread()
            and os.environ.get("MKCFS_DIGEST_THREADS") is None)


def spare_cpu(looks: int = 5) -> bool:
    """Whether a CPU this process may run on is idle right now (besides the one it runs on):
    the kernel's count of runnable tasks, this one included, is below the number of CPUs.
    A second process only pays on an idle CPU; on a loaded machine it costs CPU time and
    saves no wall time. The count is looked at up to ``looks`` times, 1 ms apart: a kernel
    thread that runs for an instant (freeing the memory of a process that just ended, say)
    should not decide, a machine that stays busy does."""
    import time
    try:
        cpus = len(os.sched_getaffinity(0))
        for look in range(looks):
            if look:
                time.sleep(0.001)
            with open("/proc/loadavg", "rb") as f:
                running = int(f.read().split()[3].split(b"/")[0])
            if running < cpus:
                return True
    except (OSError, ValueError, IndexError, AttributeError):
        return False
    return False


def die_with_parent(parent: int) -> None:
    """In a forked worker: be killed when the process ``parent`` ends (``PR_SET_PDEATHSIG``), and
    end now if it has already (a killed build must not leave workers running)."""
    import signal
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:   # the parent died before the line above
        os._exit(1)
