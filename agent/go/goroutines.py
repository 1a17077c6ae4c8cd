"""Go runtime readers for the goroutine profile: a Go binary's probe points, and its goroutines read from memory.

`go_binary` finds what the goroutine probe (agent/probes/goroutine.py) needs
of an executable: the g layout (agent/go/layouts.py), the casgstatus call
sites in the functions where goroutines are born and die, runtime.gopark,
runtime.allgs, runtime.exit.

The goroutines of a live process are read through /proc/PID/mem
(agent/processes/memory.py): runtime.allgs (a []*g), each g's status, ids
and g.sched, and their stacks unwound from g.sched.pc/sp with the
pclntab's SP deltas (runtime.(*unwinder) does the same). Not from
g.sched.bp: since CL 476235 mcall stores the *caller's caller's* frame
pointer there, so a frame-pointer walk would lose gopark's caller. Labels
are read in the Go 1.24+ form (a sorted slice); older runtimes get none.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass, field

from agent.go.exit_pause import GO_EXIT_FUNCTIONS
from agent.go.layouts import G_LAYOUT_TABLE, GLayout, dwarf_g_layout
from agent.processes.memory import ProcessMemory
from symbolizer.elf import ElfFile, defined_symbol_value, elf_errors
from symbolizer.errors import PclntabError
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
MAX_FRAMES = 127
MAX_GOROUTINES_READ = 1 << 20  # a corrupt allglen must not make us read forever
MAX_LABELS = 64
MAX_LABEL_BYTES = 1024  # of one key or value: the length is the program's word, not to be trusted
# runtime.isSystemGoroutine: these entry functions are user goroutines although in package runtime.
USER_RUNTIME_ENTRIES = frozenset({"runtime.main", "runtime.corostart", "runtime.handleAsyncEvent"})
FUNC_FLAG_TOP_FRAME = 1  # abi.FuncFlagTopFrame: goexit, the bottom of every goroutine
FUNC_FLAG_SPWRITE = 2  # abi.FuncFlagSPWrite: the SP is not derivable past this frame


class GStatus(enum.IntEnum):
    """runtime2.go _G* values (the ones the goroutine profile looks at)."""

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
        layout, source = (dwarf_g_layout(elf) if use_dwarf else None), "dwarf"
        if layout is None:
            vt = info.version_tuple
            layout, source = (G_LAYOUT_TABLE.get(vt[:2]) if vt else None), "table"
        if layout is None:
            log.info("%s: %s without DWARF is not in the goroutine layout table", path, info.version)
            return None
        elf.ensure_all()
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
            allgs = defined_symbol_value(elf, ALLGS, "STT_OBJECT") or 0
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
        key = mem.read(kp, min(kl, MAX_LABEL_BYTES)).decode(errors="replace") if kl else ""
        value = mem.read(vp, min(vl, MAX_LABEL_BYTES)).decode(errors="replace") if vl else ""
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
