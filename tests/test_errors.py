"""One error hierarchy: every deliberate error of mkcfs is a ``CfsError`` and subclasses the
matching built-in; erofs's own errors stand alone (erofs never imports mkcfs); an emitter bug is
reported as an internal error, never as bad input."""

from __future__ import annotations

import errno

import pytest

import mkcfs.errors
from erofs.errors import ImageFormatError, InternalError, LayoutError
from mkcfs.build.overlay import XattrLimitError
from mkcfs.cli import common
from mkcfs.errors import BuildInputError, CfsError, StoreError, WalkError
from mkcfs.tree import HardLinkLoopError


@pytest.mark.parametrize("kind,builtin", [
    (BuildInputError, ValueError), (WalkError, OSError), (StoreError, OSError),
    (HardLinkLoopError, ValueError), (XattrLimitError, ValueError)])
def test_mkcfs_errors_are_cfs_errors_and_builtins(kind, builtin):
    assert issubclass(kind, CfsError) and issubclass(kind, builtin)


def test_store_failures_are_not_walk_errors():
    assert not issubclass(StoreError, WalkError) and not issubclass(WalkError, StoreError)


def test_one_internal_error():
    assert not hasattr(mkcfs.errors, "InternalError")
    assert issubclass(InternalError, AssertionError) and not issubclass(InternalError, CfsError)
    assert issubclass(LayoutError, ValueError) and issubclass(ImageFormatError, ValueError)


def _run(exc: BaseException, capsys) -> tuple[int, str]:
    def body(argv: list[str]) -> int:
        raise exc
    status = common.run("prog", "usage\n", body, [])
    return status, capsys.readouterr().err


def test_emitter_bug_is_reported_as_an_internal_error(capsys):
    status, err = _run(InternalError("inode 7 not slot aligned"), capsys)
    assert (status, err) == (1, "prog: internal error (please report): inode 7 not slot aligned\n")


@pytest.mark.parametrize("exc,line", [
    (HardLinkLoopError("unresolved hard link"), "prog: unresolved hard link\n"),
    (XattrLimitError(errno.ERANGE, b"user.x"), "prog: user.x: ERANGE\n"),
    (StoreError("cannot fill store /s: No space left on device"),
     "prog: cannot fill store /s: No space left on device\n"),
])
def test_errors_reach_the_user_as_one_line(exc, line, capsys):
    assert _run(exc, capsys) == (1, line)
