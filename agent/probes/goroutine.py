"""Goroutine profile: the live goroutines of each Go process, by stack (bpf/goroutine.bpf.c).

BPF sends a goroutine's creation (with g.startpc, g.gopc and g.labels) and
its exit, from uprobes on the casgstatus calls of runtime.newproc1 and
runtime.gdestroy (goexit0 before Go 1.23); `GoroutineTable` keeps the live
set from them. Where each one is parked, and its labels, are read from the
process's memory when a profile is made (runtime.allgs, below), and a
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
right after the uprobes are in: runtime.allgs (a []*g) through
/proc/PID/mem, each g's status, ids and g.sched, and their stacks unwound
from g.sched.pc/sp with the pclntab's SP deltas (runtime.(*unwinder) does the
same). Not from g.sched.bp: since CL 476235 mcall stores the *caller's
caller's* frame pointer there, so a frame-pointer walk would lose gopark's
caller. Events that happen between the uprobes going in and that read are
seen twice; each sets a goroutine's state outright, so applying them after
the snapshot gives the right end state.

At the end, a process that is still alive is read once more: goroutines that
are not parked (running, runnable, in a syscall: BPF does not follow those
hot transitions) get their stack from g.sched, and the label sets are read
fresh. For a process that exited during the capture the table as of its exit
is reported, labels as read when first seen, and the goroutines that were
not parked at the exit are reported at their entry function only.

Limits: g's field offsets come from the binary's DWARF, else VERSION_TABLE,
which holds only what was measured here (Go 1.27: agent/go/layouts.py had not
landed when this was written, and it lacks goid/sched/gopc/startpc anyway).
Pre-existing goroutines need runtime.allgs from .symtab: in a stripped binary
only goroutines created during the capture, or parked or woken in it, are seen.
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
from dataclasses import dataclass, field

from agent.bpfload import btf, libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import RawRecord, RecordKind
from agent.go.exit_pause import GO_EXIT_FUNCTIONS, GO_EXIT_PROGRAM
from agent.probes.family import Probe, ProbeConfig, Window
from agent.processes.memory import ProcessMemory
from agent.processes.stack_resolver import StackResolver
from agent.processes.targets import gated_command_path, running_pids
from agent.processes.tracker import ProcessTracker
from exporters.profile import Profile, SampleKey, ValueType
from symbolizer.elf import ElfFile, elf_errors
from symbolizer.errors import BpfprofError, PclntabError
from symbolizer.gobuildinfo import read_build_info
from symbolizer.gopclntab import GoPclntab, load_pclntab
from symbolizer.proc_maps import file_base

log = logging.getLogger(__name__)

CASGSTATUS = "runtime.casgstatus"
GOPARK = "runtime.gopark"
# Where goroutines are born and die: their calls of casgstatus are the only ones probed when the
# process's goroutines can be read from memory (runtime.allgs). goexit0 did gdestroy's work before 1.23.
LIFE_FUNCTIONS = ("runtime.newproc1", "runtime.gdestroy", "runtime.goexit0")
CALL_REL32 = 0xE8
ALLGS = "runtime.allgs"
EV_SHIFT = 56  # bpf/goroutine.bpf.c GOR_EV_SHIFT
PAYLOAD_MASK = (1 << EV_SHIFT) - 1
NO_LAYOUT = 0  # gor_counts index
MAX_PROCS = 4096
MAX_FRAMES = 127
MAX_GOROUTINES_READ = 1 << 20  # a corrupt allglen must not make us read forever
MAX_LABELS = 64
CREATED_BY = "created_by"
# runtime.isSystemGoroutine: these entry functions are user goroutines although in package runtime.
USER_RUNTIME_ENTRIES = frozenset({"runtime.main", "runtime.corostart", "runtime.handleAsyncEvent"})
FUNC_FLAG_TOP_FRAME = 1  # abi.FuncFlagTopFrame: goexit, the bottom of every goroutine
FUNC_FLAG_SPWRITE = 2  # abi.FuncFlagSPWrite: the SP is not derivable past this frame


class Event(enum.IntEnum):
    """Top byte of a goroutine record's value (bpf/goroutine.bpf.c GOR_EV_*)."""

    CREATE = 1
    PARK = 2
    WAKE = 3
    EXIT = 4
    EXEC = 5


class GStatus(enum.IntEnum):
    """runtime2.go _G* values (the ones this module looks at)."""

    IDLE = 0
    RUNNABLE = 1
    RUNNING = 2
    SYSCALL = 3
    WAITING = 4
    DEAD = 6
    LEAKED = 10
    DEADEXTRA = 11


SCAN_BIT = 0x1000  # _Gscan: a status being scanned by the GC; the rest is the status
DEAD_STATUSES = frozenset({GStatus.IDLE, GStatus.DEAD, GStatus.DEADEXTRA})


# -- runtime.g layout ----------------------------------------------------------

@dataclass(frozen=True)
class GLayout:
    """Offsets of the runtime.g fields this profile reads (linux/amd64)."""

    sched: int  # runtime.gobuf: sp at +0, pc at +8
    atomicstatus: int
    goid: int
    gopc: int
    startpc: int
    labels: int

    @property
    def size(self) -> int:
        """Bytes of g to read to have every field."""
        return max(self.sched + 16, self.atomicstatus + 4, self.goid + 8, self.gopc + 8, self.startpc + 8,
                   self.labels + 8)


# (major, minor) -> layout, measured from the DWARF of binaries built with that toolchain.
VERSION_TABLE: dict[tuple[int, int], GLayout] = {
    (1, 27): GLayout(sched=56, atomicstatus=144, goid=152, gopc=288, startpc=304, labels=352),
}
_G_FIELDS = {"sched", "atomicstatus", "goid", "gopc", "startpc", "labels"}


def dwarf_layout(elf: ElfFile) -> GLayout | None:
    """runtime.g's offsets from DWARF; None without DWARF or without one of the fields."""
    if not elf.has_dwarf:
        return None
    with elf_errors(f"{elf.path}: DWARF runtime.g"):
        for cu in elf.elf.get_dwarf_info().iter_CUs():
            top = cu.get_top_DIE()
            name = top.attributes.get("DW_AT_name")
            if name is None or name.value != b"runtime":
                continue
            for die in top.iter_children():
                sname = die.attributes.get("DW_AT_name")
                if die.tag != "DW_TAG_structure_type" or sname is None or sname.value != b"runtime.g":
                    continue
                found: dict[str, int] = {}
                for member in die.iter_children():
                    mname = member.attributes.get("DW_AT_name")
                    loc = member.attributes.get("DW_AT_data_member_location")
                    if mname is not None and loc is not None and isinstance(loc.value, int):
                        key = mname.value.decode(errors="replace")
                        if key in _G_FIELDS:
                            found[key] = loc.value
                return GLayout(**found) if len(found) == len(_G_FIELDS) else None
    return None


@dataclass
class GoBinary:
    """What the goroutine probe needs of one Go executable."""

    path: str
    version: str
    layout: GLayout
    layout_source: str  # "dwarf" or "table"
    casgstatus_offset: int  # file offsets for the uprobes
    gopark_offset: int
    allgs_vaddr: int  # 0: stripped, pre-existing goroutines cannot be listed
    pie: bool
    pclntab: GoPclntab = field(repr=False)
    life_sites: tuple[int, ...] = ()  # file offsets of the casgstatus calls in LIFE_FUNCTIONS
    exit_offset: int = 0  # file offset of runtime.exit, 0 if not found

    @property
    def reads_parks(self) -> bool:
        """Parked goroutines and their stacks are read from memory (allgs), not traced: only births
        and deaths trap, at their casgstatus call sites. Otherwise every status change traps
        (casgstatus's entry) and every park (gopark)."""
        return bool(self.allgs_vaddr and self.life_sites)

    def uprobes(self) -> list[tuple[str, int]]:
        """(program, file offset) of every uprobe this binary gets."""
        if self.reads_parks:
            return [("gor_casgstatus", off) for off in self.life_sites]
        return [("gor_casgstatus", self.casgstatus_offset), ("gor_gopark", self.gopark_offset)]


def go_binary(path: str, use_dwarf: bool = True) -> GoBinary | None:
    """The goroutine probe's view of `path`; None if it is not a Go binary we can handle.

    ElfParseError/OSError propagate for files that cannot be read.
    """
    with ElfFile(path) as elf:
        info = read_build_info(elf)
        if info is None:
            return None
        layout, source = (dwarf_layout(elf) if use_dwarf else None), "dwarf"
        if layout is None:
            vt = info.version_tuple
            layout, source = (VERSION_TABLE.get(vt[:2]) if vt else None), "table"
        if layout is None:
            log.info("%s: %s without DWARF is not in the goroutine layout table", path, info.version)
            return None
        data = bytes(elf.image)
        tab = load_pclntab(data)
        if tab is None:
            return None
        funcs = {name: (entry, end) for entry, end, name in tab.functions()
                 if name in (CASGSTATUS, GOPARK, *LIFE_FUNCTIONS, *GO_EXIT_FUNCTIONS)}
        entries = {name: funcs[name][0] for name in (CASGSTATUS, GOPARK) if name in funcs}
        if len(entries) < 2:
            return None
        sites = tuple(elf.offset_for_vaddr(site) for name in LIFE_FUNCTIONS if name in funcs
                      for site in call_sites(data, elf, *funcs[name], entries[CASGSTATUS]))
        allgs = 0
        with elf_errors(f"{path}: .symtab"):
            symtab = elf.elf.get_section_by_name(".symtab")
            if symtab is not None:
                found = symtab.get_symbol_by_name(ALLGS)
                allgs = found[0]["st_value"] if found else 0
        return GoBinary(path, info.version, layout, source, elf.offset_for_vaddr(entries[CASGSTATUS]),
                        elf.offset_for_vaddr(entries[GOPARK]), allgs, elf.is_pie_or_shared, tab, sites,
                        next((elf.offset_for_vaddr(funcs[n][0]) for n in GO_EXIT_FUNCTIONS if n in funcs), 0))


def call_sites(image: bytes, elf: ElfFile, start: int, end: int, callee: int) -> list[int]:
    """Addresses of the direct calls (E8 rel32) to `callee` in the function at [start, end).

    Go's amd64 compiler calls a non-inlined function with E8 rel32 only; a
    stray E8 byte inside another instruction would have to encode exactly
    `callee` as its target to be taken for one. At a call the arguments are
    already in their ABIInternal registers, so the entry program reads them
    there as it would at casgstatus's entry.
    """
    base = elf.offset_for_vaddr(start)
    code = image[base:base + (end - start)]
    out = []
    i = code.find(CALL_REL32)
    while 0 <= i <= len(code) - 5:
        (rel,) = struct.unpack_from("<i", code, i + 1)
        if start + i + 5 + rel == callee:
            out.append(start + i)
        i = code.find(CALL_REL32, i + 1)
    return out


# -- reading a live process ----------------------------------------------------

def load_bias(pid: int, path: str, pie: bool) -> int:
    """Runtime address minus ELF vaddr of the executable in `pid` (0 unless PIE: Go links PIE at vaddr 0)."""
    return file_base(pid, path) if pie else 0


@dataclass
class GState:
    """One runtime.g as read from memory."""

    gp: int
    goid: int
    status: int
    sched_sp: int
    sched_pc: int
    gopc: int
    startpc: int
    labels: int


def parse_g(gp: int, raw: bytes, layout: GLayout) -> GState:
    u64 = lambda off: struct.unpack_from("<Q", raw, off)[0]  # noqa: E731
    status = struct.unpack_from("<I", raw, layout.atomicstatus)[0] & ~SCAN_BIT
    return GState(gp, u64(layout.goid), status, u64(layout.sched), u64(layout.sched + 8), u64(layout.gopc),
                  u64(layout.startpc), u64(layout.labels))


def read_allgs(mem: ProcessMemory, allgs: int, layout: GLayout) -> list[GState]:
    """Every g in runtime.allgs (`allgs` is the slice header's runtime address); dead ones too."""
    ptr, length = struct.unpack("<QQ", mem.read(allgs, 16))
    if not ptr or length > MAX_GOROUTINES_READ:
        return []
    out = []
    for gp in struct.unpack(f"<{length}Q", mem.read(ptr, 8 * length)):
        try:
            out.append(parse_g(gp, mem.read(gp, layout.size), layout))
        except OSError:
            continue  # freed between the two reads (allgs never shrinks: rare)
    return out


def unwind(mem: ProcessMemory, tab: GoPclntab, bias: int, pc: int, sp: int) -> tuple[int, ...]:
    """PCs of a stopped goroutine from its saved pc/sp, leaf first, goexit last.

    Each frame's return address is at SP + funcspdelta(pc) and the caller's SP
    8 above it. Stops at the top frame, at an SPWRITE function, at code that is
    not Go, or at an unreadable word.
    """
    frames: list[int] = []
    while len(frames) < MAX_FRAMES and pc:
        frames.append(pc)
        try:
            info = tab.frame_info(pc - bias - (1 if len(frames) > 1 else 0))
        except PclntabError:
            break
        if info is None or info.flag & (FUNC_FLAG_TOP_FRAME | FUNC_FLAG_SPWRITE):
            break
        at = sp + info.sp_delta
        try:
            pc = mem.u64(at)
        except OSError:
            break
        sp = at + 8
    return tuple(frames)


def read_labels(mem: ProcessMemory, ptr: int) -> tuple[tuple[str, str], ...]:
    """A goroutine's pprof labels at g.labels (Go 1.24+: *labelMap, a slice of {key, value string})."""
    if not ptr:
        return ()
    items, length = struct.unpack("<QQ", mem.read(ptr, 16))
    if not items or length > MAX_LABELS:
        return ()
    words = struct.unpack(f"<{4 * length}Q", mem.read(items, 32 * length))
    out = []
    for i in range(length):
        kp, kl, vp, vl = words[4 * i:4 * i + 4]
        key = mem.read(kp, kl).decode(errors="replace") if kl else ""
        value = mem.read(vp, vl).decode(errors="replace") if vl else ""
        out.append((key, value))
    return tuple(out)


def runtime_pprof_frames(tab: GoPclntab, bias: int, pcs: tuple[int, ...]) -> tuple[int, ...]:
    """`pcs` without the frames runtime/pprof leaves out of a goroutine profile.

    Wrapper functions (abi.FuncIDWrapper: go-statement wrappers such as
    main.main.gowrap1, method value wrappers) are elided by tracebackPCs, and
    runtime/pprof stops at runtime.goexit, the top frame of every goroutine.
    """
    wrapper = tab._wrapper_func_id()  # not public in GoPclntab; abi.FuncIDWrapper of this binary
    out = []
    for i, pc in enumerate(pcs):
        try:
            info = tab.frame_info(pc - bias - (1 if i else 0))
        except PclntabError:
            info = None
        if info is not None and info.flag & FUNC_FLAG_TOP_FRAME:
            break
        if info is None or info.func_id != wrapper:
            out.append(pc)
    return tuple(out)


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


def goroutine_profile(start_time_ns: int, duration_ns: int) -> Profile:
    return Profile(sample_types=[ValueType("goroutine", "count")], period_type=ValueType("goroutine", "count"),
                   period=1, start_time_ns=start_time_ns, duration_ns=duration_ns,
                   default_sample_type="goroutine", kind="goroutine")


class _LayoutValue(ctypes.Structure):
    """struct gor_layout."""

    _fields_ = [("goid", ctypes.c_uint16), ("labels", ctypes.c_uint16), ("gopc", ctypes.c_uint16),
                ("startpc", ctypes.c_uint16)]


class GoroutineProbe(Probe):
    """The live goroutines. In the daemon each interval reports those live at its
    end; the table carries over, the uprobes and binaries are shared."""

    name = "goroutine"
    source = "goroutine.bpf.c"
    kinds = (RecordKind.GOROUTINE, RecordKind.GO_EXIT)
    events_per_cpu_s = 20000  # header-only records mostly: creations, parks, wake-ups
    UPROBES = ("gor_casgstatus", "gor_gopark")

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__(config)
        self.table = GoroutineTable()
        self._objs: LoadedObjects | None = None
        self._per_pid = False
        self._binaries: dict[tuple[int, int], GoBinary | None] = {}  # (st_dev, st_ino)
        self._attached: set[tuple[int, int, int]] = set()  # (pid or -1, st_dev, st_ino)
        self._procs: dict[int, _Proc] = {}
        self._gated: dict[int, tuple[int, int]] = {}  # pid of a command not yet exec'd -> its binary's key
        self._uprobe_fds: list[int] = []
        self._counters_fd = -1
        self.no_layout = 0
        self.attach_errors = 0
        self.seeded = 0  # goroutines first known from the start-up memory read
        self.late_found = 0  # goroutines found only by the end-of-capture read (missed events)

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
        fds = libbpf.attach_tracepoint(objs.programs["gor_on_exec"], "sched", "sched_process_exec")
        self._objs = objs
        pids = self.target_pids(objs)
        self._per_pid = bool(pids)
        for pid in pids or running_pids():
            self._add_process(pid)
        fds += self._uprobe_fds  # the probe set detaches these with the rest
        self._uprobe_fds = []  # later ones (exec'd targets): detach()
        return fds

    def on_start(self, objs: LoadedObjects) -> None:
        self._counters_fd = os.dup(objs.maps["gor_counts"])

    def new_accumulator(self) -> GoroutineProbe:
        """Shares the loaded programs, the binaries and the uprobes (exec'd Go targets get theirs placed)."""
        acc = GoroutineProbe(self.config)
        acc._objs, acc._per_pid, acc._binaries = self._objs, self._per_pid, self._binaries
        acc._attached, acc._uprobe_fds, acc._gated = self._attached, self._uprobe_fds, self._gated
        return acc

    def carry_into(self, nxt: Probe, alive: Callable[[int], bool]) -> None:
        assert isinstance(nxt, GoroutineProbe)
        nxt.table = self.table.carry(alive)
        nxt._procs = {pid: proc for pid, proc in self._procs.items() if alive(pid)}

    def detach(self) -> None:
        libbpf.detach(self._uprobe_fds)  # placed after start: the probe set does not know them

    def _binary(self, exe: str) -> tuple[tuple[int, int], GoBinary | None]:
        st = os.stat(exe)
        key = (st.st_dev, st.st_ino)
        if key not in self._binaries:
            self._binaries[key] = go_binary(exe)
        return key, self._binaries[key]

    def _add_process(self, pid: int) -> None:
        """Describe `pid` to BPF, put the uprobes in its executable, then read its existing goroutines."""
        if self._objs is None:  # an accumulator the daemon swapped in: the template attached, not this one
            return
        exe = f"/proc/{pid}/exe"
        # A command bpfprof starts is probed before its exec: a short program would be over before
        # its exec record was handled (its pid stays; uprobes follow the file, bias is set at exec).
        gated = gated_command_path(pid)
        if gated is not None:
            exe = gated
        try:
            key, binary = self._binary(exe)
            if binary is None:
                return
            layout = binary.layout
            libbpf.map_update(self._objs.maps["gor_procs"], ctypes.c_uint32(pid),
                              _LayoutValue(layout.goid, layout.labels, layout.gopc, layout.startpc))
            target = pid if self._per_pid else -1
            if (target, *key) not in self._attached:
                self._attached.add((target, *key))
                probes = binary.uprobes()
                if self.config.own_command and binary.reads_parks and binary.exit_offset:
                    probes.append((GO_EXIT_PROGRAM, binary.exit_offset))  # read once more before it exits
                for prog, off in probes:
                    self._uprobe_fds += libbpf.attach_uprobe(self._objs.programs[prog], exe, off, target)
            if gated is not None:
                self._procs[pid] = _Proc(binary, 0)
                self._gated[pid] = key
                return
            proc = _Proc(binary, load_bias(pid, exe, binary.pie))
            self._procs[pid] = proc
            self.seeded += self._seed(pid, proc)
        except (OSError, BpfprofError) as e:  # gone, unreadable, or not ours to probe
            self.attach_errors += 1
            log.info("goroutine uprobes not placed in pid %d: %s", pid, e)

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

    # -- records -------------------------------------------------------------

    def on_record(self, rec: RawRecord) -> None:
        if rec.kind == RecordKind.GO_EXIT:  # paused at runtime.exit: its goroutines as they are now
            proc, gs = self._procs.get(rec.pid), self.table.procs.get(rec.pid)
            if proc is not None and gs is not None:
                # the exiting goroutine (g in aux) is where BPF found it, not where its stale g.sched says
                self._refresh(rec.pid, proc, gs, running=(rec.aux, rec.user_ips) if rec.user_ips else None)
            return
        event, payload = rec.value >> EV_SHIFT, rec.value & PAYLOAD_MASK
        if event == Event.EXEC:  # a target (or, system-wide, anyone) runs a new program
            if self._exec_of_gated(payload):
                return
            self._procs.pop(payload, None)
            self.table.procs.pop(payload, None)  # the old program's goroutines are gone
            self._add_process(payload)
            return
        try:
            ev = Event(event)
        except ValueError:
            return
        self.table.apply(rec.pid, ev, rec.aux, payload, rec.user_ips)
        if ev in (Event.CREATE, Event.PARK) and payload:
            self._remember_labels(rec.pid, payload)

    def _exec_of_gated(self, pid: int) -> bool:
        """The exec of a command probed before it (its events so far are its own): its load bias now."""
        key = self._gated.pop(pid, None)
        proc = self._procs.get(pid)
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

    def _remember_labels(self, pid: int, ptr: int) -> None:
        """Read a label set at first sight: for a process that exits before the end of the capture."""
        proc = self._procs.get(pid)
        if proc is None or ptr in proc.labels:
            return
        try:
            with ProcessMemory(pid) as mem:
                proc.labels[ptr] = read_labels(mem, ptr)
        except (OSError, struct.error):
            proc.labels[ptr] = ()

    def record_count(self) -> int:
        return self.table.events

    def bpf_losses(self, objs: LoadedObjects) -> dict[str, int]:
        return {"goroutine_no_layout": sum(libbpf.map_lookup_percpu_u64(objs.maps["gor_counts"], NO_LAYOUT))}

    def _read_counters(self) -> None:
        if self._counters_fd < 0:
            return
        try:
            self.no_layout = sum(libbpf.map_lookup_percpu_u64(self._counters_fd, NO_LAYOUT))
        finally:
            os.close(self._counters_fd)
            self._counters_fd = -1

    # -- the end of the capture ------------------------------------------------

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
        self._read_counters()
        profile = goroutine_profile(window.start_ns, max(0, window.end_ns - window.start_ns))
        exited = entry_only = 0
        for pid, gs in self.table.procs.items():
            proc = self._procs.get(pid)
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
        if self.no_layout:
            profile.comments.append(f"dropped: {self.no_layout} goroutine events of processes not yet described")
        if self.attach_errors:
            profile.comments.append(f"goroutine uprobes could not be placed in {self.attach_errors} processes")
        return [profile]
