"""Symbolizer speed: DWARF line tables and inline chains on libpython, /proc/kallsyms loading.

Run from the repository root (no root needed; the kallsyms figures need it to
see addresses, but loading is timed either way):

    .venv/bin/python bench/symbolizer_speed.py [--lib PATH] [--addresses 200]

Every measurement runs in a fresh child process, so RSS growth is its own:

- new CU: the first lookup() + frames() at PyUnicode_FromString (the CU of
  Objects/unicodeobject.c, the largest line table of libpython), after the CU
  index is built: CPU seconds and RSS growth (mmap pages touched included).
- per CU: the first lookup() + frames() in the middle of every CU, one after
  another: slowest and median CPU, and the largest decoded state a kept CU
  holds (its arrays; the cache keeps MAX_CACHED_UNITS of them).
- random: --addresses random addresses of .text, lookup() + frames() each.
- peer: pyelftools' own line-program decoding (line_program_for_CU +
  get_entries) of the unicodeobject.c CU against ours (_Unit.line_table), as
  a ratio. pyelftools is what dwarf_lines used before; its figures for the
  two first rows were 1.48 s / +88 MB and 17.7 s / +895 MB.
- kallsyms: KernelSymbols() against the previous per-line parser (kept here
  as the peer), median of 7 loads each, and the read alone.

Targets (PASS/MISS, never a failing exit status): a new CU costs <= 50 ms of
CPU and a kept CU <= 5 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FALLBACK_LIB = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"
FIRST_CU_SYMBOL = "PyUnicode_FromString"
TARGET_CU_CPU_S = 0.050
TARGET_CU_BYTES = 5 * 1024 * 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def default_lib() -> str:
    name, libdir = sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LIBDIR")
    if name and libdir and os.path.exists(os.path.join(libdir, name)):
        return os.path.join(libdir, name)
    return FALLBACK_LIB


def unit_bytes(unit) -> int:
    """Bytes of decoded state a kept CU holds in arrays (line rows, file names, subprogram index)."""
    n = unit.lines.nbytes() if unit.lines is not None else 0
    if unit.sub_lo is not None:
        n += 8 * (len(unit.sub_lo) + len(unit.sub_hi) + len(unit.sub_die))
    return n


# -- children: each prints one JSON object --------------------------------------------


def child_first_cu(lib: str) -> dict:
    from symbolizer.dwarf_lines import DwarfLines
    from symbolizer.elf import ElfFile
    from symbolizer.elf_symbols import ElfSymbols

    elf = ElfFile(lib)
    addr = ElfSymbols(elf).find(FIRST_CU_SYMBOL).start + 8
    dwarf = DwarfLines(elf)
    t0 = time.process_time()
    dwarf.lookup(0)  # builds the CU index
    index_s = time.process_time() - t0
    r0, c0 = rss_mb(), time.process_time()
    dwarf.lookup(addr)
    dwarf.frames(addr)
    cpu_s, grow_mb = time.process_time() - c0, rss_mb() - r0
    unit = dwarf._unit_for(addr)
    return {"index_s": index_s, "cpu_s": cpu_s, "rss_mb": grow_mb, "kept_bytes": unit_bytes(unit),
            "rows": len(unit.lines.addrs)}


def child_per_cu(lib: str) -> dict:
    from symbolizer import dwarf_lines
    from symbolizer.elf import ElfFile

    dwarf = dwarf_lines.DwarfLines(ElfFile(lib))
    dwarf.lookup(0)
    seen: set[int] = set()
    cpu: list[float] = []
    kept: list[int] = []
    for lo, hi, off in dwarf._cu_ranges:
        if off in seen:
            continue
        seen.add(off)
        addr = (lo + hi) // 2
        c0 = time.process_time()
        dwarf.lookup(addr)
        dwarf.frames(addr)
        cpu.append(time.process_time() - c0)
        kept.append(unit_bytes(dwarf._unit_for(addr)))
    return {"cus": len(cpu), "max_cpu_s": max(cpu), "median_cpu_s": statistics.median(cpu),
            "max_kept_bytes": max(kept), "median_kept_bytes": statistics.median(kept),
            "cache_units": dwarf_lines.MAX_CACHED_UNITS}


def child_random(lib: str, n: int, seed: int) -> dict:
    from symbolizer.dwarf_lines import DwarfLines
    from symbolizer.elf import ElfFile

    elf = ElfFile(lib)
    dwarf = DwarfLines(elf)
    dwarf.lookup(0)
    h = elf.section(".text").header
    rng = random.Random(seed)
    addrs = [rng.randrange(h.sh_addr, h.sh_addr + h.sh_size) for _ in range(n)]
    r0, c0 = rss_mb(), time.process_time()
    cus = set()
    for a in addrs:
        dwarf.lookup(a)
        dwarf.frames(a)
        unit = dwarf._unit_for(a)
        if unit is not None:
            cus.add(unit.offset)
    return {"cpu_s": time.process_time() - c0, "rss_mb": rss_mb() - r0, "cus": len(cus),
            "cached": dwarf.cached_units()}


def child_line_ours(lib: str) -> dict:
    from symbolizer.dwarf_lines import DwarfLines
    from symbolizer.elf import ElfFile
    from symbolizer.elf_symbols import ElfSymbols

    elf = ElfFile(lib)
    addr = ElfSymbols(elf).find(FIRST_CU_SYMBOL).start + 8
    dwarf = DwarfLines(elf)
    dwarf.lookup(0)
    unit = dwarf._unit_for(addr)
    r0, c0 = rss_mb(), time.process_time()
    table = unit.line_table()
    return {"cpu_s": time.process_time() - c0, "rss_mb": rss_mb() - r0, "rows": len(table.addrs),
            "cu_offset": unit.offset}


def child_line_pyelftools(lib: str, cu_offset: int) -> dict:
    from symbolizer.elf import ElfFile

    dwarf = ElfFile(lib).elf.get_dwarf_info(relocate_dwarf_sections=False)
    cu = dwarf.get_CU_at(cu_offset)
    r0, c0 = rss_mb(), time.process_time()
    rows = [e.state for e in dwarf.line_program_for_CU(cu).get_entries() if e.state is not None]
    return {"cpu_s": time.process_time() - c0, "rss_mb": rss_mb() - r0, "rows": len(rows)}


def _kallsyms_per_line(data: bytes) -> tuple[list[int], list[str]]:
    """The previous loader, kept as the peer: one split and one int() per line, a dict of aliases."""
    from symbolizer.kallsyms import _rank

    best: dict[int, tuple[bytes, bytes]] = {}
    for line in data.splitlines():
        parts = line.split(b" ", 2)
        if len(parts) < 3 or parts[1] not in (b"t", b"T", b"w", b"W"):
            continue
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        cur = best.get(addr)
        if cur is None or _rank(parts[1][0], parts[2]) > _rank(cur[0][0], cur[1]):
            best[addr] = (parts[1], parts[2])
    starts = sorted(best)
    return starts, [best[a][1].replace(b"\t", b" ").decode("utf-8", "replace") for a in starts]


def child_kallsyms() -> dict:
    from symbolizer.kallsyms import DEFAULT_PATH, KernelSymbols

    def median_s(fn) -> float:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def read() -> bytes:
        with open(DEFAULT_PATH, "rb") as f:
            return f.read()

    data = read()
    table = KernelSymbols()
    starts = table._starts
    probes = [starts[i] + 1 for i in range(0, len(starts), max(1, len(starts) // 5000))]
    t0 = time.perf_counter()
    for a in probes:
        table.lookup(a)
    lookup_us = (time.perf_counter() - t0) / max(1, len(probes)) * 1e6
    return {"lines": data.count(b"\n"), "symbols": len(table), "usable": table.usable,
            "read_s": median_s(read), "ours_s": median_s(KernelSymbols),
            "peer_s": median_s(lambda: _kallsyms_per_line(read())), "lookup_us": lookup_us}


CHILDREN = {
    "first_cu": lambda a: child_first_cu(a.lib),
    "per_cu": lambda a: child_per_cu(a.lib),
    "random": lambda a: child_random(a.lib, a.addresses, a.seed),
    "line_ours": lambda a: child_line_ours(a.lib),
    "line_pyelftools": lambda a: child_line_pyelftools(a.lib, a.cu_offset),
    "kallsyms": lambda a: child_kallsyms(),
}


def run_child(args: argparse.Namespace, name: str, *extra: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--lib", args.lib,
           "--addresses", str(args.addresses), "--seed", str(args.seed), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"{name}: child failed:\n{out.stderr}")
    return json.loads(out.stdout)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", default=default_lib(), help="ELF file with DWARF (default: this Python's libpython)")
    p.add_argument("--addresses", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--cu-offset", dest="cu_offset", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if not os.path.exists(args.lib):
        sys.exit(f"{args.lib}: no such file (give --lib)")

    print(f"DWARF: {args.lib} ({os.path.getsize(args.lib) / 1e6:.1f} MB)")
    first = run_child(args, "first_cu")
    print(f"  CU index: {first['index_s'] * 1000:.1f} ms CPU")
    print(f"  first lookup+frames in the CU of {FIRST_CU_SYMBOL} ({first['rows']} line rows): "
          f"{first['cpu_s'] * 1000:.1f} ms CPU, RSS +{first['rss_mb']:.1f} MB, "
          f"kept {first['kept_bytes'] / 1e6:.2f} MB")
    per = run_child(args, "per_cu")
    print(f"  every CU, first lookup+frames: {per['cus']} CUs, slowest {per['max_cpu_s'] * 1000:.1f} ms, "
          f"median {per['median_cpu_s'] * 1000:.1f} ms CPU; kept per CU: largest "
          f"{per['max_kept_bytes'] / 1e6:.2f} MB, median {per['median_kept_bytes'] / 1e6:.2f} MB; "
          f"cache holds {per['cache_units']} CUs")
    rnd = run_child(args, "random")
    print(f"  {args.addresses} random .text addresses, lookup+frames: {rnd['cpu_s']:.3f} s CPU, "
          f"RSS +{rnd['rss_mb']:.1f} MB, {rnd['cus']} CUs touched, {rnd['cached']} kept")
    ours = run_child(args, "line_ours")
    peer = run_child(args, "line_pyelftools", "--cu-offset", str(ours["cu_offset"]))
    ratio = peer["cpu_s"] / ours["cpu_s"] if ours["cpu_s"] else float("inf")
    print(f"  line program of that CU: ours {ours['cpu_s'] * 1000:.1f} ms, +{ours['rss_mb']:.1f} MB "
          f"({ours['rows']} rows); pyelftools {peer['cpu_s'] * 1000:.0f} ms, +{peer['rss_mb']:.1f} MB "
          f"({peer['rows']} rows): pyelftools/ours = {ratio:.0f}x CPU")
    print(f"  target new CU <= {TARGET_CU_CPU_S * 1000:.0f} ms: "
          f"{verdict(max(per['max_cpu_s'], first['cpu_s']) <= TARGET_CU_CPU_S)}; "
          f"target kept CU <= {TARGET_CU_BYTES >> 20} MB: {verdict(per['max_kept_bytes'] <= TARGET_CU_BYTES)}")

    k = run_child(args, "kallsyms")
    print(f"kallsyms: {k['lines']} lines, {k['symbols']} text symbols"
          + ("" if k["usable"] else " (addresses hidden: run as root for lookups that resolve)"))
    print(f"  load: ours {k['ours_s'] * 1000:.0f} ms, per-line peer {k['peer_s'] * 1000:.0f} ms "
          f"(peer/ours = {k['peer_s'] / k['ours_s']:.2f}x); reading the file alone {k['read_s'] * 1000:.0f} ms; "
          f"lookup {k['lookup_us']:.2f} us")


if __name__ == "__main__":
    main()
