"""The daemon's GC policy: long-lived objects frozen after each build, cycles still collected."""

from __future__ import annotations

import gc
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
