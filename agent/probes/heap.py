"""Heap profile: bpf/heap.bpf.c on the allocators of the target processes.

Native processes, two ways. A process with bpfprof's in-process sampler
(agent/probes/heap_sampler.py; `record -- COMMAND` preloads it) samples itself and
calls two empty functions for sampled objects only: uprobes there, no trap
per malloc. Any other: uprobes on glibc's allocation functions in every
mapped file that exports malloc (libc, or a static executable), per target
process (so other processes never trap), sampling decided in BPF (see
heap.bpf.c); a whole-system capture probes the system libc in every process.
Go binaries: the runtime's own heap profile buckets, read from the process's
memory (agent/go/heap_buckets.py: no trap, the program pays nothing); a
command bpfprof started is paused at runtime.exit for a last read. Where the
buckets cannot be found (stripped binaries), uprobes on the runtime's own
sampling path (agent/go/heap.py).
ALLOC records carry a stack copy, unwound here by CFI (DWARF or not, frame
pointers or not); the allocator's own frames are hidden.

mmap/munmap are not probed: glibc's malloc calls the same `mmap` symbol for
its large blocks, so those bytes would be counted twice, and telling the
application's own mappings apart needs per-call state on every malloc.

The agent keeps the sampled objects that are still live (an ALLOC whose
FREE has not come), so in-use values are those at the end of the capture;
objects of processes that exited count as in use at exit.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.bpfload import libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import RawRecord, RecordKind
from agent.go import heap as go_heap
from agent.go.exit_pause import GO_EXIT_PROGRAM, GO_EXIT_SOURCE
from agent.go.heap import GoHeapTarget
from agent.go.heap_buckets import HeapBuckets, physical_stack, read_heap_buckets
from agent.probes import heap_sampler
from agent.probes.family import Accumulator, ProbeConfig, ProbeFamily, SettingChanges, Window, read_percpu_total
from agent.processes.stack_resolver import StackResolver, UnwoundStack
from agent.processes.targets import gated_command_path
from agent.processes.tracker import ProcessTracker
from exporters.profile import Location, Profile, SampleKey
from exporters.profile_types import empty_profile
from symbolizer.elf import ElfFile, defined_symbols
from symbolizer.errors import BpfprofError
from symbolizer.proc_maps import open_mapped_file, read_maps

log = logging.getLogger(__name__)

SYSTEM_LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
# libc symbol -> (entry program, whether the return is probed for the address).
# aligned_alloc and memalign are one function in glibc: probe points are
# deduplicated by offset so nothing fires twice.
LIBC_PROBES: dict[str, tuple[str, bool]] = {
    "malloc": ("heap_malloc_enter", True),
    "calloc": ("heap_calloc_enter", True),
    "realloc": ("heap_realloc_enter", True),
    "aligned_alloc": ("heap_aligned_alloc_enter", True),
    "memalign": ("heap_aligned_alloc_enter", True),
    "posix_memalign": ("heap_posix_memalign_enter", True),
    "free": ("heap_free_enter", False),
}
RETURN_PROGRAM = "heap_alloc_return"
GO_MALLOC_PROGRAM = "heap_go_malloc"
SAMPLER_ALLOC_PROGRAM = "heap_sampler_alloc"
SAMPLER_FREE_PROGRAM = "heap_sampler_free"
GO_FREE_PROGRAM = "heap_go_free"
# Go processes are re-read this often, so one that exits (and was not paused
# at exit) keeps what it had published up to then; Go publishes at each GC.
GO_READ_EVERY_S = 5.0
SAMPLE_BYTES_MAP = "heap_sample_bytes"
STATS_MAP = "heap_stats"
HEAP_STAT_LIVE_FULL = 0  # heap.bpf.c HEAP_STAT_*
HEAP_STAT_NULL_RESULT = 1
# Frames runtime/pprof hides at the leaf of a Go heap sample (protomem.go).
GO_RUNTIME_PREFIXES = ("runtime.", "internal/runtime/")
# Sampled allocations per CPU-second the ring buffer is sized for: 1 GB/s
# of allocation at 512 KiB is ~2000; a full buffer is counted, not fatal.
EVENTS_PER_CPU_S = 4000


def scale_heap_sample(count: int, size: int, rate: int) -> tuple[int, int]:
    """Go's scaleHeapSample: (count, count*size) divided by the chance 1-exp(-size/rate) of sampling."""
    if count == 0 or size == 0:
        return 0, 0
    if rate <= 1:
        return count, count * size
    scale = 1 / (1 - math.exp(-size / rate))
    return int(count * scale), int(count * size * scale)


@dataclass(frozen=True)
class _GroupKey:
    """Sampled objects that share a sample: Go's bucket (stack, size) plus our per-thread split."""

    pid: int
    tid: int
    thread_name: str
    kernel_ips: tuple[int, ...]
    user_ips: tuple[int, ...]
    size: int
    rate: int = 0  # sampled at this mean byte interval by BPF; 0: the process's own rate (Go, the sampler)


@dataclass
class _Group:
    first: RawRecord
    allocs: int = 0
    live: int = 0


@dataclass
class HeapTracker:
    """ALLOC/FREE records -> per (stack, size) allocation and live counts. No kernel needed."""

    groups: dict[_GroupKey, _Group] = field(default_factory=dict)
    live: dict[tuple[int, int], _GroupKey] = field(default_factory=dict)  # (pid, address) -> its group
    records: int = 0
    unmatched_frees: int = 0
    duplicates: int = 0

    def add(self, rec: RawRecord, rate: int = 0) -> None:
        """`rate`: the BPF sampling rate an ALLOC was taken at (0: its process's own rate)."""
        self.records += 1
        if rec.kind == RecordKind.ALLOC:
            key = _GroupKey(rec.pid, rec.tid, rec.thread_name, rec.kernel_ips, rec.user_ips, rec.value, rate)
            if self.live.get((rec.pid, rec.aux)) == key:
                # The same live object from the same stack again: an entry uprobe
                # on a Go function fires twice when its prologue grows the stack
                # (morestack restarts the function). One allocation, not two.
                self.duplicates += 1
                return
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group(rec)
            group.allocs += 1
            group.live += 1
            old = self.live.get((rec.pid, rec.aux))
            if old is not None:  # the free of the previous object there was missed
                self.groups[old].live -= 1
            self.live[(rec.pid, rec.aux)] = key
        elif rec.kind == RecordKind.FREE:
            key = self.live.pop((rec.pid, rec.aux), None)
            if key is None:
                self.unmatched_frees += 1  # its ALLOC came before the capture
            else:
                self.groups[key].live -= 1

    def carry(self, alive: Callable[[int], bool]) -> HeapTracker:
        """A tracker for the next interval: the live objects of running processes, no allocations yet."""
        nxt = HeapTracker()
        for key, g in self.groups.items():
            if g.live > 0 and alive(key.pid):
                nxt.groups[key] = _Group(g.first, allocs=0, live=g.live)
        nxt.live = {obj: key for obj, key in self.live.items() if key in nxt.groups}
        return nxt

    def scaled(self, rate_of: dict[int, int], default_rate: int) -> Iterable[tuple[_Group, list[int]]]:
        """Each group with [alloc_objects, alloc_space, inuse_objects, inuse_space] scaled as Go does."""
        for key, g in self.groups.items():
            rate = key.rate or rate_of.get(key.pid, default_rate)
            yield g, [*scale_heap_sample(g.allocs, key.size, rate), *scale_heap_sample(g.live, key.size, rate)]


def _allocator_location(loc: Location) -> bool:
    """Go's allocator (runtime frames, as runtime/pprof hides them) or bpfprof's in-process sampler."""
    if loc.mapping is not None and loc.mapping.path.rsplit("/", 1)[-1] == heap_sampler.LIB_NAME:
        return True
    return bool(loc.frames) and all(f.function.startswith(GO_RUNTIME_PREFIXES) for f in loc.frames)


def hide_runtime_frames(stack: tuple[Location, ...]) -> tuple[Location, ...]:
    """Drop the leading allocator locations: the allocation site is the leaf; keep all if all are."""
    for i, loc in enumerate(stack):
        if not _allocator_location(loc):
            return stack[i:]
    return stack


@dataclass(frozen=True)
class _ProbePoint:
    path: str
    offset: int
    program: str
    retprobe: bool


def libc_probe_points(path: str) -> list[_ProbePoint]:
    """Entry (and return) probe points of the allocation functions `path` exports (read through
    ElfFile: bounded copies of a file another user may own)."""
    with ElfFile(path) as ef:
        found = defined_symbols(ef, tuple(LIBC_PROBES), tables=(".dynsym",))
        vaddrs = {name: found[name] for name in LIBC_PROBES if name in found}  # in LIBC_PROBES' order
        if "malloc" not in vaddrs or "free" not in vaddrs:
            return []
        points: list[_ProbePoint] = []
        seen: set[int] = set()
        for name, vaddr in vaddrs.items():
            off = ef.offset_for_vaddr(vaddr)
            if off in seen:
                continue
            seen.add(off)
            program, returns = LIBC_PROBES[name]
            points.append(_ProbePoint(path, off, program, False))
            if returns:
                points.append(_ProbePoint(path, off, RETURN_PROGRAM, True))
    return points


def _attach_points(objs: LoadedObjects, points: list[_ProbePoint], pid: int) -> list[int]:
    """Uprobes at `points` of one file in `pid` (-1: every process): one link per program and kind
    (entry or return), so detaching them waits for one grace period, not one per point."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for pt in points:
        groups.setdefault((pt.program, pt.retprobe), []).append(pt.offset)
    fds: list[int] = []
    try:
        for (program, retprobe), offsets in groups.items():
            fds += libbpf.attach_uprobes(objs.programs[program], points[0].path, offsets, pid, retprobe)
    except BaseException:
        libbpf.close_all(fds)
        raise
    return fds


class HeapAccumulator(Accumulator):
    """One interval's allocations (alloc_*) and the sampled objects live at its end (inuse_*), which carry
    over from interval to interval."""

    family: HeapProbe

    def __init__(self, family: HeapProbe) -> None:
        super().__init__(family)
        self.live = HeapTracker()
        # Go processes read from their buckets: the read at the interval's start and at its end (or exit).
        self.go_base: dict[int, HeapBuckets] = {}
        self.go_reads: dict[int, HeapBuckets] = {}
        self.go_unread: set[int] = set()  # gone before their buckets were read
        self._last_go_read = time.monotonic()
        self.rates: dict[int, int] = {}  # pid -> its own sampling rate (Go's MemProfileRate, the sampler's)
        self.null_results = 0  # sampled allocations that returned NULL in this interval (read at its end)

    def read_buckets(self, pid: int, into: dict[int, HeapBuckets]) -> HeapBuckets | None:
        """Read `pid`'s buckets (and its rate) into `into`; None if it is gone or unreadable."""
        found = self.family.read_buckets(pid)
        if found is None:
            return None
        into[pid], self.rates[pid] = found
        return found[0]

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_go_read >= GO_READ_EVERY_S:
            self._last_go_read = now
            for pid in self.family.bucket_pids():
                self.read_buckets(pid, into=self.go_reads)

    def _last_read(self, pid: int) -> HeapBuckets | None:
        """The latest read of `pid`: this interval's (periodic, at exit), else the one it started from."""
        return self.go_reads.get(pid) or self.go_base.get(pid)

    def carry_into(self, nxt: Accumulator, alive: Callable[[int], bool]) -> None:
        assert isinstance(nxt, HeapAccumulator)
        nxt.live = self.live.carry(alive)
        for pid in self.family.bucket_pids():  # the cut: this interval's end is the next one's start
            read = self.read_buckets(pid, into=self.go_reads) or self._last_read(pid)
            if read is not None and alive(pid):
                nxt.go_base[pid] = read
        nxt.rates = {pid: rate for pid, rate in self.rates.items() if alive(pid)}
        self.null_results = self.family.null_results_since_last()

    def on_record(self, rec: RawRecord) -> None:
        family = self.family
        if rec.kind == RecordKind.GO_EXIT:  # paused at runtime.exit: the probe set continues it after
            if rec.pid in family.go_targets and family.go_targets[rec.pid].reads_buckets:
                self.read_buckets(rec.pid, into=self.go_reads)
            return
        bpf_rate = 0
        if rec.kind == RecordKind.ALLOC:
            if rec.pid not in self.rates:
                rate = family.rate_of(rec.pid)
                if rate is not None:
                    self.rates[rec.pid] = rate
            if rec.pid not in self.rates:  # sampled in BPF: at the rate in effect then (the governor moves it)
                bpf_rate = family.sample_bytes.at(rec.ktime_ns)
            rec = family.complete(rec)
        self.live.add(rec, bpf_rate)

    def record_count(self) -> int:
        return self.live.records

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        family = self.family
        rate = family.sample_bytes.now
        for pid in family.bucket_pids():  # read at the cut (carry_into); a process gone keeps its last read
            last = self._last_read(pid)
            if last is None:
                self.go_unread.add(pid)
            else:  # gone in this interval: as of its last read (in-use at exit, as for native processes)
                self.go_reads[pid] = last
        sampled = {k.pid for k in self.live.groups} | set(self.go_reads)
        rates = set(self.rates.values()) | ({rate} if len(self.rates) < len(sampled) else set())
        # One period per profile: the native rate, unless every sampled process is Go.
        period = rate if rate in rates or not rates else min(rates)
        profile = empty_profile("heap", window.start_ns, window.duration_ns, period)
        with_kernel = family.config.with_kernel
        for group, values in self.live.scaled(self.rates, rate):
            r = group.first
            stack = hide_runtime_frames(resolver.stack(r.pid, r.kernel_ips if with_kernel else (), r.user_ips))
            info = tracker.get(r.pid)
            key = SampleKey(stack=stack, pid=r.pid, tid=r.tid, thread_name=r.thread_name,
                            labels=(("process_name", info.name),) if info else ())
            # A group carried from an earlier interval is dated at this one's start.
            profile.add(key, values, max(window.start_ns, r.ktime_ns + window.wall_offset_ns))
        self._add_bucket_samples(profile, resolver, tracker, window)
        go_targets = dict(family.go_targets)
        unknown_rate = sum(1 for pid in sampled if pid in go_targets and not go_targets[pid].rate_vaddr)
        if unknown_rate:
            profile.comments.append(f"heap: {unknown_rate} Go processes without runtime.MemProfileRate in their "
                                    f"symbols (stripped): its default {go_heap.DEFAULT_RATE_BYTES} assumed")
        go = sampled & set(go_targets)
        if go:
            own = len(go & set(self.go_reads))
            profile.comments.append(f"heap: {own} of {len(go)} Go processes read from the runtime's own profile "
                                    f"buckets (as of their last GC), {len(go) - own} through uprobes on its "
                                    f"sampling path")
        native = sampled - set(go_targets)
        if native:
            own = len(native & set(family.sampler_pids))
            profile.comments.append(f"heap: {own} of {len(native)} native processes sampled in process by "
                                    f"{heap_sampler.LIB_NAME}, {len(native) - own} through uprobes on malloc")
        if self.go_unread:
            profile.comments.append(f"heap: {len(self.go_unread)} Go processes exited before their heap profile "
                                    f"buckets were read")
        if self.live.unmatched_frees:
            profile.comments.append(f"heap: {self.live.unmatched_frees} frees of objects sampled before the capture")
        if self.null_results:
            profile.comments.append(f"heap: {self.null_results} sampled allocations returned NULL")
        changes = family.sample_bytes.inside(window)
        if changes:
            profile.comments.append("heap: sample rate of the processes sampled in BPF changed (overhead governor "
                                    "or reload), each allocation scaled by its own: "
                                    + family.sample_bytes.describe(changes, window, " bytes"))
        return [profile]

    def _add_bucket_samples(self, profile: Profile, resolver: StackResolver, tracker: ProcessTracker,
                            window: Window) -> None:
        """The Go processes read from their buckets: alloc_* since the first read, inuse_* as of the last GC."""
        for pid, read in self.go_reads.items():
            info = tracker.get(pid)
            name = info.name if info else ""
            rate = self.rates.get(pid, go_heap.DEFAULT_RATE_BYTES)
            for (stk, size), (allocs, live) in read.since(self.go_base.get(pid)).items():
                values = [*scale_heap_sample(allocs, size, rate), *scale_heap_sample(live, size, rate)]
                if not any(values):
                    continue
                locs = physical_stack(resolver.stack(pid, (), UnwoundStack(stk, frozenset())))
                key = SampleKey(stack=hide_runtime_frames(locs), pid=pid, tid=pid, thread_name=name,
                                labels=(("process_name", name),) if info else ())
                profile.add(key, values, window.end_ns)


class HeapProbe(ProbeFamily):
    """The allocators of the target processes: what is probed in each, and the Go binaries read from memory."""

    name = "heap"
    source = "heap.bpf.c"
    extra_sources = (GO_EXIT_SOURCE,)
    kinds = (RecordKind.ALLOC, RecordKind.FREE, RecordKind.GO_EXIT)
    accumulator = HeapAccumulator
    ustack_switch = "HEAP_USTACK"
    events_per_cpu_s = EVENTS_PER_CPU_S
    LOSSES = {"heap_live_map_full": "sampled heap objects untracked (live map full): in-use overstated"}

    def __init__(self, config: ProbeConfig, tracker: ProcessTracker) -> None:
        super().__init__(config, tracker)
        # Filled by attach() only (the polling thread); the builder reads copies.
        self.go_targets: dict[int, GoHeapTarget] = {}  # pid -> its Go binary
        self.sampler: heap_sampler.SamplerSites | None = None  # preloaded into the command bpfprof starts
        self.sampler_pids: dict[int, tuple[heap_sampler.SamplerSites, int]] = {}  # pid -> (its sampler, bias)
        self.preloaded: set[int] = set()  # commands bpfprof started with the sampler preloaded
        self._null_before = 0
        # Mean bytes between the allocations BPF samples (the heap_sample_bytes map); set_sample_bytes moves it.
        self.sample_bytes = SettingChanges(config.heap_sample_bytes)

    def command_env(self) -> dict[str, str]:
        """Preload the in-process sampler into the command (agent/probes/heap_sampler.py), when it can be built."""
        lib = heap_sampler.library()
        if lib is None:
            return {}
        self.sampler = heap_sampler.sampler_sites(str(lib))
        return heap_sampler.preload_env(lib, self.config.heap_sample_bytes) if self.sampler else {}

    def programs(self) -> dict[str, ProgType]:
        names = {p for p, _ in LIBC_PROBES.values()} | {RETURN_PROGRAM, GO_MALLOC_PROGRAM, GO_FREE_PROGRAM,
                                                         GO_EXIT_PROGRAM, SAMPLER_ALLOC_PROGRAM,
                                                         SAMPLER_FREE_PROGRAM}
        return dict.fromkeys(sorted(names), ProgType.KPROBE)

    def maps(self) -> list[str]:
        return [STATS_MAP, SAMPLE_BYTES_MAP]

    def attach(self, objs: LoadedObjects) -> list[int]:
        super().attach(objs)
        # A map, not a define: one compiled entry (bpf_cache) serves every heap_sample_bytes.
        libbpf.map_update(objs.maps[SAMPLE_BYTES_MAP], ctypes.c_uint32(0), ctypes.c_uint64(self.sample_bytes.now))
        pids = self.target_pids()
        fds: list[int] = []
        try:
            if not pids:  # the whole system: every process mapping the system libc
                log.warning("heap: probing malloc and free of every process (whole system); each call "
                            "traps into a uprobe, so allocation-heavy programs slow down: select processes")
                fds += _attach_points(objs, libc_probe_points(SYSTEM_LIBC), -1)
            for pid in pids:
                fds += self._attach_pid(objs, pid)
        except BpfprofError:  # a libc we cannot read too: nothing stays attached
            libbpf.close_all(fds)
            raise
        if not fds and not self.bucket_pids():
            log.warning("heap: no allocator found to probe in the target processes")
        return fds

    def _attach_sampler(self, objs: LoadedObjects, pid: int, sites: heap_sampler.SamplerSites) -> list[int]:
        fds = libbpf.attach_uprobes(objs.programs[SAMPLER_ALLOC_PROGRAM], sites.path, [sites.alloc_offset], pid)
        return fds + libbpf.attach_uprobes(objs.programs[SAMPLER_FREE_PROGRAM], sites.path, [sites.free_offset], pid)

    def _attach_pid(self, objs: LoadedObjects, pid: int) -> list[int]:
        """Probe the allocators of one process: its in-process sampler if it has one, else its mapped
        libc-like files; and its Go runtime."""
        files: dict[int, str] = {}  # inode -> a readable path
        exe = gated_command_path(pid)
        sampler = None
        if exe is not None and self.sampler is not None:  # preloaded by us, mapped once the gate execs
            sampler = self.sampler
            self.sampler_pids[pid] = (sampler, 0)
            self.preloaded.add(pid)
        else:
            try:
                found = heap_sampler.sampler_in(pid)
            except (OSError, BpfprofError) as e:  # a library of that name the agent cannot read: none
                log.info("heap: pid %d: sampler library not read: %s", pid, e)
                found = None
            if found is not None:
                sampler = found[0]
                self.sampler_pids[pid] = found
        try:
            for entry in read_maps(pid):
                if "x" in entry.perms and entry.is_file and entry.inode not in files:
                    path = open_mapped_file(pid, entry)
                    if path is not None:
                        files[entry.inode] = path
            if exe is not None:  # not mapped yet: the gate execs it once released
                files.setdefault(os.stat(exe).st_ino, exe)
        except OSError as e:
            log.warning("heap: cannot read the mappings of pid %d: %s", pid, e)
            return []
        fds: list[int] = self._attach_sampler(objs, pid, sampler) if sampler is not None else []
        for path in files.values():
            go = go_heap.go_heap_target(path)
            if go is not None:
                if go.profiling_disabled:
                    log.warning("heap: %s does not use runtime/pprof, so its runtime never samples "
                                "allocations: no Go heap profile for pid %d", path, pid)
                self.go_targets[pid] = go
                if go.reads_buckets:  # read from its memory: nothing runs in the program
                    if self.config.own_command and go.exit_offset:
                        fds += libbpf.attach_uprobes(objs.programs[GO_EXIT_PROGRAM], path, [go.exit_offset], pid)
                    continue
                fds += libbpf.attach_uprobes(objs.programs[GO_MALLOC_PROGRAM], path, [go.malloc_offset], pid)
                fds += libbpf.attach_uprobes(objs.programs[GO_FREE_PROGRAM], path, [go.free_offset], pid)
                continue
            if sampler is not None:
                continue  # its allocator calls are sampled in the process: no trap per call
            try:
                points = libc_probe_points(path)
            except Exception as e:  # noqa: BLE001  (one unreadable file must not end the capture)
                log.debug("heap: %s: %s", path, e)
                continue
            fds += _attach_points(objs, points, pid)
        return fds

    def on_start(self, objs: LoadedObjects, first: Accumulator) -> None:
        assert isinstance(first, HeapAccumulator)
        # alloc_* of a running Go process are what it allocates during the capture
        for pid in self.bucket_pids():
            first.read_buckets(pid, into=first.go_base)

    def bucket_pids(self) -> list[int]:
        """The Go processes read from their buckets (a list: the polling thread may add targets)."""
        return [pid for pid, go in list(self.go_targets.items()) if go.reads_buckets]

    def set_sample_bytes(self, sample_bytes: int) -> None:
        """Sample the allocations BPF sees every `sample_bytes` on average from now on (the map; no reload).
        Go's runtime and the preloaded sampler keep their own rates. BpfLoadError if the map write fails."""
        if sample_bytes != self.sample_bytes.now and self.objs is not None:
            libbpf.map_update(self.objs.maps[SAMPLE_BYTES_MAP], ctypes.c_uint32(0), ctypes.c_uint64(sample_bytes))
        self.sample_bytes.set(sample_bytes)

    def read_buckets(self, pid: int) -> tuple[HeapBuckets, int] | None:
        """`pid`'s profile buckets and its MemProfileRate now; None if it is gone or unreadable."""
        go = self.go_targets[pid]
        try:
            bias = go.bias(pid)
            read = read_heap_buckets(pid, go.bucket_addresses(bias))
        except OSError as e:
            log.debug("heap: buckets of pid %d unreadable: %s", pid, e)
            return None
        rate = go_heap.read_memprofile_rate(pid, go, bias)
        if self.tracker.get(pid) is None:
            self.tracker.observe(pid)  # its maps, for the stacks, while it runs: it sends no records
        return read, rate

    def rate_of(self, pid: int) -> int | None:
        """The sampling rate a process with its own sampler uses (Go, the preloaded sampler); None: ours."""
        if pid in self.go_targets:
            return go_heap.read_memprofile_rate(pid, self.go_targets[pid])
        if pid in self.sampler_pids:
            if pid in self.preloaded:
                return self.config.heap_sample_bytes  # preloaded by us, at our rate
            sites, bias = self.sampler_pids[pid]
            return heap_sampler.read_rate(pid, sites, bias, self.config.heap_sample_bytes)
        return None

    def loss_totals(self) -> dict[str, int]:
        return {"heap_live_map_full": read_percpu_total(self.objs, STATS_MAP, HEAP_STAT_LIVE_FULL)}

    def null_results_since_last(self) -> int:
        """Sampled allocations that returned NULL since the last call (at each cut)."""
        total = read_percpu_total(self.objs, STATS_MAP, HEAP_STAT_NULL_RESULT)
        n, self._null_before = total - self._null_before, total
        return n
