"""Lock-contention profile: bpf/lock.bpf.c (futex waits, pthread locks, Go semaphores, kernel locks).

Samples are waiter-side, like Go's block profile restricted to locks:
`contentions/count` and `delay/nanoseconds` (the time from the lock call to
acquisition, for calls that had to wait). A `lock` label names the source:
futex (raw waits outside the pthread calls, condition variables and Go's idle
threads included), pthread_mutex, pthread_rwlock, go (sync.Mutex, RWMutex,
WaitGroup: runtime.semacquire1), kernel.

Uprobes go into each target process (`perf_event_open` with its pid) when
the targets are known: at start, and again when a target execs (the BPF side
sends an exec notice). Without targets (--all) they go system-wide, on the
agent's own libc and on every Go binary seen running or exec'd.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import time
from dataclasses import dataclass

from agent import libbpf
from agent.bpf_compile import LoadedObjects, ProgType
from agent.probe import Probe, ProbeConfig, RawRecord, Window
from agent.process_tracker import ProcessTracker
from agent.profile_builder import add_records
from agent.records import RecordKind
from agent.stack_resolver import StackResolver
from agent.uprobes import function_offsets, vaddr_to_offset
from exporters.profile import Profile, ValueType
from symbolizer.elf import ElfFile
from symbolizer.errors import BpfprofError
from symbolizer.gopclntab import load_pclntab
from symbolizer.proc_maps import open_mapped_file, read_maps

log = logging.getLogger(__name__)

MAX_THREADS = 16384  # threads waiting at once, per wait kind
MAX_GOROUTINES = 65536  # goroutines inside runtime.semacquire1 at once
MAP_FULL = 0  # lock_counts index (LOCK_MAP_FULL)
SOURCE_SHIFT = 60
ADDR_MASK = (1 << SOURCE_SHIFT) - 1

PTHREAD_MUTEX_FUNCS = ("pthread_mutex_lock", "pthread_mutex_timedlock", "pthread_mutex_clocklock")
PTHREAD_RWLOCK_FUNCS = ("pthread_rwlock_rdlock", "pthread_rwlock_wrlock", "pthread_rwlock_timedrdlock",
                        "pthread_rwlock_timedwrlock", "pthread_rwlock_clockrdlock", "pthread_rwlock_clockwrlock")
GO_SEMACQUIRE = "runtime.semacquire1"
GO_PARK = "runtime.gopark"
_RET = 0xC3
_CALL_REL32 = 0xE8


class LockSource(enum.IntEnum):
    """Top nibble of a lock record's aux (bpf/lock.bpf.c LOCK_SRC_*)."""

    FUTEX = 0
    PTHREAD_MUTEX = 1
    PTHREAD_RWLOCK = 2
    GO = 3
    EXEC = 0xE  # not a wait: a target exec'd
    KERNEL = 0xF  # kernel addresses have the top nibble set


def decode_aux(aux: int) -> tuple[LockSource, int]:
    """(source, lock address) of a lock record's aux."""
    source = LockSource(aux >> SOURCE_SHIFT)
    return source, aux if source == LockSource.KERNEL else aux & ADDR_MASK


def lock_profile(start_time_ns: int, duration_ns: int) -> Profile:
    """An empty lock profile with runtime/pprof's mutex/block sample types."""
    return Profile(
        sample_types=[ValueType("contentions", "count"), ValueType("delay", "nanoseconds")],
        period_type=ValueType("contentions", "count"),
        period=1,
        start_time_ns=start_time_ns,
        duration_ns=duration_ns,
        default_sample_type="delay",
        kind="lock",
    )


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
    """
    with open(path, "rb") as f:
        data = f.read()
    tab = load_pclntab(data)
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
    with ElfFile(path) as elf:
        base = vaddr_to_offset(elf, entry)
    code = data[base:base + end - entry]
    returns, start = [], 0
    for stop, delta in zip(*_pcsp_table(tab, idx), strict=True):
        if delta == 0 and stop - start == 1 and code[start] == _RET:
            returns.append(base + start)
        start = stop
    resumes = [base + i + 5 for i in range(len(code) - 4)
               if code[i] == _CALL_REL32 and entry + i + 5 + struct.unpack_from("<i", code, i + 1)[0] == park]
    if not returns or not resumes:
        return None
    return GoSemaSites(base, tuple(resumes), tuple(returns))


def pthread_offsets(path: str) -> dict[str, int]:
    """File offsets of the pthread lock functions a libc defines."""
    return function_offsets(path, [*PTHREAD_MUTEX_FUNCS, *PTHREAD_RWLOCK_FUNCS])


def _libc_in_maps(pid: int | str) -> str | None:
    """A host path to the libc process `pid` maps, None if it maps none (yet).

    Through symbolizer.proc_maps: /proc/PID/map_files (the exact inode), else
    the path resolved inside /proc/PID/root without following symlinks out
    of the process's root.
    """
    try:
        entries = read_maps(pid)
    except OSError:
        return None
    for entry in entries:
        if entry.is_file and os.path.basename(entry.path).startswith("libc.so"):
            return open_mapped_file(pid, entry)
    return None


def kernel_lock_tracepoints() -> bool:
    """Whether this kernel has lock:contention_begin/end."""
    try:
        libbpf.tracepoint_id("lock", "contention_begin")
        libbpf.tracepoint_id("lock", "contention_end")
    except BpfprofError:
        return False
    return True


class LockProbe(Probe):
    name = "lock"
    source = "lock.bpf.c"
    kinds = (RecordKind.LOCK,)
    events_per_cpu_s = 2000
    COUNTERS = "lock_counts"
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
    UPROBES = ("lock_pthread_mutex_enter", "lock_pthread_rwlock_enter", "lock_pthread_return",
               "lock_go_sema_enter", "lock_go_sema_resume", "lock_go_sema_return")
    EXEC_RETRIES = 20  # ~0.2 s for the dynamic loader of an exec'd target to map libc

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__(config)
        self.records: list[RawRecord] = []
        self.kernel_locks = kernel_lock_tracepoints()
        self._objs: LoadedObjects | None = None
        self._per_pid = False
        self._attached: set[tuple[int, int, int]] = set()  # (pid or -1, st_dev, st_ino)
        self._offsets: dict[tuple[int, int], object] = {}  # (st_dev, st_ino) -> pthread offsets / Go sites
        self._uprobe_fds: list[int] = []
        self._counters_fd = -1
        self.map_full = 0
        self.attach_errors = 0

    def defines(self) -> dict[str, int]:
        return {"LOCK_KERNEL": int(self.kernel_locks), "LOCK_MAX_THREADS": MAX_THREADS,
                "LOCK_MAX_GOROUTINES": MAX_GOROUTINES}

    def programs(self) -> dict[str, ProgType]:
        progs = dict.fromkeys(self.FUTEX_TRACEPOINTS, ProgType.TRACEPOINT)
        if self.kernel_locks:
            progs.update(dict.fromkeys(self.KERNEL_TRACEPOINTS, ProgType.TRACEPOINT))
        progs.update(dict.fromkeys(self.UPROBES, ProgType.KPROBE))
        return progs

    def maps(self) -> list[str]:
        return [self.COUNTERS]

    def attach(self, objs: LoadedObjects) -> list[int]:
        fds: list[int] = []
        tps = dict(self.FUTEX_TRACEPOINTS)
        if self.kernel_locks:
            tps.update(self.KERNEL_TRACEPOINTS)
        for prog, (category, event) in tps.items():
            fds += libbpf.attach_tracepoint(objs.programs[prog], category, event)
        self._objs = objs
        pids = list(self.config.pids or libbpf.map_keys_u32(objs.maps["targets"]))
        self._per_pid = bool(pids)
        if pids:
            for pid in pids:
                self._attach_process(pid, retries=0)
        else:
            self._attach_system_wide()
        fds += self._uprobe_fds  # the probe set detaches these with the rest
        self._uprobe_fds = []  # later ones (exec'd targets): detached by profiles()
        return fds

    def on_start(self, objs: LoadedObjects) -> None:
        self._counters_fd = os.dup(objs.maps[self.COUNTERS])

    # -- uprobes -------------------------------------------------------------

    def _uprobe(self, prog: str, path: str, offset: int, pid: int) -> None:
        assert self._objs is not None
        self._uprobe_fds += libbpf.attach_uprobe(self._objs.programs[prog], path, offset, pid)

    def _attach_file(self, path: str, pid: int) -> None:
        """Probe the pthread or Go lock paths in the ELF file at `path` (for `pid`, -1: everyone)."""
        st = os.stat(path)
        key = (pid, st.st_dev, st.st_ino)
        if key in self._attached:
            return
        self._attached.add(key)
        file_key = (st.st_dev, st.st_ino)
        if file_key not in self._offsets:
            self._offsets[file_key] = go_sema_sites(path) or pthread_offsets(path)
        found = self._offsets[file_key]
        if isinstance(found, GoSemaSites):
            self._uprobe("lock_go_sema_enter", path, found.entry, pid)
            for off in found.resumes:
                self._uprobe("lock_go_sema_resume", path, off, pid)
            for off in found.returns:
                self._uprobe("lock_go_sema_return", path, off, pid)
            return
        for name, off in found.items():  # type: ignore[union-attr]
            enter = "lock_pthread_mutex_enter" if name in PTHREAD_MUTEX_FUNCS else "lock_pthread_rwlock_enter"
            self._uprobe(enter, path, off, pid)
            assert self._objs is not None
            self._uprobe_fds += libbpf.attach_uprobe(self._objs.programs["lock_pthread_return"], path, off, pid,
                                                     retprobe=True)

    def _attach_process(self, pid: int, retries: int) -> None:
        """Uprobes in process `pid`: its libc, and its executable when that is Go."""
        exe = f"/proc/{pid}/exe"
        try:
            libc = _libc_in_maps(pid)
            for _ in range(retries):
                if libc is not None:
                    break
                time.sleep(0.01)
                libc = _libc_in_maps(pid)
            target = pid if self._per_pid else -1
            if libc is not None:
                self._attach_file(libc, target)
            if os.path.exists(exe):
                self._attach_file(exe, target)
        except (OSError, BpfprofError) as e:  # the process went away, or a binary we cannot read
            self.attach_errors += 1
            log.info("lock uprobes not placed in pid %d: %s", pid, e)

    def _attach_system_wide(self) -> None:
        own = _libc_in_maps("self")
        if own is not None:
            self._attach_file(own, -1)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    if self._is_go(f"/proc/{entry}/exe"):
                        self._attach_file(f"/proc/{entry}/exe", -1)
                except (OSError, BpfprofError):
                    continue

    def _is_go(self, path: str) -> bool:
        st = os.stat(path)
        found = self._offsets.get((st.st_dev, st.st_ino))
        if found is None:
            found = go_sema_sites(path)
            if found is None:
                return False
            self._offsets[(st.st_dev, st.st_ino)] = found
        return isinstance(found, GoSemaSites)

    # -- records -------------------------------------------------------------

    def on_record(self, rec: RawRecord) -> None:
        if rec.aux >> SOURCE_SHIFT == LockSource.EXEC:  # the exec'd pid is in value (see lock.bpf.c)
            pid = rec.value
            if self._per_pid:
                self._attach_process(pid, self.EXEC_RETRIES)
            else:
                try:
                    if self._is_go(f"/proc/{pid}/exe"):
                        self._attach_file(f"/proc/{pid}/exe", -1)
                except (OSError, BpfprofError):
                    pass
            return
        self.records.append(rec)

    def record_count(self) -> int:
        return len(self.records)

    def _read_counters(self) -> None:
        if self._counters_fd < 0:
            return
        try:
            self.map_full = sum(libbpf.map_lookup_percpu_u64(self._counters_fd, MAP_FULL))
        finally:
            os.close(self._counters_fd)
            self._counters_fd = -1

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        libbpf.detach(self._uprobe_fds)  # placed after start: the probe set does not know them
        self._read_counters()
        profile = lock_profile(window.start_ns, max(0, window.end_ns - window.start_ns))
        add_records(profile, self.records, resolver, tracker, window, lambda r: [1, r.value],
                    with_kernel=self.config.with_kernel,
                    labels=lambda r: (("lock", decode_aux(r.aux)[0].name.lower()),))
        if self.map_full:
            profile.comments.append(f"dropped: {self.map_full} lock waits (wait map full)")
        if self.attach_errors:
            profile.comments.append(f"lock uprobes could not be placed in {self.attach_errors} processes")
        return [profile]
