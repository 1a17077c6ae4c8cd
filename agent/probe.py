"""What a probe family is: its BPF source, its programs, how it attaches,
and how its records become profiles.

Every family selected for a capture is compiled in one clang run
(agent/probe_set.py) and shares one ring buffer; records are routed to the
probe that owns their kind. Add a family: a bpf/<name>.bpf.c, a Probe
subclass in agent/<name>_probe.py, one line in PROBES (agent/probes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.bpf_compile import LoadedObjects, ProgType
from agent.process_tracker import ProcessTracker
from agent.records import RecordKind
from agent.stack_resolver import StackResolver
from exporters.profile import Profile, TraceLink


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One ring-buffer record as BPF wrote it. Addresses are leaf first."""

    kind: int
    pid: int
    tid: int
    cpu: int
    ktime_ns: int  # CLOCK_MONOTONIC
    value: int
    aux: int
    thread_name: str
    kernel_ips: tuple[int, ...]
    user_ips: tuple[int, ...]
    # Trace context read at sample time (bpf/tracectx.bpf.h), when the probe asked for it:
    go_labels: tuple[tuple[str, str], ...] = ()  # the running goroutine's pprof labels, in Go's order
    go_labels_truncated: bool = False  # labels missing or cut: the set above is not the whole set
    otel_link: TraceLink | None = None  # from an OTEP 4947 thread context record
    # CPU samples with a stack copy (bpf/ustack.bpf.h), until the agent unwinds them:
    user_regs: tuple[int, int, int] | None = None  # RIP, RSP, RBP; None: no copy was sent
    user_stack: bytes = b""  # user memory from RSP up
    user_mode: bool = True  # the sample hit user mode (RIP is the interrupted instruction)


@dataclass(frozen=True)
class ProbeConfig:
    """What every probe may need to know about the capture."""

    frequency_hz: int = 99
    with_kernel: bool = True
    offcpu_min_ns: int = 0  # off-CPU: shorter blocks are not recorded
    heap_sample_bytes: int = 512 * 1024  # heap: mean bytes between sampled allocations
    pids: tuple[int, ...] | None = None  # uprobe-based probes attach per process when known


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
    kinds: tuple[RecordKind, ...] = ()
    events_per_cpu_s: int = 0  # expected record rate, for ring-buffer sizing

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config

    def defines(self) -> dict[str, int]:
        """Extra -D switches of this family's source."""
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

    def on_start(self, objs: LoadedObjects) -> None:
        """Called after attach, before the capture's first poll."""

    def on_record(self, rec: RawRecord) -> None:
        """Take one record of one of `kinds`."""

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        """The profiles of what was recorded (one per profile type this family makes)."""
        return []

    def record_count(self) -> int:
        """Records taken so far, for the progress line."""
        return 0

    # Whether the daemon can cut this family's data into intervals under
    # running programs (agent/daemon.py): families whose state spans the whole
    # capture (live heap objects, live goroutines) cannot yet.
    interval_safe: bool = True

    def new_accumulator(self) -> Probe:
        """A fresh instance to take one interval's records (the daemon swaps these).

        It shares what the loaded programs set up in this instance: override
        when on_start()/use_*() state is needed to take records.
        """
        return type(self)(self.config)
