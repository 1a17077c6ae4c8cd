"""A recording session: sample, remember processes, then build the Profile.

The loop drains the ring buffer every `drain_interval_s`; a pid seen for the
first time is snapshotted right then (ProcessTracker), so its stacks resolve
even if it exits seconds later. Symbolization runs once at the end over the
distinct addresses, which is cheaper than per sample and keeps the drain
loop short.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.cpu_sampler import CpuSampler, RawSample
from agent.process_tracker import ProcessTracker
from agent.records import DROP_DESCRIPTIONS, Drop
from agent.stack_resolver import StackResolver
from agent.targets import GatedCommand
from exporters.profile import ProcessMeta, Profile, SampleKey, cpu_profile
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


@dataclass
class CaptureStats:
    """Progress of a capture, for the live line and the final report."""

    elapsed_s: float = 0.0
    samples: int = 0
    processes: int = 0
    drops: dict[Drop, int] = field(default_factory=dict)
    command_exit: int | None = None
    first_sample_s: float | None = None  # since this process started: the start-up cost users wait for

    def drop_lines(self) -> list[str]:
        return [f"{n} {DROP_DESCRIPTIONS[d]}" for d, n in self.drops.items() if n]


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
        self.tracker = tracker or ProcessTracker()
        self.samples: list[RawSample] = []
        self.stats = CaptureStats()
        self._start_ns = 0
        self._end_ns = 0

    def _on_sample(self, s: RawSample) -> None:
        if not self.samples:
            self.stats.first_sample_s = process_age_s()
        self.samples.append(s)
        if s.pid not in self.tracker:
            self.tracker.observe(s.pid)

    def run(self, stop: threading.Event, progress: Callable[[CaptureStats], None] | None = None,
            on_start: Callable[[], None] | None = None) -> CaptureStats:
        """Record; returns the final stats. BpfprofError if set-up fails.

        `on_start` is called once the perf events are attached and sampling.
        """
        opts = self.options
        pids: Sequence[int] | None = opts.pids
        command = None
        follow = False
        if opts.command:
            pids, follow = (), True
        sampler = CpuSampler(opts.frequency_hz, pids=pids, follow_children=follow, with_kernel=opts.with_kernel,
                             drain_interval_s=DRAIN_INTERVAL_S)
        try:
            if opts.command:
                command = GatedCommand(opts.command)
                sampler.add_target(command.pid)
            sampler.start(self._on_sample)
            self._start_ns = time.time_ns()
            start = time.monotonic()
            if on_start is not None:
                on_start()
            if command is not None:
                command.release()
            while not stop.is_set():
                sampler.poll(int(DRAIN_INTERVAL_S * 1000))
                self.stats.elapsed_s = time.monotonic() - start
                self.stats.samples = len(self.samples)
                self.stats.processes = self.tracker.stats.processes
                if progress is not None:
                    progress(self.stats)
                if opts.duration_s is not None and self.stats.elapsed_s >= opts.duration_s:
                    break
                if command is not None and command.process.poll() is not None:
                    break
            sampler.drain()
            self._end_ns = time.time_ns()
            self.stats.drops = sampler.drops()
        finally:
            sampler.close()
            if command is not None:
                if command.process.poll() is None and stop.is_set():
                    command.process.terminate()
                try:
                    self.stats.command_exit = command.process.wait(timeout=5)
                except Exception:  # noqa: BLE001  (a command that ignores SIGTERM is left running, not waited on forever)
                    log.warning("command %d still running after the capture", command.pid)
        self.stats.samples = len(self.samples)
        self.stats.processes = self.tracker.stats.processes
        return self.stats

    def build_profile(self, kernel: KernelSymbols | None = None) -> Profile:
        """Symbolize every sample into a CPU Profile (pprof's cpu sample types)."""
        opts = self.options
        if kernel is None and opts.with_kernel and any(s.kernel_ips for s in self.samples):
            kernel = KernelSymbols()
        resolver = StackResolver(self.tracker, kernel)
        profile = cpu_profile(self._start_ns, max(0, self._end_ns - self._start_ns), opts.frequency_hz)
        period = profile.period
        offset = _wall_offset_ns()
        for s in self.samples:
            stack = resolver.stack(s.pid, s.kernel_ips if opts.with_kernel else (), s.user_ips)
            info = self.tracker.get(s.pid)
            key = SampleKey(stack=stack, pid=s.pid, tid=s.tid, thread_name=s.thread_name,
                            labels=(("process_name", info.name),) if info else ())
            profile.add(key, [s.value, s.value * period], s.ktime_ns + offset)
        for info in self.tracker.processes():
            profile.processes[info.pid] = ProcessMeta(
                pid=info.pid, name=info.name, executable_path=info.exe, container_id=info.container.container_id,
                service_name=info.service_name or info.exe.rsplit("/", 1)[-1] or info.name)
        for line in self.stats.drop_lines():
            profile.comments.append(f"dropped: {line}")
        st = resolver.stats
        if st.user_unresolved:
            log.info("%d of %d user addresses unresolved", st.user_unresolved, st.user_addresses)
        return profile
