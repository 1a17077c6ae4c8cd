"""CPython frames for every family whose records carry them (cpu, offcpu, lock): one per capture.

The BPF side is one `py_procs` map whatever the selection (the families are
one translation unit, agent/probes/probe_set.py), so the agent side is one
too: the registry that keeps `py_procs` in step with the processes seen
(agent/python/registry.py) and the code objects read from them
(agent/python/frames.py). The probe set makes it when a selected family
reads Python frames (ProbeFamily.reads_python) and hands it to each.

Threads: observe() and forget() (the tracker's eviction, at a cut) run on the
drain thread; merge() and comments() on the build thread. The registry locks
what both sides touch.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterable, Sequence

from agent.bpfload import libbpf
from agent.bpfload.records import PyProc, RawRecord
from agent.errors import BpfLoadError
from agent.processes.tracker import ProcessTracker
from agent.python.frames import PythonFrames
from agent.python.registry import PythonRegistry
from exporters.profile import Location

log = logging.getLogger(__name__)

PY_PROCS_MAP = "py_procs"


def map_writer(fd: int) -> Callable[[int, PyProc | None], None]:
    """A registry's `write`: put or delete one pid's `py_procs` value."""

    def write(pid: int, value: PyProc | None) -> None:
        key = ctypes.c_uint32(pid)
        if value is None:
            libbpf.lib().bpf_map_delete_elem(fd, ctypes.byref(key))
            return
        try:
            libbpf.map_update(fd, key, value)
        except BpfLoadError as e:  # map full: this process keeps native frames only
            log.warning("pid %d: Python frames not registered: %s", pid, e)

    return write


class PythonStacks:
    """The capture's interpreters and code objects; `write(pid, value or None)` keeps `py_procs`."""

    def __init__(self, write: Callable[[int, PyProc | None], None], tracker: ProcessTracker | None = None,
                 proc_root: str = "/proc") -> None:
        self.registry = PythonRegistry(write, proc_root)
        self.frames = PythonFrames(proc_root)
        if tracker is not None:
            tracker.on_evict(self.forget)  # held weakly: the families and the probe set keep this alive

    def observe(self, rec: RawRecord) -> None:
        """A record arrived (drain thread). Call before the family's complete(): a new process's first
        record may wait there for its unwind tables, and its records carry no Python frames until it is
        registered. The code objects are read now, while the process lives: a profile is built after
        short-lived ones exit."""
        proc = self.registry.observe(rec.pid, rec.thread_name)
        if rec.py_frames and proc is not None and proc.layout is not None:
            self.frames.read_codes(rec.pid, rec.py_frames, proc.layout)

    def observe_thread(self, pid: int, thread_name: str) -> None:
        """A repeat of a record already observed (its code objects are read): the process's re-check."""
        self.registry.observe(pid, thread_name)

    def observe_pid(self, pid: int) -> None:
        """A known target: registered before its first record."""
        self.registry.observe(pid)

    def forget(self, pid: int) -> None:
        """A process left the process table: what is held of it goes."""
        self.frames.forget(pid)
        self.registry.forget(pid)

    def merge(self, rec: RawRecord, stack: tuple[Location, ...]) -> tuple[Location, ...]:
        """`stack` with the record's Python frames in place of the interpreter's (build thread); as it is
        for a record without them."""
        if not rec.py_frames:
            return stack
        proc = self.registry.processes.get(rec.pid)
        if proc is None or proc.layout is None:
            return stack
        return self.frames.merge(rec.pid, stack, rec.py_frames, proc.layout)

    def comments(self, entries: Iterable[tuple[RawRecord, Sequence[int], Sequence[int]]] = ()) -> list[str]:
        """The profile's comment lines about the interpreters seen (PythonRegistry.comments), and how many
        of `entries`' samples (SampleStore.entries) were taken before their process's interpreter was
        registered: BPF had nothing to read them with, so they keep their native frames only."""
        since = self.registry.reading_since
        early = 0
        for rec, times, _ in entries:
            start = since.get(rec.pid)
            if start is not None and not rec.py_frames:
                early += sum(1 for t in times if t < start)
        lines = self.registry.comments()
        if early:
            lines.append(f"Python frames: {early} samples taken before their process's interpreter was "
                         "registered (at its first record) have native frames only")
        return lines
