"""Goroutine profile: the live goroutines of each Go process, by stack (bpf/goroutine.bpf.c).

BPF sends a goroutine's creation (with g.startpc, g.gopc and g.labels) and
its exit, from uprobes on the casgstatus calls of runtime.newproc1 and
runtime.gdestroy (goexit0 before Go 1.23); `GoroutineTable` keeps the live
set from them. Where each one is parked, and its labels, are read from the
process's memory when a profile is made (runtime.allgs), and a
command bpfprof started is paused at runtime.exit to be read once more
(common.bpf.h go_exit_pause). Measured (bench/overhead.py): tracing every
status change (casgstatus's entry) and every park (gopark) cost a channel
ping-pong ~35 us per round trip (0.25 us bare: 145x); births and deaths
alone cost it nothing (+1 %), and a goroutine-per-request server one trap
per birth and one per death. Stripped binaries (no runtime.allgs to read)
are still traced the old way: parks (with their stacks, from
runtime.gopark), wake-ups and all. At the end of the
capture each live goroutine is one sample of `goroutine/count`, at the stack
where it parked, with its pprof labels and a `created_by` label (the
function holding g.gopc), like runtime/pprof's goroutine profile. System
goroutines (entry function in package runtime, but runtime.main) are left
out as runtime/pprof does.

Goroutines older than the uprobes are read once from the process's memory
right after the uprobes are in (runtime.allgs and each g's g.sched: the
readers are in agent/go/goroutines.py). Events that happen between the
uprobes going in and that read are seen twice; each sets a goroutine's
state outright, so applying them after the snapshot gives the right end
state.

At the end, a process that is still alive is read once more: goroutines that
are not parked (running, runnable, in a syscall: BPF does not follow those
hot transitions) get their stack from g.sched, and the label sets are read
fresh. For a process that exited during the capture the table as of its exit
is reported, labels as read when first seen, and the goroutines that were
not parked at the exit are reported at their entry function only.

Limits: g's field offsets come from the binary's DWARF, else
agent/go/layouts.py G_LAYOUT_TABLE, which holds only what was measured here
(Go 1.27). Pre-existing goroutines need runtime.allgs from .symtab: in a
stripped binary only goroutines created during the capture, or parked or
woken in it, are seen.
Labels are read in the Go 1.24+ form (a sorted slice); older runtimes get none.

Cost of the traced way (stripped binaries): every goroutine status change
traps into the casgstatus uprobe (about 10 hits per ping-pong round trip);
fine for servers that park thousands of times a second, not for a
switch-bound program.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from agent.bpfload import btf, libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import GorLayout, RawRecord, RecordKind
from agent.go.exit_pause import GO_EXIT_PROGRAM, GO_EXIT_SOURCE
from agent.go.goroutines import (
    DEAD_STATUSES,
    FUNC_FLAG_TOP_FRAME,
    USER_RUNTIME_ENTRIES,
    GoBinary,
    GState,
    GStatus,
    go_binary,
    load_bias,
    read_allgs,
    read_labels,
    runtime_pprof_frames,
    unwind,
)
from agent.probes.family import Accumulator, ProbeConfig, ProbeFamily, Window, read_percpu_total
from agent.probes.uprobes import ProcessUprobes
from agent.processes.memory import ProcessMemory
from agent.processes.stack_resolver import StackResolver
from agent.processes.targets import gated_command_path, running_pids
from agent.processes.tracker import ProcessTracker
from exporters.profile import Profile, SampleKey
from exporters.profile_types import empty_profile
from symbolizer.errors import BpfprofError, PclntabError

log = logging.getLogger(__name__)

EV_SHIFT = 56  # bpf/goroutine.bpf.c GOR_EV_SHIFT
PAYLOAD_MASK = (1 << EV_SHIFT) - 1
NO_LAYOUT = 0  # gor_counts index
MAX_PROCS = 4096
CREATED_BY = "created_by"


class Event(enum.IntEnum):
    """Top byte of a goroutine record's value (bpf/goroutine.bpf.c GOR_EV_*)."""

    CREATE = 1
    PARK = 2
    WAKE = 3
    EXIT = 4
    EXEC = 5


# -- the live set --------------------------------------------------------------

@dataclass
class Goroutine:
    """What is known of one live goroutine."""

    goid: int
    parked: bool = False  # stack is where it parked and it has not woken since
    stack: tuple[int, ...] = ()  # user PCs, leaf first; () unknown
    labels_ptr: int = 0
    gopc: int = 0
    startpc: int = 0


class GoroutineTable:
    """Live goroutines per process, from events and memory snapshots (pure: no I/O)."""

    def __init__(self) -> None:
        self.procs: dict[int, dict[int, Goroutine]] = {}
        self.events = 0

    def apply(self, pid: int, event: Event, goid: int, payload: int, ips: tuple[int, ...]) -> None:
        gs = self.procs.setdefault(pid, {})
        self.events += 1
        if event == Event.CREATE:
            gs[goid] = Goroutine(goid, labels_ptr=payload, startpc=ips[0] if ips else 0,
                                 gopc=ips[1] if len(ips) > 1 else 0)
        elif event == Event.EXIT:
            gs.pop(goid, None)
        elif event == Event.PARK:
            g = gs.get(goid) or gs.setdefault(goid, Goroutine(goid))
            g.parked, g.stack, g.labels_ptr = True, ips, payload
        elif event == Event.WAKE:
            g = gs.get(goid) or gs.setdefault(goid, Goroutine(goid))
            g.parked, g.stack = False, ()  # where it parked is no longer where it is

    def carry(self, alive: Callable[[int], bool]) -> GoroutineTable:
        """A copy with the goroutines of running processes (events mutate them: nothing is shared)."""
        nxt = GoroutineTable()
        # Direct construction, not dataclasses.replace: this runs in the polling thread for every live
        # goroutine at each cut (3-4x faster; 100 000 goroutines ~70 ms).
        nxt.procs = {pid: {goid: Goroutine(g.goid, g.parked, g.stack, g.labels_ptr, g.gopc, g.startpc)
                           for goid, g in gs.items()}
                     for pid, gs in self.procs.items() if alive(pid)}
        return nxt

    def seed(self, pid: int, snapshot: Iterable[tuple[GState, tuple[int, ...]]]) -> int:
        """Add goroutines read from memory that no event has described yet; returns how many."""
        gs = self.procs.setdefault(pid, {})
        added = 0
        for st, stack in snapshot:
            if st.status in DEAD_STATUSES or st.goid in gs:
                continue
            gs[st.goid] = Goroutine(st.goid, parked=st.status in (GStatus.WAITING, GStatus.LEAKED), stack=stack,
                                    labels_ptr=st.labels, gopc=st.gopc, startpc=st.startpc)
            added += 1
        return added


@dataclass
class _Proc:
    """A target Go process: its binary and load bias."""

    binary: GoBinary
    bias: int
    labels: dict[int, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # g.labels -> pairs


class GoroutineAccumulator(Accumulator):
    """The live goroutines of one interval; the table and the processes carry over to the next."""

    family: GoroutineProbe

    def __init__(self, family: GoroutineProbe) -> None:
        super().__init__(family)
        self.table = GoroutineTable()
        self.procs: dict[int, _Proc] = {}
        self.seeded = 0  # goroutines first known from a memory read when their process was found
        self.late_found = 0  # goroutines found only by the end-of-interval read (missed events)
        self.no_layout = 0

    def forget(self, pid: int) -> None:
        """`pid` runs a new program: the old one's goroutines are gone."""
        self.procs.pop(pid, None)
        self.table.procs.pop(pid, None)

    def add_process(self, pid: int, proc: _Proc) -> None:
        """Take `pid`'s goroutines as its memory has them now."""
        self.procs[pid] = proc
        self.seeded += self._seed(pid, proc)

    def _snapshot(self, pid: int, proc: _Proc) -> list[tuple[GState, tuple[int, ...]]]:
        """Every g of `pid` with its stack from g.sched; [] without runtime.allgs."""
        if not proc.binary.allgs_vaddr:
            return []
        with ProcessMemory(pid) as mem:
            out = []
            for st in read_allgs(mem, proc.binary.allgs_vaddr + proc.bias, proc.binary.layout):
                stack = () if st.status in DEAD_STATUSES else unwind(mem, proc.binary.pclntab, proc.bias,
                                                                     st.sched_pc, st.sched_sp)
                out.append((st, stack))
            return out

    def _seed(self, pid: int, proc: _Proc) -> int:
        try:
            return self.table.seed(pid, self._snapshot(pid, proc))
        except OSError as e:
            log.info("goroutines of pid %d not read: %s", pid, e)
            return 0

    def on_record(self, rec: RawRecord) -> None:
        if rec.kind == RecordKind.GO_EXIT:  # paused at runtime.exit: its goroutines as they are now
            proc, gs = self.procs.get(rec.pid), self.table.procs.get(rec.pid)
            if proc is not None and gs is not None:
                # the exiting goroutine (g in aux) is where BPF found it, not where its stale g.sched says
                self._refresh(rec.pid, proc, gs, running=(rec.aux, rec.user_ips) if rec.user_ips else None)
            return
        event, payload = rec.value >> EV_SHIFT, rec.value & PAYLOAD_MASK
        try:
            ev = Event(event)
        except ValueError:
            return
        self.table.apply(rec.pid, ev, rec.aux, payload, rec.user_ips)
        if ev in (Event.CREATE, Event.PARK) and payload:
            self._remember_labels(rec.pid, payload)

    def _remember_labels(self, pid: int, ptr: int) -> None:
        """Read a label set at first sight: for a process that exits before the end of the capture."""
        proc = self.procs.get(pid)
        if proc is None or ptr in proc.labels:
            return
        try:
            with ProcessMemory(pid) as mem:
                proc.labels[ptr] = read_labels(mem, ptr)
        except (OSError, struct.error):
            proc.labels[ptr] = ()

    def record_count(self) -> int:
        return self.table.events

    def carry_into(self, nxt: Accumulator, alive: Callable[[int], bool]) -> None:
        assert isinstance(nxt, GoroutineAccumulator)
        nxt.table = self.table.carry(alive)
        # Copies: the builder's _refresh of this interval replaces labels the drain thread stores for the next.
        nxt.procs = {pid: replace(proc, labels=dict(proc.labels)) for pid, proc in self.procs.items() if alive(pid)}

    # -- the end of an interval ---------------------------------------------------

    def _refresh(self, pid: int, proc: _Proc, gs: dict[int, Goroutine],
                 running: tuple[int, tuple[int, ...]] | None = None) -> bool:
        """Re-read a live process: stacks of goroutines not parked (of all, when parks are not traced),
        fresh labels. `running`: (g address, stack) of a goroutine known to be running there. False if
        the process is gone."""
        try:
            snapshot = self._snapshot(pid, proc)
            if running is not None:
                snapshot = [(st, running[1] if st.gp == running[0] else stack) for st, stack in snapshot]
            if proc.binary.reads_parks:  # where each one is now, and its labels now (pprof.Do changes them)
                for st, stack in snapshot:
                    g = gs.get(st.goid)
                    if g is not None and st.status not in DEAD_STATUSES:
                        g.parked = st.status in (GStatus.WAITING, GStatus.LEAKED)
                        g.stack, g.labels_ptr = stack, st.labels
            with ProcessMemory(pid) as mem:
                proc.labels = {}
                for g in gs.values():
                    if g.labels_ptr and g.labels_ptr not in proc.labels:
                        try:
                            proc.labels[g.labels_ptr] = read_labels(mem, g.labels_ptr)
                        except (OSError, struct.error):
                            proc.labels[g.labels_ptr] = ()
        except OSError:
            return False
        if not snapshot:
            return True
        by_goid = {st.goid: (st, stack) for st, stack in snapshot if st.status not in DEAD_STATUSES}
        for goid, g in list(gs.items()):
            found = by_goid.get(goid)
            if found is None:
                del gs[goid]  # its exit was missed (uprobes went in late)
            elif not g.parked:
                g.stack = found[1]
        self.late_found += self.table.seed(pid, by_goid.values())
        return True

    def _is_system(self, proc: _Proc, g: Goroutine) -> bool:
        """runtime.isSystemGoroutine, by the entry function's name.

        Without g.startpc (a goroutine older than the probes, first seen parking,
        no allgs to read it from) the entry is the frame under goexit, if the
        stack reaches it.
        """
        tab, bias = proc.binary.pclntab, proc.bias
        entry = g.startpc
        try:
            if not entry and len(g.stack) >= 2:
                bottom = tab.frame_info(g.stack[-1] - bias - 1)
                if bottom is not None and bottom.flag & FUNC_FLAG_TOP_FRAME:
                    entry = g.stack[-2] - 1
            found = tab.func_for(entry - bias) if entry else None
        except PclntabError:
            return False
        return found is not None and found[1].startswith("runtime.") and found[1] not in USER_RUNTIME_ENTRIES

    def _created_by(self, proc: _Proc, gopc: int) -> str:
        found = proc.binary.pclntab.func_for(gopc - proc.bias - 1) if gopc else None
        return found[1] if found else ""

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        profile = empty_profile("goroutine", window.start_ns, window.duration_ns)
        exited = entry_only = 0
        for pid, gs in self.table.procs.items():
            proc = self.procs.get(pid)
            if proc is None:
                continue
            if not self._refresh(pid, proc, gs):
                exited += 1
            if pid not in tracker:
                tracker.observe(pid)
            info = tracker.get(pid)
            base = (("process_name", info.name),) if info else ()
            for g in gs.values():
                if self._is_system(proc, g):
                    continue
                stack = g.stack
                if not stack:  # not parked when its process exited: only where it started is known
                    entry_only += 1
                    stack = (g.startpc,) if g.startpc else ()
                labels = base + (((CREATED_BY, self._created_by(proc, g.gopc)),) if g.gopc else ())
                labels += tuple(sorted(proc.labels.get(g.labels_ptr, ())))
                stack = runtime_pprof_frames(proc.binary.pclntab, proc.bias, stack)
                key = SampleKey(stack=resolver.stack(pid, (), stack), pid=pid, tid=0, thread_name="",
                                labels=labels)
                profile.add(key, [1], window.end_ns)
        profile.comments.append(f"goroutines: {self.table.events} events, {self.seeded} read at start from memory, "
                                f"{self.late_found} found only at the end")
        if exited:
            profile.comments.append(f"{exited} processes exited during the capture: their goroutines as of the exit")
        if entry_only:
            profile.comments.append(f"{entry_only} goroutines not parked at the exit: shown at their entry function")
        return [profile]


class GoroutineProbe(ProbeFamily):
    """Goroutine births and deaths traced in the Go programs of the targets; the binaries and uprobes are
    shared by every interval."""

    name = "goroutine"
    source = "goroutine.bpf.c"
    extra_sources = (GO_EXIT_SOURCE,)
    kinds = (RecordKind.GOROUTINE, RecordKind.GO_EXIT)
    accumulator = GoroutineAccumulator
    events_per_cpu_s = 20000  # header-only records mostly: creations, parks, wake-ups
    UPROBES = ("gor_casgstatus", "gor_gopark")
    LOSSES = {"goroutine_no_layout": "goroutine events of processes not yet described"}

    def __init__(self, config: ProbeConfig, tracker: ProcessTracker) -> None:
        super().__init__(config, tracker)
        self.uprobes: ProcessUprobes[GoBinary] = ProcessUprobes("goroutine", go_binary, self._uprobes_of)
        self._gated: dict[int, tuple[int, int]] = {}  # pid of a command not yet exec'd -> its binary's key

    def _uprobes_of(self, binary: GoBinary) -> list[tuple[str, int]]:
        probes = binary.uprobes()
        if self.config.own_command and binary.reads_parks and binary.exit_offset:
            probes.append((GO_EXIT_PROGRAM, binary.exit_offset))  # read once more before it exits
        return probes

    def defines(self) -> dict[str, int]:
        # go_exit_pause reads the exiting goroutine's g through the thread's FS base
        try:
            fsbase = btf.task_fsbase_offset()
        except btf.BtfError:
            fsbase = -1  # the exiting goroutine is then shown where its g.sched says
        return {"GOR_MAX_PROCS": MAX_PROCS, "TASK_FSBASE_OFFSET": fsbase}

    def programs(self) -> dict[str, ProgType]:
        progs = dict.fromkeys(self.UPROBES, ProgType.KPROBE)
        progs["gor_on_exec"] = ProgType.TRACEPOINT
        progs[GO_EXIT_PROGRAM] = ProgType.KPROBE
        return progs

    def maps(self) -> list[str]:
        return ["gor_procs", "gor_counts"]

    def attach(self, objs: LoadedObjects) -> list[int]:
        super().attach(objs)
        return libbpf.attach_tracepoint(objs.programs["gor_on_exec"], "sched", "sched_process_exec")

    def on_start(self, objs: LoadedObjects, first: Accumulator) -> None:
        assert isinstance(first, GoroutineAccumulator)
        targets = self.target_pids()
        self.uprobes.bind(objs, per_pid=bool(targets))  # add_process() describes each process to BPF first
        for pid in targets or running_pids():
            self.add_process(pid, first)

    def is_notice(self, rec: RawRecord) -> bool:
        return rec.kind == RecordKind.GO_EXIT or rec.value >> EV_SHIFT == Event.EXEC

    def route(self, rec: RawRecord, acc: Accumulator) -> None:
        assert isinstance(acc, GoroutineAccumulator)
        if rec.kind == RecordKind.GOROUTINE and rec.value >> EV_SHIFT == Event.EXEC:
            pid = rec.value & PAYLOAD_MASK  # a target (or, system-wide, anyone) runs a new program
            if not self._exec_of_gated(pid, acc):
                acc.forget(pid)
                self.add_process(pid, acc)
            return
        acc.on_record(rec)

    def add_process(self, pid: int, acc: GoroutineAccumulator) -> None:
        """Describe `pid` to BPF, put the uprobes in its executable, then read its existing goroutines."""
        found = self.uprobes.lookup(pid)
        if found is None:
            return
        exe, key, binary = found
        layout = binary.layout
        try:
            assert self.objs is not None
            libbpf.map_update(self.objs.maps["gor_procs"], ctypes.c_uint32(pid),
                              GorLayout(layout.goid, layout.labels, layout.gopc, layout.startpc))
        except BpfprofError as e:  # the process table is full
            self.uprobes.errors += 1
            log.info("goroutine uprobes not placed in pid %d: %s", pid, e)
            return
        if not self.uprobes.place(pid, exe, key, binary):
            return
        # A command bpfprof starts is probed before its exec: a short program would be over before
        # its exec record was handled (its pid stays; uprobes follow the file, bias is set at exec).
        if gated_command_path(pid) is not None:
            acc.procs[pid] = _Proc(binary, 0)
            self._gated[pid] = key
            return
        try:
            bias = load_bias(pid, exe, binary.pie)
        except OSError as e:
            log.info("goroutines of pid %d not read: %s", pid, e)
            return
        acc.add_process(pid, _Proc(binary, bias))

    def _exec_of_gated(self, pid: int, acc: GoroutineAccumulator) -> bool:
        """The exec of a command probed before it (its events so far are its own): its load bias now."""
        key = self._gated.pop(pid, None)
        proc = acc.procs.get(pid)
        if key is None or proc is None:
            return False
        try:
            st = os.stat(f"/proc/{pid}/exe")
            if (st.st_dev, st.st_ino) != key:
                return False  # it ran something else: handled as any exec
            proc.bias = load_bias(pid, f"/proc/{pid}/exe", proc.binary.pie)
        except OSError:
            pass  # gone already: its events are kept, its addresses as of a non-PIE load
        return True

    def detach(self) -> None:
        self.uprobes.detach()

    def notes(self) -> list[str]:
        return self.uprobes.notes()

    def loss_totals(self) -> dict[str, int]:
        return {"goroutine_no_layout": read_percpu_total(self.objs, "gor_counts", NO_LAYOUT)}
