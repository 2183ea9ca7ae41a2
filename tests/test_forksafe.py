"""mkcfs.forksafe: a second process is used only when a CPU is idle."""

from __future__ import annotations

import os

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
