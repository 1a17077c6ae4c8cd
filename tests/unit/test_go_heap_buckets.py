"""The bucket reader's decoding, on bucket lists laid out as Go lays them
out, in this process's own memory (read back through /proc/self/mem).
Against a real Go program: tests/integration/test_heap.py."""

from __future__ import annotations

import ctypes
import os
import struct

from agent.go.heap_buckets import BucketAddresses, HeapBuckets, cycle_words, physical_stack, read_heap_buckets
from exporters.profile import Location
from symbolizer.frames import Frame, FrameKind


class _Memory:
    """Buckets in ctypes buffers: header, stack, memRecord {active, future[3]} of {allocs, frees}."""

    def __init__(self, cycle: int, words: int = 2) -> None:
        self.words = words
        self.keep: list[ctypes.Array] = []
        self.head = ctypes.c_uint64(0)
        self.cycle = ctypes.c_uint32(cycle << 1)

    def add(self, stk: tuple[int, ...], size: int, cycles: list[tuple[int, int]]) -> None:
        rec = []
        for allocs, frees in cycles:  # active, future[0..2]
            rec += [allocs, frees] + [0] * (self.words - 2)
        words = [0, self.head.value, 1, 0, size, len(stk), *stk, *rec]
        buf = (ctypes.c_uint64 * len(words))(*words)
        self.keep.append(buf)
        self.head.value = ctypes.addressof(buf)  # new buckets go at the head

    def where(self) -> BucketAddresses:
        return BucketAddresses(ctypes.addressof(self.head), ctypes.addressof(self.cycle), self.words)


def _read(mem: _Memory) -> HeapBuckets:
    return read_heap_buckets(os.getpid(), mem.where())


def test_published_counts_are_active_plus_the_cycle_due_for_flush():
    mem = _Memory(cycle=4)  # flush index 4 % 3 = 1: future[1] is published next, others not yet
    mem.add((0x401000, 0x402000), 64, [(10, 4), (1, 0), (2, 1), (100, 100)])
    mem.add((0x403000,), 4096, [(3, 3), (0, 0), (0, 0), (7, 0)])
    got = _read(mem).counts
    assert got == {((0x401000, 0x402000), 64): (12, 5), ((0x403000,), 4096): (3, 3)}


def test_nothing_published_yet_counts_every_cycle_as_go_does():
    mem = _Memory(cycle=0)
    mem.add((0x401000,), 32, [(0, 0), (1, 0), (2, 1), (3, 0)])
    assert _read(mem).counts == {((0x401000,), 32): (6, 1)}


def test_go_1_26_records_have_byte_counts_too():
    assert cycle_words((1, 21, 13)) == 4 and cycle_words((1, 26, 6)) == 4 and cycle_words((1, 27, 3)) == 2
    mem = _Memory(cycle=2, words=4)
    mem.add((0x401000,), 128, [(5, 1), (0, 0), (0, 0), (9, 9)])
    assert _read(mem).counts == {((0x401000,), 128): (14, 10)}


def test_since_is_allocations_in_between_and_live_now():
    before = HeapBuckets({((1,), 8): (10, 2)})
    after = HeapBuckets({((1,), 8): (15, 9), ((2,), 16): (4, 0)})
    assert after.since(before) == {((1,), 8): (5, 6), ((2,), 16): (4, 4)}
    assert after.since(None)[((1,), 8)] == (15, 6)


def test_a_torn_stack_length_is_skipped_not_followed():
    mem = _Memory(cycle=0)
    mem.add((0x401000,), 32, [(1, 0), (0, 0), (0, 0), (0, 0)])
    mem.add((0x402000,), 64, [(2, 0), (0, 0), (0, 0), (0, 0)])
    struct.pack_into("<Q", mem.keep[-1], 5 * 8, 1 << 40)  # nstk of the head bucket: garbage
    got = _read(mem)
    assert got.torn == 1 and got.counts == {((0x401000,), 32): (1, 0)}


def _loc(addr: int, *functions: str) -> Location:
    return Location(address=addr, mapping=None, frames=tuple(Frame(function=f, kind=FrameKind.GO) for f in functions))


def test_physical_stack_folds_the_pcs_of_inlined_frames():
    # runtime.callers: allocB, then runB inlined into main (runB's PC, main's inline-mark PC), runtime.main
    leaf = _loc(1, "main.allocB")
    inlined = _loc(2, "main.runB", "main.main")
    mark = _loc(3, "main.main")
    outer = _loc(4, "runtime.main")
    assert physical_stack((leaf, inlined, mark, outer)) == (leaf, inlined, outer)
    # a recursive call of the same function is a frame of its own when it is not the inline parent
    again = _loc(5, "main.runB", "main.main")
    assert physical_stack((inlined, mark, again, _loc(6, "main.main"))) == (inlined, again)
    assert physical_stack((inlined, outer)) == (inlined, outer)  # unresolved or truncated: kept
