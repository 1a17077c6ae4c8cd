"""The overhead governor: hold the agent's CPU cost to `limits.cpu_percent` of the host's capacity.

Cost is what the agent's process used (every thread: getrusage) plus what
its BPF programs ran in the kernel on the profiled processes' time: the
kernel's own count where kernel.bpf_stats_enabled is on, else an estimate
of BPF_NS_PER_SAMPLE_ESTIMATE per sample the agent received. Most of both
grows with the sampling frequency (records to parse, stacks to walk and
symbolize), so the governor steers the frequency of the frequency-driven
families (cpu) between `limits.min_frequency_hz` and the configured
`profiling.frequency_hz`:

    every GOVERN_PERIOD_S, cost over the readings since the last change (up to WINDOW_S):
    outside budget x (1 +- DEADBAND)  ->  frequency x budget / cost   (a step at most x MAX_STEP or / MAX_STEP)

Cost is roughly fixed + k x frequency, and that multiplicative step moves
toward the budget without overshooting it. Readings restart after a change
so a decision never mixes two frequencies. The frequency is changed in place
(perf_event ioctl, no BPF reload); each sample keeps the period it was taken
at (agent/probes/cpu.py), so rates stay right across a change.

The other families with a rate follow the same factor (`steered`): the heap
family's BPF sample rate (bytes between sampled allocations, the
heap_sample_bytes map) grows as the frequency falls, and the off-CPU
threshold (the offcpu_min_ns map) rises by OFFCPU_STEP_NS per unit of the
factor, so fewer short blocks are recorded. Each allocation is scaled by the
rate it was sampled at (agent/probes/heap.py). The lock family has no rate:
a contention is recorded whole or not at all, so it is not steered; Go heap
profiles and the preloaded sampler keep their own rates.

The control law (Governor.decide) is plain arithmetic, tested without a kernel.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

GOVERN_PERIOD_S = 5.0  # how often the governor decides
WINDOW_S = 15.0  # the longest span of readings one decision averages (an interval's build is a burst)
DEADBAND = 0.10  # within budget +-10 % nothing changes (noise would make it hunt)
MAX_STEP = 4.0  # one decision changes the frequency by at most this factor
# Kernel time of one CPU sample's programs (record + BPF stack walk) when the kernel does not count it.
# Not calibrated yet: an order of magnitude for a 16-frame walk with a stack copy; bpf_stats beats it.
BPF_NS_PER_SAMPLE_ESTIMATE = 6_000


# The off-CPU threshold rises by this per unit of ceiling/frequency - 1: 300 us more at a quarter of the
# rate. Most blocks on a busy host are short (a wake-up, a page fault): they go first.
OFFCPU_STEP_NS = 100_000
MAX_HEAP_SAMPLE_BYTES = 1 << 30  # the heap rate is never spread wider than an allocation per GiB


@dataclass(frozen=True)
class Steered:
    """What the families sample at, for one governor frequency."""

    frequency_hz: int
    heap_sample_bytes: int
    offcpu_min_ns: int


def steered(frequency_hz: int, ceiling_hz: int, heap_sample_bytes: int, offcpu_min_ns: int) -> Steered:
    """The configured rates (at `ceiling_hz`) scaled down by frequency_hz / ceiling_hz."""
    stretch = ceiling_hz / frequency_hz if frequency_hz > 0 else 1.0
    return Steered(frequency_hz,
                   min(MAX_HEAP_SAMPLE_BYTES, max(heap_sample_bytes, round(heap_sample_bytes * stretch))),
                   offcpu_min_ns + round(OFFCPU_STEP_NS * max(0.0, stretch - 1.0)))


def own_cpu_s() -> float:
    """CPU seconds this process used so far, all threads (reaped children excluded: the compile child)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class Reading:
    """Cumulative figures at one moment."""

    monotonic_s: float
    agent_cpu_s: float
    bpf_s: float


class Governor:
    """Decides the sampling frequency from measured cost; the daemon applies it."""

    def __init__(self, cpu_percent: float, floor_hz: int, ceiling_hz: int, cpus: int | None = None) -> None:
        self.cpus = cpus or os.cpu_count() or 1
        self.budget = cpu_percent / 100.0 * self.cpus  # CPU seconds per second
        self.ceiling_hz = ceiling_hz
        self.floor_hz = min(floor_hz, ceiling_hz)
        self.frequency_hz = ceiling_hz
        self.readings: collections.deque[Reading] = collections.deque()
        self.last_cost = 0.0  # CPU seconds per second over the last decision's readings
        self.changes = 0
        self.at_floor_over_budget = False

    @property
    def enabled(self) -> bool:
        return self.budget > 0 and self.floor_hz < self.ceiling_hz

    def observe(self, reading: Reading) -> None:
        self.readings.append(reading)
        while len(self.readings) > 2 and reading.monotonic_s - self.readings[1].monotonic_s >= WINDOW_S:
            self.readings.popleft()

    def cost(self) -> float | None:
        """CPU seconds per second over the readings kept (None before two readings a period apart)."""
        if len(self.readings) < 2:
            return None
        a, b = self.readings[0], self.readings[-1]
        span = b.monotonic_s - a.monotonic_s
        if span < GOVERN_PERIOD_S * 0.8:
            return None
        return ((b.agent_cpu_s - a.agent_cpu_s) + (b.bpf_s - a.bpf_s)) / span

    def decide(self) -> int | None:
        """The new frequency, or None to keep the current one."""
        cost = self.cost()
        if cost is None:
            return None
        self.last_cost = cost  # reported (bpfprof_cost_cpu_percent) whether or not the governor steers
        if not self.enabled:
            return None
        ratio = self.budget / cost if cost > 0 else MAX_STEP
        if abs(cost / self.budget - 1.0) <= DEADBAND:
            return None
        target = self.frequency_hz * min(MAX_STEP, max(1.0 / MAX_STEP, ratio))
        new = int(round(min(self.ceiling_hz, max(self.floor_hz, target))))
        self.at_floor_over_budget = new == self.floor_hz and cost > self.budget * (1 + DEADBAND)
        if new == self.frequency_hz:
            return None
        return new

    def applied(self, frequency_hz: int) -> None:
        """The daemon set `frequency_hz`: later decisions average only readings taken at it."""
        self.frequency_hz = frequency_hz
        self.changes += 1
        if self.readings:
            last = self.readings[-1]
            self.readings.clear()
            self.readings.append(last)


class CostMeter:
    """Cumulative agent CPU and BPF run time; `bpf_run_time_ns()` and `samples()` come from the pipeline."""

    def __init__(self, use_bpf_stats: bool) -> None:
        self.use_bpf_stats = use_bpf_stats
        self.source = "bpf_stats" if use_bpf_stats else "estimate"
        self._bpf_base_ns = 0  # run time of pipelines already closed (a reload restarts the probes)
        self._bpf_last_ns = 0

    def read(self, bpf_run_time_ns: int, samples: int) -> Reading:
        if self.use_bpf_stats:
            if bpf_run_time_ns < self._bpf_last_ns:  # new programs: their counts start again
                self._bpf_base_ns += self._bpf_last_ns
            self._bpf_last_ns = bpf_run_time_ns
            bpf_ns = self._bpf_base_ns + bpf_run_time_ns
        else:
            bpf_ns = samples * BPF_NS_PER_SAMPLE_ESTIMATE
        return Reading(time.monotonic(), own_cpu_s(), bpf_ns / 1e9)
