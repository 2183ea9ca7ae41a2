"""The ``mkcfs`` command group: top-level help, unknown subcommands, per-subcommand --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mkcfs.cli import mkcfs as group


def test_top_level_help_lists_every_subcommand(capsys):
    assert group.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mkcfs SUBCOMMAND")
    for name in group.SUBCOMMANDS:
        assert f"\n  {name} " in out


def test_no_arguments_is_a_usage_error(capsys):
    assert group.main([]) == 2


def test_unknown_subcommand_is_one_line_and_usage(capsys):
    assert group.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "mkcfs: unknown subcommand 'frobnicate'"


@pytest.mark.parametrize("name", sorted(group.SUBCOMMANDS))
def test_every_subcommand_answers_help(name, capsys):
    assert group.main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: mkcfs {name}")


def test_python_dash_m_runs_the_group():
    proc = subprocess.run([sys.executable, "-m", "mkcfs", "--help"], capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith(b"usage: mkcfs SUBCOMMAND")
