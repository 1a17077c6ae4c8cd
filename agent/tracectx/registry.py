"""Which processes get their trace context read in BPF, and how: the `trace_procs` map.

At first sight of a pid (its first sample, or before any sample for --pid
targets) the executable is examined once per file: a Go binary gets its
runtime layout (agent/go/layouts.py), an executable exporting
otel_thread_ctx_v1 its TLS offset (agent/tracectx/otel_thread_ctx.py).

Go offsets come from the version table (agent/go/layouts.py, from the Go
runtime's sources per release). Only a Go binary of a release the table does
not know has its DWARF read for them, by a worker thread: reading DWARF takes
0.5 s to seconds of CPU (pyelftools over the runtime's DIEs; 4 s of a 10 s
capture's profile of one Go binary under load), which the drain loop must not
wait for and which a known release does not need. Samples a process sends before
its entry is written carry no context: for a process seen only through its
samples that is the first drain interval (~0.1 s).

A pid is looked at again when a record shows a new thread name (exec renames
the process: a gated `-- COMMAND` is a shell until it execs, and its first
samples may be the shell's) and at least every RECHECK_S (pid reuse, exec
under the same name); the executable's (dev, inode) tells whether anything
changed, so a look costs one stat.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.bpfload.records import ProcCtx, ProcFlag
from agent.go.layouts import GoRuntimeLayout, layout_for
from agent.tracectx.otel_thread_ctx import thread_ctx_offset
from symbolizer.elf import ElfFile
from symbolizer.errors import BpfprofError
from symbolizer.gobuildinfo import read_build_info

log = logging.getLogger(__name__)

RECHECK_S = 1.0
MAX_FILES = 4096  # executables examined kept (dev, inode); past it they are forgotten (a build makes new ones)
WORKER_IDLE_S = 1.0
FileId = tuple[int, int]  # (st_dev, st_ino) of the executable


@dataclass(frozen=True)
class ExeTraceContext:
    """What can be read in processes running one executable file."""

    go: GoRuntimeLayout | None = None
    otel_tls: int | None = None
    has_dwarf: bool = False
    go_unknown: bool = False  # a Go binary of a release the version table lacks: only its DWARF can tell

    def proc_ctx(self) -> ProcCtx | None:
        """The `trace_procs` value, None if there is nothing to read."""
        if self.go is None and self.otel_tls is None:
            return None
        v = ProcCtx()
        if self.go is not None:
            v.flags |= ProcFlag.GO
            v.g_m, v.m_curg, v.g_labels = self.go.g_m, self.go.m_curg, self.go.g_labels
            v.labels_form = self.go.labels_form
            v.go_tls_g = self.go.tls_g
        if self.otel_tls is not None:
            v.flags |= ProcFlag.OTEL
            v.otel_tls = self.otel_tls
        return v


def examine(path: str, use_dwarf: bool) -> ExeTraceContext:
    """Trace-context facts of one executable; nothing readable on any error."""
    try:
        with ElfFile(path) as elf:
            info = read_build_info(elf)
            go = layout_for(elf, use_dwarf, info) if info is not None else None
            return ExeTraceContext(go=go, otel_tls=thread_ctx_offset(elf), has_dwarf=elf.has_dwarf,
                                   go_unknown=info is not None and go is None)
    except (BpfprofError, OSError) as e:
        log.info("%s: not examined for trace context: %s", path, e)
        return ExeTraceContext()


class TraceContextRegistry:
    """Keeps `trace_procs` in step with the processes seen. `write(pid, value or None)` updates
    or deletes an entry (the BPF map in the agent, a dict in tests). Call close() when done."""

    def __init__(self, write: Callable[[int, ProcCtx | None], None], proc_root: str = "/proc",
                 clock: Callable[[], float] = time.monotonic, use_dwarf: bool = True) -> None:
        self._write = write
        self._proc_root = proc_root
        self._clock = clock
        self._use_dwarf = use_dwarf
        self._lock = threading.Lock()  # _by_file, _pids and writes: the DWARF worker updates them too
        self._by_file: dict[FileId, ExeTraceContext] = {}
        # pid -> (exe identity, next check, thread name at the last check)
        self._pids: dict[int, tuple[FileId | None, float, str]] = {}
        self._dwarf_jobs: queue.SimpleQueue[tuple[FileId, str] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self.examined_files = 0

    def observe(self, pid: int, thread_name: str = "") -> None:
        """Called for every record's pid; cheap unless the pid is new or due for a re-check."""
        seen = self._pids.get(pid)
        now = self._clock()
        if seen is not None and now < seen[1] and thread_name == seen[2]:
            return
        exe = f"{self._proc_root}/{pid}/exe"
        try:
            st = os.stat(exe)
            ident: FileId | None = (st.st_dev, st.st_ino)
        except OSError:
            ident = None  # gone, or a kernel thread
        with self._lock:
            self._pids[pid] = (ident, now + RECHECK_S, thread_name)
            if seen is not None and seen[0] == ident:
                return
            ctx = ExeTraceContext()
            if ident is not None:
                known = self._by_file.get(ident)
                if known is None:
                    if len(self._by_file) >= MAX_FILES:
                        self._by_file.clear()
                    known = self._by_file[ident] = examine(exe, use_dwarf=False)
                    self.examined_files += 1
                    if self._use_dwarf and known.has_dwarf and known.go_unknown:
                        self._queue_dwarf(ident, exe)
                ctx = known
            value = ctx.proc_ctx()
            if value is not None or seen is not None:
                self._write(pid, value)
        if value is not None:
            log.info("pid %d: trace context %s", pid, ctx)

    def forget(self, pid: int) -> None:
        """Drop `pid` (the process table evicted it): looked at again if it shows up again."""
        with self._lock:
            self._pids.pop(pid, None)

    def __len__(self) -> int:
        """Processes known."""
        return len(self._pids)

    def _queue_dwarf(self, ident: FileId, exe: str) -> None:
        """Under the lock. The worker exits when idle, so no thread outlives a capture for long."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._dwarf_loop, name="trace-ctx-dwarf", daemon=True)
            self._worker.start()
        self._dwarf_jobs.put((ident, exe))

    def _dwarf_loop(self) -> None:
        while True:
            try:
                job = self._dwarf_jobs.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._dwarf_jobs.empty():
                        self._worker = None
                        return
                continue
            if job is None:
                return
            ident, exe = job
            try:
                with ElfFile(exe) as elf:
                    go = layout_for(elf, use_dwarf=True)
            except (BpfprofError, OSError) as e:  # the process is gone: keep the table's offsets
                log.info("%s: DWARF not read: %s", exe, e)
                continue
            with self._lock:
                ctx = self._by_file.get(ident)
                if ctx is None or go is None or ctx.go == go:
                    continue
                ctx = self._by_file[ident] = replace(ctx, go=go, go_unknown=False)
                value = ctx.proc_ctx()
                for pid, (pid_ident, _, _) in self._pids.items():
                    if pid_ident == ident:
                        self._write(pid, value)

    def layouts(self) -> dict[FileId, ExeTraceContext]:
        with self._lock:
            return dict(self._by_file)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish queued DWARF reads and stop the worker."""
        worker = self._worker
        if worker is not None:
            self._dwarf_jobs.put(None)
            worker.join(timeout=timeout_s)
            self._worker = None
