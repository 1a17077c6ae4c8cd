"""The overhead governor: hold the agent's CPU cost to `limits.cpu_percent` of the host's capacity.

Cost is what the agent's process used (every thread: getrusage) plus what
its BPF programs ran in the kernel on the profiled processes' time: the
kernel's own count where kernel.bpf_stats_enabled is on, else an estimate
of BPF_NS_PER_SAMPLE_ESTIMATE per sample the agent received.

Three families have a rate to steer (STEERED), each by its own factor in
[floor, 1] of its configured rate, the floor being limits.min_frequency_hz /
profiling.frequency_hz for all three:

    cpu     sampling frequency  = configured frequency x factor (perf_event ioctl, in place)
    heap    BPF sample rate     = configured bytes between sampled allocations / factor
    offcpu  off-CPU threshold   = configured threshold + OFFCPU_STEP_NS x (1 / factor - 1)

An interval's build is a burst of the agent's CPU once per export interval;
the meter counts each build spread evenly over its interval (CostMeter.built),
so that 5 s windows with and without one agree and decisions do not hunt.

Each family's cost is its own programs' BPF run time plus the agent's CPU
shared out by the records each family delivered (records are what the
agent's work follows: parse, unwind, symbolize, build). Every
GOVERN_PERIOD_S, over the readings since the last change (up to WINDOW_S):

    over budget x (1 + DEADBAND):   the costliest family first, its factor cut so its cost falls by
                                    the excess (cost taken as proportional to the rate); what one
                                    family cannot shed (its floor, a step of at most / MAX_STEP) the
                                    next costliest sheds
    under budget x (1 - DEADBAND):  the room handed back, the cheapest family below its configured
                                    rate first, a step of at most x MAX_STEP

So a host where off-CPU blocks cost the most loses off-CPU detail before
CPU sampling does. Cost is not exactly proportional (fixed costs, a
threshold is not a rate), and each decision measures again: readings
restart after a change so a decision never mixes two settings. Each sample
keeps the rate it was taken at (agent/probes/cpu.py, heap.py), so rates stay
right across a change. The lock family has no rate (a contention is
recorded whole or not at all) and goroutine profiles are snapshots: their
cost counts in the total but is not steered; Go heap profiles and the
preloaded sampler keep their own rates.

The control law (Governor.decide) is plain arithmetic, tested without a kernel.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

GOVERN_PERIOD_S = 5.0  # how often the governor decides
WINDOW_S = 15.0  # the longest span of readings one decision averages (an interval's build is a burst)
DEADBAND = 0.10  # within budget +-10 % nothing changes (noise would make it hunt)
MAX_STEP = 4.0  # one decision changes a family's rate by at most this factor
# Kernel time of one CPU sample's programs (record + BPF stack walk) when the kernel does not count it.
# Not calibrated yet: an order of magnitude for a 16-frame walk with a stack copy; bpf_stats beats it.
BPF_NS_PER_SAMPLE_ESTIMATE = 6_000

STEERED = ("cpu", "heap", "offcpu")  # the families with a rate, in the order logs name them

# The off-CPU threshold rises by this per unit of 1/factor - 1: 300 us more at a quarter of the rate.
# Most blocks on a busy host are short (a wake-up, a page fault): they go first.
OFFCPU_STEP_NS = 100_000
MAX_HEAP_SAMPLE_BYTES = 1 << 30  # the heap rate is never spread wider than an allocation per GiB


@dataclass(frozen=True)
class Steered:
    """What the families sample at, for one set of governor factors."""

    frequency_hz: int
    heap_sample_bytes: int
    offcpu_min_ns: int


def steered(factors: Mapping[str, float], ceiling_hz: int, heap_sample_bytes: int, offcpu_min_ns: int) -> Steered:
    """The configured rates (`ceiling_hz`, `heap_sample_bytes`, `offcpu_min_ns`) at the families' `factors`
    (1.0, or a family not named: as configured)."""
    cpu, heap, off = (max(factors.get(name, 1.0), 1e-9) for name in STEERED)
    return Steered(max(1, round(ceiling_hz * cpu)),
                   min(MAX_HEAP_SAMPLE_BYTES, max(heap_sample_bytes, round(heap_sample_bytes / heap))),
                   offcpu_min_ns + round(OFFCPU_STEP_NS * max(0.0, 1.0 / off - 1.0)))


def own_cpu_s() -> float:
    """CPU seconds this process used so far, all threads (reaped children excluded: the compile child)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class Reading:
    """Cumulative figures at one moment: the agent's CPU and all BPF run time, and by family the BPF run
    time of its own programs and the records it took (what shares the agent's CPU out)."""

    monotonic_s: float
    agent_cpu_s: float
    bpf_s: float
    family_bpf_s: Mapping[str, float] = field(default_factory=dict)
    family_records: Mapping[str, int] = field(default_factory=dict)


class Governor:
    """Decides each steered family's rate factor from measured cost; the daemon applies them."""

    def __init__(self, cpu_percent: float, floor_hz: int, ceiling_hz: int, cpus: int | None = None,
                 families: Iterable[str] = STEERED) -> None:
        self.cpus = cpus or os.cpu_count() or 1
        self.budget = cpu_percent / 100.0 * self.cpus  # CPU seconds per second
        self.ceiling_hz = ceiling_hz
        self.floor_hz = min(floor_hz, ceiling_hz)
        self.floor = self.floor_hz / ceiling_hz if ceiling_hz > 0 else 1.0  # the lowest factor of any family
        self.factors = {name: 1.0 for name in families if name in STEERED}
        self.readings: collections.deque[Reading] = collections.deque()
        self.last_cost = 0.0  # CPU seconds per second over the last decision's readings
        self.last_family_costs: dict[str, float] = {}  # the same, by family (steered or not)
        self.changes = 0
        self.at_floor_over_budget = False

    @property
    def enabled(self) -> bool:
        return self.budget > 0 and self.floor_hz < self.ceiling_hz and bool(self.factors)

    @property
    def frequency_hz(self) -> int:
        """The cpu family's sampling frequency at its factor now."""
        return max(1, round(self.ceiling_hz * self.factors.get("cpu", 1.0)))

    def observe(self, reading: Reading) -> None:
        self.readings.append(reading)
        while len(self.readings) > 2 and reading.monotonic_s - self.readings[1].monotonic_s >= WINDOW_S:
            self.readings.popleft()

    def _span(self) -> tuple[Reading, Reading, float] | None:
        if len(self.readings) < 2:
            return None
        a, b = self.readings[0], self.readings[-1]
        span = b.monotonic_s - a.monotonic_s
        return (a, b, span) if span >= GOVERN_PERIOD_S * 0.8 else None

    def cost(self) -> float | None:
        """CPU seconds per second over the readings kept (None before two readings a period apart)."""
        got = self._span()
        if got is None:
            return None
        a, b, span = got
        return ((b.agent_cpu_s - a.agent_cpu_s) + (b.bpf_s - a.bpf_s)) / span

    def family_costs(self) -> dict[str, float]:
        """CPU seconds per second by family over the readings kept: its BPF programs' run time plus the
        agent's CPU times its share of the records."""
        got = self._span()
        if got is None:
            return {}
        a, b, span = got
        agent = b.agent_cpu_s - a.agent_cpu_s
        records = {name: n - a.family_records.get(name, 0) for name, n in b.family_records.items()}
        total = sum(n for n in records.values() if n > 0)
        out = {}
        for name in set(records) | set(b.family_bpf_s):
            own_bpf = b.family_bpf_s.get(name, 0.0) - a.family_bpf_s.get(name, 0.0)
            share = max(0, records.get(name, 0)) / total if total else 0.0
            out[name] = max(0.0, own_bpf + agent * share) / span
        return out

    def decide(self) -> dict[str, float] | None:
        """The families' new factors, or None to keep the ones in force."""
        cost = self.cost()
        if cost is None:
            return None
        self.last_cost = cost  # reported (bpfprof_cost_cpu_percent) whether or not the governor steers
        self.last_family_costs = costs = self.family_costs()
        if not self.enabled:
            return None
        if abs(cost / self.budget - 1.0) <= DEADBAND:
            self.at_floor_over_budget = False
            return None
        if cost > self.budget:
            new = self._shed(cost - self.budget, costs)
            self.at_floor_over_budget = (cost > self.budget * (1 + DEADBAND)
                                         and all(f <= self.floor for f in new.values()))
        else:
            new = self._hand_back(self.budget - cost, costs)
            self.at_floor_over_budget = False
        if self._settings(new) == self._settings(self.factors):
            return None
        return new

    def _shed(self, excess: float, costs: Mapping[str, float]) -> dict[str, float]:
        """Factors that cut `excess` CPU s/s, the costliest family first. Without a cost by family (nothing
        delivered records in the window) every family is cut alike by budget / cost."""
        new = dict(self.factors)
        if not any(costs.get(name, 0.0) > 0 for name in new):
            ratio = self.budget / (self.budget + excess)
            return {name: max(self.floor, f / MAX_STEP, f * ratio) for name, f in new.items()}
        for name in sorted(new, key=lambda n: -costs.get(n, 0.0)):
            c, f = costs.get(name, 0.0), new[name]
            if excess <= 0 or c <= 0:
                break
            lowest = max(self.floor, f / MAX_STEP)
            new[name] = nf = max(lowest, f * (c - excess) / c)
            excess -= c * (1.0 - nf / f)
        return new

    def _hand_back(self, room: float, costs: Mapping[str, float]) -> dict[str, float]:
        """Factors raised within `room` CPU s/s, the cheapest family below its configured rate first."""
        new = dict(self.factors)
        for name in sorted(new, key=lambda n: costs.get(n, 0.0)):
            c, f = costs.get(name, 0.0), new[name]
            if room <= 0:
                break
            if f >= 1.0:
                continue
            highest = min(1.0, f * MAX_STEP)
            new[name] = nf = min(highest, f * (c + room) / c) if c > 0 else highest
            room -= c * (nf / f - 1.0)
        return new

    def _settings(self, factors: Mapping[str, float]) -> Steered:
        """What `factors` come to in the units the kernel takes (a change below them is none)."""
        return steered(factors, self.ceiling_hz, 1 << 20, 0)

    def applied(self, factors: Mapping[str, float]) -> None:
        """The daemon set `factors`: later decisions average only readings taken at them."""
        self.factors.update(factors)
        self.changes += 1
        if self.readings:
            last = self.readings[-1]
            self.readings.clear()
            self.readings.append(last)


class CostMeter:
    """Cumulative agent CPU and BPF run time; the BPF figures and sample counts come from the pipeline."""

    def __init__(self, use_bpf_stats: bool) -> None:
        """An interval's build is a burst of the agent's CPU once per export interval (tens of ms): windows
        with and without one would alternate and the governor hunt around its budget. The builder reports
        each build's CPU (built); a reading counts builds spread evenly over their interval instead."""
        self.use_bpf_stats = use_bpf_stats
        self._lock = threading.Lock()
        self._builds_cpu_s = 0.0  # CPU of every build so far (the builder thread's own clock)
        self._build_rate = 0.0  # the last build's CPU per second of its interval
        self._spread_s = 0.0  # builds' CPU counted so far, at the rate of the last one
        self._spread_at: float | None = None
        self.source = "bpf_stats" if use_bpf_stats else "estimate"
        self._base: dict[str, int] = {}  # run time of pipelines already closed (a reload restarts the probes)
        self._last: dict[str, int] = {}
        self._records_base: dict[str, int] = {}
        self._records_last: dict[str, int] = {}

    @staticmethod
    def _carry(now: Mapping[str, int], last: dict[str, int], base: dict[str, int]) -> dict[str, int]:
        """Counters made monotonic across a restart of the probes (new programs count from 0 again)."""
        out = {}
        for name, n in now.items():
            if n < last.get(name, 0):
                base[name] = base.get(name, 0) + last[name]
            last[name] = n
            out[name] = base.get(name, 0) + n
        return out

    def built(self, cpu_s: float, interval_s: float) -> None:
        """The builder thread spent `cpu_s` on an interval `interval_s` long (called from that thread)."""
        with self._lock:
            self._builds_cpu_s += cpu_s
            self._build_rate = cpu_s / interval_s if interval_s > 0 else 0.0

    def _agent_cpu_s(self, now: float) -> float:
        """The process's CPU with builds counted at the rate of the last one instead of as they happened."""
        with self._lock:
            if self._spread_at is not None:
                self._spread_s += self._build_rate * (now - self._spread_at)
            self._spread_at = now
            return own_cpu_s() - self._builds_cpu_s + self._spread_s

    def read(self, bpf_run_time_ns: Mapping[str, int], samples: int,
             family_records: Mapping[str, int] | None = None) -> Reading:
        """A reading from the programs' run time by family (`shared`: programs of no one family), the samples
        the agent took (for the estimate) and the records each family took."""
        records = self._carry(family_records or {}, self._records_last, self._records_base)
        if self.use_bpf_stats:
            family_bpf = {name: n / 1e9 for name, n in self._carry(bpf_run_time_ns, self._last, self._base).items()}
            total = sum(family_bpf.values())
        else:
            total = samples * BPF_NS_PER_SAMPLE_ESTIMATE / 1e9
            # The estimate is per sample; samples are the families' records.
            family_bpf = {name: n * BPF_NS_PER_SAMPLE_ESTIMATE / 1e9 for name, n in records.items()}
        now = time.monotonic()
        return Reading(now, self._agent_cpu_s(now), total, family_bpf, records)
