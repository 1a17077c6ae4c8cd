"""Lock probe pieces that need no kernel: aux decoding, profile shape, program set, sleep merging, labels."""

from __future__ import annotations

from dataclasses import replace

from agent.bpfload.records import RawRecord, RecordKind
from agent.probes import lock as lock_probe
from agent.probes.family import ProbeConfig
from agent.probes.lock import LockProbe, LockSource, decode_aux
from agent.processes.stack_resolver import UnwindMode
from agent.processes.tracker import ProcessTracker
from exporters.pprof import decode_pprof, encode_pprof
from exporters.profile import Location, SampleKey
from exporters.profile_types import empty_profile
from symbolizer.frames import Frame, FrameKind


def test_aux_carries_source_and_address():
    assert decode_aux(0x7F00_1234_5678) == (LockSource.FUTEX, 0x7F00_1234_5678)
    assert decode_aux((1 << 60) | 0x5555_0000_1000) == (LockSource.PTHREAD_MUTEX, 0x5555_0000_1000)
    assert decode_aux((3 << 60) | 0xC000_0100_00) == (LockSource.GO, 0xC000_0100_00)
    # kernel addresses have the top nibble set: kept whole
    assert decode_aux(0xFFFF_8881_0433_5A00) == (LockSource.KERNEL, 0xFFFF_8881_0433_5A00)
    assert decode_aux(0xE << 60)[0] == LockSource.EXEC


def test_profile_types_follow_runtime_pprof():
    p = empty_profile("lock", 1, 2)
    p.add(SampleKey(stack=(), pid=1, tid=1, thread_name="t"), [1, 2500])
    msg = decode_pprof(encode_pprof(p))
    st = msg.string_table
    assert [(st[t.type], st[t.unit]) for t in msg.sample_type] == [("contentions", "count"), ("delay", "nanoseconds")]
    assert (st[msg.period_type.type], st[msg.period_type.unit]) == ("contentions", "count")
    assert st[msg.default_sample_type] == "delay"


def test_kernel_lock_programs_only_when_the_tracepoints_exist(monkeypatch):
    monkeypatch.setattr(lock_probe, "kernel_lock_tracepoints", lambda: False)
    probe = LockProbe(ProbeConfig(), ProcessTracker())
    assert probe.defines()["LOCK_KERNEL"] == 0
    assert not set(LockProbe.KERNEL_TRACEPOINTS) & set(probe.programs())
    monkeypatch.setattr(lock_probe, "kernel_lock_tracepoints", lambda: True)
    probe = LockProbe(ProbeConfig(), ProcessTracker())
    assert probe.defines()["LOCK_KERNEL"] == 1
    assert set(LockProbe.KERNEL_TRACEPOINTS) <= set(probe.programs())


def _sleep(tid: int, end_ns: int, waited_ns: int, rsp: int, ips=(0x401000, 0x402000), again=True) -> RawRecord:
    """A futex sleep record as BPF sends it (value: ns asleep, ktime: its end), with its registers."""
    aux = 0x7F00_0000_1000 | (lock_probe.AGAIN if again else 0)
    return RawRecord(kind=RecordKind.LOCK, pid=7, tid=tid, cpu=0, ktime_ns=end_ns, value=waited_ns, aux=aux,
                     thread_name="t", kernel_ips=(0xFFFF_FFFF_8100_0000,), user_ips=ips, user_regs=(ips[0], rsp, 0))


def test_sleeps_of_one_call_are_one_contention():
    """glibc's wait loop sleeps again when woken and beaten to the lock: same thread, frame and stack, a short gap."""
    probe = LockProbe(ProbeConfig(unwind=UnwindMode.FP), ProcessTracker()).new_accumulator()
    probe.on_record(_sleep(1, end_ns=1_000_000, waited_ns=400_000, rsp=0x7FF0))
    probe.on_record(_sleep(1, end_ns=1_500_000, waited_ns=480_000, rsp=0x7FF0))  # 20 us after the first woke
    probe.on_record(_sleep(2, end_ns=1_500_000, waited_ns=480_000, rsp=0x7FF0))  # another thread
    probe.on_record(_sleep(1, end_ns=2_000_000, waited_ns=100_000, rsp=0x7FF0, again=False))  # it woke someone
    probe.on_record(_sleep(1, end_ns=2_900_000, waited_ns=100_000, rsp=0x7FF0))  # 0.8 ms after: a later call
    probe.on_record(_sleep(1, end_ns=19_000_000, waited_ns=100_000, rsp=0x7FF0))
    probe.on_record(_sleep(1, end_ns=19_100_000, waited_ns=50_000, rsp=0x7FF0, ips=(0x401000, 0x403000, 0x404000)))
    probe.on_record(_sleep(1, end_ns=19_160_000, waited_ns=50_000, rsp=0x7FF0,  # the same call, another wait place
                           ips=(0x401000, 0x403100, 0x404000)))
    probe.on_record(_sleep(1, end_ns=19_200_000, waited_ns=50_000, rsp=0x7FE0,  # another frame
                           ips=(0x401000, 0x403000, 0x404000)))
    probe.on_record(_sleep(1, end_ns=19_300_000, waited_ns=50_000, rsp=0x7FE0,  # another caller
                           ips=(0x401000, 0x403000, 0x405000)))
    probe.carry_into(probe.family.new_accumulator(), alive=lambda pid: True)  # the cut ends open sleeps
    waits = sorted((r.tid, t, v) for r, times, values in probe.samples.entries() for t, v in zip(times, values, strict=True))
    assert waits == [(1, 1_500_000, 900_000), (1, 2_000_000, 100_000), (1, 2_900_000, 100_000), (1, 19_000_000, 100_000),
                     (1, 19_160_000, 110_000), (1, 19_200_000, 50_000), (1, 19_300_000, 50_000),
                     (2, 1_500_000, 480_000)]
    assert probe.merged_sleeps == 2
    assert all(r.kernel_ips == () for r in probe.samples.records)  # the futex syscall path is the same in every sleep


def _loc(*names: str) -> Location:
    return Location(address=0x1000, mapping=None, frames=tuple(Frame(function=n, kind=FrameKind.NATIVE) for n in names))


def test_pthread_sleeps_are_labelled_and_start_at_the_lock_function():
    futex = 0x7F00_0000_1000
    acc = LockProbe(ProbeConfig(), ProcessTracker()).new_accumulator()
    rec = _sleep(1, 1, 1, 1)
    stack = (_loc(), _loc("__futex_abstimed_wait_common"), _loc("__pthread_rwlock_wrlock"), _loc("writer"))
    assert acc._reshape(rec, stack) == (stack[2:], (("lock", "pthread_rwlock"),))
    stack = (_loc(), _loc("pthread_mutex_lock"), _loc("site"))
    assert acc._reshape(rec, stack) == (stack[1:], (("lock", "pthread_mutex"),))
    stack = (_loc(), _loc("__GI___pthread_mutex_lock"), _loc("site"))  # libc6-dbg's name of it
    assert acc._reshape(rec, stack) == (stack[1:], (("lock", "pthread_mutex"),))
    stack = (_loc(), _loc("spin_lock_slow"), _loc("site"))  # a hand-rolled futex lock
    assert acc._reshape(rec, stack) == (stack, (("lock", "futex"),))
    go = replace(rec, aux=(3 << 60) | futex)
    stack = (_loc("runtime.semacquire1"), _loc("internal/sync.runtime_SemacquireMutex"), _loc("main.f"))
    assert acc._reshape(go, stack) == (stack, (("lock", "go"),))
    assert acc.not_lock_waits == 0


def test_waits_that_are_no_lock_acquisition_are_left_out():
    """By call site: joins, condition variables, semaphores, Go's idle Ms and WaitGroups wait for events."""
    acc = LockProbe(ProbeConfig(), ProcessTracker()).new_accumulator()
    rec = _sleep(1, 1, 1, 1)
    for names in (("__futex_abstimed_wait_common", "__pthread_clockjoin_ex", "main"),
                  ("pthread_cond_wait", "waiter"), ("___pthread_cond_timedwait64", "waiter"),
                  ("__new_sem_wait_slow64", "sem_wait", "worker"),
                  ("runtime.futex.abi0", "runtime.notesleep", "runtime.mPark", "runtime.stopm"),
                  ("runtime.futex", "runtime.futexsleep", "runtime.notesleep", "runtime.stopm")):
        assert acc._reshape(rec, tuple(_loc(n) for n in names)) is None, names
    go = replace(rec, aux=(3 << 60) | 0x1000)
    stack = (_loc("runtime.semacquire1"), _loc("sync.runtime_SemacquireWaitGroup"), _loc("main.main"))
    assert acc._reshape(go, stack) is None
    assert acc.not_lock_waits == 7
    # the Go runtime's internal lock is one
    stack = tuple(_loc(n) for n in ("runtime.futex", "runtime.futexsleep", "runtime.semasleep", "runtime.lock2"))
    assert acc._reshape(rec, stack) == (stack, (("lock", "go_runtime"),))


def _py(name: str, file: str = "/app/work.py") -> Location:
    """A merged CPython frame (as PythonStacks.merge puts it in place of the interpreter's); file "": a code
    object that could not be read."""
    return Location(address=0x7F00_0000_2000, mapping=None,
                    frames=(Frame(function=name, kind=FrameKind.CPYTHON, file=file, system_name=name),))


def test_python_lock_waits_are_told_by_their_python_caller():
    """A semaphore sleep under CPython's lock acquisition is a lock's when the Python frames name a caller
    other than threading's event waits; the lock function is the leaf, the Python caller above it."""
    acc = LockProbe(ProbeConfig(), ProcessTracker()).new_accumulator()
    rec = _sleep(1, 1, 1, 1)
    native = (_loc("__futex_abstimed_wait_common"), _loc("__new_sem_wait_slow64.constprop.0"))
    acquire = (_loc("PyThread_acquire_lock_timed"), _loc("acquire_timed"), _loc("lock_PyThread_acquire_lock"))
    stack = native + acquire + (_py("contend"), _py("worker"), _py("Thread._bootstrap", "/usr/lib/threading.py"))
    assert acc._reshape(rec, stack) == (stack[2:], (("lock", "python"),))
    mutex = (_loc("PyMutex_Lock"), _py("Registry.add"))  # 3.13's PyMutex, under a C method
    assert acc._reshape(rec, native + mutex) == (mutex, (("lock", "python"),))
    assert acc.not_lock_waits == 0
    for caller in (_py("Condition.wait", "/usr/lib/python3.11/threading.py"),  # Event, Semaphore, queue under it
                   _py("Thread._wait_for_tstate_lock", "/usr/lib/python3.11/threading.py"),  # join before 3.13
                   _py("wait", "/root/.pyenv/versions/3.9.18/lib/python3.9/threading.py"),  # co_name before 3.11
                   _py("<code 0x7f0012345678>", file="")):  # unreadable: nothing says it is a lock
        assert acc._reshape(rec, native + acquire + (caller, _py("main"))) is None, caller
    assert acc._reshape(rec, native + acquire) is None  # no Python frames: a semaphore wait, as before
    assert acc.not_lock_waits == 5
    # a function named `wait` of the application's own is not threading's
    stack = native + acquire + (_py("wait", "/app/pool.py"),)
    assert acc._reshape(rec, stack) == (stack[2:], (("lock", "python"),))
