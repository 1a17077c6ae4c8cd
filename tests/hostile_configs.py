"""Config files a hostile or careless user may hand the agent, written to a path (tests share them)."""

from __future__ import annotations

import os
from pathlib import Path


def alias_bomb() -> str:
    """"Billion laughs": nine levels of nine aliases each, 9**9 strings once expanded, 400 bytes of YAML."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def deep_nesting(depth: int = 50_000) -> str:
    """A flow sequence nested `depth` deep (PyYAML's composer recurses once per level)."""
    return "export: " + "[" * depth + "]" * depth + "\n"


# name -> (how to put it at a path, words the one-line error carries)
HOSTILE = {
    "alias_bomb": (lambda p: p.write_text(alias_bomb()), ("aliases", "not accepted")),
    "deep_nesting": (lambda p: p.write_text(deep_nesting()), ("nested deeper than",)),
    "dev_zero": (lambda p: p.symlink_to("/dev/zero"), ("larger than",)),
    "fifo": (lambda p: os.mkfifo(p), ("not a regular file",)),
    "too_big": (lambda p: p.write_text("# padding\n" * 200_000), ("larger than",)),
}


def put(name: str, path: Path) -> tuple[str, ...]:
    """Replace `path` with the hostile config `name`; returns the words its error must carry."""
    make, words = HOSTILE[name]
    if path.exists() or path.is_symlink():
        path.unlink()
    make(path)
    return words
