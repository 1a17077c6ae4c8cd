"""A probe family and its accumulator: what is attached, and what one interval's records become.

A family (cpu, offcpu, heap, lock, goroutine) owns what lives as long as the
programs: its BPF source and defines, what it attaches (perf events,
tracepoints, per-process uprobes), its loss counters and the state every
interval shares (the unwinder, the binaries it has read). It lives from
attach to close.

An accumulator takes one interval's records and turns them into profiles.
It reads what it needs of its family through `self.family`, so nothing is
copied by hand between them; what outlives an interval (live heap objects,
live goroutines) it hands to the next accumulator in carry_into().

Every family selected for a capture is compiled in one clang run
(agent/probes/probe_set.py) and shares one ring buffer; the capture pipeline
(agent/capture/pipeline.py) routes each record to the families of its kind.
Add a family: a bpf/<name>.bpf.c, a ProbeFamily and an Accumulator subclass
in agent/probes/<name>.py, one line in PROBES (agent/probes/registry.py).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from agent.bpfload import btf, libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import Loss, RawRecord, RecordKind, Scratch, Ustack
from agent.probes.python_stacks import PythonStacks
from agent.processes.stack_resolver import (
    DEFAULT_UNWIND,
    DEFAULT_USTACK_BYTES,
    MAX_USTACK_BYTES,
    StackResolver,
    UnwindMode,
    UserStacks,
)
from agent.processes.tracker import ProcessTracker
from agent.unwind.tables import DEFAULT_TABLE_BYTES, UnwindTables
from exporters.profile import Profile

log = logging.getLogger(__name__)


def fsbase_offset() -> int:
    """offsetof(task_struct, thread.fsbase) on this kernel, -1 when BTF cannot say."""
    try:
        return btf.task_fsbase_offset()
    except btf.BtfError as e:
        log.warning("no FS base offset from BTF (%s): no Python frames, Go labels only in user-mode samples, "
                    "no OpenTelemetry thread contexts", e)
        return -1


@dataclass(frozen=True)
class ProbeConfig:
    """What every family may need to know about the capture; `record` and the daemon both fill it."""

    frequency_hz: int = 99
    with_kernel: bool = True
    offcpu_min_ns: int = 0  # off-CPU: shorter blocks are not recorded
    heap_sample_bytes: int = 512 * 1024  # heap: mean bytes between sampled allocations
    pids: tuple[int, ...] | None = None  # uprobe-based families attach per process when known
    # The targets are a command bpfprof started (`record -- COMMAND`) and its children: bpfprof may
    # pause them at exit to read what the exit would take (the Go heap profile).
    own_command: bool = False
    unwind: UnwindMode = DEFAULT_UNWIND  # user stacks: CFI walk in BPF, of a stack copy, or frame pointers
    ustack_bytes: int = DEFAULT_USTACK_BYTES  # stack copied per sample for the agent's CFI walk
    unwind_table_bytes: int = DEFAULT_TABLE_BYTES  # kernel memory for the BPF walker's unwind rows

    def __post_init__(self) -> None:
        if not 0 < self.ustack_bytes <= MAX_USTACK_BYTES:
            raise ValueError(f"stack copy of {self.ustack_bytes} bytes: choose 1 to {MAX_USTACK_BYTES}")


@dataclass(frozen=True)
class Window:
    """An interval's time window, wall clock, and the monotonic->wall offset."""

    start_ns: int
    end_ns: int
    wall_offset_ns: int  # add to a record's ktime_ns to get Unix time

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


class SettingChanges:
    """A setting changed while the probes run (the overhead governor, a reload) and when: records are read
    with the value in effect when they were taken (CLOCK_MONOTONIC ns, as their ktime_ns)."""

    MAX_CHANGES = 4096  # far more than the records of an interval can span

    def __init__(self, initial: int) -> None:
        self.initial = initial
        self.now = initial
        self.changes: list[tuple[int, int]] = []  # (monotonic ns, value) in time order

    def set(self, value: int) -> bool:
        """Record a change to `value` now; False if it is the value already in effect."""
        if value == self.now:
            return False
        self.changes.append((time.clock_gettime_ns(time.CLOCK_MONOTONIC), value))
        del self.changes[:-self.MAX_CHANGES]
        self.now = value
        return True

    def at(self, ktime_ns: int) -> int:
        """The value in effect at `ktime_ns`."""
        i = bisect.bisect_right(self.changes, (ktime_ns, math.inf))
        return self.changes[i - 1][1] if i else self.initial

    def inside(self, window: Window) -> list[tuple[int, int]]:
        """The changes made within `window` (monotonic ns, value)."""
        start, end = window.start_ns - window.wall_offset_ns, window.end_ns - window.wall_offset_ns
        return [(t, v) for t, v in self.changes if start < t <= end]

    @staticmethod
    def describe(changes: list[tuple[int, int]], window: Window, unit: str) -> str:
        """`512 KiB from 1765040000.123, ...` for a profile's comment (Unix seconds)."""
        return ", ".join(f"{v}{unit} from {(t + window.wall_offset_ns) / 1e9:.3f}" for t, v in changes)


@dataclass(frozen=True, eq=False)  # counted per batch by identity (CapturePipeline._count_repeats)
class Repeat:
    """Where a sample went in its accumulator, so that its repeats in the interval go there by their bytes
    alone: CapturePipeline.deliver_bufs keys it by records.repeat_key, checks `image` (the process snapshot
    it was delivered under) is still the process's, and appends each repeat's time and value to `events`
    (its SampleStore entry's). Once per batch of records, `after(self, n)` does for its n repeats what the
    accumulator does per record besides."""

    after: Callable[[Repeat, int], None]
    events: array
    pid: int
    thread_name: str
    image: object
    family: str  # its family's name (the governor shares the agent's CPU out by records per family)
    no_copy: bool = False  # counted as a stack from frame pointers only (UserStacks.complete)


class Accumulator:
    """One interval's records of one family. Built by ProbeFamily.new_accumulator().

    Threads (the daemon): on_record(), tick() and carry_into() run in the
    polling thread; once carry_into() has run, profiles() runs in the
    builder thread and nothing else touches this accumulator.
    """

    def __init__(self, family: ProbeFamily) -> None:
        self.family = family

    def on_record(self, rec: RawRecord) -> Repeat | None:
        """Take one record of one of the family's kinds. Returns how to add a repeat of it without parsing
        one (a record equal but for its time and value, records.repeat_key), or None if it cannot be."""
        return None

    def tick(self) -> None:
        """Called after every poll of the ring buffer: for work on a clock (heap: re-reading Go buckets)."""

    def record_count(self) -> int:
        """Records taken so far, for the progress line."""
        return 0

    def carry_into(self, nxt: Accumulator, alive: Callable[[int], bool]) -> None:
        """End this interval and hand what outlives it to `nxt`, the next interval's accumulator.

        `alive(pid)` says whether a process still runs: state of dead ones is
        not carried. Copy what either side mutates afterwards. Families whose
        profiles are per interval (cpu, offcpu, lock) carry nothing.
        """

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        """The profiles of this interval (one per profile type the family makes); called only after
        carry_into() ended the interval (the pipeline cuts before it builds)."""
        return []


class ProbeFamily:
    """Base of a probe family. Subclasses set the class attributes and override the hooks."""

    name: str = ""  # the --profile name: "cpu", "offcpu", ...
    source: str = ""  # bpf/<source>
    extra_sources: tuple[str, ...] = ()  # other bpf/ program files it needs (each compiled once per set)
    kinds: tuple[RecordKind, ...] = ()
    events_per_cpu_s: int = 0  # expected record rate, for ring-buffer sizing
    accumulator: type[Accumulator] = Accumulator
    # Families whose records carry the user registers and a stack copy (bpf/ustack.bpf.h
    # submit_with_ustack) name their source's on/off switch of the copy; None: no copy.
    ustack_switch: str | None = None
    # Families whose user stacks the BPF walker can unwind (bpf/unwind.bpf.h) name their source's switch
    # and the program type of their sampling programs (the walker is tail-called within it).
    bpf_unwind_switch: str | None = None
    bpf_unwind_prog: ProgType | None = None
    bpf_unwind_family: int = 0  # UNWIND_FAMILY_*: the index of its walk counters
    # Families whose records carry the thread's CPython frames (bpf/python.bpf.h py_read_frames): the probe
    # set gives each the capture's one PythonStacks (`python`), whose frames their profiles merge.
    reads_python: bool = False
    # What loss_totals() counts: reason (a metric label) -> description (reads after a count).
    LOSSES: ClassVar[dict[str, str]] = {}

    def __init__(self, config: ProbeConfig, tracker: ProcessTracker) -> None:
        self.config = config
        self.tracker = tracker
        self.objs: LoadedObjects | None = None  # set by attach()
        mode = UnwindMode(config.unwind)
        # Walked in BPF where the family can, with a stack copy (or frame pointers) where it has no table yet.
        self.walks_in_bpf = mode == UnwindMode.CFI and self.bpf_unwind_switch is not None
        cfi = self.ustack_switch is not None and mode in (UnwindMode.CFI, UnwindMode.COPY)
        # The copy size is compiled in; records are unwound against the tracker's snapshots as they arrive.
        self.ustack_bytes = ((config.ustack_bytes + 7) & ~7) if cfi else 0
        self.user_stacks: UserStacks | None = UserStacks(tracker) if cfi else None
        self.unwind_tables: UnwindTables | None = None  # set by the probe set when walks_in_bpf
        self.python: PythonStacks | None = None  # set by the probe set when reads_python
        # Records drained on a short clock, so that a process is snapshotted soon after its first sample,
        # before it can exit. Not needed where BPF walks every stack: a process it has no table for
        # (new, or after an exec) sends its samples with an immediate wake-up (unwind_walk.bpf.c).
        self.needs_drain_clock = not self.walks_in_bpf

    # -- what is compiled --------------------------------------------------------

    def command_env(self) -> dict[str, str]:
        """Variables a command bpfprof starts (`record -- COMMAND`) needs for this family (heap: its sampler)."""
        return {}

    def defines(self) -> dict[str, int]:
        """-D switches of this family's source (USTACK_BYTES: the set takes the largest)."""
        own = {}
        if self.ustack_switch is not None:
            own = {"USTACK_BYTES": self.ustack_bytes, self.ustack_switch: int(self.ustack_bytes > 0)}
        if self.bpf_unwind_switch is not None:
            own[self.bpf_unwind_switch] = int(self.walks_in_bpf)
        if self.reads_python:  # a thread's PyThreadState is found by its FS base
            own["TASK_FSBASE_OFFSET"] = fsbase_offset()
        return own

    def programs(self) -> dict[str, ProgType]:
        """BPF functions to load, by name."""
        return {}

    def maps(self) -> list[str]:
        """Family-specific maps the agent needs fds of (shared maps are always there)."""
        return []

    @property
    def record_bytes(self) -> int:
        """The largest record this family sends, for ring-buffer sizing (0: a stack record)."""
        if not self.ustack_bytes:
            return 0
        return ctypes.sizeof(Scratch) + ctypes.sizeof(Ustack) + self.ustack_bytes

    # -- life cycle --------------------------------------------------------------

    def attach(self, objs: LoadedObjects) -> list[int]:
        """Attach the loaded programs; return perf event fds the probe set closes."""
        self.objs = objs
        if self.unwind_tables is not None and self.user_stacks is not None:
            self.user_stacks.tables = self.unwind_tables
        return []

    def on_start(self, objs: LoadedObjects, first: Accumulator) -> None:
        """After every family attached, before the first poll; `first` takes the first interval's
        records (goroutines already running are seeded into it)."""

    def route(self, rec: RawRecord, acc: Accumulator) -> Repeat | None:
        """Deliver one record: notices about processes (an exec) are the family's, samples the accumulator's
        (what it returns: Accumulator.on_record)."""
        return acc.on_record(rec)

    def is_notice(self, rec: RawRecord) -> bool:
        """Whether `rec` is a notice (an exec, a paused exit) rather than a sample: notices reach the
        family whatever the daemon's selection says, and are not counted as samples."""
        return rec.kind == RecordKind.GO_EXIT

    def target_pids(self) -> list[int]:
        """The processes this capture targets, for families attached per process (uprobes): the configured
        pids, else the BPF target set (a `-- COMMAND`); [] when the whole system is recorded."""
        assert self.objs is not None
        return list(self.config.pids or ()) or libbpf.map_keys_u32(self.objs.maps["targets"])

    def notes(self) -> list[str]:
        """Comments for this family's profiles about the capture so far (uprobes that could not be placed)."""
        return []

    def detach(self) -> None:
        """Detach what this family attached after start (uprobes in exec'd targets); the probe set calls it."""

    def new_accumulator(self) -> Accumulator:
        return self.accumulator(self)

    # -- what was lost -----------------------------------------------------------

    def loss_totals(self) -> dict[str, int]:
        """What this family's BPF side lost so far, by a reason of LOSSES (a full map). Read while the
        programs are loaded; BpfprofError if a counter cannot be read."""
        return {}

    def losses(self) -> list[Loss]:
        """Running totals of what this family lost or cut short: its BPF counters (a warning when they
        grow) and the user stacks its unwinder left short. The pipeline reports the growth per interval."""
        out = [Loss(reason, n, self.LOSSES[reason], warn=True) for reason, n in self.loss_totals().items()]
        if self.unwind_tables is not None:
            out += self.unwind_tables.losses(self.bpf_unwind_family)
        return out + (self.user_stacks.losses() if self.user_stacks is not None else [])

    def complete(self, rec: RawRecord) -> RawRecord:
        """`rec` with its user stack unwound from the copy (as it is without one)."""
        return self.user_stacks.complete(rec) if self.user_stacks is not None else rec


def read_percpu_total(objs: LoadedObjects | None, map_name: str, index: int) -> int:
    """The sum over CPUs of a per-CPU counter, 0 when the programs are not loaded."""
    if objs is None or map_name not in objs.maps:
        return 0
    return sum(libbpf.map_lookup_percpu_u64(objs.maps[map_name], index))
