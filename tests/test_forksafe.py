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
