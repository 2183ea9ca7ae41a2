"""mkcfs.forksafe: a second process is used only when a CPU is idle, and dies with its parent."""

from __future__ import annotations

import os

import pytest

from mkcfs import forksafe


def test_a_spare_cpu_is_one_the_runnable_tasks_leave_idle(monkeypatch):
    # this process is runnable itself: with one CPU there is never a spare one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not forksafe.spare_cpu()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100000)))
    assert forksafe.spare_cpu()


def test_a_busy_instant_does_not_decide_a_busy_machine_does(monkeypatch):
    """The runnable count is looked at a few times: one look at a spare CPU is enough."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    counts: list[int] = []
    real_open = open

    def loadavg(path, mode="r", *args, **kwargs):
        if path == "/proc/loadavg":
            import io
            return io.BytesIO(b"0.5 0.5 0.5 %d/100 1234\n" % counts.pop(0))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", loadavg)
    counts[:] = [3, 2, 1]
    assert forksafe.spare_cpu()
    assert counts == []
    counts[:] = [3, 3, 3, 3, 3, 1]
    assert not forksafe.spare_cpu()
    assert counts == [1]   # five looks, then no more


def test_a_child_dies_with_its_parent():
    """``die_with_parent``: a forked process is killed when the process it names ends."""
    import signal
    import time

    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:   # the parent of the child, killed below
        try:
            parent = os.getpid()
            child = os.fork()
            if child == 0:
                try:
                    forksafe.die_with_parent(parent)
                    os.write(write_end, b"%d\n" % os.getpid())
                    time.sleep(60)
                finally:
                    os._exit(0)
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        child = int(reader.readline())
    os.kill(middle, signal.SIGKILL)
    os.waitpid(middle, 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in (b"Z", b"X"):
            break
        time.sleep(0.02)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
