"""Uprobes: where to put one (a function's file offset in an ELF file), and a family's uprobes per process."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agent.bpfload import libbpf
from agent.bpfload.bpf_compile import LoadedObjects
from agent.processes.targets import gated_command_path, running_pids
from agent.processes.tracker import process_start_ticks
from symbolizer.elf import ElfFile
from symbolizer.elf_symbols import ElfSymbols
from symbolizer.errors import BpfprofError

log = logging.getLogger(__name__)
Sites = TypeVar("Sites")
# Per-process uprobes of exited processes are closed once this many processes have some (then at twice
# what was left): a `record -- go test ./...` runs hundreds of Go binaries, each holding uprobe fds.
SWEEP_AT = 64
# The most uprobe fds of exited processes waiting for the closer: past it, new processes get no
# uprobes (counted) rather than the agent holding fds without bound (the perf event fallback closes
# ~10 a second).
CLOSE_BACKLOG = 1024


@dataclass
class _Placed:
    """What one target process holds: its start time (a reused pid is another process), fds, file keys."""

    start: int | None
    fds: list[int] = field(default_factory=list)
    keys: list[tuple[int, int, int]] = field(default_factory=list)


class UprobeCloser:
    """Closes uprobe fds on a thread of its own, never on the caller's (the drain thread).

    A close waits for an RCU grace period in the kernel (~30-100 ms here);
    the thread takes everything handed over since its last round and closes
    it with libbpf.close_all, in parallel, so a round of uprobe_multi links
    costs about one grace period however many processes exited. stop()
    hands back what it had not closed, for the final close_all.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue: list[int] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.closed = 0  # fds closed so far
        self.backlog = 0  # fds handed over and not closed yet (queued or in the round under way)

    def submit(self, fds: list[int]) -> None:
        with self._lock:
            self._queue += fds
            self.backlog += len(fds)
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name=f"bpfprof-{self._name}-closer", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                batch, self._queue = self._queue, []
                if self._stopping:
                    self._queue = batch  # stop() closes them with the rest, in one round
                    return
            n = len(batch)
            libbpf.close_all(batch)
            with self._lock:
                self.closed += n
                self.backlog -= n

    def stop(self) -> list[int]:
        """End the thread (after the round it is in); the fds it had not closed."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join()
        with self._lock:
            left, self._queue = self._queue, []
            self.backlog = 0
            self._thread, self._stopping = None, False  # a later submit starts a new thread
        return left


def function_offsets(path: str, names: list[str]) -> dict[str, int]:
    """File offsets of the functions `names` that `path` defines (missing names are left out)."""
    with ElfFile(path) as elf:
        syms = ElfSymbols(elf)
        out = {}
        for name in names:
            sym = syms.find(name)
            if sym is not None:
                out[name] = elf.offset_for_vaddr(sym.start)
        return out


class ProcessUprobes(Generic[Sites]):
    """The life cycle of a family's uprobes in the programs its target processes run, written once.

    At start, each target's executable (every running process when the
    capture is system-wide) is read once per file (st_dev, st_ino) by
    `sites_of(path)`, which returns what to probe there or None (not a program
    of that kind); `uprobes(sites)` lists (program, file offset) pairs. A
    target that execs is placed again through add() (the family sees the exec
    notice). With targets, uprobes go into each process (perf_event_open with
    its pid); system-wide, once per file for every process (-1). A command
    bpfprof starts is probed before its exec, through the file it will run,
    so a short one is probed from its first instruction. detach() removes
    every uprobe placed.

    Each program's offsets in a file go into one BPF uprobe_multi link (the
    pid filter in the link) where the kernel has them, else one perf event
    per offset (libbpf.attach_uprobes). Removing a uprobe waits for an RCU
    grace period (~100 ms a perf event on 6.18, serialized in the kernel), so
    a `record` of 60 short Go children took 31 s to end with perf events;
    a link removes all its offsets after one, and links closed in parallel
    share grace periods. Per-process uprobes of processes that exited are
    handed to an UprobeCloser as new ones are placed (`SWEEP_AT`), so their
    fds and kernel uprobes do not pile up, and the drain thread never waits
    for a close; detach() closes what is left in one parallel round.

    Uprobes stay per process, not one system-wide link per file filtered in
    BPF: that would cost nothing to re-run the same binary, but every other
    process running that file would trap too (a uprobe costs ~1-3 us a hit):
    for libc's malloc that is every process on the host, for a Go program's
    semaphore functions every other instance of that binary. With parallel
    closes a target's uprobes cost about one grace period, on a thread of
    their own, so the per-process way keeps untargeted processes untouched.
    """

    def __init__(self, family: str, sites_of: Callable[[str], Sites | None],
                 uprobes: Callable[[Sites], list[tuple[str, int]]]) -> None:
        self.family = family
        self._sites_of = sites_of
        self._uprobes = uprobes
        self._sites: dict[tuple[int, int], Sites | None] = {}
        self._placed: set[tuple[int, int, int]] = set()  # (pid or -1, st_dev, st_ino)
        self._fds: list[int] = []  # system-wide uprobes
        self._per_pid: dict[int, _Placed] = {}  # per-process uprobes, by pid
        self._sweep_at = SWEEP_AT
        self._closer = UprobeCloser(family)
        self.closed = 0  # processes whose uprobes were closed after they exited
        self.skipped = 0  # processes given no uprobes: too many closes were still pending
        self._objs: LoadedObjects | None = None
        self.per_pid = False
        self.errors = 0  # processes whose uprobes could not be placed

    def bind(self, objs: LoadedObjects, per_pid: bool) -> None:
        """Use the programs of `objs`; per_pid False: uprobes go system-wide, once per file."""
        self._objs = objs
        self.per_pid = per_pid

    def start(self, objs: LoadedObjects, targets: list[int]) -> None:
        """Place uprobes in `targets`, or in every running process when there are none (system-wide)."""
        self.bind(objs, bool(targets))
        for pid in targets or running_pids():
            self.add(pid)

    def sites(self, path: str) -> tuple[tuple[int, int], Sites | None]:
        """(file key, what `sites_of` found) of the file at `path`, read once per file."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key not in self._sites:
            self._sites[key] = self._sites_of(path)
        return key, self._sites[key]

    def add(self, pid: int) -> tuple[str, Sites] | None:
        """Place the uprobes in `pid`'s program; (the path probed, its sites), None if it has none or is gone."""
        found = self.lookup(pid)
        if found is None or not self.place(pid, *found):
            return None
        return found[0], found[2]

    def lookup(self, pid: int) -> tuple[str, tuple[int, int], Sites] | None:
        """(path, file key, sites) of the program `pid` runs (or is about to exec); None if none or gone."""
        if self._objs is None:
            return None
        exe = gated_command_path(pid) or f"/proc/{pid}/exe"
        try:
            key, sites = self.sites(exe)
        except (OSError, BpfprofError) as e:
            self._failed(pid, e)
            return None
        return None if sites is None else (exe, key, sites)

    def place(self, pid: int, exe: str, key: tuple[int, int], sites: Sites) -> bool:
        """Put the uprobes of `sites` into `pid` (once per process, or per file system-wide); False on failure."""
        assert self._objs is not None
        target = pid if self.per_pid else -1
        if (target, *key) in self._placed:
            return True
        self._placed.add((target, *key))  # tried once: a failure is not retried at every exec
        if self.per_pid:
            placed = self._per_pid.get(pid)
            if placed is None:
                if len(self._per_pid) >= self._sweep_at:
                    self._sweep()
                if self._closer.backlog > CLOSE_BACKLOG:
                    self._skip(pid)
                    return False
                placed = self._per_pid[pid] = _Placed(process_start_ticks(pid))
            placed.keys.append((target, *key))
            fds = placed.fds
        else:
            fds = self._fds
        offsets: dict[str, list[int]] = {}  # program -> its offsets here: one link each
        for program, offset in self._uprobes(sites):
            offsets.setdefault(program, []).append(offset)
        try:
            for program, offs in offsets.items():
                fds += libbpf.attach_uprobes(self._objs.programs[program], exe, offs, target)
        except (OSError, BpfprofError) as e:
            self._failed(pid, e)
            return False
        return True

    def _sweep(self) -> None:
        """Hand the uprobes of processes that exited (or whose pid now names another process) to the closer."""
        for pid, placed in list(self._per_pid.items()):
            if process_start_ticks(pid) != placed.start or placed.start is None:
                self._closer.submit(placed.fds)
                self._placed.difference_update(placed.keys)
                del self._per_pid[pid]
                self.closed += 1
        self._sweep_at = max(SWEEP_AT, 2 * len(self._per_pid))

    def _skip(self, pid: int) -> None:
        self.skipped += 1
        if self.skipped & (self.skipped - 1) == 0:
            log.warning("%s uprobes not placed in pid %d: %d uprobe closes still pending (%d processes so far)",
                        self.family, pid, self._closer.backlog, self.skipped)

    def _failed(self, pid: int, e: Exception) -> None:
        if not isinstance(e, FileNotFoundError):  # gone (or a kernel thread) is no error
            self.errors += 1
            log.info("%s uprobes not placed in pid %d: %s", self.family, pid, e)

    def notes(self) -> list[str]:
        """Profile comments: processes whose uprobes could not be placed (so far)."""
        notes = [f"{self.family} uprobes could not be placed in {self.errors} processes"] if self.errors else []
        if self.skipped:
            notes.append(f"{self.family} uprobes not placed in {self.skipped} processes: the closes of exited "
                         "processes' uprobes fell behind")
        return notes

    def detach(self) -> None:
        """Close every uprobe placed, in one parallel round (libbpf.close_all)."""
        fds = self._closer.stop() + self._fds
        for placed in self._per_pid.values():
            fds += placed.fds
        self._fds = []
        self._per_pid.clear()
        libbpf.close_all(fds)
        if self.closed:
            log.info("%s: uprobes of %d exited processes closed during the capture", self.family, self.closed)
