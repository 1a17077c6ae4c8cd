"""Off-CPU profile: bpf/offcpu.bpf.c on the sched:sched_switch tracepoint.

Each record is one block of one thread: the stacks where it went off CPU and
how long it stayed off (switch-out to switch-in, so time waiting in the run
queue after the wake-up counts, as in bcc's offcputime). Preemptions count
too; the `state` label tells them apart from sleeps.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

from agent.bpfload import libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import RawRecord, RecordKind
from agent.probes.family import Accumulator, ProbeConfig, ProbeFamily, SettingChanges, Window, read_percpu_total
from agent.probes.profile_builder import waits_profile
from agent.probes.sample_store import SampleStore
from agent.processes.stack_resolver import StackResolver
from agent.processes.tracker import ProcessTracker
from exporters.profile import Location, Profile

# Threads whose stacks can wait in the stash at once (~2 KiB each, kernel memory);
# beyond that the least recently switched-out are evicted and their block is lost.
MAX_THREADS = 8192
# Counting the stash's entries (for its evictions) is a syscall per entry, up to MAX_THREADS (~20 ms):
# done at every cut only while the stash may be near full (where evictions happen), else this often.
EVICTION_WALK_S = 60.0
# Threads of Python processes whose frames can wait at once (~0.5 KiB each): their own LRU, so that the
# stash does not carry room for a trailer most threads never have; beyond it a block loses its Python
# frames (counted), not its native stack.
MAX_PYTHON_THREADS = 2048
# Counters of offcpu_counts (bpf/offcpu.bpf.c OFFCPU_*).
STASH_FAILED, SHORT, PY_LOST, TOO_BIG, UNSENT, UNCONSUMED, STASHED, CONSUMED, NO_SCRATCH = range(9)

# prev_state at switch-out: the kernel's TASK_REPORT bits, 0x100 = preempted.
# 0 (TASK_RUNNING) is a runnable thread that gave the CPU up (cond_resched,
# sched_yield): off CPU without blocking, which is what "preempted" means here.
_STATES = {0: "preempted", 0x100: "preempted", 1: "sleeping", 2: "disk", 0x80: "idle"}


def state_label(prev_state: int) -> str:
    """What the thread was doing when it went off CPU, from sched_switch's prev_state."""
    if prev_state & 0x100:
        return "preempted"
    return _STATES.get(prev_state, f"state_{prev_state:#x}")


class OffCpuAccumulator(Accumulator):
    family: OffCpuProbe

    def __init__(self, family: OffCpuProbe) -> None:
        super().__init__(family)
        self.samples = SampleStore()
        self.short_blocks = 0  # blocks under the threshold in this interval (read at its end)

    def on_record(self, rec: RawRecord) -> None:
        if self.family.python is not None:
            self.family.python.observe(rec)
        self.samples.add(rec)

    def record_count(self) -> int:
        return len(self.samples)

    def carry_into(self, nxt: Accumulator, alive: Callable[[int], bool]) -> None:
        self.short_blocks = self.family.short_blocks_since_last()

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        config = self.family.config
        python = self.family.python
        reshape = None
        if python is not None and any(r.py_frames for r in self.samples.records):

            def reshape(r: RawRecord, stack: tuple[Location, ...]) -> tuple:
                return python.merge(r, stack), (("state", state_label(r.aux)),)

        profile = waits_profile("offcpu", self.samples, resolver, tracker, window, config.with_kernel,
                                labels=lambda r: (("state", state_label(r.aux)),), reshape=reshape)
        if python is not None:
            profile.comments.extend(python.comments(self.samples.entries()))
        min_ns = self.family.min_ns
        if min_ns.now or min_ns.changes:
            profile.comments.append(f"off-CPU blocks shorter than {min_ns.now} ns left out: {self.short_blocks}")
        changes = min_ns.inside(window)
        if changes:
            profile.comments.append("off-CPU threshold changed (overhead governor or reload): "
                                    + min_ns.describe(changes, window, " ns"))
        return [profile]


class OffCpuProbe(ProbeFamily):
    """sched_switch: each block of a thread, from switch-out to switch-in, with its stacks."""

    name = "offcpu"
    source = "offcpu.bpf.c"
    kinds = (RecordKind.OFFCPU,)
    accumulator = OffCpuAccumulator
    PROGRAM = "tracepoint__sched__sched_switch"
    COUNTERS = "offcpu_counts"
    MIN_NS = "offcpu_min_ns"
    bpf_unwind_switch = "OFFCPU_BPF_UNWIND"
    bpf_unwind_prog = ProgType.TRACEPOINT
    bpf_unwind_family = 1  # UNWIND_FAMILY_OFFCPU
    reads_python = True
    # Blocks per CPU-second that pass the threshold on a busy host; sizes the ring buffer.
    events_per_cpu_s = 2000
    STASH = "offcpu_stash"
    LOSSES = {"offcpu_stash_failed": "off-CPU blocks (stash update failed)",
              "offcpu_python_lost": "off-CPU blocks' Python frames (evicted before the switch-in)",
              "offcpu_stash_evicted": "off-CPU blocks (evicted from a full stash before the switch-in)",
              "offcpu_too_big": "off-CPU blocks (stash entry larger than a record)",
              "offcpu_unsent": "off-CPU blocks (record with Python frames too big to send)",
              "offcpu_switch_in_missed": "off-CPU blocks (switch-in not seen: overwritten at the next switch-out)",
              "offcpu_switch_missed": "off-CPU blocks (sched_switch runs the program missed)",
              "offcpu_no_scratch": "off-CPU blocks (no per-CPU scratch at the switch-out)"}

    def __init__(self, config: ProbeConfig, tracker: ProcessTracker) -> None:
        super().__init__(config, tracker)
        self._short_before = 0
        self.min_ns = SettingChanges(config.offcpu_min_ns)  # the offcpu_min_ns map; set_min_ns moves it
        self.needs_drain_clock = True  # a stashed sleep is sent at switch-in without an immediate wake-up
        self._evicted = 0  # the highest eviction count read (a reading races the programs: never lower it)
        self._walked_at = -EVICTION_WALK_S  # monotonic time of the last count of the stash's entries

    def defines(self) -> dict[str, int]:
        return {"OFFCPU_MAX_THREADS": MAX_THREADS, "OFFCPU_PY_THREADS": MAX_PYTHON_THREADS, **super().defines()}

    def programs(self) -> dict[str, ProgType]:
        return {self.PROGRAM: ProgType.TRACEPOINT}

    def maps(self) -> list[str]:
        return [self.COUNTERS, self.MIN_NS, self.STASH]

    def attach(self, objs: LoadedObjects) -> list[int]:
        super().attach(objs)
        # The threshold is a map, not a define: one compiled entry (bpf_cache) serves every --offcpu-min-us.
        libbpf.map_update(objs.maps[self.MIN_NS], ctypes.c_uint32(0), ctypes.c_uint64(self.min_ns.now))
        return libbpf.attach_tracepoint(objs.programs[self.PROGRAM], "sched", "sched_switch")

    def set_min_ns(self, min_ns: int) -> None:
        """Leave out blocks shorter than `min_ns` from now on (the map; no reload). BpfLoadError if the
        map write fails."""
        if min_ns != self.min_ns.now and self.objs is not None:
            libbpf.map_update(self.objs.maps[self.MIN_NS], ctypes.c_uint32(0), ctypes.c_uint64(min_ns))
        self.min_ns.set(min_ns)

    def loss_totals(self) -> dict[str, int]:
        def count(index: int) -> int:
            return read_percpu_total(self.objs, self.COUNTERS, index)

        return {"offcpu_stash_failed": count(STASH_FAILED), "offcpu_python_lost": count(PY_LOST),
                "offcpu_stash_evicted": self.evicted(), "offcpu_too_big": count(TOO_BIG),
                "offcpu_unsent": count(UNSENT), "offcpu_switch_in_missed": count(UNCONSUMED),
                "offcpu_switch_missed": self.switch_misses(), "offcpu_no_scratch": count(NO_SCRATCH)}

    def evicted(self) -> int:
        """Stash entries the LRU evicted so far (blocks lost): added - deleted at switch-in - still there.

        Read in that order, a count can only come out low while the programs run (entries added after the
        first reading, deleted before the last), never high: the highest reading is kept.
        """
        if self.objs is None or self.STASH not in self.objs.maps:
            return 0
        stashed = read_percpu_total(self.objs, self.COUNTERS, STASHED)
        now = time.monotonic()
        # stashed - consumed = entries left + evicted: under half the capacity, a walk now finds at most the
        # evictions of a past crowd, which the walk every EVICTION_WALK_S counts (late, not lost).
        if (stashed - read_percpu_total(self.objs, self.COUNTERS, CONSUMED) < MAX_THREADS // 2
                and now - self._walked_at < EVICTION_WALK_S):
            return self._evicted
        self._walked_at = now
        left = len(set(libbpf.map_keys_u32(self.objs.maps[self.STASH])))
        consumed = read_percpu_total(self.objs, self.COUNTERS, CONSUMED)
        self._evicted = max(self._evicted, stashed - consumed - left)
        return self._evicted

    def switch_misses(self) -> int:
        """sched_switch runs the kernel skipped for the program (recursion misses): each may lose a block."""
        if self.objs is None or self.PROGRAM not in self.objs.programs:
            return 0
        return libbpf.prog_recursion_misses(self.objs.programs[self.PROGRAM])

    def short_blocks_since_last(self) -> int:
        """Blocks left out for being short since the last call (at each cut)."""
        total = read_percpu_total(self.objs, self.COUNTERS, SHORT)
        n, self._short_before = total - self._short_before, total
        return n
