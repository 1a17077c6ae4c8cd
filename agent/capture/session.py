"""A recording session: record, remember processes, then build the Profiles.

The loop drains the ring buffer every `DRAIN_INTERVAL_S`; a pid seen for the
first time is snapshotted right then (ProcessTracker), so its stacks resolve
even if it exits seconds later. Symbolization runs once at the end over the
distinct addresses, which is cheaper than per record and keeps the drain
loop short.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.bpfload.records import DROP_DESCRIPTIONS, Drop, RawRecord
from agent.probes.cpu import CpuProbe
from agent.probes.family import Probe, ProbeConfig, Window
from agent.probes.probe_set import ProbeSet
from agent.probes.profile_builder import add_process_meta
from agent.probes.registry import PROBES
from agent.processes.stack_resolver import DEFAULT_UNWIND, DEFAULT_USTACK_BYTES, StackResolver, UnwindMode
from agent.processes.targets import GatedCommand
from agent.processes.tracker import ProcessTracker
from exporters.profile import Profile
from symbolizer.errors import ConfigError
from symbolizer.kallsyms import KernelSymbols

log = logging.getLogger(__name__)

DRAIN_INTERVAL_S = 0.1


@dataclass(frozen=True)
class RecordOptions:
    """What to record. `pids` None and `command` None: the whole system."""

    frequency_hz: int = 99
    duration_s: float | None = None
    pids: tuple[int, ...] | None = None
    command: tuple[str, ...] | None = None
    with_kernel: bool = True
    profiles: tuple[str, ...] = ("cpu",)
    offcpu_min_ns: int = 0
    heap_sample_bytes: int = 512 * 1024
    unwind: UnwindMode = DEFAULT_UNWIND  # CPU samples: CFI walk of a stack copy, or frame pointers
    ustack_bytes: int = DEFAULT_USTACK_BYTES  # stack copied per CPU sample for the CFI walk


@dataclass
class CaptureStats:
    """Progress of a capture, for the live line and the final report."""

    elapsed_s: float = 0.0
    samples: int = 0
    processes: int = 0
    drops: dict[Drop, int] = field(default_factory=dict)
    command_exit: int | None = None
    first_sample_s: float | None = None  # since this process started: the start-up cost users wait for
    unwind_lines: list[str] = field(default_factory=list)  # user stacks the unwinder left short, by reason

    def drop_lines(self) -> list[str]:
        return [f"{n} {DROP_DESCRIPTIONS[d]}" for d, n in self.drops.items() if n] + self.unwind_lines


def process_age_s() -> float:
    """Seconds since this process started, from /proc/self/stat and CLOCK_BOOTTIME.

    Not psutil's create_time: it is built on /proc/stat's whole-second boot
    time and can be off by most of a second.
    """
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def _wall_offset_ns() -> int:
    """Add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get Unix time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class RecordSession:
    """One capture. run() blocks until the duration ends, the command exits or `stop` is set."""

    def __init__(self, options: RecordOptions, tracker: ProcessTracker | None = None) -> None:
        self.options = options
        self.tracker = tracker if tracker is not None else ProcessTracker()
        config = ProbeConfig(frequency_hz=options.frequency_hz, with_kernel=options.with_kernel,
                             offcpu_min_ns=options.offcpu_min_ns, pids=options.pids,
                             heap_sample_bytes=options.heap_sample_bytes, own_command=bool(options.command))
        unknown = [p for p in options.profiles if p not in PROBES]
        if unknown:
            raise ConfigError(f"unknown profile type {unknown[0]!r}: choose from {', '.join(PROBES)}")
        self.probes: list[Probe] = [PROBES[name](config) for name in PROBES if name in options.profiles]
        for p in self.probes:
            p.use_tracker(self.tracker, options.unwind, options.ustack_bytes)
        self.stats = CaptureStats()
        self._records = 0
        self._start_ns = 0
        self._end_ns = 0
        self._has_kernel_stacks = False

    def _on_record(self, r: RawRecord) -> None:
        if not self._records:
            self.stats.first_sample_s = process_age_s()
        self._records += 1
        if r.kernel_ips:
            self._has_kernel_stacks = True
        self.tracker.note_record(r.pid, r.tid, r.thread_name)

    def run(self, stop: threading.Event, progress: Callable[[CaptureStats], None] | None = None,
            on_start: Callable[[], None] | None = None) -> CaptureStats:
        """Record; returns the final stats. BpfprofError if set-up fails.

        `on_start` is called once the probes are attached and recording.
        """
        opts = self.options
        pids: Sequence[int] | None = opts.pids
        command = None
        follow = False
        if opts.command:
            pids, follow = (), True
        probe_set = ProbeSet(self.probes, pids=pids, follow_children=follow, with_kernel=opts.with_kernel,
                             drain_interval_s=DRAIN_INTERVAL_S)
        try:
            if opts.command:
                env = {k: v for p in self.probes for k, v in p.command_env().items()}
                command = GatedCommand(opts.command, env)
                probe_set.add_target(command.pid)
            probe_set.start(self._on_record)
            self._start_ns = time.time_ns()
            start = time.monotonic()
            if on_start is not None:
                on_start()
            if command is not None:
                command.release()
            while not stop.is_set():
                probe_set.poll(int(DRAIN_INTERVAL_S * 1000))
                for p in self.probes:
                    p.tick()
                self.stats.elapsed_s = time.monotonic() - start
                self.stats.samples = self._records
                self.stats.processes = self.tracker.stats.processes
                if progress is not None:
                    progress(self.stats)
                if opts.duration_s is not None and self.stats.elapsed_s >= opts.duration_s:
                    break
                if command is not None and command.process.poll() is not None:
                    break
            probe_set.drain()
            self._end_ns = time.time_ns()
            self.stats.drops = probe_set.drops()
            self.stats.unwind_lines = [line for p in self.probes if isinstance(p, CpuProbe) for line in p.unwind_lines()]
        finally:
            probe_set.close()
            if command is not None:
                if command.process.poll() is None and stop.is_set():
                    command.process.terminate()
                try:
                    self.stats.command_exit = command.process.wait(timeout=5)
                except subprocess.TimeoutExpired:  # a command that ignores SIGTERM is left running
                    log.warning("command %d still running after the capture", command.pid)
        self.stats.samples = self._records
        self.stats.processes = self.tracker.stats.processes
        return self.stats

    def build_profiles(self, kernel: KernelSymbols | None = None) -> list[Profile]:
        """Symbolize every record into one Profile per profile type, in PROBES order."""
        if kernel is None and self.options.with_kernel and self._has_kernel_stacks:
            kernel = KernelSymbols()
        resolver = StackResolver(self.tracker, kernel)
        window = Window(self._start_ns, self._end_ns, _wall_offset_ns())
        out = []
        for probe in self.probes:
            for profile in probe.profiles(resolver, self.tracker, window):
                add_process_meta(profile, self.tracker)
                # the CPU profile carries its own unwind lines (CpuProbe.profiles)
                profile.comments.extend(f"dropped: {n} {DROP_DESCRIPTIONS[d]}" for d, n in self.stats.drops.items() if n)
                out.append(profile)
        st = resolver.stats
        if st.user_unresolved:
            log.info("%d of %d user addresses unresolved", st.user_unresolved, st.user_addresses)
        return out

    def build_profile(self, kernel: KernelSymbols | None = None) -> Profile:
        """The first profile (the CPU one when it was recorded)."""
        return self.build_profiles(kernel)[0]
