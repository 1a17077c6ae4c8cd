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


def test_frozen_objects_are_left_alone_until_the_periodic_full_collection():
    heap = LongLivedHeap(full_every_s=3600)
    heap.after_build()
    kept = _cycle()
    heap.after_build()  # frozen with the rest: a full collection does not see it
    gc.collect()
    assert kept() is not None
    heap.full_every_s = 0  # the periodic full collection is due
    heap.after_build()
    assert kept() is None
