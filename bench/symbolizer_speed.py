"""Symbolizer speed: DWARF line tables and inline chains on libpython, Go pclntab, /proc/kallsyms loading.

Run from the repository root (no root needed; the kallsyms figures need it to
see addresses, but loading is timed either way):

    .venv/bin/python bench/symbolizer_speed.py [--lib PATH] [--addresses 200] [--go-binary PATH]
        [--only dwarf|pclntab|kallsyms]

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
- Go pclntab, on the pcgroundtruth fixture (built with the venv's go, with
  and without symbols; --go-binary for another Go binary): load_pclntab from
  the file's bytes and from an ElfFile (what FileSymbols passes), best of 7;
  lookup() rate on never-seen PCs (every 7th byte of every function: decodes
  and caches each function's tables) and on a 20,000-PC working set already
  seen (the per-PC cache). Peer: `go tool addr2line` (Go's debug/gosym) on
  the same never-seen PCs, its start-up (a run with one PC) subtracted.
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
sys.path.insert(0, os.path.join(ROOT, "tests"))

FALLBACK_LIB = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"
FIRST_CU_SYMBOL = "PyUnicode_FromString"
PCLNTAB_PC_STEP = 7  # bytes between the never-seen PCs looked up in every function
PCLNTAB_HOT_PCS = 20_000  # a working set that fits the PC cache, as a profile's hot PCs do
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


def _best_s(fn, number: int = 20, repeat: int = 7) -> float:
    """Seconds per call of fn, best of `repeat` rounds of `number` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / number


def pclntab_pcs(table) -> list[int]:
    return [pc for entry, end, _ in table.functions() for pc in range(entry, end, PCLNTAB_PC_STEP)]


def child_pclntab(binary: str) -> dict:
    from symbolizer.elf import ElfFile
    from symbolizer.gopclntab import load_pclntab

    with open(binary, "rb") as f:
        data = f.read()
    elf = ElfFile(binary)
    load_bytes_s = _best_s(lambda: load_pclntab(data))
    load_elf_s = _best_s(lambda: load_pclntab(elf))
    table = load_pclntab(data)
    pcs = pclntab_pcs(table)
    t0 = time.perf_counter()
    for pc in pcs:
        table.lookup(pc)
    cold_s = time.perf_counter() - t0
    hot = pcs[:PCLNTAB_HOT_PCS]
    for pc in hot:
        table.lookup(pc)
    t0 = time.perf_counter()
    for pc in hot:
        table.lookup(pc)
    warm_s = time.perf_counter() - t0
    return {"funcs": len(table), "load_bytes_s": load_bytes_s, "load_elf_s": load_elf_s, "pcs": len(pcs),
            "cold_per_s": len(pcs) / cold_s, "hot": len(hot), "warm_per_s": len(hot) / warm_s}


def addr2line_per_s(binary: str, pcs: list[int]) -> tuple[float, float]:
    """(lookups/s, start-up s) of `go tool addr2line` over `pcs`, start-up measured with one PC."""
    from fixtures.builder import go_tool

    def run(some: list[int]) -> float:
        t0 = time.perf_counter()
        subprocess.run([go_tool(), "tool", "addr2line", binary], input="".join(f"{pc:#x}\n" for pc in some),
                       capture_output=True, text=True, check=True)
        return time.perf_counter() - t0

    startup_s = min(run(pcs[:1]) for _ in range(5))
    total_s = min(run(pcs) for _ in range(3))
    return len(pcs) / max(total_s - startup_s, 1e-9), startup_s


def pclntab_report(args: argparse.Namespace) -> None:
    from fixtures.builder import build_go
    from symbolizer.gopclntab import load_pclntab

    if args.go_binary:
        binaries = {"given": args.go_binary}
    else:
        binaries = {"with .symtab": str(build_go("pcgroundtruth")),
                    "stripped": str(build_go("pcgroundtruth", stripped=True))}
    for label, binary in binaries.items():
        r = run_child(args, "pclntab", "--go-binary", binary)
        print(f"Go pclntab: {binary} ({label}, {os.path.getsize(binary) / 1e6:.1f} MB, {r['funcs']} funcs)")
        print(f"  load_pclntab: from bytes {r['load_bytes_s'] * 1e3:.2f} ms, from an ElfFile "
              f"{r['load_elf_s'] * 1e3:.2f} ms")
        print(f"  lookup: {r['cold_per_s']:,.0f}/s on never-seen PCs ({r['pcs']} PCs), "
              f"{r['warm_per_s']:,.0f}/s on {r['hot']} PCs seen before")
        with open(binary, "rb") as f:
            pcs = pclntab_pcs(load_pclntab(f.read()))
        peer, startup_s = addr2line_per_s(binary, pcs)
        print(f"  peer go tool addr2line, the same {len(pcs)} never-seen PCs: {peer:,.0f}/s (its start-up, "
              f"{startup_s * 1e3:.0f} ms, excluded): ours/peer = {r['cold_per_s'] / peer:.2f}x")


CHILDREN = {
    "first_cu": lambda a: child_first_cu(a.lib),
    "per_cu": lambda a: child_per_cu(a.lib),
    "random": lambda a: child_random(a.lib, a.addresses, a.seed),
    "line_ours": lambda a: child_line_ours(a.lib),
    "line_pyelftools": lambda a: child_line_pyelftools(a.lib, a.cu_offset),
    "kallsyms": lambda a: child_kallsyms(),
    "pclntab": lambda a: child_pclntab(a.go_binary),
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


def dwarf_report(args: argparse.Namespace) -> None:
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


def kallsyms_report(args: argparse.Namespace) -> None:
    k = run_child(args, "kallsyms")
    print(f"kallsyms: {k['lines']} lines, {k['symbols']} text symbols"
          + ("" if k["usable"] else " (addresses hidden: run as root for lookups that resolve)"))
    print(f"  load: ours {k['ours_s'] * 1000:.0f} ms, per-line peer {k['peer_s'] * 1000:.0f} ms "
          f"(peer/ours = {k['peer_s'] / k['ours_s']:.2f}x); reading the file alone {k['read_s'] * 1000:.0f} ms; "
          f"lookup {k['lookup_us']:.2f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", default=default_lib(), help="ELF file with DWARF (default: this Python's libpython)")
    p.add_argument("--addresses", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--cu-offset", dest="cu_offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--go-binary", dest="go_binary", default="",
                   help="Go binary for the pclntab figures (default: the pcgroundtruth fixture, built here)")
    p.add_argument("--only", action="append", choices=("dwarf", "pclntab", "kallsyms"),
                   help="run only this part (repeatable); default: all")
    args = p.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    parts = {"dwarf": dwarf_report, "pclntab": pclntab_report, "kallsyms": kallsyms_report}
    for name in args.only or parts:
        parts[name](args)


if __name__ == "__main__":
    main()
