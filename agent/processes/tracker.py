"""Processes as they were at first sight: maps, files, names.

A process may exit (and its binary be deleted) long before its samples are
symbolized, so at the first sample of a pid the tracker reads its maps and
opens every executable file through /proc/PID/map_files (bound to the exact
inode, deleted and memfd files included) or /proc/PID/root. The ElfFile keeps
the file open, so it stays readable after the process is gone.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.processes.containers import ContainerInfo, read_container_info, read_environ_var
from agent.processes.memory import read_vdso
from symbolizer import proc_maps
from symbolizer.elf import ElfFile
from symbolizer.errors import BpfprofError
from symbolizer.file_symbols import DEFAULT_CACHE, FileSymbols, SymbolCache
from symbolizer.frames import BuildIdKind, Mapping
from symbolizer.process_symbols import MappedFile, ProcessSymbols

log = logging.getLogger(__name__)


@dataclass
class ProcessInfo:
    """What the tracker knows of one process."""

    pid: int
    name: str  # comm of the process (its main thread)
    exe: str  # path of the executable inside the process's mount namespace
    symbols: ProcessSymbols
    container: ContainerInfo = field(default_factory=ContainerInfo)
    service_name: str = ""  # OTEL_SERVICE_NAME from its environment, "" if unset
    exited: bool = False
    errors: list[str] = field(default_factory=list)


@dataclass
class TrackerStats:
    processes: int = 0
    snapshot_failures: int = 0  # pid gone before its maps could be read
    unreadable_files: int = 0
    refreshes: int = 0
    refresh_misses: int = 0  # refreshes that kept the snapshot held: the process was gone or exiting
    evictions: int = 0  # processes dropped by evict()
    refused: int = 0  # first sights turned away because the table was full
    leaf_refreshes: int = 0  # re-reads for a record whose leaf was outside the snapshot (see note_record)


# (dev, inode) -> symbols entries kept; past it the table is cleared (binaries
# that churn, such as a build, would grow it without bound).
INODE_CACHE_MAX = 4096
# A process is re-read for a record's leaf outside its snapshot at most this often (note_record): code
# that is never in a snapshot (freed JIT code) must not have every record re-read it.
LEAF_REFRESH_S = 0.25
USER_SPACE_END = 1 << 47  # x86_64 user addresses lie below; [vsyscall] is above and in no snapshot
_MISSING: Any = object()  # a dict.get default that tells "absent" from a held None


def process_start_ticks(pid: int, proc_root: str = "/proc") -> int | None:
    """Field 22 of /proc/PID/stat: tells a reused pid from the process we snapshotted."""
    try:
        with open(f"{proc_root}/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class ProcessTracker:
    """Snapshots processes at first sight and keeps them for symbolization."""

    def __init__(self, cache: SymbolCache = DEFAULT_CACHE, proc_root: str = "/proc",
                 max_processes: int | None = None) -> None:
        self.cache = cache
        self.proc_root = proc_root
        self.max_processes = max_processes  # None: unbounded (a one-shot capture)
        self._procs: dict[int, ProcessInfo | None] = {}
        self._last_seen: dict[int, int] = {}  # pid -> interval sequence of its last record
        self._start: dict[int, int | None] = {}  # pid -> start ticks at first sight
        # (dev, inode) -> symbols: libc is mapped by every process, open it once
        self._by_inode: dict[tuple[str, int], FileSymbols | None] = {}
        self._vdso: FileSymbols | None = None
        # (pid, tid) pairs whose name was compared with the snapshot's (see note_record), bounded
        self._named_tids: set[tuple[int, int]] = set()
        # Told of every pid evicted once no interval may still need what they hold of it (on_evict)
        self._listeners: list[Callable[[], Callable[[int], None] | None]] = []
        self._forget_later: dict[int, int] = {}  # evicted pid -> the interval that may still need it
        self._leaf_refreshed: dict[int, float] = {}  # pid -> when a record's leaf last had it re-read
        self.stats = TrackerStats()

    def on_evict(self, forget: Callable[[int], None]) -> None:
        """Call `forget(pid)` for each pid evicted, once no pending interval needs it: per-process state
        kept elsewhere (Python code objects, registries) goes with the process. A bound method is held
        weakly (the families of a config replaced by a reload go with it)."""
        if inspect.ismethod(forget):
            ref = weakref.WeakMethod(forget)
            self._listeners.append(ref)
        else:
            self._listeners.append(lambda: forget)

    def _forget(self, pid: int) -> None:
        for ref in list(self._listeners):
            forget = ref()
            if forget is None:
                self._listeners.remove(ref)
            else:
                forget(pid)

    def __contains__(self, pid: int) -> bool:
        return pid in self._procs

    def get(self, pid: int) -> ProcessInfo | None:
        return self._procs.get(pid)

    def lookup(self) -> Callable[[int], ProcessInfo | None]:
        """get() without a method call of its own, for the per-sample loop (CapturePipeline.deliver_bufs)."""
        return self._procs.get

    def __len__(self) -> int:
        return len(self._procs)

    def observe(self, pid: int) -> ProcessInfo | None:
        """Snapshot `pid` unless already known; None if it exited before we looked or the table is full."""
        known = self._procs.get(pid, _MISSING)
        if known is not _MISSING:
            return known
        if self.max_processes is not None and len(self._procs) >= self.max_processes:
            self.stats.refused += 1
            return None
        self._start[pid] = process_start_ticks(pid, self.proc_root)
        info = self._snapshot(pid)
        self._procs[pid] = info
        if info is None:
            self.stats.snapshot_failures += 1
        else:
            self.stats.processes += 1
        return info

    def adopt(self, info: ProcessInfo) -> None:
        """Hold a snapshot taken elsewhere as its pid's: a recorded capture replayed (tests/replay),
        whose processes are long gone."""
        if self._procs.get(info.pid) is None:
            self.stats.processes += 1
        self._procs[info.pid] = info
        self._start.setdefault(info.pid, None)

    def note_record(self, pid: int, tid: int, thread_name: str, leaf: int = 0) -> ProcessInfo | None:
        """Call for every record: snapshots new processes, re-snapshots after an exec.

        An exec keeps the pid but replaces every mapping; the main thread's
        name (the kernel's comm, which exec sets to the new program's name)
        no longer matching the snapshot's is the cheap sign. The new image
        must be read while the process is alive: after it exits, a refresh
        at symbolization time would find nothing.

        A snapshot taken while the process was still being set up has the
        new name but not all its code: mid-exec, or before the dynamic loader
        mapped libc. `leaf`, the record's first user address (0: none), is
        code that ran: one outside the snapshot has it re-read (at most every
        LEAF_REFRESH_S per process), or every later frame there stays
        unresolved and the BPF walker's table (built from the snapshot)
        stops at it.
        """
        info = self._procs.get(pid) if pid in self._procs else self.observe(pid)
        if info is not None and 0 < leaf < USER_SPACE_END and info.symbols.mapping_at(leaf) is None:
            now = time.monotonic()
            if now - self._leaf_refreshed.get(pid, -LEAF_REFRESH_S) >= LEAF_REFRESH_S:
                self._leaf_refreshed[pid] = now
                self.stats.leaf_refreshes += 1
                info = self.refresh(pid)
        if info is not None and tid == pid and thread_name and thread_name != info.name:
            info = self.refresh(pid)
        elif info is not None and tid != pid and thread_name and (pid, tid) not in self._named_tids:
            # A thread's first record: threads start with their process's name, so a new thread named
            # otherwise was born after an exec the main thread has not shown yet (records of CPUs are
            # read one CPU after another). A thread that renamed itself costs one needless refresh.
            if len(self._named_tids) > 65536:
                self._named_tids.clear()
            self._named_tids.add((pid, tid))
            if thread_name != info.name:
                info = self.refresh(pid)
        return info

    def refresh(self, pid: int) -> ProcessInfo | None:
        """Re-read the maps of a live process (it mapped new code: dlopen, JIT; it exec'd).

        A process that is exiting has already dropped its address space: its maps read empty
        (and exe unreadable) while its last records still arrive (a Go program's idle Ms, asleep
        on futexes the whole run, wake only at the exit, and the exit deletes its BPF unwind
        table, which asks for a refresh). Such a read never replaces the snapshot held: the
        records ran in that image, and an empty one would leave their addresses unmapped.
        """
        info = self._snapshot(pid, allow_empty=self._procs.get(pid) is None)
        if info is not None:
            self.stats.refreshes += 1
            if pid in self._procs:  # evicted meanwhile (the unwind worker refreshes too): not brought back
                self._procs[pid] = info
        else:
            self.stats.refresh_misses += 1
        return self._procs.get(pid)

    def _snapshot(self, pid: int, allow_empty: bool = True) -> ProcessInfo | None:
        """None if `pid` is gone, or (unless `allow_empty`) has no mappings left: it is exiting."""
        base = f"{self.proc_root}/{pid}"
        try:
            entries = proc_maps.read_maps(pid, self.proc_root)
            if not entries and not allow_empty:
                return None
            with open(f"{base}/comm") as f:
                name = f.read().strip()
        except OSError as e:
            if e.errno == errno.EFBIG:  # a process that made more mappings than we read: counted as a failure
                log.warning("pid %d: not snapshotted, its stacks stay unresolved: %s", pid, e.strerror)
            return None
        try:
            exe = os.readlink(f"{base}/exe")
        except OSError:
            exe = ""
        mapped = []
        for e in entries:
            if not e.is_executable or e.is_vsyscall:
                continue
            fs = self._symbols_for(pid, e)
            ident = fs.id if fs is not None else None
            mapping = Mapping(
                start=e.start, end=e.end, file_offset=e.offset, path=e.path,
                build_id=ident.build_id if ident else "",
                build_id_kind=ident.kind if ident else BuildIdKind.NONE)
            mapped.append(MappedFile(mapping, fs))
        return ProcessInfo(pid=pid, name=name, exe=exe.removesuffix(" (deleted)"), symbols=ProcessSymbols(mapped),
                           container=read_container_info(pid, self.proc_root),
                           service_name=read_environ_var(pid, "OTEL_SERVICE_NAME", self.proc_root))

    def _symbols_for(self, pid: int, entry: proc_maps.MapsEntry) -> FileSymbols | None:
        if entry.is_vdso:
            return self._vdso_symbols(pid)
        if not entry.is_file:
            return None
        key = (entry.dev, entry.inode)
        known = self._by_inode.get(key, _MISSING)  # one lookup: evict() may clear the table meanwhile
        if known is not _MISSING:
            return known
        fs = None
        try:
            path = proc_maps.open_mapped_file(pid, entry, self.proc_root)
            if path is None:
                raise OSError(f"{entry.path} is not readable through /proc/{pid}")
            elf = ElfFile(path)
            fs = self.cache.get(elf)
            if fs.elf is not elf:
                elf.close()  # the cache already holds this build id
            elif not fs.debug_path:  # separate debug info is looked for in the process's root, by its path
                fs.debug_root, fs.debug_path = f"{self.proc_root}/{pid}/root", entry.path
        except (BpfprofError, OSError) as e:
            self.stats.unreadable_files += 1
            log.info("pid %d: cannot read %s: %s", pid, entry.path, e)
        self._by_inode[key] = fs
        return fs

    def _vdso_symbols(self, pid: int) -> FileSymbols | None:
        # One kernel, one vdso: the first process's copy serves all 64-bit ones.
        if self._vdso is None:
            try:
                image = read_vdso(pid, self.proc_root)
                if image:
                    self._vdso = self.cache.get(ElfFile.from_bytes(image, "[vdso]"))
            except (BpfprofError, OSError) as e:
                log.info("pid %d: cannot read [vdso]: %s", pid, e)
        return self._vdso

    def seen(self, pid: int, seq: int) -> None:
        """Note that `pid` had a record in interval `seq` (for least-recently-sampled eviction)."""
        self._last_seen[pid] = seq

    def evict(self, safe_seq: int) -> int:
        """Drop processes no pending interval needs; returns how many.

        Snapshots that failed go whenever they were sampled: they hold nothing
        to symbolize with, and a process still alive gets another try at its
        next sample instead of losing every later one to the failure. Other
        candidates were last sampled before `safe_seq`: first those that exited
        or whose pid was reused (start time changed), then the least recently
        sampled until the table is under `max_processes`.
        """
        # Copies of the live dicts: the builder and the unwind worker add pids while this runs (a
        # comprehension over _procs raised "dictionary changed size during iteration" in a stress test).
        # dict.copy(), not list(d.items()): that allocates a tuple per item, a garbage collection there
        # can run finalizers that let another thread in, and the iteration fails all the same.
        for pid, seq in self._forget_later.copy().items():
            if pid in self._procs:
                del self._forget_later[pid]  # seen again: alive under that pid
            elif seq < safe_seq:
                del self._forget_later[pid]
                self._forget(pid)
        failed = [pid for pid, info in self._procs.copy().items() if info is None]
        failed_set = set(failed)
        candidates = sorted((seq, pid) for pid, seq in self._last_seen.copy().items()
                            if seq < safe_seq and pid not in failed_set)
        gone = failed + [pid for _, pid in candidates
                         if process_start_ticks(pid, self.proc_root) != self._start.get(pid)]
        if self.max_processes is not None:
            excess = len(self._procs) - len(gone) - self.max_processes
            if excess > 0:
                gone_set = set(gone)
                gone += [pid for _, pid in candidates if pid not in gone_set][:excess]
        for pid in gone:
            self._procs.pop(pid, None)
            self._leaf_refreshed.pop(pid, None)
            seq = self._last_seen.pop(pid, None)
            self._start.pop(pid, None)
            if seq is None or seq < safe_seq:
                self._forget(pid)
            else:  # a failed snapshot sampled in an interval not built yet: its other state waits for it
                self._forget_later[pid] = seq
        self.stats.evictions += len(gone)
        if len(self._by_inode) > INODE_CACHE_MAX:
            self._by_inode.clear()
        return len(gone)

    def processes(self) -> list[ProcessInfo]:
        return [p for p in self._procs.values() if p is not None]
