"""Goroutine profile without a kernel: the live-set bookkeeping, g layouts, memory reads and
the pclntab unwinder, on the goroutines fixture's binary and this process's own memory."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from agent.bpfload.records import RawRecord
from agent.go.goroutines import GState, GStatus, go_binary, read_allgs, read_labels, runtime_pprof_frames, unwind
from agent.go.layouts import G_LAYOUT_TABLE
from agent.probes.family import ProbeConfig
from agent.probes.goroutine import Event, Goroutine, GoroutineProbe, GoroutineTable, _Proc
from agent.processes.memory import ProcessMemory
from agent.processes.tracker import ProcessTracker
from fixtures.builder import build_go


class Arena:
    """A zeroed block of this process's own memory, laid out as a test says and read back through
    /proc/self/mem by the real reader. Addresses in a test are offsets into it: arena(off)."""

    SIZE = 1 << 17

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(self.SIZE)
        self.base = ctypes.addressof(self.buf)
        self.mem = ProcessMemory(os.getpid())

    def __call__(self, off: int) -> int:
        return self.base + off

    def put(self, off: int, data: bytes) -> None:
        assert off + len(data) <= self.SIZE
        ctypes.memmove(self.base + off, data, len(data))

    def put_u64(self, off: int, *words: int) -> None:
        self.put(off, struct.pack(f"<{len(words)}Q", *words))


@pytest.fixture
def arena():
    a = Arena()
    yield a
    a.mem.close()


@pytest.fixture(scope="module")
def binary():
    found = go_binary(str(build_go("goroutines")))
    assert found is not None
    return found


def _entry(tab, name: str) -> int:
    return next(entry for entry, _end, n in tab.functions() if n == name)


def test_table_follows_create_park_wake_exit():
    t = GoroutineTable()
    t.apply(7, Event.CREATE, 10, 0xA0, (0x1000, 0x2000))
    g = t.procs[7][10]
    assert (g.startpc, g.gopc, g.labels_ptr, g.parked, g.stack) == (0x1000, 0x2000, 0xA0, False, ())
    t.apply(7, Event.PARK, 10, 0xB0, (1, 2, 3))
    assert (g.parked, g.stack, g.labels_ptr) == (True, (1, 2, 3), 0xB0)
    t.apply(7, Event.WAKE, 10, GStatus.RUNNABLE, ())
    assert (g.parked, g.stack) == (False, ())  # where it parked is stale now
    t.apply(7, Event.PARK, 10, 0, (4,))
    t.apply(7, Event.EXIT, 10, GStatus.DEAD, ())
    assert t.procs[7] == {}
    t.apply(7, Event.WAKE, 11, GStatus.RUNNABLE, ())  # older than the probes: known from its first event
    assert t.procs[7][11].parked is False
    assert t.events == 6


def test_seed_never_overrides_events_and_skips_dead():
    t = GoroutineTable()
    t.apply(1, Event.PARK, 5, 0, (9,))
    st = lambda goid, status: GState(0, goid, status, 0, 0, 0, 0x40, 0)  # noqa: E731
    added = t.seed(1, [(st(5, GStatus.RUNNING), (1,)), (st(6, GStatus.DEAD), ()), (st(7, GStatus.WAITING), (2, 3)),
                       (st(8, GStatus.RUNNABLE), (4,))])
    assert added == 2
    assert t.procs[1][5].stack == (9,)
    assert (t.procs[1][7].parked, t.procs[1][7].stack, t.procs[1][7].startpc) == (True, (2, 3), 0x40)
    assert t.procs[1][8].parked is False


def test_probe_decodes_records_without_bpf():
    probe = GoroutineProbe(ProbeConfig(), ProcessTracker()).new_accumulator()
    rec = lambda ev, goid, payload, ips=(): RawRecord(6, 42, 43, 0, 0, (ev << 56) | payload, goid, "x", (), ips)  # noqa: E731
    probe.on_record(rec(Event.CREATE, 3, 0, (0x10, 0x20)))
    probe.on_record(rec(Event.PARK, 3, 0, (0x30, 0x40)))
    probe.on_record(rec(99, 3, 0))  # unknown event: ignored
    g = probe.table.procs[42][3]
    assert (g.parked, g.stack, g.gopc) == (True, (0x30, 0x40), 0x20)
    assert probe.record_count() == 2


def test_dwarf_layout_equals_the_version_table(binary):
    assert binary.layout_source == "dwarf"
    assert binary.layout == G_LAYOUT_TABLE[(1, 27)]
    assert binary.allgs_vaddr and not binary.pie
    stripped = go_binary(str(build_go("goroutines", stripped=True)))
    assert stripped is not None and stripped.layout_source == "table" and stripped.allgs_vaddr == 0
    assert stripped.layout == binary.layout


def test_read_allgs_and_labels_from_memory(binary, arena):
    layout, a = binary.layout, arena
    a.put_u64(0x5000, a(0x6000), 2, 4)  # allgs: ptr, len, cap
    a.put_u64(0x6000, a(0x7000), a(0x8000))
    for gp, goid, status in ((0x7000, 1, 0x1000 | GStatus.WAITING), (0x8000, 9, GStatus.DEAD)):
        a.put_u64(gp + layout.goid, goid)
        a.put(gp + layout.atomicstatus, struct.pack("<I", status))
        a.put_u64(gp + layout.sched, 0x9000, 0x401000)  # sp, pc
        a.put_u64(gp + layout.labels, a(0xA000))
    gs = read_allgs(a.mem, a(0x5000), layout)
    assert [(g.gp, g.goid, g.status, g.sched_sp, g.sched_pc, g.labels) for g in gs] == [
        (a(0x7000), 1, GStatus.WAITING, 0x9000, 0x401000, a(0xA000)),
        (a(0x8000), 9, GStatus.DEAD, 0x9000, 0x401000, a(0xA000))]
    a.put_u64(0xA000, a(0xB000), 2, 2)  # labelMap: []label
    a.put_u64(0xB000, a(0xC000), 5, a(0xC010), 1, a(0xC020), 4, a(0xC030), 0)
    a.put(0xC000, b"group")
    a.put(0xC010, b"a")
    a.put(0xC020, b"zone")
    assert read_labels(a.mem, a(0xA000)) == (("group", "a"), ("zone", ""))
    assert read_labels(a.mem, 0) == ()
    a.put_u64(0x6000, a(0x7000), 8)  # a g that is not mapped (freed between the reads) is skipped
    assert [g.goid for g in read_allgs(a.mem, a(0x5000), layout)] == [1]


def test_unwind_follows_sp_deltas_to_goexit(binary, arena):
    tab = binary.pclntab
    gopark, park_a, goexit = (_entry(tab, n) for n in ("runtime.gopark", "main.parkA", "runtime.goexit"))
    # a PC inside gopark past its prologue, a return address inside parkA, goexit+1 as Go sets it up
    leaf = next(pc for pc in range(gopark + 1, gopark + 200) if (tab.sp_delta(pc) or 0) > 0)
    ret_a = next(pc for pc in range(park_a + 8, park_a + 200) if (tab.sp_delta(pc - 1) or 0) > 0)
    a = arena
    sp = a(0x10000)
    at = sp + tab.sp_delta(leaf)
    a.put_u64(at - a.base, ret_a)
    at2 = at + 8 + tab.sp_delta(ret_a - 1)
    a.put_u64(at2 - a.base, goexit + 1)
    assert unwind(a.mem, tab, 0, leaf, sp) == (leaf, ret_a, goexit + 1)
    assert unwind(a.mem, tab, 0, leaf, 8) == (leaf,)  # an unreadable word (page zero) ends the walk, never raises
    # runtime/pprof's view: goexit gone, and go-statement wrappers elided
    wrap = _entry(tab, "main.main.gowrap1")
    assert runtime_pprof_frames(tab, 0, (leaf, ret_a, wrap + 1, goexit + 1)) == (leaf, ret_a)


def test_system_goroutines_by_entry_or_by_the_frame_under_goexit(binary):
    tab, probe, proc = binary.pclntab, GoroutineProbe(ProbeConfig(), ProcessTracker()).new_accumulator(), _Proc(binary, 0)
    bgsweep, park_b, goexit, rt_main = (_entry(tab, n) for n in ("runtime.bgsweep", "main.parkB", "runtime.goexit",
                                                                  "runtime.main"))
    assert probe._is_system(proc, Goroutine(1, startpc=bgsweep))
    assert not probe._is_system(proc, Goroutine(1, startpc=rt_main))  # runtime.main is the user's
    assert probe._is_system(proc, Goroutine(1, stack=(0x1, bgsweep + 20, goexit + 1)))
    assert not probe._is_system(proc, Goroutine(1, stack=(0x1, park_b + 20, goexit + 1)))
    assert not probe._is_system(proc, Goroutine(1, stack=(0x1, bgsweep + 20)))  # stack cut short: unknown


def test_carry_copies_the_live_set_of_running_processes():
    """The next interval's table is a copy: events applied to it do not change the interval being built."""
    t = GoroutineTable()
    t.apply(7, Event.PARK, 10, 0xB0, (1, 2, 3))
    t.apply(8, Event.PARK, 11, 0, (4,))
    nxt = t.carry(alive=lambda pid: pid == 7)
    assert set(nxt.procs) == {7} and nxt.events == 0
    nxt.apply(7, Event.WAKE, 10, GStatus.RUNNABLE, ())
    assert (t.procs[7][10].parked, t.procs[7][10].stack) == (True, (1, 2, 3))
    assert (nxt.procs[7][10].parked, nxt.procs[7][10].labels_ptr) == (False, 0xB0)
