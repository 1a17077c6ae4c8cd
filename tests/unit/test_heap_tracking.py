"""Heap probe logic that needs no kernel: scaling, live tracking, runtime-frame hiding, probe points."""

from __future__ import annotations

import math
import os
import shutil

import pytest

from agent.bpfload.records import RawRecord, RecordKind
from agent.probes.family import SettingChanges, Window
from agent.probes.heap import (
    LIBC_PROBES,
    RETURN_PROGRAM,
    SYSTEM_LIBC,
    HeapTracker,
    hide_runtime_frames,
    libc_probe_points,
    scale_heap_sample,
)
from agent.processes.targets import GatedCommand, gated_command_path
from exporters.profile import Location
from symbolizer.frames import Frame, FrameKind

RATE = 512 * 1024


def rec(kind: RecordKind, addr: int, size: int = 0, ips: tuple[int, ...] = (0x10,), pid: int = 7) -> RawRecord:
    return RawRecord(int(kind), pid, pid, 0, 1, size, addr, "t", (), ips)


def test_scale_is_gos_scaleHeapSample():  # noqa: N802  (Go's name)
    # values computed with Go's formula: int64(count * 1/(1-exp(-size/rate)))
    scale = 1 / (1 - math.exp(-16384 / RATE))
    assert scale_heap_sample(10, 16384, RATE) == (int(10 * scale), int(10 * 16384 * scale))
    assert scale_heap_sample(0, 16384, RATE) == (0, 0)
    assert scale_heap_sample(3, 100, 1) == (3, 300)  # rate 1: everything sampled
    big = scale_heap_sample(1, 64 * RATE, RATE)  # a huge block is always sampled
    assert big == (1, 64 * RATE)


def test_tracker_alloc_free_and_inuse():
    t = HeapTracker()
    t.add(rec(RecordKind.ALLOC, 0x1000, 64))
    t.add(rec(RecordKind.ALLOC, 0x2000, 64))
    t.add(rec(RecordKind.ALLOC, 0x3000, 128, ips=(0x20,)))
    t.add(rec(RecordKind.FREE, 0x1000))
    t.add(rec(RecordKind.FREE, 0x9000))  # allocated before the capture
    groups = {(g.first.user_ips, g.first.value): (g.allocs, g.live) for g in t.groups.values()}
    assert groups == {((0x10,), 64): (2, 1), ((0x20,), 128): (1, 1)}
    assert t.unmatched_frees == 1
    values = {g.first.value: v for g, v in t.scaled({}, 1)}
    assert values[64] == [2, 128, 1, 64]


def test_tracker_reused_address_retires_the_old_object():
    t = HeapTracker()
    t.add(rec(RecordKind.ALLOC, 0x1000, 64))
    t.add(rec(RecordKind.ALLOC, 0x1000, 32))  # the free of the first was not seen
    live = sorted((g.first.value, g.live) for g in t.groups.values())
    assert live == [(32, 1), (64, 0)]


def test_tracker_addresses_are_per_process():
    t = HeapTracker()
    t.add(rec(RecordKind.ALLOC, 0x1000, 64, pid=1))
    t.add(rec(RecordKind.FREE, 0x1000, pid=2))
    assert [g.live for g in t.groups.values()] == [1]


def test_per_process_rates_scale_go_processes_with_their_own():
    t = HeapTracker()
    t.add(rec(RecordKind.ALLOC, 0x1000, 4096, pid=1))
    t.add(rec(RecordKind.ALLOC, 0x1000, 4096, pid=2))
    by_pid = {g.first.pid: v for g, v in t.scaled({2: 1}, RATE)}
    assert by_pid[2] == [1, 4096, 1, 4096]
    assert by_pid[1][1] == scale_heap_sample(1, 4096, RATE)[1]


def _loc(*names: str) -> Location:
    return Location(0x1, None, tuple(Frame(function=n, kind=FrameKind.GO) for n in names))


def test_hide_runtime_frames():
    stack = (_loc("runtime.mProf_Malloc"), _loc("runtime.mallocgc"), _loc("main.f"), _loc("runtime.main"))
    assert hide_runtime_frames(stack) == stack[2:]
    only_runtime = (_loc("runtime.malg"), _loc("runtime.newproc1"))
    assert hide_runtime_frames(only_runtime) == only_runtime
    unresolved = (Location(0x5, None), _loc("main.f"))
    assert hide_runtime_frames(unresolved) == unresolved


@pytest.mark.skipif(not os.path.exists(SYSTEM_LIBC), reason="not a Debian-layout glibc system")
def test_libc_probe_points_cover_every_allocator_once():
    points = libc_probe_points(SYSTEM_LIBC)
    entries = [p for p in points if not p.retprobe]
    offsets = [p.offset for p in entries]
    assert len(offsets) == len(set(offsets)), "two uprobes on one address would count twice"
    programs = {p.program for p in entries}
    assert programs == {prog for prog, _ in LIBC_PROBES.values()}
    returns = [p for p in points if p.retprobe]
    assert {p.program for p in returns} == {RETURN_PROGRAM}
    assert len(returns) == len(entries) - 1  # every allocating entry but free's


def test_gated_command_is_recognised(tmp_path):
    gate = GatedCommand(["true"])
    try:
        assert gated_command_path(gate.pid) == shutil.which("true")
    finally:
        gate.kill()
    assert gated_command_path(os.getpid()) is None


def test_an_entry_probe_firing_twice_for_one_allocation_counts_once():
    """Go's prologue can call morestack and restart the function: mProf_Malloc's entry uprobe fires again."""
    from agent.bpfload.records import RawRecord, RecordKind
    from agent.probes.heap import HeapTracker

    def alloc(addr, size=1024, tid=7):
        return RawRecord(RecordKind.ALLOC, 1, tid, 0, 0, size, addr, "app", (), (0x401000, 0x402000))

    t = HeapTracker()
    t.add(alloc(0xC000100000))
    t.add(alloc(0xC000100000))  # the restarted entry: same object, same stack
    t.add(alloc(0xC000200000))
    (group,) = t.groups.values()
    assert (group.allocs, group.live, t.duplicates) == (2, 2, 1)
    t.add(RawRecord(RecordKind.FREE, 1, 7, 0, 0, 0, 0xC000100000, "app", (), ()))
    t.add(alloc(0xC000100000))  # reused after its free: a new allocation
    assert (group.allocs, group.live) == (3, 2)


def test_carry_keeps_live_objects_of_running_processes_and_no_allocations():
    """The daemon's next interval starts with what is live (in use), none of this interval's allocations."""
    t = HeapTracker()
    t.add(rec(RecordKind.ALLOC, 0x100, 64, ips=(0x10,)))
    t.add(rec(RecordKind.ALLOC, 0x200, 64, ips=(0x10,)))
    t.add(rec(RecordKind.ALLOC, 0x300, 32, ips=(0x20,)))
    t.add(rec(RecordKind.FREE, 0x300))  # dead: its group does not carry
    t.add(rec(RecordKind.ALLOC, 0x100, 64, ips=(0x10,), pid=9))  # a process that exits
    nxt = t.carry(alive=lambda pid: pid == 7)
    assert [(k.pid, k.size, g.allocs, g.live) for k, g in nxt.groups.items()] == [(7, 64, 0, 2)]
    assert set(nxt.live) == {(7, 0x100), (7, 0x200)}
    nxt.add(rec(RecordKind.FREE, 0x100))  # a free in the next interval lowers in-use there, not here
    assert [g.live for g in nxt.groups.values()] == [1]
    assert sorted(g.live for g in t.groups.values()) == [0, 1, 2]


def test_each_allocation_is_scaled_by_the_rate_it_was_sampled_at():
    """The governor moved the BPF rate mid-interval: the same stack and size sampled at two rates are two
    groups, each scaled by its own (inuse too, when they carry into the next interval)."""
    t = HeapTracker()
    t.add(rec(RecordKind.ALLOC, 0x1000, 4096), RATE)
    t.add(rec(RecordKind.ALLOC, 0x2000, 4096), 4 * RATE)
    t.add(rec(RecordKind.ALLOC, 0x3000, 4096, pid=8))  # 0: its process's own rate (Go, the sampler)
    got = sorted((g.first.pid, v) for g, v in t.scaled({8: 100}, 1))
    assert got == sorted([(7, [*scale_heap_sample(1, 4096, RATE), *scale_heap_sample(1, 4096, RATE)]),
                          (7, [*scale_heap_sample(1, 4096, 4 * RATE), *scale_heap_sample(1, 4096, 4 * RATE)]),
                          (8, [*scale_heap_sample(1, 4096, 100), *scale_heap_sample(1, 4096, 100)])])
    carried = t.carry(lambda pid: True)
    assert sorted(k.rate for k in carried.groups) == [0, RATE, 4 * RATE]


def test_setting_changes_are_read_at_the_records_time():
    s = SettingChanges(RATE)
    assert s.at(0) == RATE and not s.set(RATE)
    assert s.set(2 * RATE)
    t = s.changes[0][0]
    assert s.at(t - 1) == RATE and s.at(t) == 2 * RATE and s.now == 2 * RATE
    window = Window(t - 10, t + 10, 0)
    assert s.inside(window) == [(t, 2 * RATE)] and s.inside(Window(t, t + 10, 0)) == []
    assert s.describe(s.inside(window), window, " bytes") == f"{2 * RATE} bytes from {t / 1e9:.3f}"
