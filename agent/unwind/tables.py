"""The BPF unwinder's tables (bpf/unwind.bpf.h): per-file rows and per-process mappings, kept in the kernel.

Rows are built once per file (symbolizer/unwind_rows.py, keyed by the file's
identity: its build id, else a content hash) and shared by every process that
maps the file. They live in one memory-mapped BPF array, `unwind_rows`: a
file's rows are one contiguous run, written with one copy before any process
table points at it. The array's size is the byte budget the config sets;
when a new file does not fit, the files no registered process maps are
evicted, least recently used first. A file that still does not fit, or whose
rows cannot be built, is walked with frame pointers (counted).

A process is registered at its first sample (which took the copy path: the
BPF side found no table) and again when a sample meets code outside its
registered mappings (dlopen, JIT) or after an exec (the BPF side deletes the
table at exec and at exit). Registration reads the tracker's snapshot, so it
runs on a worker thread: building libc's rows takes ~50 ms, a large Go
binary's more, and the drain loop must not wait for it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.bpfload import libbpf
from agent.bpfload.records import Loss
from agent.errors import BpfLoadError
from agent.processes.tracker import ProcessInfo, ProcessTracker
from symbolizer import unwind_cache
from symbolizer.file_symbols import FileId, FileSymbols
from symbolizer.unwind_rows import ROW, ROWS_FORMAT_VERSION, file_rows

if TYPE_CHECKING:
    from symbolizer.cfi import UnwindTable
    from symbolizer.gopclntab import GoPclntab

log = logging.getLogger(__name__)

ROW_BYTES = ROW.size  # struct unwind_row
FAMILIES = 3  # UNWIND_FAMILIES
MAX_MAPPINGS = 256  # UNWIND_MAX_MAPPINGS
FP_ROWS = 0xFFFFFFFF  # UNWIND_FP_ROWS: a mapping walked by frame pointers
DEFAULT_TABLE_BYTES = 16 << 20  # 2 M rows: libc has ~28 k, a large Go binary ~140-230 k
MIN_TABLE_BYTES = 64 << 10
MAX_TABLE_BYTES = 1 << 30
DEFAULT_MAX_PROCESSES = 4096  # UNWIND_PROCS
# A process is registered again at most this often (a fallback storm after an exec or a dlopen).
REREGISTER_S = 0.25


_UNSEEN = object()


class UnwindMapping(ctypes.Structure):
    """struct unwind_mapping."""

    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("bias", ctypes.c_uint64),
                ("first", ctypes.c_uint32), ("count", ctypes.c_uint32)]


class UnwindProc(ctypes.Structure):
    """struct unwind_proc: an `unwind_procs` value."""

    _fields_ = [("n", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("m", UnwindMapping * MAX_MAPPINGS)]


# unwind_stats indices (enum unwind_stat) -> (metric reason, description, a loss?)
STATS: tuple[tuple[str, str, bool], ...] = (
    ("complete", "user stacks walked in BPF to their outermost frame", False),
    ("truncated", "user stacks deeper than 128 frames, cut", True),
    ("fallback_no_table", "samples of processes without tables yet, sent with a stack copy", False),
    ("fallback_unmapped", "samples that met code outside the registered mappings, continued from a stack copy",
     False),
    ("stop_no_cfi", "user stacks cut where code had no unwind rule and no frame pointer", True),
    ("stop_bad_cfa", "user stacks cut where the frame address did not move up the stack", True),
    ("stop_read", "user stacks cut where a read of the stack failed", True),
    ("stop_rbp_unknown", "user stacks cut where a rule needed a frame pointer an earlier frame lost", True),
    ("stop_unsupported", "user stacks cut at an unwind rule the BPF walker does not support", True),
    ("stop_go_spwrite", "Go stacks cut at a stack switch (systemstack, mcall)", True),
    ("stop_calls", "user stacks cut where a tail call of the walker failed", True),
    ("fallback_no_copy", "fallback samples whose stack copy could not be made, sent as walked", True),
)


@dataclass
class TableStats:
    files_loaded: int = 0
    rows_loaded: int = 0
    bytes_loaded: int = 0
    files_evicted: int = 0
    files_without_rows: int = 0  # no CFI, unreadable, or a build error: frame pointers
    files_over_budget: int = 0  # did not fit even after eviction: frame pointers
    build_seconds: float = 0.0
    processes_registered: int = 0
    registrations: int = 0
    process_table_full: int = 0
    stale_deleted: int = 0  # tables of processes found gone that BPF still held (registered after their exit)


@dataclass
class _File:
    first: int
    count: int
    base: int
    users: int = 0


class RowStore:
    """The `unwind_rows` array: contiguous runs per file, a first-fit allocator, LRU eviction."""

    def __init__(self, fd: int, capacity_rows: int) -> None:
        self.capacity = capacity_rows
        self._fd = fd
        self._free: list[tuple[int, int]] = [(0, capacity_rows)]  # (start, count), sorted by start
        self.files: OrderedDict[FileId, _File] = OrderedDict()  # least recently used first
        self.used_rows = 0

    def _alloc(self, count: int) -> int | None:
        for i, (start, n) in enumerate(self._free):
            if n >= count:
                self._free[i] = (start + count, n - count)
                if n == count:
                    del self._free[i]
                return start
        return None

    def _release(self, start: int, count: int) -> None:
        free = self._free
        free.append((start, count))
        free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def load(self, key: FileId, base: int, data: bytes) -> tuple[_File | None, int]:
        """The file's run of rows, written now if new: (run, files evicted); run None if it does not fit."""
        got = self.files.get(key)
        if got is not None:
            self.files.move_to_end(key)
            return got, 0
        count = len(data) // ROW_BYTES
        if count == 0 or count > self.capacity:
            return None, 0
        evicted = 0
        start = self._alloc(count)
        while start is None:
            victim = next((k for k, f in self.files.items() if f.users == 0), None)
            if victim is None:
                return None, evicted
            f = self.files.pop(victim)
            self._release(f.first, f.count)
            self.used_rows -= f.count
            evicted += 1
            start = self._alloc(count)
        self._write(start * ROW_BYTES, data)
        run = _File(start, count, base)
        self.files[key] = run
        self.used_rows += count
        return run, evicted

    def _write(self, offset: int, data: bytes) -> None:
        """Copy `data` into the array at byte `offset` through a mapping of just the pages it covers.

        A BPF array's mmap maps every page of the window at once (the
        kernel's remap_vmalloc_range), so mapping the whole array would put
        its full budget (16 MB by default) into the agent's RSS for good.
        """
        first = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = -(-(offset + len(data)) // mmap.PAGESIZE) * mmap.PAGESIZE
        with mmap.mmap(self._fd, end - first, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=first) as mm:
            mm[offset - first:offset - first + len(data)] = data

    def close(self) -> None:
        """Nothing stays mapped between writes; kept for the callers' lifecycle."""


def rows_key(table: UnwindTable | None, go: GoPclntab | None) -> str:
    """The cache name of the rows build_rows makes of these inputs: a digest of the inputs themselves.

    Not the file's build id: a copy of a binary with its build-id note kept and its .gopclntab section
    header bent (a test does that; so could any user) would otherwise swap its rows with the real file's,
    for every capture after, and walk the real binary's stacks with them (a CI run lost main.worker so).
    """
    h = hashlib.sha256(b"cfi")
    if table is not None:
        for a in (table.pcs, table.kinds, table.cfa_offs, table.rbp_offs):
            h.update(len(a).to_bytes(8, "little"))
            h.update(memoryview(a).cast("B"))
    h.update(b"go" + (go.fingerprint() if go is not None else b""))
    return h.hexdigest()


def _default_rows(fs: FileSymbols) -> tuple[int, bytes] | None:
    """A file's (base, rows), None when it has none: from the on-disk cache when the same inputs were
    packed before (a Go binary's pclntab walk costs ~50 ms for a small one, a second for a big one,
    again at every start), else built and cached."""
    key = rows_key(fs.unwind_table, fs.go)
    cached = unwind_cache.load_rows(key, "rows", ROWS_FORMAT_VERSION, ROW.size)
    if cached is not None:
        return cached if cached[1] else None
    rows = file_rows(fs)
    unwind_cache.store_rows(key, "rows", ROWS_FORMAT_VERSION, ROW.size, rows.base, rows.data if rows.count else b"")
    if not rows.count:
        return None
    return rows.base, rows.data


class UnwindTables:
    """Registers processes with the BPF unwinder: their files' rows loaded, their mappings written.

    `want(pid)` is cheap and safe from the drain thread; a worker thread does the rest.
    """

    def __init__(self, objs_maps: dict[str, int], tracker: ProcessTracker, capacity_rows: int,
                 rows_for: Callable[[FileSymbols], tuple[int, bytes] | None] = _default_rows) -> None:
        self.tracker = tracker
        self.rows = RowStore(objs_maps["unwind_rows"], capacity_rows)
        self._procs_fd = objs_maps["unwind_procs"]
        self._stats_fd = objs_maps["unwind_stats"]
        self._rows_for = rows_for
        self.stats = TableStats()
        self._lock = threading.Lock()  # guards rows + _registered, shared by worker and drain thread
        self._registered: dict[int, tuple[float, frozenset[FileId]]] = {}  # pid -> (when, files)
        self._pending: set[int] = set()
        self._again: set[int] = set()  # pids wanted (forced) while their registration was under way
        self._lost: set[int] = set()  # registered pids whose table BPF deleted, until registered again
        self._noted: dict[int, object] = {}  # pid -> the snapshot its last record was delivered under
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        # Set by close() under _lock: the map fds may be closed after it, so the worker writes nothing more
        # (a build under way when the capture ends finishes into nothing; it is not waited for).
        self._closed = False

    # -- drain thread ----------------------------------------------------------------

    def want(self, pid: int, refresh: bool = False, force: bool = False) -> None:
        """Have `pid` registered (again, with its maps re-read, if `refresh`) unless that happened just now;
        `force`: even then (a new snapshot), and again after a registration under way (it may be the old one's)."""
        with self._lock:
            if pid in self._pending:
                if force:
                    self._again.add(pid)
                return
            got = self._registered.get(pid)
            if not force and got is not None and time.monotonic() - got[0] < REREGISTER_S:
                return
            self._pending.add(pid)
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="bpfprof-unwind-tables", daemon=True)
            self._worker.start()
        self._queue.put(-pid if refresh else pid)

    def note(self, pid: int, info: object) -> None:
        """A record of `pid` was delivered under snapshot `info`: register it if that snapshot is new to
        us (first sight, or an exec the tracker noticed). Cheap: called for every record."""
        if self._noted.get(pid, _UNSEEN) is not info:
            self._noted[pid] = info
            # Always: an exec moments after the last registration (`record -- COMMAND`'s gate execs the
            # command) would otherwise leave the new image on the fallback until something else asks.
            self.want(pid, force=True)

    def lost_table(self, pid: int, ktime_ns: int) -> bool:
        """True once per registration of `pid` when BPF found no table for it since: an exec (or its
        exit) deleted it. The caller re-reads the process's maps; want() registers it again.

        `ktime_ns` (CLOCK_MONOTONIC, as time.monotonic) is when BPF looked: a sample taken before the
        registration and read after it (a new process's first samples, as under churn) lost nothing,
        and re-reading for it cost a snapshot per new process."""
        with self._lock:
            got = self._registered.get(pid)
            if got is None or pid in self._lost or ktime_ns < got[0] * 1e9:
                return False
            self._lost.add(pid)
            return True

    def forget_dead(self, alive: Callable[[int], bool]) -> None:
        """Release the files of registered processes that are gone (the BPF side deleted their tables), and
        forget the snapshot of every noted process that is gone, registered or not."""
        with self._lock:
            # Noted pids too: one never registered (its snapshot failed, or the tracker evicted it before the
            # worker came to it, as when the worker is behind) held its snapshot until its pid came back.
            dead = [pid for pid in self._registered.keys() | self._noted.keys() if not alive(pid)]
            for pid in dead:
                if pid in self._registered:
                    self._drop(pid)
                    # BPF deletes a table at its process's exit, but not one written after it (the worker
                    # registered a snapshot of a process that had just exited): without this it stays
                    # until the pid is reused, and under churn such tables fill unwind_procs.
                    try:
                        if libbpf.map_delete(self._procs_fd, ctypes.c_uint32(pid)):
                            self.stats.stale_deleted += 1
                    except BpfLoadError as e:
                        log.debug("pid %d: unwind table not deleted: %s", pid, e)
                self._noted.pop(pid, None)

    # -- worker -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._closed:
                return
            pid, refresh = abs(item), item < 0
            try:
                # Only processes the drain thread already tracks (it owns the table's limit and eviction);
                # an exec was already re-read there (note_record, UserStacks.complete).
                info = self.tracker.get(pid)
                if pid in self.tracker and (info is None or refresh):  # a snapshot that failed mid-exec: again
                    info = self.tracker.refresh(pid)
                if info is not None:
                    self.register(info)
            except Exception:  # noqa: BLE001  (a worker that dies would leave every later process on the copy path)
                log.exception("unwind tables of pid %d", pid)
            finally:
                with self._lock:
                    self._pending.discard(pid)
                    again = pid in self._again
                    self._again.discard(pid)
                if again:  # a newer snapshot arrived while this one registered
                    self.want(pid, force=True)

    def register(self, info: ProcessInfo) -> bool:
        """Load the rows of every file `info` maps and write its mappings; False if the table is full."""
        entries: list[tuple[int, int, int, int, int]] = []
        files: list[FileId] = []
        for mf in info.symbols.mappings[:MAX_MAPPINGS]:
            m, fs = mf.mapping, mf.symbols
            run = self._file_rows(fs) if fs is not None else None
            if run is None or fs is None:
                entries.append((m.start, m.end, 0, FP_ROWS, 0))
                continue
            vaddr = fs.translate(m.start, m.start, m.file_offset)
            if vaddr is None:
                entries.append((m.start, m.end, 0, FP_ROWS, 0))
                continue
            bias = (vaddr - run.base - m.start) & 0xFFFFFFFFFFFFFFFF
            entries.append((m.start, m.end, bias, run.first, run.count))
            files.append(fs.id)
        value = UnwindProc()
        value.n = len(entries)
        for i, e in enumerate(sorted(entries)):
            value.m[i] = UnwindMapping(*e)
        with self._lock:
            if self._closed:
                return False
            for key in files:
                run = self.rows.files.get(key)
                if run is not None:
                    run.users += 1
            if info.pid in self._registered:
                self._drop(info.pid)
            try:
                libbpf.map_update(self._procs_fd, ctypes.c_uint32(info.pid), value)
            except BpfLoadError as e:
                self.stats.process_table_full += 1
                log.debug("pid %d: no unwind table: %s", info.pid, e)
                for key in files:
                    run = self.rows.files.get(key)
                    if run is not None:
                        run.users -= 1
                return False
            self._lost.discard(info.pid)
            log.debug("pid %d: unwind table of %d mappings, %d files with rows", info.pid, len(entries), len(files))
            if info.pid not in self._registered:
                self.stats.processes_registered += 1
            self.stats.registrations += 1
            self._registered[info.pid] = (time.monotonic(), frozenset(files))
        return True

    def _file_rows(self, fs: FileSymbols) -> _File | None:
        with self._lock:
            run = self.rows.files.get(fs.id)
            if run is not None:
                self.rows.files.move_to_end(fs.id)
                return run
        t0 = time.process_time()
        try:
            built = self._rows_for(fs)
        except Exception as e:  # noqa: BLE001  (a file that cannot be parsed is walked by frame pointers)
            log.debug("%s: no unwind rows: %s", fs.path, e)
            built = None
        self.stats.build_seconds += time.process_time() - t0
        if built is None:
            self.stats.files_without_rows += 1
            return None
        base, data = built
        with self._lock:
            if self._closed:
                return None
            run, evicted = self.rows.load(fs.id, base, data)
            self.stats.files_evicted += evicted
            if run is None:
                self.stats.files_over_budget += 1
                return None
            self.stats.files_loaded += 1
            self.stats.rows_loaded += run.count
            self.stats.bytes_loaded += len(data)
        return run

    def _drop(self, pid: int) -> None:
        """Forget `pid`'s registration (lock held): its files lose a user."""
        _, files = self._registered.pop(pid)
        self._lost.discard(pid)
        for key in files:
            run = self.rows.files.get(key)
            if run is not None and run.users > 0:
                run.users -= 1

    # -- counters ------------------------------------------------------------------------

    def walk_counts(self, family: int) -> dict[str, int]:
        """How the BPF walks of a family (UNWIND_FAMILY_*) ended so far, by STATS reason (sums over CPUs)."""
        at = family * len(STATS)
        return {name: sum(libbpf.map_lookup_percpu_u64(self._stats_fd, at + i))
                for i, (name, _, _) in enumerate(STATS)}

    def losses(self, family: int) -> list[Loss]:
        """User stacks of a family that the BPF walk cut short, by reason (running totals)."""
        counts = self.walk_counts(family)
        return [Loss(f"unwind_{name}", counts[name], desc) for name, desc, loss in STATS if loss and counts[name]]

    def totals(self) -> dict[str, int]:
        """Walk counts summed over the families, and the tables' counters: for summaries and metrics."""
        out = dict.fromkeys((name for name, _, _ in STATS), 0)
        for family in range(FAMILIES):
            for name, n in self.walk_counts(family).items():
                out[name] += n
        st = self.stats
        out.update(files_loaded=st.files_loaded, table_bytes=st.bytes_loaded, files_evicted=st.files_evicted,
                   files_over_budget=st.files_over_budget, processes_registered=st.processes_registered,
                   registrations=st.registrations, process_table_full=st.process_table_full,
                   stale_deleted=st.stale_deleted,
                   build_ms=round(st.build_seconds * 1000))
        return out

    def summary(self) -> str:
        """One line for `record`: how stacks were walked and what the tables cost."""
        t = self.totals()
        walked = sum(t[name] for name, _, _ in STATS if not name.startswith("fallback_no_table"))
        fallback = t["fallback_no_table"] + t["fallback_unmapped"]
        return (f"{walked} user stacks walked in BPF ({t['complete']} to their outermost frame), {fallback} by the fallback "
                f"(a stack copy or frame pointers) while tables loaded; tables of {t['files_loaded']} files, "
                f"{t['table_bytes'] / 1e6:.1f} MB, built in {t['build_ms']} ms")

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            # Between items it stops at once; inside a large file's build (seconds) it is left to finish
            # into nothing rather than holding up the end of the capture.
            self._worker.join(timeout=0.5)
            self._worker = None
        self.rows.close()
