"""symbolizer.unwinder against independent unwinders, on real stack dumps.

The fixtures (tests/fixtures/c/unwind_chain.c, unwind_templates.cc,
tests/fixtures/go/unwind) capture their own RIP/RSP/RBP and stack top from
known call chains and write the chain libgcc's _Unwind_Backtrace (C, C++)
or runtime.Callers (Go) sees. We rebuild the process's mappings from the
saved /proc/self/maps (the files are still on disk) and must find exactly
the same return addresses, and end at the outermost frame.
"""

from __future__ import annotations

import re
import subprocess
import weakref
from array import array
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.builder import build_c, build_go
from symbolizer.cfi import RBP_SAME, CfaKind, UnwindTable
from symbolizer.elf import ElfFile, LoadSegment
from symbolizer.file_symbols import FileSymbols, file_id
from symbolizer.frames import Mapping
from symbolizer.proc_maps import parse_maps
from symbolizer.process_symbols import MappedFile, ProcessSymbols
from symbolizer.unwinder import (
    MAX_CACHED_PROCESSES,
    FrameSource,
    Regs,
    StopReason,
    Unwinder,
    frame_pointer_walk,
    unwind,
)

C_BUILDS = {
    "fp": ("-O2", "-g", "-fno-omit-frame-pointer"),
    "nofp": ("-O2", "-g", "-fomit-frame-pointer"),
}


@dataclass
class Scenario:
    regs: Regs
    expect: list[int]  # return addresses, leaf's caller first
    stack: bytes


_FILES: dict[str, FileSymbols] = {}


def _process(maps_text: str) -> ProcessSymbols:
    """A ProcessSymbols over the saved maps; FileSymbols shared across dumps by path."""
    mapped = []
    for e in parse_maps(maps_text):
        if not e.is_executable:
            continue
        fs = None
        if e.is_file:
            fs = _FILES.get(e.path)
            if fs is None:
                elf = ElfFile(e.path)
                fs = _FILES[e.path] = FileSymbols(elf, file_id(elf))
        mapped.append(MappedFile(Mapping(e.start, e.end, e.offset, e.path), fs))
    return ProcessSymbols(mapped)


def load_dump(outdir: Path) -> tuple[dict[str, Scenario], ProcessSymbols]:
    """Parse a fixture's OUTDIR (format in unwind_chain.c)."""
    out: dict[str, Scenario] = {}
    name = ""
    fields: dict[str, str] = {}
    for line in (outdir / "index.txt").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "scenario":
            name = value
        fields[key] = value
        if key == "stack":
            expect = [int(x, 16) for x in fields["expect"].split()]
            while expect and expect[-1] == 0:
                expect.pop()  # libgcc reports _start's undefined RA as a last IP of 0
            stack = (outdir / f"{name}.stack").read_bytes()
            assert len(stack) == int(value)
            out[name] = Scenario(Regs(*(int(x, 16) for x in fields["regs"].split())), expect, stack)
    return out, _process((outdir / "maps").read_text())


def _run(binary: Path, outdir: Path) -> tuple[dict[str, Scenario], ProcessSymbols]:
    outdir.mkdir()
    subprocess.run([str(binary), str(outdir)], check=True, timeout=60)
    return load_dump(outdir)


@pytest.fixture(scope="module", params=sorted(C_BUILDS))
def c_dump(request, tmp_path_factory):
    binary = build_c("unwind_chain", C_BUILDS[request.param])
    return request.param, *_run(binary, tmp_path_factory.mktemp("unwind") / request.param)


@pytest.fixture(scope="module")
def cc_dump(tmp_path_factory):
    binary = build_c("unwind_templates", ("-O2", "-fomit-frame-pointer"))
    return _run(binary, tmp_path_factory.mktemp("unwind_cc") / "out")


@pytest.fixture(scope="module")
def go_dump(tmp_path_factory):
    binary = build_go("unwind", stripped=True)
    return _run(binary, tmp_path_factory.mktemp("unwind_go") / "out")


_GCC_CLONE = re.compile(r"(\.(constprop|isra|part|cold)(\.\d+)?)+$")


def _names(ps: ProcessSymbols, pcs: list[int], sources: list[FrameSource]) -> list[str]:
    out = []
    for i, pc in enumerate(pcs):
        _, frames = ps.resolve(pc, return_address=i > 0 and sources[i] != FrameSource.SIGNAL)
        # gcc clones static functions (caller_a.constprop.0): compare base names
        out.append(_GCC_CLONE.sub("", frames[-1].function) if frames else "?")
    return out


COMPLETE = ["leaf_from_a", "leaf_from_b", "chain", "qsort_compare", "signal_handler"]


@pytest.mark.parametrize("scenario", COMPLETE)
def test_c_chain_equals_libgcc(c_dump, scenario):
    _, scenarios, ps = c_dump
    s = scenarios[scenario]
    res = Unwinder().unwind(s.regs, s.stack, ps)
    assert res.pcs[1:] == s.expect
    assert res.stop == StopReason.OUTERMOST
    assert res.complete


def test_c_frameless_leaf_has_its_caller(c_dump):
    build, scenarios, ps = c_dump
    for name, caller in (("leaf_from_a", "caller_a"), ("leaf_from_b", "caller_b")):
        s = scenarios[name]
        res = unwind(s.regs, s.stack, ps)
        names = _names(ps, res.pcs, res.sources)
        assert names[:2] == ["leaf", caller], names
        assert names[-1] == "_start"
        assert "main" in names
        # The frame-pointer walk the BPF side does today loses the caller.
        fp = frame_pointer_walk(s.regs, s.stack)
        assert caller not in _names(ps, fp, [FrameSource.LEAF] + [FrameSource.FP] * (len(fp) - 1)), build


def test_c_through_libc_and_signal_frames(c_dump):
    _, scenarios, ps = c_dump
    s = scenarios["qsort_compare"]
    res = unwind(s.regs, s.stack, ps)
    names = _names(ps, res.pcs, res.sources)
    # libc's own frames (msort_with_tmp, recursively) have no .dynsym name; libc6-dbg's .symtab names them,
    # and qsort_r by its internal alias (__GI___qsort_r), as perf does.
    assert names[0] == "compare"
    qsort = next(i for i, n in enumerate(names) if n.removeprefix("__GI_").lstrip("_") == "qsort_r")
    assert names.index("sort_some") > qsort > 1
    assert set(names[1:qsort]) == {"msort_with_tmp"}, names
    assert set(res.sources[1:]) == {FrameSource.CFI}

    s = scenarios["signal_handler"]
    res = unwind(s.regs, s.stack, ps)
    names = _names(ps, res.pcs, res.sources)
    assert names[0] == "on_signal"
    assert ps.mapping_at(res.pcs[1]).mapping.name == "libc.so.6"  # __restore_rt (no .dynsym name)
    # The frame after __restore_rt is the interrupted PC, marked as exact.
    assert res.sources[2] == FrameSource.SIGNAL
    assert names.index("raise_signal") > names.index("raise") > 2
    assert names[-1] == "_start"


def test_c_deep_stack_stops_truncated_with_a_prefix(c_dump):
    _, scenarios, ps = c_dump
    s = scenarios["deep_recursion"]
    u = Unwinder()
    res = u.unwind(s.regs, s.stack, ps)
    assert res.stop == StopReason.STACK_TRUNCATED
    assert len(res.pcs) > 10
    assert res.pcs[1:] == s.expect[:len(res.pcs) - 1]
    assert u.stops == {StopReason.STACK_TRUNCATED: 1}


def test_cc_templates_without_frame_pointers(cc_dump):
    scenarios, ps = cc_dump
    s = scenarios["templates"]
    res = unwind(s.regs, s.stack, ps)
    assert res.pcs[1:] == s.expect
    assert res.stop == StopReason.OUTERMOST
    names = _names(ps, res.pcs, res.sources)
    assert names[:6] == [f"deep::Level<{n}>::run(int)" for n in range(6)]
    assert "deep::through_function(std::function<int (int)> const&, int)" in names
    assert "main" in names


def test_go_frameless_leaf_from_three_callers(go_dump):
    scenarios, ps = go_dump
    for name, caller in (("leaf_from_a", "main.callerA"), ("leaf_from_b", "main.callerB"),
                         ("leaf_from_c", "main.callerC")):
        s = scenarios[name]
        res = unwind(s.regs, s.stack, ps)
        assert res.pcs[1:] == s.expect, name
        assert res.stop == StopReason.OUTERMOST
        assert set(res.sources[1:]) == {FrameSource.GO}
        names = _names(ps, res.pcs, res.sources)
        assert names[:2] == ["main.captureLeaf", caller]
        assert names[-1] == "runtime.goexit"
        fp = frame_pointer_walk(s.regs, s.stack)
        assert caller not in _names(ps, fp, [FrameSource.LEAF] + [FrameSource.FP] * (len(fp) - 1))


def test_go_truncated_copy_stops_cleanly(go_dump):
    scenarios, ps = go_dump
    s = scenarios["leaf_from_c"]
    for size in (0, 7, 8, 100, 512):
        res = unwind(s.regs, s.stack[:size], ps)
        assert res.stop == StopReason.STACK_TRUNCATED
        assert res.pcs[1:] == s.expect[:len(res.pcs) - 1]


# -- synthetic stacks: every stop reason, never an invented frame ------------------


class _FakeElf:
    load_segments = [LoadSegment(0, 0x100000, 0, 0x100000, 5)]


class _FakeSymbols:
    """A FileSymbols stand-in: identity translation, a given table, no Go."""

    def __init__(self, table: UnwindTable | None) -> None:
        self.elf = _FakeElf()
        self.unwind_table = table
        self.go = None

    def translate(self, addr: int, start: int, off: int) -> int:
        return addr - start + off

    def unwind_rules(self) -> UnwindTable | None:
        return self.unwind_table


def _table(rows: list[tuple[int, CfaKind, int, int]]) -> UnwindTable:
    return UnwindTable(array("Q", [r[0] for r in rows]), array("B", [r[1] for r in rows]),
                       array("i", [r[2] for r in rows]), array("i", [r[3] for r in rows]))


def _proc(table: UnwindTable | None) -> ProcessSymbols:
    return ProcessSymbols([MappedFile(Mapping(0x1000, 0x9000, 0x1000, "/fake"), _FakeSymbols(table))])


def _stack(*words: int) -> bytes:
    return b"".join(w.to_bytes(8, "little") for w in words)


RSP = 0x7FFF0000


def test_synthetic_cfi_chain_ends_at_outermost():
    # 0x2000: CFA=RSP+16 (one pushed word); 0x3000: CFA=RSP+8; 0x4000: RA undefined.
    table = _table([(0x2000, CfaKind.RSP, 16, RBP_SAME), (0x3000, CfaKind.RSP, 8, RBP_SAME),
                    (0x4000, CfaKind.OUTERMOST, 0, 0), (0x5000, CfaKind.NONE, 0, RBP_SAME)])
    stack = _stack(0xAAAA, 0x3005, 0x4005, 0)
    res = unwind(Regs(0x2010, RSP, 0), stack, _proc(table))
    assert res.pcs == [0x2010, 0x3005, 0x4005]
    assert res.stop == StopReason.OUTERMOST


def test_synthetic_frame_pointer_fallback_is_marked():
    # No CFI at 0x5000: RBP chain. [RBP] = next RBP, [RBP+8] = RA.
    table = _table([(0x2000, CfaKind.RSP, 8, RBP_SAME), (0x5000, CfaKind.NONE, 0, RBP_SAME)])
    stack = _stack(0, RSP + 32, 0x5100, 0, RSP + 48, 0x2100, 0, 0)
    res = unwind(Regs(0x5010, RSP, RSP + 8), stack, _proc(table))
    assert res.pcs[:3] == [0x5010, 0x5100, 0x2100]
    assert res.sources[1] == FrameSource.FP


def test_synthetic_epilogue_after_pop_rbp_keeps_the_callers_rbp():
    # GCC's epilogue: `pop %rbp` moves the CFA to RSP+8 but no note restores RBP's rule, which still puts
    # the save at CFA-16, below RSP now (libpython's x_add and PyLong_FromSsize_t, sampled there). The
    # copy starts at RSP: the popped value is RBP itself, and the caller, whose CFA is RBP-based, goes on.
    table = _table([(0x2000, CfaKind.RSP, 8, -16), (0x3000, CfaKind.RBP, 16, -16),
                    (0x4000, CfaKind.OUTERMOST, 0, 0)])
    callers_rbp = RSP + 24
    stack = _stack(0x3005, 0, 0, RSP + 48, 0x4005)  # [RSP]=RA; the caller's frame: [RBP]=saved, [RBP+8]=RA
    res = unwind(Regs(0x2010, RSP, callers_rbp), stack, _proc(table))
    assert res.pcs == [0x2010, 0x3005, 0x4005]
    assert res.stop == StopReason.OUTERMOST


@pytest.mark.parametrize(("regs", "stack", "reason"), [
    (Regs(0x99999, RSP, 0), _stack(0x2000), StopReason.UNMAPPED_PC),  # leaf outside every mapping
    (Regs(0x2000, RSP, 0), _stack(0x99999), StopReason.UNMAPPED_PC),  # RA outside: kept, then stop
    (Regs(0x2000, RSP, 0), b"", StopReason.STACK_TRUNCATED),
    (Regs(0x5010, RSP, 0), _stack(0x2000), StopReason.NO_CFI),  # no CFI and RBP below RSP
    (Regs(0x6010, RSP, RSP - 64), _stack(0x2000), StopReason.BAD_CFA),  # CFA=RBP+8 not above RSP
    (Regs(0x7010, RSP, 0), _stack(0x2000), StopReason.UNSUPPORTED_CFI),
    (Regs(0x2000, RSP, 0), _stack(0), StopReason.OUTERMOST),  # RA 0
])
def test_synthetic_stop_reasons(regs, stack, reason):
    table = _table([(0x2000, CfaKind.RSP, 8, RBP_SAME), (0x5000, CfaKind.NONE, 0, RBP_SAME),
                    (0x6000, CfaKind.RBP, 8, RBP_SAME), (0x7000, CfaKind.UNSUPPORTED, 0, 1),
                    (0x8000, CfaKind.NONE, 0, RBP_SAME)])
    u = Unwinder()
    res = u.unwind(regs, stack, _proc(table))
    assert res.stop == reason
    assert u.stops[reason] == 1 and u.samples == 1
    # Only addresses that a rule explained: the leaf, plus the one RA read at 0x2000.
    assert len(res.pcs) <= 2


def test_synthetic_self_loop_is_cut():
    # A frame whose CFA equals its RSP would loop forever; it must stop as BAD_CFA.
    table = _table([(0x2000, CfaKind.RSP, 0, RBP_SAME), (0x3000, CfaKind.NONE, 0, RBP_SAME)])
    res = unwind(Regs(0x2000, RSP + 8, 0), _stack(0x2000, 0x2000), _proc(table), stack_base=RSP)
    assert res.stop == StopReason.BAD_CFA
    assert res.pcs == [0x2000]


def test_synthetic_max_depth():
    # Unbounded well-formed recursion: cut at max_frames, not an error.
    table = _table([(0x2000, CfaKind.RSP, 8, RBP_SAME), (0x3000, CfaKind.NONE, 0, RBP_SAME)])
    res = Unwinder(max_frames=10).unwind(Regs(0x2000, RSP, 0), _stack(*[0x2001] * 64), _proc(table))
    assert res.stop == StopReason.MAX_DEPTH
    assert len(res.pcs) == 11


def test_a_process_out_of_the_cache_is_not_held():
    # The drain thread's Unwinder lives as long as the agent and walks every process of a churning host:
    # what it caches of one (rules, its mappings' views) must go with its cache entry, not hold the
    # snapshot (and through it the files' tables) for good.
    table = _table([(0x2000, CfaKind.RSP, 8, RBP_SAME), (0x3000, CfaKind.OUTERMOST, 0, 0)])
    u = Unwinder()
    first = _proc(table)
    assert u.unwind(Regs(0x2000, RSP, 0), _stack(0x3005), first).stop == StopReason.OUTERMOST
    gone_process, gone_mapping = weakref.ref(first), weakref.ref(first.mappings[0])
    del first
    for _ in range(MAX_CACHED_PROCESSES):
        u.unwind(Regs(0x2000, RSP, 0), _stack(0x3005), _proc(table))
    assert gone_process() is None
    assert gone_mapping() is None


def test_go_frame_info_of_stripped_binary():
    from symbolizer.gopclntab import FUNC_FLAG_SPWRITE, FUNC_FLAG_TOP_FRAME, load_pclntab  # noqa: PLC0415

    table = load_pclntab(build_go("unwind", stripped=True).read_bytes())
    funcs = {name: (entry, end) for entry, end, name in table.functions()}
    entry, end = funcs["main.captureLeaf"]
    # A frameless leaf: delta 0 at every instruction (that is why its caller is at [RSP]).
    assert {table.sp_delta(pc) for pc in range(entry, end) if table.sp_delta(pc) is not None} == {0}
    assert table.frame_info(funcs["runtime.goexit"][0] + 1).flag & FUNC_FLAG_TOP_FRAME
    assert table.frame_info(funcs["runtime.systemstack"][0]).flag & FUNC_FLAG_SPWRITE
    entry, end = funcs["main.framed"]
    deltas = [table.sp_delta(pc) for pc in range(entry, end)]
    assert deltas[0] == 0 and max(d for d in deltas if d is not None) >= 16 * 8  # [32]int local
    assert table.frame_info(0) is None
