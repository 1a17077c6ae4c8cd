"""What the agent keeps of a process goes when the process table evicts it.

Under churn (a thousand processes a minute) the registries (Python
interpreters, trace contexts) and the cache of Python code objects grew by every pid ever seen: a soak's RSS never levelled. The tracker tells
them of each pid it evicts, once no interval still to be built needs it.
"""

from __future__ import annotations

import os
import subprocess
import weakref

from agent.bpfload.records import RawRecord, RecordKind
from agent.probes.cpu import CpuProbe
from agent.probes.family import ProbeConfig
from agent.probes.python_stacks import PythonStacks
from agent.processes.stack_resolver import UserStacks
from agent.processes.tracker import ProcessTracker
from agent.tracectx.registry import TraceContextRegistry
from agent.unwind.tables import UnwindTables
from symbolizer.file_symbols import SymbolCache

PYTHON = "/usr/bin/python3.11"
CHILD = "import sys, time\ndef work(): pass\nprint(id(work.__code__), flush=True)\ntime.sleep(60)\n"


def test_an_evicted_process_leaves_the_registries_and_the_code_cache():
    tracker = ProcessTracker(cache=SymbolCache(), max_processes=64)
    probe = CpuProbe(ProbeConfig(), tracker)
    written: dict[str, dict[int, object]] = {"py": {}, "ctx": {}}
    python = PythonStacks(lambda pid, v: written["py"].__setitem__(pid, v), tracker)  # as the probe set makes it
    probe.trace_contexts = TraceContextRegistry(lambda pid, v: written["ctx"].__setitem__(pid, v), use_dwarf=False)
    child = subprocess.Popen([PYTHON, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        code_addr = int(child.stdout.readline())
        pid = child.pid
        assert tracker.observe(pid) is not None
        tracker.seen(pid, 0)
        proc = python.registry.observe(pid, "python3.11")
        assert proc is not None and proc.layout is not None
        python.frames.read_codes(pid, [code_addr], proc.layout)
        assert python.frames.code(pid, code_addr, proc.layout).qualname == "work"
        probe.trace_contexts.observe(pid, "python3.11")
        assert pid in python.registry.processes and len(python.frames) == 1 and len(probe.trace_contexts) == 1
        assert tracker.evict(safe_seq=1) == 0  # alive: it stays, and so does what is known of it
    finally:
        child.kill()
        child.wait()
    assert tracker.evict(safe_seq=0) == 0  # interval 0 is not built yet: it still needs the process
    assert pid in python.registry.processes
    assert tracker.evict(safe_seq=1) == 1
    assert pid not in python.registry.processes
    assert len(python.frames) == 0
    assert len(probe.trace_contexts) == 0


def test_a_failed_snapshot_sampled_in_a_pending_interval_is_forgotten_after_it():
    tracker = ProcessTracker(cache=SymbolCache(), max_processes=64)
    forgotten: list[int] = []
    tracker.on_evict(forgotten.append)
    child = subprocess.Popen(["true"])
    child.wait()
    assert tracker.observe(child.pid) is None  # gone before its maps were read
    tracker.seen(child.pid, 3)
    assert tracker.evict(safe_seq=2) == 1  # nothing to symbolize with: out of the table at once...
    assert forgotten == []  # ...but interval 3 may still look up what else is known of it
    tracker.evict(safe_seq=3)
    assert forgotten == []
    tracker.evict(safe_seq=4)
    assert forgotten == [child.pid]


def test_a_gone_process_the_unwind_tables_never_registered_leaves_them():
    """A pid is noted at its records with the snapshot they came under; a registration that never happens
    (the snapshot failed, or the tracker evicted the process before the worker came to it) held that
    snapshot until the pid was reused."""
    tracker = ProcessTracker(cache=SymbolCache(), max_processes=64)
    tables = UnwindTables({"unwind_rows": -1, "unwind_procs": -1, "unwind_stats": -1}, tracker, 1024)
    tables.want = lambda pid, refresh=False, force=False: None  # the worker never comes to it

    def alive(pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}")

    child = subprocess.Popen(["sleep", "60"])
    try:
        info = tracker.observe(child.pid)
        assert info is not None
        tables.note(child.pid, info)
        snapshot = weakref.ref(info)
        del info
        tracker.seen(child.pid, 0)
        tables.forget_dead(alive)
        assert snapshot() is not None  # alive: noted still
    finally:
        child.kill()
        child.wait()
    assert tracker.evict(safe_seq=1) == 1
    tables.forget_dead(alive)
    assert snapshot() is None


def test_a_pid_evicted_is_re_read_again_at_a_pc_outside_its_snapshot():
    """The stack walker re-reads a process's maps once when a sample's PC is outside its snapshot (dlopen,
    JIT). The pids re-read were kept for good: a set that grew under churn, and a process that reused a pid
    in it was never re-read."""
    tracker = ProcessTracker(cache=SymbolCache(), max_processes=64)
    stacks = UserStacks(tracker)
    child = subprocess.Popen(["sleep", "60"])
    try:
        pid = child.pid
        rec = RawRecord(kind=RecordKind.CPU, pid=pid, tid=pid, cpu=0, ktime_ns=0, value=1, aux=0,
                        thread_name="sleep", kernel_ips=(), user_ips=(), user_regs=(0x10, 0x7FFD0000, 0),
                        user_stack=bytes(64))
        assert tracker.observe(pid) is not None
        tracker.seen(pid, 0)
        stacks.complete(rec)
        stacks.complete(rec)
        assert tracker.stats.refreshes == 1  # once per process
        tracker.max_processes = 0  # evicted while alive, as the least recently sampled of a full table
        assert tracker.evict(safe_seq=1) == 1
        tracker.max_processes = 64
        assert tracker.observe(pid) is not None  # seen again: the table's new process under that pid
        stacks.complete(rec)
        assert tracker.stats.refreshes == 2
    finally:
        child.kill()
        child.wait()



def test_a_sample_taken_before_its_process_was_registered_did_not_lose_the_table():
    """A new process's first samples fall back (no table yet) and are often read after the worker has
    registered it: taken for a lost table (an exec), each re-read the process, a second snapshot per new
    process under churn. BPF's time of the sample tells the two apart."""
    import time

    tracker = ProcessTracker(cache=SymbolCache(), max_processes=64)
    tables = UnwindTables({"unwind_rows": -1, "unwind_procs": -1, "unwind_stats": -1}, tracker, 1024)
    before_ns = time.monotonic_ns()
    tables._registered[4242] = (time.monotonic(), frozenset())  # as register() leaves it
    after_ns = time.monotonic_ns() + 1
    assert not tables.lost_table(4242, before_ns), "sampled before the registration: nothing was lost"
    assert tables.lost_table(4242, after_ns), "after it: the exec hook deleted the table"
    assert not tables.lost_table(4242, after_ns), "once per registration"
    assert not tables.lost_table(4343, after_ns), "never registered"
