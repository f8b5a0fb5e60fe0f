"""pyproject.toml declares every package of the source tree: a plain (non-editable) `pip install .` ships them all.
(`make setup` installs in editable mode, where a package missing from the list still imports: only this catches it.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_declared():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    dirs = {name: ROOT / path for name, path in tool["package-dir"].items()}
    found = set()
    for name, top in dirs.items():
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top)
            found.add(".".join((name, *rel.parts)) if rel.parts else name)
    assert found - declared == set(), f"add to [tool.setuptools] packages: {sorted(found - declared)}"
    assert declared - found == set(), f"declared but not in the tree: {sorted(declared - found)}"
