"""Lock-contention profile: bpf/lock.bpf.c (futex waits, Go semaphores, kernel locks).

Samples are waiter-side, like Go's block profile restricted to locks:
`contentions/count` and `delay/nanoseconds` (the time a call spent asleep
waiting for a lock, for calls that had to sleep). A `lock` label names the
source: pthread_mutex and pthread_rwlock (futex sleeps inside those calls),
python (CPython's lock acquisition: threading.Lock and RLock, the import
lock; 3.13's PyMutex), futex (other futex sleeps that may be locks:
hand-rolled locks), go_runtime
(the Go runtime's internal locks), go (sync.Mutex, RWMutex:
runtime.semacquire1), kernel.

Contention only, decided by call site (the symbolized stack): a futex sleep
is left out (counted in not_lock_waits) when it is not a lock acquisition:
inside pthread_join, a condition variable, a semaphore or a barrier wait
(NOT_LOCK_C_FUNCS), or the Go runtime's own futex sleeps (runtime.futex:
idle Ms parking on notes, GC and scheduler internals) other than its internal
lock (runtime.lock2, kept as `go_runtime`; Go's mutex profile counts those too).
A Go semaphore wait is left out when sync.WaitGroup is the caller of
runtime.semacquire1 (GO_NOT_LOCK_SEMAS): sync.Mutex and RWMutex stay.
CPython's locks sleep in a semaphore wait too, under PyThread_acquire_lock_timed
(or 3.13's PyMutex); such a sleep is a lock's when the record carries the
waiter's Python frames (read in BPF) and its innermost Python caller is named
(its code object was read before the process exited) and not
threading's event waits built on a lock (Condition.wait, under which Event,
Semaphore, Barrier and queue wait, and Thread.join before 3.13:
PYTHON_EVENT_WAITS). Without Python frames (a version they are not read for)
it stays out, as any semaphore wait. GIL waits are condition-variable waits:
out too.

Nothing runs on an uncontended pthread lock call. Each futex sleep is sent
with the user registers and a stack copy, unwound here by CFI (Debian's libc
keeps no frame pointers, so a frame-pointer walk from inside it loses the
call site). A sleep whose stack holds a pthread lock function is that lock's
contention, shown with the function as the leaf (runtime/pprof shows
sync.(*Mutex).Lock the same way). glibc may sleep more than once in one call
(woken, it lost the lock to another thread): sleeps of one thread at the same
stack pointer and stack (but for the two innermost frames: rwlocks wait at
two places in one call) with no futex wake of its own in between (BPF flags
those) and less than MERGE_GAP_NS apart are one contention.

Go uprobes go into each target process when the targets are known, else
system-wide on every Go binary seen running or exec'd (agent/probes/uprobes.py
ProcessUprobes); the BPF side sends an exec notice so exec'd programs get them.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.bpfload import libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import RawRecord, RecordKind
from agent.probes.family import Accumulator, ProbeConfig, ProbeFamily, Window, read_percpu_total
from agent.probes.profile_builder import waits_profile
from agent.probes.sample_store import SampleStore
from agent.probes.uprobes import ProcessUprobes
from agent.processes.stack_resolver import StackResolver
from agent.processes.tracker import ProcessTracker
from exporters.profile import Location, Profile
from symbolizer.elf import ElfFile
from symbolizer.errors import BpfprofError
from symbolizer.frames import FrameKind
from symbolizer.gopclntab import load_pclntab

log = logging.getLogger(__name__)

MAX_THREADS = 16384  # threads waiting at once, per wait kind
MAX_GOROUTINES = 65536  # goroutines inside runtime.semacquire1 at once
MAP_FULL = 0  # lock_counts index (LOCK_MAP_FULL)
SOURCE_SHIFT = 60
AGAIN = 1 << 59  # bpf/lock.bpf.c LOCK_AGAIN: no futex wake by the thread since its previous sleep
ADDR_MASK = AGAIN - 1

PTHREAD_MUTEX_FUNCS = frozenset({"pthread_mutex_lock", "pthread_mutex_timedlock", "pthread_mutex_clocklock"})
PTHREAD_RWLOCK_FUNCS = frozenset({"pthread_rwlock_rdlock", "pthread_rwlock_wrlock", "pthread_rwlock_timedrdlock",
                                  "pthread_rwlock_timedwrlock", "pthread_rwlock_clockrdlock",
                                  "pthread_rwlock_clockwrlock"})
# Two sleeps of one thread at one stack pointer and caller stack, with no futex wake
# by it in between (so it released no contended lock) and this close, are one
# lock call: glibc's wait loop, woken and beaten to the lock, sleeps again.
# What it cannot tell apart: a lock released uncontended and taken again from
# the same frame within the gap; then the hold time counts as waiting.
MERGE_GAP_NS = 500_000
# Futex sleeps under these libc functions (leading underscores stripped: glibc's
# internal names, as .symtab or debug info gives them) wait for an event, not a lock.
NOT_LOCK_C_FUNCS = ("pthread_join", "pthread_clockjoin", "pthread_timedjoin", "pthread_cond_wait",
                    "pthread_cond_timedwait", "pthread_cond_clockwait", "pthread_barrier_wait", "sem_wait",
                    "sem_timedwait", "sem_clockwait", "new_sem_wait", "old_sem_wait")
# CPython's lock acquisition (exported: in .dynsym of stripped interpreters too), and 3.13's PyMutex.
PYTHON_LOCK_FUNCS = frozenset({"PyThread_acquire_lock_timed", "PyMutex_Lock", "_PyMutex_LockTimed"})
# Python functions of threading.py that wait for an event by acquiring a lock: co_qualname (3.11+), co_name.
PYTHON_EVENT_WAITS = frozenset({"Condition.wait", "Thread._wait_for_tstate_lock", "wait", "_wait_for_tstate_lock"})
PYTHON_EVENT_FILE = "threading.py"
GO_FUTEX = "runtime.futex"  # the Go runtime's futex syscall wrapper: every futex sleep of Go code
GO_RUNTIME_LOCK = "runtime.lock2"  # the runtime's internal mutex: a lock; notes, parking: not
# Callers of runtime.semacquire1 that wait for an event (sync.WaitGroup), not a lock.
GO_NOT_LOCK_SEMAS = frozenset({"sync.runtime_SemacquireWaitGroup", "sync.runtime_Semacquire"})
GO_SEMACQUIRE = "runtime.semacquire1"
GO_PARK = "runtime.gopark"
_RET = 0xC3
MAX_FUNCTION_BYTES = 1 << 20  # runtime.semacquire1 is ~1 KiB; a pclntab claiming more is not believed
_CALL_REL32 = 0xE8


class LockSource(enum.IntEnum):
    """Top nibble of a lock record's aux (bpf/lock.bpf.c LOCK_SRC_*)."""

    FUTEX = 0
    PTHREAD_MUTEX = 1  # not sent by BPF: futex sleeps inside a pthread lock call, told by their stack
    PTHREAD_RWLOCK = 2
    GO = 3
    GO_RUNTIME = 4  # not sent by BPF: a Go runtime futex sleep inside runtime.lock2
    PYTHON = 5  # not sent by BPF: a futex sleep inside CPython's lock acquisition (python_lock_at)
    EXEC = 0xE  # not a wait: a target exec'd
    KERNEL = 0xF  # kernel addresses have the top nibble set


def decode_aux(aux: int) -> tuple[LockSource, int]:
    """(source, lock address) of a lock record's aux."""
    source = LockSource(aux >> SOURCE_SHIFT)
    return source, aux if source == LockSource.KERNEL else aux & ADDR_MASK


@dataclass(frozen=True)
class GoSemaSites:
    """File offsets in a Go binary for the uprobes on runtime.semacquire1."""

    entry: int
    resumes: tuple[int, ...]  # the instruction after each call to runtime.gopark
    returns: tuple[int, ...]  # each RET instruction


def _pcsp_table(tab, idx: int) -> tuple[list[int], list[int]]:
    # The _func record's pcsp offset (after entryOff, nameOff, args, deferreturn) is not
    # exposed by GoPclntab; its pcvalue decoder is. Go 1.18+ layout.
    pcsp = struct.unpack_from(tab._bo + "I", tab._buf, tab._pcln + tab._funcoffs[idx] + 16)[0]
    return tab._decode(pcsp)


def go_sema_sites(path: str) -> GoSemaSites | None:
    """Where to probe runtime.semacquire1 in the Go binary at `path`; None if it is not Go or lacks it.

    RETs come from the pclntab's SP-delta table, not from guessing at bytes:
    Go's epilogue pops the frame (ADDQ, POPQ BP), so an SP delta of 0 over one
    byte that is 0xC3 is exactly a RET (the prologue's delta-0 range is longer).
    Calls to gopark are `E8 rel32` whose target is gopark's entry.
    The file is read through ElfFile (another user's file: bounded copies, not a whole read).
    """
    with ElfFile(path) as elf:
        tab = load_pclntab(elf)
        if tab is None:
            return None
        found: dict[str, tuple[int, int, int]] = {}
        for idx, (entry, end, name) in enumerate(tab.functions()):
            if name in (GO_SEMACQUIRE, GO_PARK):
                found[name] = (idx, entry, end)
        if len(found) < 2:
            return None
        idx, entry, end = found[GO_SEMACQUIRE]
        park = found[GO_PARK][1]
        base = elf.offset_for_vaddr(entry)
        if not 0 < end - entry <= MAX_FUNCTION_BYTES:
            return None
        elf.ensure(base, end - entry)
        code = bytes(elf.image[base:base + end - entry])
        pcsp = _pcsp_table(tab, idx)
    returns, start = [], 0
    for stop, delta in zip(*pcsp, strict=True):
        if delta == 0 and stop - start == 1 and code[start] == _RET:
            returns.append(base + start)
        start = stop
    resumes = [base + i + 5 for i in range(len(code) - 4)
               if code[i] == _CALL_REL32 and entry + i + 5 + struct.unpack_from("<i", code, i + 1)[0] == park]
    if not returns or not resumes:
        return None
    return GoSemaSites(base, tuple(resumes), tuple(returns))


def libc_name(function: str) -> str:
    """A libc function's public name from any of its aliases: .dynsym gives `pthread_mutex_lock`, libc's
    .symtab (libc6-dbg) `___pthread_mutex_lock`, `__GI___pthread_mutex_lock` or `sem_wait@@GLIBC_2.34`."""
    return function.split("@", 1)[0].removeprefix("__GI_").lstrip("_")


def pthread_lock_at(stack: tuple[Location, ...]) -> tuple[LockSource, int] | None:
    """The pthread lock function a futex sleep's stack is inside, and its index (leaf first)."""
    for i, loc in enumerate(stack):
        for frame in loc.frames:
            name = libc_name(frame.function)
            if name in PTHREAD_MUTEX_FUNCS:
                return LockSource.PTHREAD_MUTEX, i
            if name in PTHREAD_RWLOCK_FUNCS:
                return LockSource.PTHREAD_RWLOCK, i
    return None


def python_lock_at(stack: tuple[Location, ...]) -> int | None:
    """The index (leaf first) of CPython's lock acquisition a futex sleep's stack is inside, when its
    innermost Python caller (the stack has the record's Python frames merged) is not an event wait."""
    for i, loc in enumerate(stack):
        if any(f.function in PYTHON_LOCK_FUNCS for f in loc.frames):
            caller = next((f for outer in stack[i + 1:] for f in outer.frames if f.kind == FrameKind.CPYTHON),
                          None)
            if caller is None or not caller.file:  # no Python frames, or an unreadable code object (read
                return None  # after its process exited): nothing tells a lock from an event
            if caller.function in PYTHON_EVENT_WAITS and caller.file.endswith(PYTHON_EVENT_FILE):
                return None
            return i
    return None


def _names(stack: tuple[Location, ...]) -> list[str]:
    return [frame.function for loc in stack for frame in loc.frames]


def is_lock_wait(source: LockSource, stack: tuple[Location, ...]) -> bool:
    """Whether a wait is a lock acquisition, by its call site (the module docstring says which are not).

    `stack` is leaf first; a stack with no resolved frame stays (nothing says it is not a lock).
    """
    names = _names(stack)
    if source == LockSource.GO:
        callers = names[names.index(GO_SEMACQUIRE) + 1:] if GO_SEMACQUIRE in names else names
        return not (callers and callers[0] in GO_NOT_LOCK_SEMAS)
    if source != LockSource.FUTEX:
        return True
    if is_go_runtime_futex(names):
        return GO_RUNTIME_LOCK in names
    return not any(libc_name(name).startswith(NOT_LOCK_C_FUNCS) for name in names)


def is_go_runtime_futex(names: list[str]) -> bool:
    """Whether a futex sleep is the Go runtime's own (its runtime.futex wrapper is the leaf)."""
    return bool(names) and names[0].removesuffix(".abi0") == GO_FUTEX


@dataclass
class _Sleep:
    """A futex sleep not yet sent to the records: the next one may continue it."""

    rec: RawRecord
    rsp: int  # user stack pointer at the syscall: one frame sleeping again has the same
    end_ns: int


def kernel_lock_tracepoints() -> bool:
    """Whether this kernel has lock:contention_begin/end."""
    try:
        libbpf.tracepoint_id("lock", "contention_begin")
        libbpf.tracepoint_id("lock", "contention_end")
    except BpfprofError:
        return False
    return True


class LockAccumulator(Accumulator):
    family: LockProbe

    def __init__(self, family: LockProbe) -> None:
        super().__init__(family)
        self.samples = SampleStore()
        self._sleeps: dict[int, _Sleep] = {}  # tid -> its last futex sleep, until it cannot continue
        self.merged_sleeps = 0
        self.not_lock_waits = 0  # distinct stacks (entries) left out: not lock acquisitions (is_lock_wait)
        self._left_out: set[int] = set()  # id() of the entries' records left out, for the Python comments
        self._trimmed: dict[tuple[int, int], tuple[Location, Location]] = {}  # (id, frame) -> (original, trimmed)

    def on_record(self, rec: RawRecord) -> None:
        if self.family.python is not None:
            self.family.python.observe(rec)  # before complete(): see PythonStacks.observe
        source = rec.aux >> SOURCE_SHIFT
        if source != LockSource.FUTEX:
            self.samples.add(rec)
            return
        rsp = rec.user_regs[1] if rec.user_regs is not None else 0
        rec = self.family.complete(rec)
        if rec.kernel_ips:  # BPF sends none with a stack copy; a frame-pointer-only record has the syscall path
            rec = replace(rec, kernel_ips=())
        prev = self._sleeps.get(rec.tid)
        # The same frame: the same stack pointer at the syscall, or, for a stack walked in BPF (which sends
        # no registers), a stack as deep as the previous one with the same return addresses (checked below).
        same_frame = prev is not None and (prev.rsp == rsp if rsp else
                                           not prev.rsp and len(prev.rec.user_ips) == len(rec.user_ips))
        if (prev is not None and rec.aux & AGAIN and same_frame and prev.rec.pid == rec.pid
                and 0 <= rec.ktime_ns - rec.value - prev.end_ns < MERGE_GAP_NS
                and tuple(prev.rec.user_ips[2:]) == tuple(rec.user_ips[2:])):  # one call may wait at two places
            # the same call sleeping again: one contention, waiting from the first sleep to this end
            self.merged_sleeps += 1
            merged = replace(prev.rec, value=prev.rec.value + (rec.ktime_ns - prev.end_ns), ktime_ns=rec.ktime_ns)
            self._sleeps[rec.tid] = _Sleep(merged, rsp, rec.ktime_ns)
            return
        if prev is not None:
            self.samples.add(prev.rec)
        self._sleeps[rec.tid] = _Sleep(rec, rsp, rec.ktime_ns)

    def record_count(self) -> int:
        return len(self.samples) + len(self._sleeps)

    def carry_into(self, nxt: Accumulator, alive: Callable[[int], bool]) -> None:
        # A sleep still open at the cut ends in this interval: the next one starts afresh.
        for sleep in self._sleeps.values():
            self.samples.add(sleep.rec)
        self._sleeps.clear()

    def _from_lock_function(self, loc: Location) -> Location:
        """`loc` without the frames debug info shows inlined into the lock function (lll_mutex_lock_optimized):
        the lock function is the leaf. Kept alive here: add_records names stacks by their locations' ids."""
        names = [libc_name(f.function) for f in loc.frames]
        j = next((k for k, (n, f) in enumerate(zip(names, loc.frames, strict=True))
                  if n in PTHREAD_MUTEX_FUNCS or n in PTHREAD_RWLOCK_FUNCS or f.function in PYTHON_LOCK_FUNCS), 0)
        if j == 0:
            return loc
        key = (id(loc), j)
        trimmed = self._trimmed.get(key)
        if trimmed is None:
            trimmed = self._trimmed[key] = (loc, replace(loc, frames=loc.frames[j:]))
        return trimmed[1]

    def _reshape(self, rec: RawRecord, stack: tuple[Location, ...]) -> tuple[tuple[Location, ...],
                                                                              tuple[tuple[str, str], ...]] | None:
        source, _ = decode_aux(rec.aux)
        if self.family.python is not None:  # first: which Python call waited tells a lock from an event
            stack = self.family.python.merge(rec, stack)
        if source == LockSource.FUTEX:
            found = pthread_lock_at(stack)
            if found is None and (at := python_lock_at(stack)) is not None:
                found = LockSource.PYTHON, at
            if found is not None:  # libc's wait loop under the lock function is not the user's business
                source, i = found
                stack = (self._from_lock_function(stack[i]),) + stack[i + 1:]
            elif not is_lock_wait(source, stack):
                self.not_lock_waits += 1
                self._left_out.add(id(rec))
                return None
            elif is_go_runtime_futex(_names(stack)):
                source = LockSource.GO_RUNTIME
        elif not is_lock_wait(source, stack):
            self.not_lock_waits += 1
            self._left_out.add(id(rec))
            return None
        return stack, (("lock", source.name.lower()),)

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        profile = waits_profile("lock", self.samples, resolver, tracker, window, self.family.config.with_kernel,
                                reshape=self._reshape)
        if self._left_out:  # what the profile is not: waits for events, which users may look for here
            left = [values for rec, _, values in self.samples.entries() if id(rec) in self._left_out]
            profile.comments.append(
                f"lock: {sum(map(len, left))} futex waits ({sum(map(sum, left)) / 1e6:.1f} ms) left out as no lock "
                "acquisition (joins, condition variables, semaphores, WaitGroups, idle threads)")
        if self.family.python is not None:  # of the waits in the profile, not of those left out
            kept = (e for e in self.samples.entries() if id(e[0]) not in self._left_out)
            profile.comments.extend(self.family.python.comments(kept))
        return [profile]


class LockProbe(ProbeFamily):
    """Futex, pthread and kernel lock waits; Go semaphores through uprobes in each Go program."""

    name = "lock"
    source = "lock.bpf.c"
    kinds = (RecordKind.LOCK,)
    accumulator = LockAccumulator
    ustack_switch = "LOCK_USTACK"
    bpf_unwind_switch = "LOCK_BPF_UNWIND"
    bpf_unwind_prog = ProgType.TRACEPOINT
    bpf_unwind_family = 2  # UNWIND_FAMILY_LOCK
    reads_python = True
    events_per_cpu_s = 2000
    COUNTERS = "lock_counts"
    LOSSES = {"lock_wait_map_full": "lock waits (wait map full)"}
    FUTEX_TRACEPOINTS = {
        "tracepoint__syscalls__sys_enter_futex": ("syscalls", "sys_enter_futex"),
        "tracepoint__syscalls__sys_exit_futex": ("syscalls", "sys_exit_futex"),
        "tracepoint__syscalls__sys_enter_futex_waitv": ("syscalls", "sys_enter_futex_waitv"),
        "tracepoint__syscalls__sys_exit_futex_waitv": ("syscalls", "sys_exit_futex_waitv"),
        "lock_on_exec": ("sched", "sched_process_exec"),
    }
    KERNEL_TRACEPOINTS = {
        "tracepoint__lock__contention_begin": ("lock", "contention_begin"),
        "tracepoint__lock__contention_end": ("lock", "contention_end"),
    }
    UPROBES = ("lock_go_sema_enter", "lock_go_sema_resume", "lock_go_sema_return")

    def __init__(self, config: ProbeConfig, tracker: ProcessTracker) -> None:
        super().__init__(config, tracker)
        self.kernel_locks = kernel_lock_tracepoints()
        self.go_uprobes: ProcessUprobes[GoSemaSites] = ProcessUprobes("lock", go_sema_sites, self._sema_uprobes)
        self.needs_drain_clock = True  # Go semaphore waits are walked with frame pointers: no wake-up for new processes

    @staticmethod
    def _sema_uprobes(sites: GoSemaSites) -> list[tuple[str, int]]:
        return ([("lock_go_sema_enter", sites.entry)] + [("lock_go_sema_resume", off) for off in sites.resumes]
                + [("lock_go_sema_return", off) for off in sites.returns])

    def defines(self) -> dict[str, int]:
        return {"LOCK_KERNEL": int(self.kernel_locks), "LOCK_MAX_THREADS": MAX_THREADS,
                "LOCK_MAX_GOROUTINES": MAX_GOROUTINES, **super().defines()}

    def programs(self) -> dict[str, ProgType]:
        progs = dict.fromkeys(self.FUTEX_TRACEPOINTS, ProgType.TRACEPOINT)
        if self.kernel_locks:
            progs.update(dict.fromkeys(self.KERNEL_TRACEPOINTS, ProgType.TRACEPOINT))
        progs.update(dict.fromkeys(self.UPROBES, ProgType.KPROBE))
        return progs

    def maps(self) -> list[str]:
        return [self.COUNTERS]

    def attach(self, objs: LoadedObjects) -> list[int]:
        super().attach(objs)
        fds: list[int] = []
        tps = dict(self.FUTEX_TRACEPOINTS)
        if self.kernel_locks:
            tps.update(self.KERNEL_TRACEPOINTS)
        for prog, (category, event) in tps.items():
            fds += libbpf.attach_tracepoint(objs.programs[prog], category, event)
        self.go_uprobes.start(objs, self.target_pids())
        return fds

    def is_notice(self, rec: RawRecord) -> bool:
        return rec.aux >> SOURCE_SHIFT == LockSource.EXEC

    def route(self, rec: RawRecord, acc: Accumulator) -> None:
        if self.is_notice(rec):  # a target exec'd (its pid in value, see lock.bpf.c): a Go program gets uprobes
            # No tracker refresh here: the sample path sees the exec itself (a new thread name, a lost
            # BPF table) and has the unwind tables rebuilt; a refresh here first hid it from them, and
            # every family's stacks of the new image stayed unwound against the old one.
            self.go_uprobes.add(rec.value)
        else:
            acc.on_record(rec)

    def detach(self) -> None:
        self.go_uprobes.detach()

    def notes(self) -> list[str]:
        return self.go_uprobes.notes()

    def loss_totals(self) -> dict[str, int]:
        return {"lock_wait_map_full": read_percpu_total(self.objs, self.COUNTERS, MAP_FULL)}
