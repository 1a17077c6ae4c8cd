"""The process table shared between threads: the drain thread (note_record, evict), the builder (the
goroutine family observes Go processes that sent no record) and the unwind-table worker (refresh).

A stress run of evict() against a builder's observe() raised "dictionary changed size during iteration"
on the drain thread, where nothing catches it: the daemon would have exited without its last interval."""

from __future__ import annotations

import os
import sys
import threading

from agent.processes.tracker import ProcessInfo, ProcessTracker
from symbolizer.file_symbols import SymbolCache
from symbolizer.process_symbols import ProcessSymbols


def _table(tmp_path, n: int) -> ProcessTracker:
    """A table of `n` processes sampled in interval 10 (so evict(5) keeps them), under an empty /proc."""
    tracker = ProcessTracker(SymbolCache(), proc_root=str(tmp_path))
    for pid in range(100000, 100000 + n):
        tracker.adopt(ProcessInfo(pid=pid, name="p", exe="/p", symbols=ProcessSymbols([])))
        tracker.seen(pid, 10)
    return tracker


def test_evict_while_another_thread_observes(tmp_path):
    tracker = _table(tmp_path, 4000)
    stop = threading.Event()

    def builder() -> None:
        pid = 1
        while not stop.is_set():
            tracker.observe(pid)  # gone under this /proc: a failed snapshot, held as None
            pid += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the old code failed within ~10 evictions
    t = threading.Thread(target=builder)
    t.start()
    try:
        for _ in range(100):
            tracker.evict(5)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert all(tracker.get(pid) is not None for pid in range(100000, 104000))


def test_a_refresh_does_not_bring_back_an_evicted_process():
    """The unwind worker refreshes a pid the drain thread evicted meanwhile: it stays out (a resurrected
    entry would be outside the table's accounting, never evicted again)."""
    tracker = ProcessTracker(SymbolCache(), max_processes=0)  # the real /proc: this process can be read
    pid = os.getpid()
    tracker.max_processes = None
    assert tracker.observe(pid) is not None
    tracker.seen(pid, 0)
    tracker.max_processes = 0
    assert tracker.evict(5) == 1 and pid not in tracker
    assert tracker.refresh(pid) is None and pid not in tracker
