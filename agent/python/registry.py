"""Which processes get their CPython frames read in BPF: the `py_procs` map.

At first sight of a pid, its executable and any mapped libpython3* are looked
at (once per file, by (dev, inode)) for `_PyRuntime` and its version:
`Py_Version` (exported by 3.11 and later, also from stripped interpreters:
both are in .dynsym), else the file's name (python3.9, libpython3.10.so.1.0:
3.9 and 3.10 publish their version only as text). A known version gets its
layout (agent/python/layouts.py; 3.13's from the `_Py_DebugOffsets` at the
start of `_PyRuntime`'s initialised bytes) and the runtime address of
`_PyRuntime.interpreters.head` (symbol + the mapping's load bias: 0 for
Debian's non-PIE /usr/bin/python3.11, the library's base for pyenv's shared
libpython). An unknown version is remembered so the profile's comment and
`doctor` can name it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.bpfload.records import PyProc
from agent.python.layouts import (
    DEBUG_OFFSETS_313_BYTES,
    ENTRY_BOOL,
    ENTRY_OWNER,
    INSTR_LASTI_BYTES,
    LAYOUTS,
    DebugOffsetsError,
    PyLayout,
    from_debug_offsets,
    name_note,
    unsupported_reason,
    version_of,
)
from symbolizer.elf import ElfFile, defined_symbol_value
from symbolizer.errors import BpfprofError
from symbolizer.proc_maps import MapsEntry, open_mapped_file, read_maps

log = logging.getLogger(__name__)

FileId = tuple[int, int]
MAX_NAMES = 16  # thread names per pid that trigger a new look
_MISSING: Any = object()
MAX_FILES = 4096  # files examined kept (dev, inode); past it they are forgotten (a build makes new ones)


@dataclass(frozen=True)
class PyBinary:
    """What one file says about the interpreter in it: None fields when it holds none."""

    runtime_vaddr: int  # ELF vaddr of _PyRuntime
    version: tuple[int, int] | None
    layout: PyLayout | None = None  # None: the version has none
    reason: str | None = None  # why there is no layout (unsupported_reason, or what this build lacks)


@dataclass(frozen=True)
class PyProcess:
    """An interpreter found in a process."""

    path: str
    version: tuple[int, int] | None
    runtime_addr: int  # runtime address of _PyRuntime
    layout: PyLayout | None
    reason: str | None = None  # PyBinary.reason

    def proc_value(self) -> PyProc | None:
        """The `py_procs` value, None for a version without a layout."""
        lay = self.layout
        if lay is None:
            return None
        v = PyProc()
        v.interpreters_head = self.runtime_addr + lay.runtime_interpreters_head
        for name in ("interp_threads_head", "tstate_next", "tstate_thread_id", "tstate_frame",
                     "cframe_current_frame", "frame_code", "frame_previous", "frame_instr", "frame_entry",
                     "code_adaptive", "entry_kind", "instr_kind", "owner_cstack", "cframe_previous"):
            setattr(v, name, getattr(lay, name))
        # what the BPF walk's loop reads in place of branching on the version (bpf/bpfprof.h)
        v.shim_owner = lay.owner_cstack if lay.entry_kind == ENTRY_OWNER else 0xFF
        v.entry_keep = 0xFF if lay.entry_kind == ENTRY_BOOL else 0
        v.lasti_shift = 1 if lay.instr_kind == INSTR_LASTI_BYTES else 0
        return v


def data_symbol(elf: ElfFile, name: str) -> int | None:
    """st_value of the defined STT_OBJECT symbol `name`, from .dynsym then .symtab."""
    return defined_symbol_value(elf, name, "STT_OBJECT")


NAME_VERSION = re.compile(r"python(\d)\.(\d+)")  # python3.10, libpython3.9.so.1.0


def version_from_name(path: str) -> tuple[int, int] | None:
    """(3, 10) for .../python3.10 or libpython3.10.so.1.0; None for a name without a version."""
    m = NAME_VERSION.search(os.path.basename(path))
    return (int(m[1]), int(m[2])) if m else None


def examine_file(path: str, name: str | None = None) -> PyBinary | None:
    """The interpreter facts of the ELF file at `path`, None if it has no _PyRuntime (or cannot be read).
    `name`: the file's name in its process (3.9 and 3.10 tell their version only there), if `path` is
    another way to it (/proc/PID/map_files/...)."""
    try:
        with ElfFile(path) as elf, open(path, "rb") as f:
            runtime = data_symbol(elf, "_PyRuntime")
            if runtime is None:
                return None
            version = None
            pv = data_symbol(elf, "Py_Version")
            if pv is not None:
                raw = os.pread(f.fileno(), 4, elf.offset_for_vaddr(pv))
                if len(raw) == 4:
                    version = version_of(int.from_bytes(raw, "little"))
            else:
                version = version_from_name(name or path)
            layout = LAYOUTS.get(version) if version else None
            reason = unsupported_reason(version)
            if version == (3, 13):
                raw = os.pread(f.fileno(), DEBUG_OFFSETS_313_BYTES, elf.offset_for_vaddr(runtime))
                try:
                    layout = from_debug_offsets(raw)
                except DebugOffsetsError as e:  # a free-threaded build: other layouts than the table's
                    layout = None
                    reason = f"CPython 3.13 ({e}): Python frames not supported; native frames kept"
            return PyBinary(runtime, version, layout, reason)
    except (BpfprofError, OSError) as e:
        log.info("%s: not examined for CPython: %s", path, e)
        return None


def _candidates(maps: list[MapsEntry], exe: str) -> list[MapsEntry]:
    """File mappings that may hold the interpreter: the executable, then libpython3*."""
    seen: dict[str, MapsEntry] = {}
    for m in maps:
        if not m.path.startswith("/") or m.path in seen:
            continue
        if m.path == exe or os.path.basename(m.path).startswith("libpython3"):
            seen[m.path] = m  # the first (lowest) mapping of the file
    return sorted(seen.values(), key=lambda m: m.path != exe)


class PythonRegistry:
    """Keeps `py_procs` in step with the processes seen: `write(pid, value or None)`."""

    def __init__(self, write: Callable[[int, PyProc | None], None], proc_root: str = "/proc") -> None:
        self._write = write
        self._proc_root = proc_root
        self._by_file: dict[FileId, PyBinary | None] = {}
        self._vaddrs: dict[tuple[FileId, int], int | None] = {}  # (file, mapped offset) -> its vaddr
        self.processes: dict[int, PyProcess | None] = {}
        # CLOCK_MONOTONIC ns at which BPF was given the pid's interpreter: its samples from before have
        # no Python frames (a process is registered at its first record, ~a drain period after it starts)
        self.reading_since: dict[int, int] = {}
        self._names: dict[int, set[str]] = {}  # thread names the pid's records have shown
        # observe/forget run on the drain thread, comments on the build thread: a set comprehension over
        # the live dict raised "dictionary changed size during iteration" and lost a whole interval.
        self._lock = threading.Lock()

    def observe(self, pid: int, thread_name: str = "") -> PyProcess | None:
        """Called for each record's pid; the work is done once per pid, and again at a thread name the pid
        has not shown before (an exec renames the process: `record -- COMMAND` is the gate until it execs
        the interpreter). CPython before 3.14 does not name its threads; a process that names many is
        looked at MAX_NAMES times at most."""
        names = self._names.setdefault(pid, set())
        if pid in self.processes and (thread_name in names or len(names) >= MAX_NAMES):
            return self.processes[pid]
        names.add(thread_name)
        known = self.processes.get(pid)
        found = self._find(pid)
        with self._lock:
            self.processes[pid] = found
        if found is None and known is not None:
            self._write(pid, None)  # exec'd into something else (BPF deletes it at exec too)
            self.reading_since.pop(pid, None)
        if found is not None:
            value = found.proc_value()
            if value is not None:
                self._write(pid, value)
                self.reading_since[pid] = time.monotonic_ns()
                log.info("pid %d: CPython %s frames read in BPF (%s)", pid, found.version, found.path)
            else:
                log.info("pid %d: %s", pid, found.reason)
        return found

    def forget(self, pid: int) -> None:
        """A pid that exec'd or exited: looked at again at its next record."""
        with self._lock:
            self.processes.pop(pid, None)
            self.reading_since.pop(pid, None)
        self._names.pop(pid, None)

    def comments(self) -> list[str]:
        """The profile's comment lines: one per interpreter version seen without a layout, and one per
        supported version whose functions are named by co_name."""
        with self._lock:
            seen = list(self.processes.values())
        out = {p.reason if p.layout is None else name_note(p.version) for p in seen if p is not None}
        return sorted(r for r in out if r)

    def _find(self, pid: int) -> PyProcess | None:
        root = f"{self._proc_root}/{pid}"
        try:
            exe = os.readlink(f"{root}/exe").removesuffix(" (deleted)")
            maps = read_maps(pid, self._proc_root)
        except (OSError, BpfprofError):
            return None
        for m in _candidates(maps, exe):
            # The mapped inode itself (map_files), or its path resolved inside the process's root: never
            # a symlink in a container followed out to a host file.
            path = open_mapped_file(pid, m, self._proc_root)
            if path is None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident not in self._by_file:
                if len(self._by_file) >= MAX_FILES:
                    self._by_file.clear()
                    self._vaddrs.clear()
                self._by_file[ident] = examine_file(path, m.path)
            binary = self._by_file[ident]
            if binary is None:
                continue
            vaddr = self._vaddrs.get((ident, m.offset), _MISSING)
            if vaddr is _MISSING:  # once per file and offset: the processes of one binary map it alike
                try:
                    with ElfFile(path) as elf:
                        vaddr = elf.vaddr_for_offset(m.offset)
                except (BpfprofError, OSError):
                    continue
                self._vaddrs[(ident, m.offset)] = vaddr
            if vaddr is None:
                continue
            bias = m.start - vaddr
            return PyProcess(m.path, binary.version, binary.runtime_vaddr + bias, binary.layout, binary.reason)
        return None
