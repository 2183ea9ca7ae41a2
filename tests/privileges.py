"""Run test code with fewer privileges than root, without exec'ing a new interpreter.

CI runs as root, which reads everything; permission errors can still be tested by forking and,
in the child, dropping the capabilities that bypass file permissions (or becoming nobody). The
child runs a Python callable in the already-loaded interpreter, so no binary has to be
executable by the unprivileged user.
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from collections.abc import Callable

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SYS_ADMIN = 21
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_capabilities(*caps: int) -> None:
    """Stay uid 0 but lose ``caps`` (effective, permitted, inheritable and bounding sets)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in caps:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for cap in caps:
        word, bit = divmod(cap, 32)
        for field in range(3):          # effective, permitted, inheritable
            data[word * 3 + field] &= ~(1 << bit)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def run_forked(body: Callable[[], int | None], drop: Callable[[], None]) -> tuple[int, str]:
    """Fork; in the child call ``drop()`` then ``body()``; return (exit status, its stderr).

    ``body`` returning None counts as 0; an exception (a failed assert included) prints its
    traceback to the captured stderr and exits 99."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - pytest may have replaced it
            drop()
            result = body()
            code = 0 if result is None else int(result)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")
