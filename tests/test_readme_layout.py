"""The README's Layout map names every module of the packages (and nothing that is gone)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Layout\n"):]
    return section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]


def _named() -> set[str]:
    named: set[str] = set()
    for line in _layout_block().splitlines():
        first = line.split("  ")[0].strip()
        if not first or first.endswith("/") or first.endswith(".toml"):
            continue
        parts = [p.strip() for p in first.split(",")]
        base = parts[0].rsplit("/", 1)[0]
        named.add(parts[0])
        named.update(f"{base}/{p}" for p in parts[1:])
    return named


def test_every_module_is_in_the_layout_map_and_every_entry_exists():
    modules = {str(p.relative_to(REPO)) for d in ("mkcfs", "erofs", "fsverity")
               for p in (REPO / d).rglob("*.py") if p.name != "__init__.py" or p.parent.name == "mkcfs"}
    named = _named()
    assert modules - named == set(), "modules missing from the README Layout map"
    assert {n for n in named if not (REPO / n).exists()} == set(), "Layout map names files that are gone"
    assert all(re.match(r"^[\w./-]+$", n) for n in named)
