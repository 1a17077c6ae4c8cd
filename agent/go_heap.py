"""Go binaries for the heap probe: where its uprobes go, and the runtime's sampling rate.

Why mProf_Malloc/freeSpecial uprobes and not the runtime's own buckets read
through /proc/PID/mem: the buckets give the same numbers only as of the last
GC, need the layout of runtime.bucket/memRecord per Go version, and a read
of the whole bucket list per export (thousands of 100-byte reads at
~1 us each in a large program, every interval); the uprobes cost one trap per
*sampled* object (one per 512 KiB allocated by default: ~2 000 per GB), which
measured as noise next to the allocations themselves (bench/heap_overhead.py),
and give each sample its time, thread and address. Their arguments are fixed
by ABIInternal and have not changed since Go 1.17 for mProf_Malloc(mp, p, size)
(earlier: (p, size)) and freeSpecial(s, p, size).

A Go program that never references runtime.MemProfile (no runtime/pprof,
no net/http/pprof) is linked with runtime.disableMemoryProfiling = true: its
runtime sets MemProfileRate to 0 and never samples, so it has no heap profile
here either; `go_heap_target` says so.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from agent.uprobes import vaddr_to_offset
from symbolizer.elf import ElfFile

log = logging.getLogger(__name__)

MALLOC_SYMBOL = "runtime.mProf_Malloc"
FREE_SYMBOL = "runtime.freeSpecial"
RATE_SYMBOL = "runtime.MemProfileRate"
DISABLED_SYMBOL = "runtime.disableMemoryProfiling"
DEFAULT_RATE_BYTES = 512 * 1024  # runtime.MemProfileRate's initial value


@dataclass(frozen=True)
class GoHeapTarget:
    """File offsets of the two probe points in one Go binary, and its rate variable."""

    path: str
    malloc_offset: int
    free_offset: int
    rate_vaddr: int  # runtime.MemProfileRate, 0 if absent
    pie: bool
    profiling_disabled: bool  # linked with disableMemoryProfiling: the runtime never samples


def go_heap_target(path: str) -> GoHeapTarget | None:
    """The probe points of `path`, or None if it is not a Go binary with a memory profiler."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            if symtab is None:
                return None  # stripped: would need the function table of .gopclntab (not done)
            syms = {}
            for name in (MALLOC_SYMBOL, FREE_SYMBOL, RATE_SYMBOL, DISABLED_SYMBOL):
                found = symtab.get_symbol_by_name(name)
                if found:
                    syms[name] = found[0]["st_value"]
            if MALLOC_SYMBOL not in syms or FREE_SYMBOL not in syms:
                return None
            disabled = False
            if DISABLED_SYMBOL in syms:
                disabled = _read_vaddr(elf, syms[DISABLED_SYMBOL], 1) == b"\x01"
            pie = elf.header["e_type"] == "ET_DYN"
    except (OSError, ValueError) as e:
        log.debug("%s: not usable for Go heap probes: %s", path, e)
        return None
    except Exception as e:  # noqa: BLE001  (pyelftools raises its own errors on odd files)
        log.debug("%s: not an ELF file we can read: %s", path, e)
        return None
    with ElfFile(path) as ef:
        malloc_off = vaddr_to_offset(ef, syms[MALLOC_SYMBOL])
        free_off = vaddr_to_offset(ef, syms[FREE_SYMBOL])
    return GoHeapTarget(path, malloc_off, free_off, syms.get(RATE_SYMBOL, 0), pie, disabled)


def _read_vaddr(elf: ELFFile, vaddr: int, size: int) -> bytes | None:
    """Initial bytes of a variable in the file (data sections; bss reads as zero)."""
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_memsz"]:
            rel = vaddr - seg["p_vaddr"]
            if rel >= seg["p_filesz"]:
                return b"\0" * size
            return seg.data()[rel:rel + size]
    return None


def read_memprofile_rate(pid: int, target: GoHeapTarget) -> int:
    """runtime.MemProfileRate of a live process; the default when it cannot be read."""
    if not target.rate_vaddr:
        return DEFAULT_RATE_BYTES
    addr = target.rate_vaddr
    try:
        if target.pie:
            addr += _load_bias(pid, target.path)
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(addr)
            raw = mem.read(8)
    except (OSError, ValueError):
        return DEFAULT_RATE_BYTES
    if len(raw) != 8:
        return DEFAULT_RATE_BYTES
    (rate,) = struct.unpack("<q", raw)
    return rate if rate > 0 else DEFAULT_RATE_BYTES


def _load_bias(pid: int, path: str) -> int:
    """Start of the file's offset-0 mapping in `pid` (PIE Go binaries link at vaddr 0)."""
    ino = os.stat(path).st_ino
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and int(parts[2], 16) == 0 and int(parts[4]) == ino:
                return int(parts[0].split("-")[0], 16)
    raise ValueError(f"{path} is not mapped in {pid}")
