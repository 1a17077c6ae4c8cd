"""User-space stack unwinding from registers plus a copy of the stack top.

The BPF side hands us, per sample, the user registers RIP, RSP, RBP (the
task's pt_regs, also when the sample hit kernel mode) and a bounded copy of
user memory starting at RSP. This module walks that copy with each mapped
file's unwind rules:

  native code    CFI rows from .eh_frame/.debug_frame (symbolizer/cfi.py)
  Go code        .gopclntab pcsp: CFA = RSP + spdelta + 8, RA at CFA-8,
                 exactly runtime.(*unwinder).resolveInternal on amd64;
                 stop at FuncFlagTopFrame (goexit, mstart) and FuncFlagSPWrite
                 (stack switches: systemstack, mcall, morestack, asmcgocall)
  no CFI at all  frame pointers: CFA = RBP + 16, RA at [RBP+8], RBP' = [RBP];
                 such frames are marked FrameSource.FP
  signal frames  glibc's __restore_rt FDE ('S' augmentation): RIP, RSP, RBP
                 reloaded from the kernel's ucontext; the frame after it is an
                 interrupted PC, not a return address (FrameSource.SIGNAL)

Since #12 the agent walks most stacks in BPF (bpf/unwind.bpf.h, the same
rules over rows from symbolizer/unwind_rows.py); this walker serves the
copies that remain (`--unwind copy`, and a process's first samples before its
tables load) and is the reference the BPF walker's rows are tested against.
bench/unwind_speed.py prints its cost: 0.6-0.9 us of CPU per frame with warm
tables, 7-15 us per sample of 8-30 frames.

The walk never invents a frame: each return address comes from a rule that
covers the PC, and it stops (with a StopReason, counted) at the first PC it
cannot explain, at a read outside the copy, when the CFA fails to move up
the stack, or at the outermost frame.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections import Counter, OrderedDict
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias

from symbolizer.cfi import RBP_LOST, RBP_SAME, CfaKind, FdeIndex, UnwindTable
from symbolizer.errors import BpfprofError
from symbolizer.gopclntab import FUNC_FLAG_SPWRITE, FUNC_FLAG_TOP_FRAME, GoPclntab

if TYPE_CHECKING:
    from symbolizer.process_symbols import MappedFile

__all__ = ["FrameSource", "MappingLookup", "Regs", "StopReason", "UnwindResult", "Unwinder",
           "frame_pointer_walk", "unwind"]

# Frames walked per sample at most: deeper stacks are cut (StopReason.MAX_DEPTH).
# perf's default is 127; recursive programs go past it.
DEFAULT_MAX_FRAMES = 256

_U64 = struct.Struct("<Q")


class Regs(NamedTuple):
    """User registers at the sample (from pt_regs)."""

    rip: int
    rsp: int
    rbp: int


class FrameSource(IntEnum):
    """How a frame's address was found."""

    LEAF = 0  # RIP itself
    CFI = 1  # return address by .eh_frame/.debug_frame rules
    GO = 2  # return address by .gopclntab's pcsp
    FP = 3  # return address by the frame-pointer fallback (no CFI covered the callee)
    SIGNAL = 4  # interrupted PC from a signal frame: exact, not a return address


class StopReason(StrEnum):
    """Why a walk ended. OUTERMOST is the only complete ending."""

    OUTERMOST = "outermost"  # RA undefined (_start, clone), RA 0, Go top frame
    STACK_TRUNCATED = "stack_truncated"  # a read fell outside the stack copy
    UNMAPPED_PC = "unmapped_pc"  # PC in no executable mapping (JIT code, garbage)
    NO_CFI = "no_cfi"  # no rule for the PC and no usable frame pointer
    UNSUPPORTED_CFI = "unsupported_cfi"  # CFA on another register or an unknown expression
    BAD_CFA = "bad_cfa"  # the CFA did not move up the stack (corrupt stack or rules)
    RBP_UNKNOWN = "rbp_unknown"  # the rule needs RBP and an earlier frame lost it
    GO_SPWRITE = "go_spwrite"  # Go function that switched stacks (systemstack, asmcgocall...)
    MAX_DEPTH = "max_depth"  # cut at max_frames


class UnwindResult(NamedTuple):
    """One walked stack.

    `pcs[0]` is RIP; every later entry is a return address (look it up at
    pc - 1), except where `sources[i]` is SIGNAL (an interrupted PC, exact).
    """

    pcs: list[int]
    sources: list[FrameSource]
    stop: StopReason

    @property
    def complete(self) -> bool:
        return self.stop == StopReason.OUTERMOST


class MappingLookup(Protocol):
    """What the unwinder needs of a process: ProcessSymbols satisfies it."""

    def mapping_at(self, addr: int) -> MappedFile | None: ...


class _View(NamedTuple):
    """A mapping's runtime range [lo, hi) that one load segment translates by `bias`."""

    lo: int
    hi: int
    bias: int  # ELF vaddr = runtime address + bias
    table: UnwindTable | FdeIndex | None  # FdeIndex until a whole table is built
    go: GoPclntab | None


_NO_VIEW = _View(0, 0, 0, None, None)

# Rule kinds beyond CfaKind, for the per-pc rule cache.
_K_UNMAPPED = 100  # no mapping at the pc
_K_GO = 101  # Go frame: CFA = RSP + off (spdelta + 8); caller's BP at CFA-16 if off >= 16
_K_GO_SPWRITE = 102  # Go function that switches stacks

# Rules cached per process; a profile revisits the same few thousand PCs, and
# a hit skips mapping lookup, address translation and two bisections.
MAX_CACHED_RULES = 1 << 16
# Processes whose rule caches are kept (least recently used dropped).
MAX_CACHED_PROCESSES = 512

Rule = tuple[int, int, int]  # (kind, cfa offset, rbp offset), as UnwindTable rows
_Views: TypeAlias = "dict[int, tuple[MappedFile, list[_View]]]"  # id(mapping) -> (the mapping, its views)


class Unwinder:
    """Walks sampled stacks; keeps per-process rule caches and stop counters.

    Counters: `stops[reason]` per walk, `frames[source]` per frame, `samples`.
    One Unwinder per drain thread (the counters are plain Counters). A
    process's cache is keyed by its ProcessSymbols object: a refreshed
    snapshot of the maps is a new object, hence a new cache.
    """

    def __init__(self, max_frames: int = DEFAULT_MAX_FRAMES) -> None:
        self.max_frames = max_frames
        self.stops: Counter[StopReason] = Counter()
        self.frames: Counter[FrameSource] = Counter()
        self.samples = 0
        # id(process) -> (process, its rules by pc, its mappings' views by id(MappedFile)), least recently
        # used first. The views live in their process's entry, not in a table of their own: keyed by
        # id(mapping) and holding the mapping, such a table kept every mapping ever walked (and the unwind
        # tables of files the symbol cache had let go), ~2 kB a process: a soak under churn (1000 processes
        # a minute) grew by 2 MB a minute.
        self._procs: OrderedDict[int, tuple[MappingLookup, dict[int, Rule], _Views]] = OrderedDict()

    def _view(self, views: _Views, mf: MappedFile, pc: int) -> _View:
        """Translation and tables for `pc` in mapping `mf` (cached per mapping and segment in `views`,
        its process's)."""
        got = views.get(id(mf))
        if got is not None and got[0] is mf:
            for v in got[1]:
                if v.lo <= pc < v.hi:
                    return v
        else:
            got = (mf, [])
            views[id(mf)] = got
        fs = mf.symbols
        m = mf.mapping
        if fs is None:
            view = _View(m.start, m.end, 0, None, None)
        else:
            vaddr = fs.translate(pc, m.start, m.file_offset)
            if vaddr is None:
                return _NO_VIEW
            bias = vaddr - pc
            lo, hi = m.start, m.end
            for seg in fs.elf.load_segments:
                if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                    lo, hi = max(lo, seg.vaddr - bias), min(hi, seg.vaddr + seg.memsz - bias)
                    break
            view = _View(lo, hi, bias, fs.unwind_rules(), fs.go)
        got[1].append(view)
        return view

    def rule_at(self, process: MappingLookup, pc: int) -> Rule:
        """The unwind rule at runtime address `pc` (give a return address as pc - 1)."""
        return self._rule_at(process, self._cached(process)[2], pc)

    def _rule_at(self, process: MappingLookup, views: _Views, pc: int) -> Rule:
        mf = process.mapping_at(pc)
        if mf is None:
            return (_K_UNMAPPED, 0, 0)
        view = self._view(views, mf, pc)
        vaddr = pc + view.bias
        if view.go is not None:
            try:
                info = view.go.frame_info(vaddr)
            except BpfprofError:
                info = None
            if info is not None:
                if info.flag & FUNC_FLAG_TOP_FRAME:
                    return (CfaKind.OUTERMOST, 0, 0)
                if info.flag & FUNC_FLAG_SPWRITE:
                    return (_K_GO_SPWRITE, 0, 0)
                return (_K_GO, info.sp_delta + 8, 0)
        table = view.table
        if table is None:
            return (CfaKind.NONE, 0, RBP_SAME)
        if type(table) is FdeIndex:
            try:
                kind, off, rbp = table.rule(vaddr)
            except BpfprofError:
                return (CfaKind.UNSUPPORTED, 0, RBP_LOST)
        else:
            i = bisect_right(table.pcs, vaddr) - 1
            if i < 0:
                return (CfaKind.NONE, 0, RBP_SAME)
            kind, off, rbp = table.kinds[i], table.cfa_offs[i], table.rbp_offs[i]
        if kind == CfaKind.PLT:
            # The rule depends only on the pc, so it folds into a plain RSP row.
            return (CfaKind.RSP, off + (8 if (vaddr & 15) >= rbp else 0), RBP_SAME)
        return (kind, off, rbp)

    def _cached(self, process: MappingLookup) -> tuple[MappingLookup, dict[int, Rule], _Views]:
        """`process`'s cache entry (made now if new; the least recently used goes past MAX_CACHED_PROCESSES)."""
        key = id(process)
        got = self._procs.get(key)
        if got is not None and got[0] is process:
            self._procs.move_to_end(key)
            if len(got[1]) >= MAX_CACHED_RULES:
                got[1].clear()
            return got
        got = (process, {}, {})
        self._procs[key] = got
        if len(self._procs) > MAX_CACHED_PROCESSES:
            self._procs.popitem(last=False)
        return got

    def unwind(self, regs: Regs | tuple[int, int, int | None], stack: bytes | memoryview, process: MappingLookup,
               stack_base: int | None = None, rip_is_return: bool = False) -> UnwindResult:
        """Walk one sample's stack, leaf first.

        `stack` holds user memory from `stack_base` (default: RSP) upward.
        `rip_is_return`: RIP is a caller's return address (a walk continued
        from a frame above the leaf), looked up at RIP - 1; RBP None: unknown.
        Never raises on bad input: a corrupt table or stack ends the walk
        with a StopReason.
        """
        rip, rsp, rbp_val = regs
        rbp: int | None = rbp_val
        base = rsp if stack_base is None else stack_base
        limit = base + len(stack)
        unpack = _U64.unpack_from
        _, rules, views = self._cached(process)
        pcs = [rip]
        sources = [FrameSource.LEAF]
        pc = rip
        is_return = rip_is_return
        stop = StopReason.MAX_DEPTH
        for _ in range(self.max_frames):
            lookup_pc = pc - 1 if is_return else pc
            rule = rules.get(lookup_pc)
            if rule is None:
                rule = rules[lookup_pc] = self._rule_at(process, views, lookup_pc)
            kind, off, rbp_off = rule
            source = FrameSource.CFI
            new_rbp = rbp
            if kind == CfaKind.RSP:
                cfa = rsp + off
            elif kind == _K_GO:
                cfa = rsp + off
                source = FrameSource.GO
                if off >= 16:
                    # Go pushes the caller's BP first thing in every function with
                    # a frame (cmd/internal/obj/x86 prologue), right below the RA.
                    # Frameless asm that pushes other words fails the sanity check.
                    if cfa - 16 < base or cfa > limit:
                        stop = StopReason.STACK_TRUNCATED
                        break
                    saved = unpack(stack, cfa - 16 - base)[0]
                    new_rbp = saved if saved >= cfa else None
                rbp_off = RBP_SAME
            elif kind == CfaKind.RBP:
                if rbp is None:
                    stop = StopReason.RBP_UNKNOWN
                    break
                cfa = rbp + off
            elif kind == CfaKind.NONE:
                # Frame-pointer fallback: the callee is assumed to have pushed RBP.
                if rbp is None or rbp < rsp or rbp & 7:
                    stop = StopReason.NO_CFI
                    break
                if rbp < base or rbp + 16 > limit:
                    stop = StopReason.STACK_TRUNCATED
                    break
                new_rbp = unpack(stack, rbp - base)[0]
                cfa = rbp + 16
                source = FrameSource.FP
            elif kind == CfaKind.OUTERMOST:
                stop = StopReason.OUTERMOST
                break
            elif kind == CfaKind.SIGNAL:
                rbp_at = rsp + rbp_off
                if rsp + off < base or rsp + off + 16 > limit or rbp_at < base or rbp_at + 8 > limit:
                    stop = StopReason.STACK_TRUNCATED
                    break
                ra = unpack(stack, rsp + off + 8 - base)[0]
                if ra == 0:
                    stop = StopReason.OUTERMOST
                    break
                pcs.append(ra)
                sources.append(FrameSource.SIGNAL)
                pc, rsp, rbp = ra, unpack(stack, rsp + off - base)[0], unpack(stack, rbp_at - base)[0]
                is_return = False
                continue
            elif kind == CfaKind.DEREF_RSP or kind == CfaKind.DEREF_RBP:
                reg = rsp if kind == CfaKind.DEREF_RSP else rbp
                if reg is None:
                    stop = StopReason.RBP_UNKNOWN
                    break
                if reg + off < base or reg + off + 8 > limit:
                    stop = StopReason.STACK_TRUNCATED
                    break
                cfa = unpack(stack, reg + off - base)[0]
            elif kind == _K_UNMAPPED:
                stop = StopReason.UNMAPPED_PC
                break
            elif kind == _K_GO_SPWRITE:
                stop = StopReason.GO_SPWRITE
                break
            else:
                stop = StopReason.UNSUPPORTED_CFI
                break
            if cfa <= rsp:
                stop = StopReason.BAD_CFA
                break
            if cfa - 8 < base or cfa > limit:
                stop = StopReason.STACK_TRUNCATED
                break
            ra = unpack(stack, cfa - 8 - base)[0]
            if source == FrameSource.CFI and rbp_off != RBP_SAME:
                if rbp_off == RBP_LOST:
                    new_rbp = None
                elif cfa + rbp_off < rsp:
                    # A save slot below RSP: an epilogue popped RBP already, and GCC's CFI keeps the rule
                    # to the `ret` (no restore note). RBP holds the caller's value; the copy starts at RSP.
                    pass
                else:
                    if cfa + rbp_off < base or cfa + rbp_off + 8 > limit:
                        stop = StopReason.STACK_TRUNCATED
                        break
                    new_rbp = unpack(stack, cfa + rbp_off - base)[0]
            if ra == 0:
                stop = StopReason.OUTERMOST
                break
            pcs.append(ra)
            sources.append(source)
            pc, rsp, rbp = ra, cfa, new_rbp
            is_return = True
        self.samples += 1
        self.stops[stop] += 1
        self.frames.update(sources)
        return UnwindResult(pcs, sources, stop)


def unwind(regs: Regs | tuple[int, int, int], stack: bytes | memoryview, process: MappingLookup,
           stack_base: int | None = None) -> UnwindResult:
    """One-off walk with a throwaway Unwinder (keep an Unwinder for many samples)."""
    return Unwinder().unwind(regs, stack, process, stack_base)


def frame_pointer_walk(regs: Regs | tuple[int, int, int], stack: bytes | memoryview,
                       stack_base: int | None = None, max_frames: int = DEFAULT_MAX_FRAMES) -> list[int]:
    """What bpf_get_stackid / perf --call-graph fp see: RIP, then [RBP+8] up the RBP chain.

    The baseline for tests and bench/unwind_speed.py: it loses the caller of
    every frameless leaf and stops in code without frame pointers.
    """
    rip, rsp, rbp = regs
    base = rsp if stack_base is None else stack_base
    limit = base + len(stack)
    unpack = _U64.unpack_from
    out = [rip]
    prev = rsp
    while len(out) < max_frames and prev <= rbp and base <= rbp and rbp + 16 <= limit and not rbp & 7:
        nxt, ra = unpack(stack, rbp - base)[0], unpack(stack, rbp + 8 - base)[0]
        if ra == 0:
            break
        out.append(ra)
        prev, rbp = rbp + 16, nxt
    return out
