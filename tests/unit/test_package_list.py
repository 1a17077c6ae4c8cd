"""pyproject.toml lists every import package: a wheel (the Docker image, install.sh) holds only those listed."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_with_an_init_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("agent", "symbolizer", "exporters", "viewer", "bpf"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            if "node_modules" not in rel.parts and "__pycache__" not in rel.parts:
                found.add(".".join(rel.parts))
    assert found - listed == set(), "packages missing from pyproject.toml [tool.setuptools] packages"
