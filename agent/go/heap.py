"""Go binaries for the heap probe: where its probes go, and the runtime's sampling rate.

Chosen by measurement (bench/overhead.py, Go heapsites at ~4 GB/s, medians
of 7 on this 2-CPU VM): the runtime's own profile buckets read through
/proc/PID/mem (agent/go/heap_buckets.py) slowed the program by +1.1 % wall,
-1.1 % CPU (noise: nothing runs in it); uprobes on runtime.mProf_Malloc and
runtime.freeSpecial, one trap per sampled object and one per its free, by
+10-14 % wall and CPU (+36-40 % while every record woke the agent: an IPI
and a context switch per record, see common.bpf.h rb_flags). So the buckets, wherever
runtime.mbuckets and runtime.mProfCycle are in .symtab; runtime.exit is
where a command bpfprof started is paused for its last read.

A stripped binary has no symbol table: the buckets cannot be found, so the
uprobes it is, their two functions found in its .gopclntab;
runtime.MemProfileRate cannot be found either, so its default is assumed (a
program that changes it is scaled wrongly; the profile says so). The
uprobes' arguments are fixed by ABIInternal and have not changed since Go
1.17 for mProf_Malloc(mp, p, size) (earlier: (p, size)) and
freeSpecial(s, p, size).

A Go program that never references runtime.MemProfile (no runtime/pprof,
no net/http/pprof) is linked with runtime.disableMemoryProfiling = true: its
runtime sets MemProfileRate to 0 and never samples, so it has no heap profile
here either; `go_heap_target` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.go.exit_pause import GO_EXIT_FUNCTIONS
from agent.go.heap_buckets import BucketAddresses, cycle_words
from agent.processes.memory import ProcessMemory
from symbolizer.elf import ElfFile, defined_symbols
from symbolizer.errors import BpfprofError
from symbolizer.gobuildinfo import read_build_info
from symbolizer.gopclntab import load_pclntab
from symbolizer.proc_maps import file_base

log = logging.getLogger(__name__)

MALLOC_SYMBOL = "runtime.mProf_Malloc"
FREE_SYMBOL = "runtime.freeSpecial"
RATE_SYMBOL = "runtime.MemProfileRate"
DISABLED_SYMBOL = "runtime.disableMemoryProfiling"
BUCKETS_SYMBOL = "runtime.mbuckets"  # agent/go/heap_buckets.py
CYCLE_SYMBOL = "runtime.mProfCycle"
DEFAULT_RATE_BYTES = 512 * 1024  # runtime.MemProfileRate's initial value


@dataclass(frozen=True)
class GoHeapTarget:
    """Where one Go binary keeps its heap profile: its buckets and rate variable, the uprobe points."""

    path: str
    malloc_offset: int
    free_offset: int
    rate_vaddr: int  # runtime.MemProfileRate, 0 if absent
    pie: bool
    profiling_disabled: bool  # linked with disableMemoryProfiling: the runtime never samples
    # The runtime's own buckets (agent/go/heap_buckets.py); 0: not found (stripped), uprobes instead.
    buckets_vaddr: int = 0
    cycle_vaddr: int = 0
    cycle_words: int = 0
    exit_offset: int = 0  # file offset of runtime.exit, where a command bpfprof started is read at exit

    @property
    def reads_buckets(self) -> bool:
        return bool(self.buckets_vaddr and self.cycle_vaddr and self.cycle_words)

    def bucket_addresses(self, bias: int) -> BucketAddresses:
        return BucketAddresses(self.buckets_vaddr + bias, self.cycle_vaddr + bias, self.cycle_words)

    def bias(self, pid: int) -> int:
        """Add to the binary's addresses to get `pid`'s (OSError if it is not mapped there)."""
        return file_base(pid, self.path) if self.pie else 0  # PIE Go binaries link at vaddr 0


def go_heap_target(path: str) -> GoHeapTarget | None:
    """The probe points of `path`, or None if it is not a Go binary with a memory profiler.

    Read through ElfFile (the file is another user's: bounded copies, never a whole read)."""
    try:
        with ElfFile(path) as ef:
            syms = defined_symbols(ef, (MALLOC_SYMBOL, FREE_SYMBOL, RATE_SYMBOL, DISABLED_SYMBOL, BUCKETS_SYMBOL,
                                        CYCLE_SYMBOL, *GO_EXIT_FUNCTIONS), tables=(".symtab",))
            if ef.headers.section(".symtab") is None:
                # stripped: the functions are still in .gopclntab (the variables are not: defaults assumed)
                syms = _pclntab_functions(ef, (MALLOC_SYMBOL, FREE_SYMBOL))
            if MALLOC_SYMBOL not in syms or FREE_SYMBOL not in syms:
                return None
            disabled = DISABLED_SYMBOL in syms and _read_vaddr(ef, syms[DISABLED_SYMBOL], 1) == b"\x01"
            pie = ef.is_pie_or_shared
            malloc_off = ef.offset_for_vaddr(syms[MALLOC_SYMBOL])
            free_off = ef.offset_for_vaddr(syms[FREE_SYMBOL])
            exit_vaddr = next((syms[n] for n in GO_EXIT_FUNCTIONS if n in syms), 0)
            exit_off = ef.offset_for_vaddr(exit_vaddr) if exit_vaddr else 0
            info = read_build_info(ef)
    except (OSError, BpfprofError) as e:
        log.debug("%s: not usable for Go heap probes: %s", path, e)
        return None
    version = info.version_tuple if info is not None else None
    words = cycle_words(version) if version else 0
    return GoHeapTarget(path, malloc_off, free_off, syms.get(RATE_SYMBOL, 0), pie, disabled,
                        syms.get(BUCKETS_SYMBOL, 0), syms.get(CYCLE_SYMBOL, 0), words, exit_off)


def _pclntab_functions(elf: ElfFile, names: tuple[str, ...]) -> dict[str, int]:
    """Entry addresses of the Go functions `names` from the binary's .gopclntab."""
    tab = load_pclntab(elf)
    if tab is None:
        return {}
    return {name: entry for entry, _, name in tab.functions() if name in names}


def _read_vaddr(elf: ElfFile, vaddr: int, size: int) -> bytes | None:
    """Initial bytes of a variable in the file (data sections; bss reads as zero)."""
    for seg in elf.load_segments:
        if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.memsz:
            rel = vaddr - seg.vaddr
            if rel + size > seg.filesz:
                return b"\0" * size
            elf.ensure(seg.offset + rel, size)
            return bytes(elf.image[seg.offset + rel:seg.offset + rel + size])
    return None


def read_memprofile_rate(pid: int, target: GoHeapTarget, bias: int | None = None) -> int:
    """runtime.MemProfileRate of a live process (`bias`: target.bias(pid), if known); the default
    when it cannot be read."""
    if not target.rate_vaddr:
        return DEFAULT_RATE_BYTES
    try:
        bias = target.bias(pid) if bias is None else bias
    except OSError:
        return DEFAULT_RATE_BYTES
    return read_rate_at(pid, target.rate_vaddr + bias, DEFAULT_RATE_BYTES)


def read_rate_at(pid: int, addr: int, default: int, proc_root: str = "/proc") -> int:
    """A sampling-rate variable (int64, bytes) of a live process at `addr`; `default` if unreadable or <= 0."""
    try:
        with ProcessMemory(pid, proc_root) as mem:
            rate = mem.i64(addr)
    except OSError:
        return default
    return rate if rate > 0 else default
