"""Every command and subcommand answers ``--help`` (usage on stdout, exit 0), and every command
has a man page that ``man -l`` renders without warnings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mkcfs.cli import mkcfs as group

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "mkcfs" / "man"
ENV = dict(os.environ, PYTHONPATH=str(REPO))

COMMANDS = {  # command -> (module, man page)
    "mkcomposefs": ("mkcfs.cli.mkcomposefs", "mkcomposefs.1"),
    "composefs-info": ("mkcfs.cli.composefs_info", "composefs-info.1"),
    "composefs-dump": ("mkcfs.cli.composefs_dump", "composefs-dump.1"),
    "mount.composefs": ("mkcfs.cli.mount_composefs", "mount.composefs.1"),
    "mkcfs": ("mkcfs.cli.mkcfs", "mkcfs.1"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help(command):
    proc = subprocess.run([sys.executable, "-m", COMMANDS[command][0], "--help"], env=ENV,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == b""
    assert proc.stdout.startswith(b"usage: ") and command.encode() in proc.stdout.split(b"\n")[0]


@pytest.mark.parametrize("name", sorted(group.SUBCOMMANDS))
def test_subcommand_help_names_its_options(name, capsys):
    assert group.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mkcfs {name}") and "--help" in out


def test_composefs_info_errors_stay_those_of_1_0_8(capsys):
    from mkcfs.cli import composefs_info

    assert composefs_info.main(["--hel"]) == 0            # a unique abbreviation, as getopt
    assert capsys.readouterr().out.startswith("usage: composefs-info")
    assert composefs_info.main(["--frobnicate"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err.splitlines()[0]) == (
        "Def\n", "composefs-info: unrecognized option '--frobnicate'")


MAN_LINT = shutil.which("man")


def test_every_command_has_a_man_page():
    pages = {p.name for p in MAN.iterdir()}
    assert {page for _, page in COMMANDS.values()} | {"composefs-dump.5"} == pages


@pytest.mark.skipif(MAN_LINT is None, reason="man (Debian man-db) not installed; .ci/run installs it")
@pytest.mark.parametrize("page", sorted(p.name for p in MAN.iterdir()))
def test_man_page_renders_without_warnings(page):
    proc = subprocess.run(["man", "--warnings", "-l", str(MAN / page)], capture_output=True,
                          env=dict(os.environ, MANWIDTH="80"), timeout=60)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()
    text = re.sub(r".\x08", "", proc.stdout.decode())   # no bold/underline overstrikes
    name = page.rsplit(".", 1)[0]
    assert "NAME" in text and name in text and "SEE ALSO" in text
    for section in ("SYNOPSIS", "EXIT STATUS") if page.endswith(".1") else ("DESCRIPTION",):
        assert section in text, f"{page} lacks {section}"


def test_man_pages_are_installed_with_the_package():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    data_files = config["data-files"]
    installed = {Path(f).name for files in data_files.values() for f in files}
    assert installed == {p.name for p in MAN.iterdir()}
    for target, files in data_files.items():
        assert all(target == f"share/man/man{Path(f).suffix[1:]}" for f in files)
