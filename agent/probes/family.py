"""What a probe family is: its BPF source, its programs, how it attaches,
and how its records become profiles.

Every family selected for a capture is compiled in one clang run
(agent/probes/probe_set.py) and shares one ring buffer; records are routed to the
probe that owns their kind. Add a family: a bpf/<name>.bpf.c, a Probe
subclass in agent/probes/<name>.py, one line in PROBES (agent/probes/registry.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

from agent.bpfload import libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import RawRecord, RecordKind, Scratch, Ustack
from agent.processes.stack_resolver import DEFAULT_UNWIND, DEFAULT_USTACK_BYTES, StackResolver, UnwindMode, UserStacks
from agent.processes.tracker import ProcessTracker
from exporters.profile import Profile


@dataclass(frozen=True)
class ProbeConfig:
    """What every probe may need to know about the capture."""

    frequency_hz: int = 99
    with_kernel: bool = True
    offcpu_min_ns: int = 0  # off-CPU: shorter blocks are not recorded
    heap_sample_bytes: int = 512 * 1024  # heap: mean bytes between sampled allocations
    pids: tuple[int, ...] | None = None  # uprobe-based probes attach per process when known
    # The targets are a command bpfprof started (`record -- COMMAND`) and its children: bpfprof may
    # pause them at exit to read what the exit would take (the Go heap profile).
    own_command: bool = False


@dataclass(frozen=True)
class Window:
    """The capture's time window, wall clock, and the monotonic->wall offset."""

    start_ns: int
    end_ns: int
    wall_offset_ns: int  # add to a record's ktime_ns to get Unix time


class Probe:
    """Base of a probe family. Subclasses set the class attributes and override the hooks."""

    name: str = ""  # the --profile name: "cpu", "offcpu", ...
    source: str = ""  # bpf/<source>
    extra_sources: tuple[str, ...] = ()  # more bpf/ files it needs, compiled once however many families name them
    kinds: tuple[RecordKind, ...] = ()
    events_per_cpu_s: int = 0  # expected record rate, for ring-buffer sizing

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config

    def use_tracker(self, tracker: ProcessTracker, unwind: UnwindMode = DEFAULT_UNWIND,
                    ustack_bytes: int = DEFAULT_USTACK_BYTES) -> None:
        """Families whose records carry a user stack copy (cpu, lock) unwind it with
        `unwind` against `tracker`'s snapshots as records arrive. Call before the
        probe set is built (the copy size is compiled in)."""

    def command_env(self) -> dict[str, str]:
        """Variables a command bpfprof starts (`record -- COMMAND`) needs for this family (heap: its sampler)."""
        return {}

    def defines(self) -> dict[str, int]:
        """Extra -D switches of this family's source (USTACK_BYTES: the set takes the largest)."""
        return {}

    def programs(self) -> dict[str, ProgType]:
        """BPF functions to load, by name."""
        return {}

    def maps(self) -> list[str]:
        """Family-specific maps the agent needs fds of (shared maps are always there)."""
        return []

    def attach(self, objs: LoadedObjects) -> list[int]:
        """Attach the loaded programs; return perf event fds the probe set closes."""
        return []

    def target_pids(self, objs: LoadedObjects) -> list[int]:
        """The processes this capture targets, for probes attached per process (uprobes): the configured
        pids, else the BPF target set (a `-- COMMAND`); [] when the whole system is recorded."""
        return list(self.config.pids or ()) or libbpf.map_keys_u32(objs.maps["targets"])

    def on_start(self, objs: LoadedObjects) -> None:
        """Called after attach, before the capture's first poll."""

    def on_record(self, rec: RawRecord) -> None:
        """Take one record of one of `kinds`."""

    def tick(self) -> None:
        """Called after every poll of the ring buffer, in the polling thread: for work on a clock
        rather than on records (heap: re-reading Go processes' profile buckets)."""

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        """The profiles of what was recorded (one per profile type this family makes)."""
        return []

    def record_count(self) -> int:
        """Records taken so far, for the progress line."""
        return 0

    def new_accumulator(self) -> Probe:
        """A fresh instance to take one interval's records (the daemon swaps these).

        It shares what the loaded programs set up in this instance: override
        when on_start()/use_*()/attach() state is needed to take records.
        """
        return type(self)(self.config)

    def carry_into(self, nxt: Probe, alive: Callable[[int], bool]) -> None:
        """Hand the state that outlives an interval to the accumulator of the next one.

        The daemon calls it at each cut, in the polling thread, on the
        accumulator that just ended (and on this template for the first one).
        After it, `self` is read only by the builder thread and `nxt` only by
        the polling thread, so copy what either side mutates. `alive(pid)`
        says whether a process still runs: state of dead ones is not carried.
        Families whose profiles are per interval (cpu, offcpu, lock) carry nothing;
        heap carries its live objects, goroutine its live goroutines.
        """

    def detach(self) -> None:
        """Detach what this family attached after start (uprobes in exec'd targets); the probe set calls it."""

    def bpf_losses(self, objs: LoadedObjects) -> dict[str, int]:
        """What this family's BPF side lost so far (a full map), by reason, read from its maps in `objs`.

        Cumulative: the daemon reports the growth per interval as lost samples.
        """
        return {}


class StackCopyProbe(Probe):
    """A family whose records carry the user registers and a stack copy
    (bpf/ustack.bpf.h submit_with_ustack), unwound by CFI as they arrive:
    complete() them in on_record(). Its source copies when it is compiled
    with USTACK_BYTES > 0 and its own switch (ustack_defines())."""

    ustack_bytes: int = 0
    user_stacks: UserStacks | None = None

    def use_tracker(self, tracker: ProcessTracker, unwind: UnwindMode = DEFAULT_UNWIND,
                    ustack_bytes: int = DEFAULT_USTACK_BYTES) -> None:
        if UnwindMode(unwind) == UnwindMode.CFI:
            self.ustack_bytes = (ustack_bytes + 7) & ~7
            self.user_stacks = UserStacks(tracker)

    def ustack_defines(self, switch: str) -> dict[str, int]:
        """USTACK_BYTES and the family's own on/off switch of the copy."""
        return {"USTACK_BYTES": self.ustack_bytes, switch: int(self.ustack_bytes > 0)}

    @property
    def record_bytes(self) -> int:
        """The largest record this probe sends, for ring-buffer sizing."""
        return ctypes.sizeof(Scratch) + (ctypes.sizeof(Ustack) + self.ustack_bytes if self.ustack_bytes else 0)

    def complete(self, rec: RawRecord) -> RawRecord:
        """`rec` with its user stack unwound from the copy (as it is without one)."""
        return self.user_stacks.complete(rec) if self.user_stacks is not None else rec

    def share_unwinder(self, acc: StackCopyProbe) -> None:
        """Give a daemon accumulator this instance's unwinder."""
        acc.ustack_bytes, acc.user_stacks = self.ustack_bytes, self.user_stacks
