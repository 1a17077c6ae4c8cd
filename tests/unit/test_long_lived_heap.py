"""The daemon's GC policy: long-lived objects frozen after each build, cycles still collected."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from agent.daemon.daemon import LongLivedHeap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic GC frees it


@pytest.fixture(autouse=True)
def _unfrozen():
    yield
    gc.unfreeze()


def _cycle() -> weakref.ref:
    return weakref.ref(_Node())


def test_first_build_collects_cycles_then_freezes():
    heap = LongLivedHeap(full_every_s=3600)
    gone = _cycle()
    heap.after_build()
    assert gone() is None  # start-up cycles are collected before anything is frozen
    assert gc.get_freeze_count() > 0


def test_later_objects_stay_collectable_frozen_ones_wait_for_the_periodic_full_collection():
    heap = LongLivedHeap(full_every_s=3600)
    kept = weakref.ref(node := _Node())  # alive at the first build: frozen with the rest
    heap.after_build()
    del node
    later = _cycle()  # made after the freeze: an ordinary collection frees it
    heap.after_build()  # not due: freezes nothing more
    gc.collect()
    assert later() is None
    assert kept() is not None  # frozen: no collection sees it
    heap.full_every_s = 0  # the periodic full collection is due
    heap.after_build()
    assert kept() is None


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def test_after_a_build_the_c_heaps_free_pages_go_back():
    """What a build frees in its thread's arena stays in the agent's RSS until trimmed (a soak: 70-120 MB)."""
    kept: list[bytes] = []

    def build() -> None:
        scratch = [bytes(20_000) for _ in range(10_000)]  # 200 MB in blocks malloc keeps in its arena
        kept.extend(scratch[::50])  # a few survivors scattered through it keep glibc from shrinking it
        del scratch

    worker = threading.Thread(target=build)
    worker.start()
    worker.join()
    before = _rss_mb()
    LongLivedHeap(full_every_s=3600).trim()
    after = _rss_mb()
    assert after < before - 40, (before, after)
    assert len(kept) == 200


def test_files_released_by_the_symbol_cache_are_collected_within_a_minute_not_ten():
    heap = LongLivedHeap(full_every_s=3600)
    parsed = weakref.ref(node := _Node())  # a file's parsed state: cycles, frozen at a build
    heap.after_build()
    del node  # the cache released the file
    heap.after_build(released=True)  # too soon after the last full collection
    assert parsed() is not None
    heap._last_full -= LongLivedHeap.RELEASED_EVERY_S
    heap.after_build(released=False)  # nothing released: the ten-minute rule holds
    assert parsed() is not None
    heap.after_build(released=True)
    assert parsed() is None
