"""The BPF side of a capture: the selected probe families compiled together.

One clang run compiles every selected bpf/<family>.bpf.c as one translation
unit (in a child, agent/bpfload/bpf_compile.py); they share the ring buffer, the
drop counters and the target set of bpf/common.bpf.h. The ring buffer is
sized from CPU count x expected event rate x drain interval (DESIGN.md), so
a full buffer means the agent fell behind, and that is counted in BPF.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.bpfload import bpf_compile, libbpf
from agent.bpfload.bpf_compile import LoadedObjects
from agent.bpfload.records import (
    Drop,
    RawRecord,
    RecordKind,
    StackRecord,
    parse_record,
)
from agent.probes.family import ProbeFamily
from agent.probes.python_stacks import PY_PROCS_MAP, PythonStacks, map_writer
from agent.processes.targets import wait_stopped
from agent.processes.tracker import ProcessTracker
from agent.unwind.tables import ROW_BYTES, UnwindTables
from bpf import source_path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIN_RINGBUF_PAGES = 64
MAX_TARGETS = 65536
# A process paused at runtime.exit stops on the return from the uprobe; this only bounds a pathological wait.
EXIT_STOP_WAIT_S = 2.0
# Headroom over the worst case of full-size records: drains are late when the
# machine is busy, which is exactly when samples matter.
RINGBUF_HEADROOM = 4
AGENT_TGID_MAP = "agent_tgid"
RING_MAP = "records"
WAKE_BYTES_MAP = "rb_wake_bytes"
SHARED_MAPS = [RING_MAP, "drops", "targets", AGENT_TGID_MAP, WAKE_BYTES_MAP]


def ringbuf_pages(cpus: int, events_per_cpu_s: int, drain_interval_s: float, record_bytes: int = 0) -> int:
    """Pages for the ring buffer: worst-case bytes per drain interval x headroom, power of two.

    `record_bytes`: the largest record (default: a full stack record).
    """
    need = cpus * events_per_cpu_s * drain_interval_s * (record_bytes or ctypes.sizeof(StackRecord)) * RINGBUF_HEADROOM
    pages = MIN_RINGBUF_PAGES
    while pages * PAGE_SIZE < need:
        pages *= 2
    return pages


def wake_bytes(pages: int, cpus: int) -> int:
    """Bytes a CPU sends between wake-ups of the agent (common.bpf.h rb_flags): all CPUs together fill
    at most a quarter of the ring in between, whatever the records' sizes."""
    return max(1, pages * PAGE_SIZE // (4 * cpus))


DRAIN_MAX_S = 1.0  # drain(): the longest an interval's cut or the end of a capture reads the ring buffer
FOLLOW_CHILDREN_SOURCE = "follow_children.bpf.c"
FOLLOW_PROGRAM = "tracepoint__sched__sched_process_fork"
COMMON_SOURCE = "common.bpf.h"
UNWIND_SOURCE = "unwind.bpf.h"  # pasted, not included: it defines maps
PYTHON_SOURCE = "python.bpf.h"  # pasted too: CPython frames read at sample time
UNWIND_WALK_SOURCE = "unwind_walk.bpf.c"
# The BPF walker of each program type, and the prog array its callers tail-call it through
# (one per type: unwind.bpf.h unwind_tail_call).
UNWIND_WALKERS = {
    bpf_compile.ProgType.PERF_EVENT: ("unwind_walk_perf", "unwind_calls_perf"),
    bpf_compile.ProgType.TRACEPOINT: ("unwind_walk_tp", "unwind_calls_tp"),
    bpf_compile.ProgType.KPROBE: ("unwind_walk_kprobe", "unwind_calls_kprobe"),
}
UNWIND_HOOKS = {"tracepoint__sched__sched_process_exec": ("sched", "sched_process_exec"),
                "tracepoint__sched__sched_process_exit": ("sched", "sched_process_exit")}
UNWIND_MAPS = ["unwind_rows", "unwind_procs", "unwind_stats", *(array for _, array in UNWIND_WALKERS.values())]
UNWIND_MAX_PROCESSES = 4096


def host_pid() -> int:
    """This process's pid in the initial pid namespace (what bpf_get_current_pid_tgid returns).

    In a container with its own pid namespace, /proc/self/status NSpid lists
    the pid in each namespace, outermost first.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return os.getpid()


def combined_source(sources: Sequence[str]) -> str:
    """One translation unit: the shared header, then each source's text once.

    Texts are pasted, not #included, because BCC rewrites map accesses and
    generates TRACEPOINT_PROBE argument structs only in its main file. The
    header's include guard turns each source's own `#include "common.bpf.h"`
    (which lets a source compile alone) into a no-op.
    """
    return "\n".join(source_path(name).read_text()
                     for name in dict.fromkeys([COMMON_SOURCE, PYTHON_SOURCE, UNWIND_SOURCE, *sources]))


@dataclass(frozen=True)
class CompilePlan:
    """What one compile of a selection is made of: the cache key's inputs, and what the set needs after it."""

    text: str
    defines: dict[str, int]
    programs: dict[str, bpf_compile.ProgType]
    maps: list[str]
    walkers: frozenset[bpf_compile.ProgType]
    table_rows: int
    # Set at load time, not compiled in (one cache entry serves every drain interval and CPU count):
    ring_pages: int = MIN_RINGBUF_PAGES
    wake_bytes: int = 1

    def is_cached(self) -> bool:
        """Whether loading this plan forks no compiler (`bpfprof doctor`)."""
        return bpf_compile.is_cached(self.text, self.defines, self.programs, self.maps)

    def load(self) -> LoadedObjects:
        objs = bpf_compile.load_programs(self.text, self.defines, self.programs, self.maps,
                                         map_entries={RING_MAP: self.ring_pages * PAGE_SIZE})
        libbpf.map_update(objs.maps[WAKE_BYTES_MAP], ctypes.c_uint32(0), ctypes.c_uint32(self.wake_bytes))
        return objs


def compile_plan(families: Sequence[ProbeFamily], filter_pids: bool, follow_children: bool = False,
                 with_kernel: bool = True, drain_interval_s: float = 0.1) -> CompilePlan:
    """The source, defines, programs and maps of one compile of `families`.

    Nothing in it depends on the process that loads it (the agent's own pid
    is written into `agent_tgid` after the load), so the compiled programs
    are cached across starts.
    """
    cpus = len(libbpf.online_cpus())
    rate = sum(f.events_per_cpu_s for f in families)
    # Families whose records are bigger than a stack record (samples with a stack copy) say so.
    biggest = max((f.record_bytes for f in families), default=0)
    pages = ringbuf_pages(cpus, rate, drain_interval_s, biggest)
    defines = {
        "FILTER_PIDS": int(filter_pids),
        "WITH_KERNEL": int(with_kernel),
        "MAX_TARGETS": MAX_TARGETS,
    }
    programs: dict[str, bpf_compile.ProgType] = {}
    maps = list(SHARED_MAPS)
    for f in families:
        own = f.defines()
        # One stack-copy buffer for the set: as big as the largest family wants.
        own["USTACK_BYTES"] = max(own.get("USTACK_BYTES", 0), defines.get("USTACK_BYTES", 0))
        defines.update(own)
        programs.update(f.programs())
        maps += [m for m in f.maps() if m not in maps]
    if any(f.reads_python for f in families):
        maps.append(PY_PROCS_MAP)
    sources = [s for f in families for s in (f.source, *f.extra_sources)]
    if follow_children:
        programs[FOLLOW_PROGRAM] = bpf_compile.ProgType.TRACEPOINT
        sources.append(FOLLOW_CHILDREN_SOURCE)
    walkers = frozenset(f.bpf_unwind_prog for f in families if f.walks_in_bpf and f.bpf_unwind_prog)
    table_rows = 0
    if walkers:
        table_rows = max(1, max(f.config.unwind_table_bytes for f in families) // ROW_BYTES)
        defines.update(UNWIND_ROWS=table_rows, UNWIND_PROCS=UNWIND_MAX_PROCESSES,
                       UNWIND_SEARCH_STEPS=table_rows.bit_length() + 1)
        programs.update({UNWIND_WALKERS[t][0]: t for t in sorted(walkers)})
        programs.update(dict.fromkeys(UNWIND_HOOKS, bpf_compile.ProgType.TRACEPOINT))
        maps += UNWIND_MAPS
        sources.append(UNWIND_WALK_SOURCE)
    return CompilePlan(combined_source(sources), defines, programs, maps, walkers, table_rows,
                       pages, wake_bytes(pages, cpus))


class ProbeSet:
    """Owns the loaded programs of a capture. Use as a context manager; close() detaches."""

    def __init__(self, families: Sequence[ProbeFamily], pids: Iterable[int] | None = None,
                 follow_children: bool = False, with_kernel: bool = True, drain_interval_s: float = 0.1,
                 tracker: ProcessTracker | None = None) -> None:
        self.families = list(families)
        self._pids = None if pids is None else list(pids)
        self._follow = follow_children
        plan = compile_plan(self.families, self._pids is not None, follow_children, with_kernel, drain_interval_s)
        walkers, table_rows = plan.walkers, plan.table_rows
        self.objs: LoadedObjects = plan.load()
        # Profiling the profiler would put its symbolization into every
        # whole-system profile. Its pid as BPF sees it (host namespace).
        libbpf.map_update(self.objs.maps[AGENT_TGID_MAP], ctypes.c_uint32(0), ctypes.c_uint32(host_pid()))
        self._events: list[int] = []
        self._ring: libbpf.RingBuffer | None = None
        self.unwind_tables: UnwindTables | None = None
        if walkers:
            for t in walkers:
                name, array = UNWIND_WALKERS[t]
                libbpf.map_update(self.objs.maps[array], ctypes.c_uint32(0),
                                  ctypes.c_uint32(self.objs.programs[name]))
            self.unwind_tables = UnwindTables(self.objs.maps, tracker if tracker is not None else ProcessTracker(), table_rows)
            for f in self.families:
                if f.walks_in_bpf:
                    f.unwind_tables = self.unwind_tables
        # One for the capture: `py_procs` is one map whichever families read Python frames.
        self.python: PythonStacks | None = None
        if any(f.reads_python for f in self.families):
            self.python = PythonStacks(map_writer(self.objs.maps[PY_PROCS_MAP]),
                                       tracker if tracker is not None else ProcessTracker())
            for f in self.families:
                if f.reads_python:
                    f.python = self.python
        self.received_bytes = 0  # ring-buffer bytes delivered: the hot path's cost (bench/hotpath_vs_bcc.py)
        for pid in self._pids or ():
            self.add_target(pid)

    def add_target(self, pid: int) -> None:
        """Record this process too (only when the set filters by pid)."""
        libbpf.map_update(self.objs.maps["targets"], ctypes.c_uint32(pid), ctypes.c_uint8(1))

    def start(self, deliver: Callable[[RawRecord], object],
              deliver_bufs: Callable[[list[bytes], Callable[[bytes], object]], None] | None = None) -> None:
        """Attach every family; each record is parsed and handed to `deliver`, or, with `deliver_bufs`,
        each batch is handed as it came to that, with the function that parses and delivers one record
        (paused exits included) for those it does not take itself."""

        def one(buf: bytes) -> object:
            rec = parse_record(buf)
            if rec.kind == RecordKind.GO_EXIT:
                self._at_go_exit(rec, deliver)
                return None
            return deliver(rec)

        def dispatch(bufs: list[bytes]) -> None:
            self.received_bytes += sum(map(len, bufs))
            if deliver_bufs is not None:
                deliver_bufs(bufs, one)
                return
            for buf in bufs:
                one(buf)

        self._ring = libbpf.RingBuffer(self.objs.maps["records"], dispatch)
        if self._follow:
            self._events += libbpf.attach_tracepoint(self.objs.programs[FOLLOW_PROGRAM], "sched", "sched_process_fork")
        if self.unwind_tables is not None:
            for prog, (category, name) in UNWIND_HOOKS.items():
                self._events += libbpf.attach_tracepoint(self.objs.programs[prog], category, name)
            for pid in self._pids or ():
                self.unwind_tables.want(pid)
        if self.python is not None:
            for pid in self._pids or ():  # known targets: registered before their first record
                self.python.observe_pid(pid)
        for f in self.families:
            self._events += f.attach(self.objs)

    @staticmethod
    def _at_go_exit(rec: RawRecord, deliver: Callable[[RawRecord], None]) -> None:
        """A Go command paused at runtime.exit (bpf/go_exit.bpf.c go_exit_pause): once it has stopped,
        every family that asked reads it; then it goes on to exit, whatever they did."""
        try:
            wait_stopped(rec.pid, EXIT_STOP_WAIT_S)
            deliver(rec)
        finally:
            try:
                os.kill(rec.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def poll(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for records and deliver them all.

        BPF wakes the agent only when its CPU's share of the ring fills up or
        a record needs an answer (common.bpf.h rb_flags), and wake() ends the
        wait early, so after the wait the ring is drained whether or not a
        wake-up came."""
        if self._ring is not None:
            self._ring.wait(timeout_s)

    def wake(self) -> None:
        """End a poll() now, from another thread or a signal handler."""
        if self._ring is not None:
            self._ring.wake()

    def drain(self) -> None:
        """Deliver the records already in the buffer without waiting (for at most DRAIN_MAX_S when BPF
        writes faster than the agent reads: what is left goes to the next interval)."""
        if self._ring is None:
            return
        deadline = time.monotonic() + DRAIN_MAX_S
        self._ring.consume()
        while self._ring.stopped_early and time.monotonic() < deadline:
            self._ring.consume()

    def drops(self) -> dict[Drop, int]:
        """Sum of each drop counter over all CPUs."""
        return {d: sum(libbpf.map_lookup_percpu_u64(self.objs.maps["drops"], d)) for d in Drop}

    def close(self) -> None:
        """Detach and free everything (idempotent)."""
        for f in self.families:
            f.detach()
        libbpf.close_all(self._events)  # uprobes among them: closed in parallel (libbpf.close_all)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.unwind_tables is not None:
            self.unwind_tables.close()
            self.unwind_tables = None
        self.objs.close()

    def __enter__(self) -> ProbeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


