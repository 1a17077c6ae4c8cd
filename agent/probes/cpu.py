"""CPU profile: bpf/cpu.bpf.c on a cpu-clock perf event at N Hz on every CPU.

Samples carry the thread's trace context (Go labels, OTEP 4947 record) for
processes registered in `trace_procs` (agent/tracectx/registry.py); the FS base
offset the BPF side needs comes from the kernel's BTF.

Unwinding (ProbeConfig.unwind): "cfi" has BPF send the user registers and a
copy of the stack top, and the agent walks it with each binary's CFI /
pclntab (agent/processes/stack_resolver.py UserStacks) as records arrive, so
a capture keeps addresses, not stack copies; "fp" keeps the frame-pointer
stack BPF walks.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import math
import random
import time
from array import array

from agent.bpfload import libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import ProcCtx, RawRecord, RecordKind
from agent.errors import BpfLoadError
from agent.probes.family import Accumulator, ProbeConfig, ProbeFamily, Repeat, Window
from agent.probes.profile_builder import add_records
from agent.probes.sample_store import SampleStore
from agent.processes.stack_resolver import NO_COPY, StackResolver
from agent.processes.tracker import ProcessTracker
from agent.tracectx.registry import TraceContextRegistry
from exporters.profile import Profile
from exporters.profile_types import cpu_profile

log = logging.getLogger(__name__)
TRACE_PROCS_MAP = "trace_procs"
# Frequency changes kept (CpuProbe.set_frequency): far more than the records of an interval can span.
MAX_FREQUENCY_CHANGES = 4096
# Sampling periods kept (CpuProbe.periods): one per draw, a few a second, far more than an interval spans.
MAX_PERIODS = 65536
# A fixed sampling period locks step with a workload periodic at a multiple of it: a loop of 2 ms cycles
# read 100 % in one of its phases at 500 Hz (tests/fixtures/c/phase_locked.c), a Go loop of ~0.3 ms
# cycles up to 4 points off at 499 Hz. So the rate is drawn anew, uniformly within +-DITHER of the
# frequency, for a run of DITHER_RUN periods (drawn too); a run starts at a moment the workload does not
# know of, so runs sample independent phases. A narrow band is not enough: at +-10 % over runs of 100
# periods the 2 ms loop still read 26-32 % for 30.
DITHER = 0.5
DITHER_RUN = (20, 60)
# Each draw restarts the events' timers (libbpf.set_cpu_clock_period): the part of the old period that
# had run, half of it on average, goes unsampled; a rate this much higher makes up for it.
_MEAN_PERIOD = math.log((1 + DITHER) / (1 - DITHER)) / (2 * DITHER)  # E[1 / (1 + u)] for u ~ U(-D, D)
DITHER_MAKEUP = 1 + _MEAN_PERIOD / sum(DITHER_RUN)



class CpuAccumulator(Accumulator):
    family: CpuProbe

    def __init__(self, family: CpuProbe) -> None:
        super().__init__(family)
        self.samples = SampleStore()

    def on_record(self, rec: RawRecord) -> Repeat | None:
        family = self.family
        if family.python is not None:
            family.python.observe(rec)  # before complete(): see PythonStacks.observe
        done = family.complete(rec)
        index = self.samples.add(done)
        if family.trace_contexts is not None:
            family.trace_contexts.observe(rec.pid, rec.thread_name)
        if done is not rec or rec.image is None:  # a stack copy is walked (and counted) on its own; a
            return None  # process with no snapshot is looked for again at its next record
        stacks = family.user_stacks
        no_copy = bool(rec.user_ips) and stacks is not None and stacks.tables is None
        return Repeat(self._after_repeats, self.samples.events[index], rec.pid, rec.thread_name, rec.image,
                      family.name, no_copy)

    def _after_repeats(self, rep: Repeat, n: int) -> None:
        """What on_record does besides storing, for `n` repeats of `rep`'s entry (their events are in)."""
        family = self.family
        self.samples.count += n
        if family.python is not None:
            family.python.observe_thread(rep.pid, rep.thread_name)
        if family.trace_contexts is not None:
            family.trace_contexts.observe(rep.pid, rep.thread_name)
        if rep.no_copy:
            family.user_stacks.outcomes[NO_COPY] += n

    def record_count(self) -> int:
        return len(self.samples)

    def tick(self) -> None:
        self.family.dither(time.monotonic())

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        config = self.family.config
        changes = list(self.family.frequency_changes)  # (monotonic ns, Hz) in time order
        end_ktime = window.end_ns - window.wall_offset_ns
        hz_at_end = self.family.frequency_at(end_ktime, changes)
        profile = cpu_profile(window.start_ns, window.duration_ns, hz_at_end)
        start_ktime = window.start_ns - window.wall_offset_ns
        # Each sample weighs the period it was taken at: drawn by dither(), or set by set_frequency().
        pairs = self.family.periods[:]  # (CLOCK_MONOTONIC ns, period ns), one after the other, in time order
        starts, lengths = pairs[0::2].tolist(), pairs[1::2].tolist()
        first = 1_000_000_000 // config.frequency_hz

        def weights(values: array, times: array) -> list[int]:
            at = [bisect.bisect_right(starts, t) - 1 for t in times]
            return [sum(values), sum(v * (lengths[i] if i >= 0 else first) for v, i in zip(values, at, strict=True))]

        inside = [(t, hz) for t, hz in changes if start_ktime < t <= end_ktime]
        if inside:
            profile.comments.append("sampling frequency changed (overhead governor or reload): "
                                    + ", ".join(f"{hz} Hz from {(t + window.wall_offset_ns) / 1e9:.3f}"
                                                for t, hz in inside))
        python = self.family.python
        reshape = None
        if python is not None and any(r.py_frames for r in self.samples.records):

            def reshape(r: RawRecord, stack: tuple) -> tuple:
                return python.merge(r, stack), ()

        add_records(profile, self.samples, resolver, tracker, window, weights, with_kernel=config.with_kernel,
                    reshape=reshape)
        if python is not None:
            profile.comments.extend(python.comments(self.samples.entries()))
        return [profile]


class CpuProbe(ProbeFamily):
    """Unwinding follows config.unwind: "cfi" has BPF send the user registers and a copy of the stack
    top, walked as records arrive; "fp" keeps the frame-pointer stack BPF walks."""

    name = "cpu"
    source = "cpu.bpf.c"
    kinds = (RecordKind.CPU,)
    accumulator = CpuAccumulator
    ustack_switch = "CPU_USTACK"
    bpf_unwind_switch = "CPU_BPF_UNWIND"
    bpf_unwind_prog = ProgType.PERF_EVENT
    reads_python = True
    PROGRAM = "on_cpu_sample"

    def __init__(self, config: ProbeConfig, tracker: ProcessTracker) -> None:
        super().__init__(config, tracker)
        self.events_per_cpu_s = config.frequency_hz
        self.trace_contexts: TraceContextRegistry | None = None
        self.frequency_hz = config.frequency_hz  # what the perf events sample at now (set_frequency)
        # (CLOCK_MONOTONIC ns, Hz) of each set_frequency(), for the profiles' comments.
        self.frequency_changes: list[tuple[int, int]] = []
        # (CLOCK_MONOTONIC ns, period ns) of each period from then on, one after the other, so that an
        # interval's samples weigh the period they were taken at; only the polling thread appends.
        self.periods = array("q")
        self._event_fds: list[int] = []
        self._random = random.Random()
        self._next_dither_s = 0.0  # time.monotonic() of the next period drawn (dither)
        self._dither_failed = False
        tracker.on_evict(self.forget)

    def forget(self, pid: int) -> None:
        """A process left the process table: what the trace context registry holds of it goes (the
        Python frames' PythonStacks is told by the tracker itself)."""
        if self.trace_contexts is not None:
            self.trace_contexts.forget(pid)

    def frequency_at(self, ktime_ns: int, changes: list[tuple[int, int]]) -> int:
        """The frequency in effect at `ktime_ns` (CLOCK_MONOTONIC) given `changes` (frequency_changes)."""
        hz = self.config.frequency_hz
        for t, value in changes:
            if t > ktime_ns:
                break
            hz = value
        return hz

    def set_frequency(self, frequency_hz: int) -> None:
        """Sample at `frequency_hz` from now on, without reloading BPF (perf_event ioctl); BpfLoadError
        if the kernel refuses. Samples keep the period they were taken at (profiles())."""
        if frequency_hz == self.frequency_hz:
            return
        self.frequency_hz = frequency_hz
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self.frequency_changes.append((now_ns, frequency_hz))
        del self.frequency_changes[:-MAX_FREQUENCY_CHANGES]
        self._next_dither_s = 0.0
        if not self.dither(time.monotonic()):  # no events (a replay), or no draws: the plain period
            period = 1_000_000_000 // frequency_hz
            libbpf.set_cpu_clock_period(self._event_fds, period)
            self._keep_period(now_ns, period)

    def dither(self, now_s: float) -> bool:
        """Draw the next sampling period if the last one has run its course (see DITHER); True if drawn.
        If the kernel refuses one, a log line, and the period stays as it is from then on."""
        if now_s < self._next_dither_s or not self._event_fds or self._dither_failed:
            return False
        draw = self._random.uniform
        rate = self.frequency_hz * (1 + draw(-DITHER, DITHER))
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            libbpf.set_cpu_clock_period(self._event_fds, round(1e9 / (rate * DITHER_MAKEUP)))
        except BpfLoadError as e:
            log.warning("cpu: the sampling period is no longer drawn (it may lock step with a periodic loop): %s", e)
            self._dither_failed = True
            return False
        self._keep_period(now_ns, round(1e9 / rate))
        self._next_dither_s = now_s + draw(*DITHER_RUN) / self.frequency_hz
        return True

    def _keep_period(self, ktime_ns: int, period_ns: int) -> None:
        self.periods.extend((ktime_ns, period_ns))  # one call: a reader's copy has whole pairs
        if len(self.periods) > 4 * MAX_PERIODS:
            del self.periods[:-2 * MAX_PERIODS]

    def programs(self) -> dict[str, ProgType]:
        return {self.PROGRAM: ProgType.PERF_EVENT}

    def maps(self) -> list[str]:
        return [TRACE_PROCS_MAP]

    def attach(self, objs: LoadedObjects) -> list[int]:
        super().attach(objs)
        self._event_fds = libbpf.attach_cpu_clock(objs.programs[self.PROGRAM], self.config.frequency_hz)
        return list(self._event_fds)

    def detach(self) -> None:
        """The probe set closes the events: their fd numbers are no longer ours to change."""
        self._event_fds = []

    def on_start(self, objs: LoadedObjects, first: Accumulator) -> None:
        fd = objs.maps[TRACE_PROCS_MAP]

        def write(pid: int, value: ProcCtx | None) -> None:
            key = ctypes.c_uint32(pid)
            if value is None:
                libbpf.lib().bpf_map_delete_elem(fd, ctypes.byref(key))
            else:
                try:
                    libbpf.map_update(fd, key, value)
                except BpfLoadError as e:  # map full: this process goes without trace context
                    log.warning("pid %d: trace context not registered: %s", pid, e)

        self.trace_contexts = TraceContextRegistry(write)
        for pid in self.config.pids or ():  # known targets: registered before their first sample
            self.trace_contexts.observe(pid)
