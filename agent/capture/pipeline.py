"""The one capture pipeline: `bpfprof record` and the daemon both drive it.

    load()    compile the selected families into one probe set (BPF loaded, nothing attached)
    start()   attach; records flow: ring buffer -> parse -> accept? -> family.route -> accumulator
    poll()    drain the ring buffer (at most wait_s apart), then each accumulator's tick()
    cut()     end an interval: its accumulators, window, sample count and losses; sampling goes on
    build()   symbolize a cut interval into Profiles (the daemon does it in another thread)
    close()   detach and free

`record` cuts once at the end; the daemon cuts every interval and adds only
selection, relabel and export. A pid seen for the first time is snapshotted
right then (ProcessTracker), so its stacks resolve even if it exits seconds
later; symbolization runs once per interval over the distinct addresses.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from agent.bpfload import libbpf
from agent.bpfload.bpf_compile import LoadedObjects
from agent.bpfload.records import (
    AFTER_TIME,
    DROP_DESCRIPTIONS,
    REPEAT_MAX_BYTES,
    TIME_AT,
    Loss,
    RawRecord,
    parse_record,
)
from agent.probes.family import Accumulator, ProbeConfig, ProbeFamily, Repeat, Window
from agent.probes.probe_set import ProbeSet
from agent.probes.profile_builder import add_process_meta
from agent.probes.registry import PROBES
from agent.processes.stack_resolver import ResolverStats, StackResolver
from agent.processes.tracker import ProcessTracker
from agent.unwind.tables import UnwindTables
from exporters.profile import Profile
from symbolizer.errors import BpfprofError, ConfigError
from symbolizer.kallsyms import KernelSymbols

log = logging.getLogger(__name__)

DRAIN_INTERVAL_S = 0.1
# The longest wait for records when no family needs the drain clock: BPF wakes the agent for what it
# must act on at once, and every wake-up costs a sleeping thread tens of microseconds of CPU on a VM.
QUIET_WAIT_S = 1.0
# Bytes of keys (records less 16 bytes, ~0.1-2 KB each) an interval keeps to know repeats by
# (CapturePipeline.deliver_bufs); past it, new distinct samples are parsed every time they come.
MAX_REPEAT_BYTES = 8 << 20
# Without a cap (record), a bound no batch reaches.
MAX_REPEATS_PER_BATCH = 1 << 62
SHARED_PROGRAMS = "shared"  # bpf_run_time_ns: the programs of no one family (fork and exec hooks)


def wall_offset_ns() -> int:
    """Add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get Unix time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def process_age_s() -> float:
    """Seconds since this process started, from /proc/self/stat and CLOCK_BOOTTIME.

    Not psutil's create_time: it is built on /proc/stat's whole-second boot
    time and can be off by most of a second.
    """
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Interval:
    """A cut interval: the accumulators that took its records, its window, what it lost."""

    seq: int
    accumulators: list[Accumulator]
    window: Window
    samples: int
    losses: list[Loss] = field(default_factory=list)


class CapturePipeline:
    """The selected probe families, their probe set and the current accumulators.

    `targets`: the pids BPF records (None: every process; empty: the ones
    add_target() names, e.g. a command about to start). `accept(rec)`, run
    once per sample before it is routed, may refuse it (the daemon's
    selection and caps); notices (an exec, a paused exit) always reach their
    family.
    """

    def __init__(self, config: ProbeConfig, profiles: Iterable[str], tracker: ProcessTracker,
                 targets: Iterable[int] | None = None, follow_children: bool = False,
                 accept: Callable[[RawRecord], bool] | None = None,
                 interval_cap: Callable[[], int] | None = None,
                 drain_interval_s: float = DRAIN_INTERVAL_S) -> None:
        wanted = list(profiles)
        unknown = [p for p in wanted if p not in PROBES]
        if unknown:
            raise ConfigError(f"unknown profile type {unknown[0]!r}: choose from {', '.join(PROBES)}")
        self.config = config
        self.tracker = tracker
        self.families: list[ProbeFamily] = [PROBES[name](config, tracker) for name in PROBES if name in wanted]
        self._by_kind: dict[int, list[ProbeFamily]] = {}
        for f in self.families:
            for k in f.kinds:
                self._by_kind.setdefault(int(k), []).append(f)
        self._targets = None if targets is None else tuple(targets)
        self._follow = follow_children
        self._drain_interval_s = drain_interval_s
        self.accept = accept
        # For a repeat (deliver_bufs), in place of accept(): the selection it passed holds until
        # forget_repeats(); what is left is the daemon's per-interval cap, read once per batch, and its
        # counts (take_repeat_counts).
        self.interval_cap = interval_cap
        self.repeats_taken = 0
        self.repeats_capped = 0
        self.record_errors = 0  # records deliver_bufs could not handle
        self._images = tracker.lookup()
        self._repeats: dict[bytes, Repeat] = {}
        self._repeat_bytes = 0
        self._set: ProbeSet | None = None
        self._tables: UnwindTables | None = None  # the BPF walker's, when user stacks are walked in BPF
        self._current: dict[ProbeFamily, Accumulator] = {}
        self.seq = 0
        self.interval_samples = 0  # samples taken in the current interval
        self.samples = 0  # since start
        self.family_records: dict[str, int] = {}  # samples each family took since start (the governor's shares)
        self.first_sample_s: float | None = None  # since this process started: the start-up cost users wait for
        self.has_kernel_stacks = False
        self._start_ns = 0
        self._totals_before: dict[str, int] = {}
        self._kernel: KernelSymbols | None = None
        self._resolver: StackResolver | None = None  # kept across builds (StackResolver.begin_build)
        self.resolver_stats = ResolverStats()  # of the last build()

    # -- set-up --------------------------------------------------------------------

    def command_env(self) -> dict[str, str]:
        """Variables a command bpfprof starts needs for the selected families."""
        return {k: v for f in self.families for k, v in f.command_env().items()}

    def load(self) -> None:
        """Compile and load the families' programs (BpfprofError if that fails); nothing attached yet."""
        self._set = ProbeSet(self.families, pids=self._targets, follow_children=self._follow,
                             with_kernel=self.config.with_kernel, drain_interval_s=self._drain_interval_s,
                             tracker=self.tracker)
        self._tables = self._set.unwind_tables

    @property
    def objs(self) -> LoadedObjects:
        """The loaded programs and maps (after load())."""
        assert self._set is not None
        return self._set.objs

    def add_target(self, pid: int) -> None:
        """Record this process too (when the pipeline records named targets)."""
        assert self._set is not None
        self._set.add_target(pid)

    def start(self) -> None:
        """Attach every family and begin the first interval."""
        if self._set is None:
            self.load()
        assert self._set is not None
        self._set.start(self.deliver, self.deliver_bufs)
        self.begin()
        for f in self.families:
            f.on_start(self._set.objs, self._current[f])

    def begin(self) -> None:
        """Open the first interval: fresh accumulators, the window starts now. start() calls it once
        attached; a pipeline without BPF (replay tests, tests/unit/test_pipeline_replay.py) calls it
        instead of start() and hands records to deliver() itself."""
        self._current = {f: f.new_accumulator() for f in self.families}
        self._start_ns = time.time_ns()

    # -- records -------------------------------------------------------------------

    def deliver_bufs(self, bufs: Sequence[bytes], one: Callable[[bytes], Repeat | None] | None = None) -> None:
        """Take ring-buffer records as they came (the probe set's callback, a batch at a time).

        A repeat of a sample already taken this interval (records.repeat_key; most samples of a steady
        host: the same threads in the same stacks) costs a key, a lookup and one append of its time and
        value to its entry, inline; what the accumulator and the daemon do per sample besides (counts,
        the trace-context and Python re-checks) runs once per batch and entry (Repeat.after). Others are
        handed to `one` (the probe set's: paused exits; default: parse and deliver()), each on its own:
        one that raises is logged and counted in `record_errors`, the batch goes on.
        """
        repeats, images = self._repeats.get, self._images
        room = self._room()
        hits: list[Repeat] = []
        for buf in bufs:
            if len(buf) <= REPEAT_MAX_BYTES:
                key = buf[:TIME_AT] + buf[AFTER_TIME:]
                rep = repeats(key)
                if rep is not None and images(rep.pid) is rep.image:
                    if len(hits) < room:
                        rep.events.frombytes(buf[TIME_AT:AFTER_TIME])
                        hits.append(rep)
                    else:
                        self.repeats_capped += 1
                    continue
            else:
                key = None
            try:
                rep = (one or self._parse_deliver)(buf)
            except Exception:
                self.record_errors += 1
                if self.record_errors & (self.record_errors - 1) == 0:  # the first, then at powers of two
                    log.exception("ring-buffer record %d bytes not handled (%d so far)", len(buf),
                                  self.record_errors)
                continue
            if rep is not None and key is not None and self._repeat_bytes < MAX_REPEAT_BYTES:
                self._repeats[key] = rep
                self._repeat_bytes += len(key)
            room = self._room()  # what it delivered counts against the cap; hits are counted after the loop
        if hits:
            self._count_repeats(hits)

    def deliver_buf(self, buf: bytes) -> None:
        """One record as it came (tests, replays): deliver_bufs of one."""
        self.deliver_bufs((buf,))

    def _parse_deliver(self, buf: bytes) -> Repeat | None:
        return self.deliver(parse_record(buf))

    def _room(self) -> int:
        """Repeats the interval may still take under the cap (interval_cap)."""
        return (self.interval_cap() if self.interval_cap is not None else MAX_REPEATS_PER_BATCH) - self.interval_samples

    def _count_repeats(self, hits: list[Repeat]) -> None:
        n = len(hits)
        self.samples += n
        self.interval_samples += n
        self.repeats_taken += n
        counts = self.family_records
        for rep, k in Counter(hits).items():
            counts[rep.family] += k
            rep.after(rep, k)

    def take_repeat_counts(self) -> tuple[int, int]:
        """(repeats taken, repeats refused by the cap) since the last call: the daemon's books."""
        out = (self.repeats_taken, self.repeats_capped)
        self.repeats_taken = self.repeats_capped = 0
        return out

    def deliver(self, rec: RawRecord) -> Repeat | None:
        """Take one parsed ring-buffer record: accept, count, route to its families' accumulators. Returns
        how a repeat of it can be added (Accumulator.on_record) when one family took it as a sample.

        Replay tests call it with recorded records.
        """
        families = self._by_kind.get(rec.kind, ())
        for f in families:
            if f.is_notice(rec):
                break
        else:  # a sample
            if self.accept is not None and not self.accept(rec):
                return None
            if self.first_sample_s is None:
                self.first_sample_s = process_age_s()
            self.samples += 1
            self.interval_samples += 1
            if rec.kernel_ips:
                self.has_kernel_stacks = True
            rec.image = self.tracker.note_record(rec.pid, rec.tid, rec.thread_name,
                                                 rec.user_ips[0] if rec.user_ips else 0)
            if self._tables is not None:
                self._tables.note(rec.pid, rec.image)
            counts = self.family_records
            for f in families:
                counts[f.name] = counts.get(f.name, 0) + 1
            if len(families) == 1:
                return families[0].route(rec, self._current[families[0]])
        for f in families:
            f.route(rec, self._current[f])
        return None

    def forget_repeats(self) -> None:
        """Parse every record again until it is seen anew (the selection changed: what was accepted may
        not be now). cut() does it too: the entries the repeats point at are the last interval's."""
        self._repeats.clear()
        self._repeat_bytes = 0

    @property
    def wait_s(self) -> float:
        """How long poll() may wait for records: the drain interval while a family needs its clock."""
        if any(f.needs_drain_clock for f in self.families):
            return self._drain_interval_s
        return max(self._drain_interval_s, QUIET_WAIT_S)

    def poll(self, timeout_s: float | None = None) -> None:
        """Wait for records (up to `timeout_s`, default wait_s; wake() ends it), deliver them all,
        then tick every accumulator."""
        assert self._set is not None
        self._set.poll(self.wait_s if timeout_s is None else timeout_s)
        for acc in self._current.values():
            acc.tick()

    def wake(self) -> None:
        """End a poll() now: from a signal handler or another thread."""
        if self._set is not None:
            self._set.wake()

    def take_ring_bytes(self) -> int:
        """Ring-buffer bytes received since the last call (0 without a probe set)."""
        if self._set is None:
            return 0
        n, self._set.received_bytes = self._set.received_bytes, 0
        return n

    def unwind_totals(self) -> dict[str, int]:
        """The BPF walker's counters so far (UnwindTables.totals), {} when stacks are not walked in BPF."""
        return self._tables.totals() if self._tables is not None else {}

    def unwind_summary(self) -> str | None:
        """How the BPF walker did so far (None when user stacks are not walked in BPF)."""
        tables = self._set.unwind_tables if self._set is not None else None
        return tables.summary() if tables is not None else None

    def set_frequency(self, frequency_hz: int) -> bool:
        """Sample the frequency-driven families (cpu) at `frequency_hz` from now on, without reloading BPF.
        False when no selected family samples by frequency. BpfLoadError if the kernel refuses."""
        changed = False
        for f in self.families:
            setter = getattr(f, "set_frequency", None)
            if setter is not None:
                setter(frequency_hz)
                changed = True
        return changed

    def set_heap_sample_bytes(self, sample_bytes: int) -> bool:
        """The heap family's BPF sample rate from now on (a map write); False without the heap family."""
        return self._set_on_families("set_sample_bytes", sample_bytes)

    def set_offcpu_min_ns(self, min_ns: int) -> bool:
        """The off-CPU threshold from now on (a map write); False without the offcpu family."""
        return self._set_on_families("set_min_ns", min_ns)

    def _set_on_families(self, setter: str, value: int) -> bool:
        changed = False
        for f in self.families:
            set_value = getattr(f, setter, None)
            if set_value is not None:
                set_value(value)
                changed = True
        return changed

    def bpf_run_time_ns(self) -> dict[str, int]:
        """The loaded programs' run time so far by family, as the kernel counts it (`shared`: programs of no
        one family, such as the exec and fork hooks). All 0 while kernel.bpf_stats_enabled is off; a
        tail-called walker is counted in its caller's run, so in the family that sampled."""
        if self._set is None:
            return {}
        owner = {name: f.name for f in self.families for name in f.programs()}
        out: dict[str, int] = {}
        for name, fd in self._set.objs.programs.items():
            family = owner.get(name, SHARED_PROGRAMS)
            try:
                out[family] = out.get(family, 0) + libbpf.prog_run_time(fd)[0]
            except BpfprofError:
                continue
        return out

    def record_count(self) -> int:
        """Records held by the current accumulators (for a progress line)."""
        return sum(acc.record_count() for acc in self._current.values())

    # -- intervals -----------------------------------------------------------------

    def alive(self, pid: int) -> bool:
        """Whether `pid` still runs, for state carried into the next interval (dropped with its process).

        A carried process is needed by the next interval even if it sends no
        record in it (objects still live, goroutines parked): its symbols are kept.
        """
        if not os.path.exists(f"{self.tracker.proc_root}/{pid}"):
            return False
        self.tracker.seen(pid, self.seq + 1)
        return True

    def _loss_totals(self) -> dict[str, Loss]:
        """Every running total of what was lost, by reason (families' unwinders may share one)."""
        # No probe set (a replay): nothing was lost in a ring buffer.
        drops = self._set.drops() if self._set is not None else {}
        totals = {d.name.lower(): Loss(d.name.lower(), n, DROP_DESCRIPTIONS[d]) for d, n in drops.items()}
        for f in self.families:
            try:
                losses = f.losses()
            except BpfprofError as e:  # a counter that cannot be read is not worth an interval
                log.debug("%s: loss counters unreadable: %s", f.name, e)
                continue
            for loss in losses:
                before = totals.get(loss.reason)
                totals[loss.reason] = loss if before is None else replace(before, count=before.count + loss.count)
        return totals

    def cut(self) -> Interval:
        """End the current interval (in the polling thread); sampling goes on into the next one."""
        if self._set is not None:
            self._set.drain()
        now = time.time_ns()
        totals = self._loss_totals()
        losses = [replace(total, count=n) for reason, total in totals.items()
                  if (n := total.count - self._totals_before.get(reason, 0))]
        # A counter unreadable this time keeps its last reading: its growth shows at the next cut, not its total.
        self._totals_before.update({reason: total.count for reason, total in totals.items()})
        if self._tables is not None:  # the BPF side deleted the tables of exited processes
            self._tables.forget_dead(lambda pid: os.path.exists(f"{self.tracker.proc_root}/{pid}"))
        self.forget_repeats()
        done = []
        for f in self.families:
            nxt = f.new_accumulator()
            self._current[f].carry_into(nxt, self.alive)
            done.append(self._current[f])
            self._current[f] = nxt
        interval = Interval(self.seq, done, Window(self._start_ns, now, wall_offset_ns()), self.interval_samples,
                            losses)
        self.seq += 1
        self.interval_samples = 0
        self._start_ns = now
        return interval

    def build(self, interval: Interval, kernel: KernelSymbols | None = None) -> list[Profile]:
        """Symbolize an interval into one Profile per profile type, in PROBES order."""
        if kernel is None and self.config.with_kernel and self.has_kernel_stacks:
            if self._kernel is None:
                try:
                    self._kernel = KernelSymbols()
                except (BpfprofError, OSError) as e:
                    log.warning("kernel symbols unavailable: %s", e)
            kernel = self._kernel
        resolver = self._resolver
        if resolver is None or resolver.kernel is not kernel:
            resolver = self._resolver = StackResolver(self.tracker, kernel)
        resolver.begin_build()
        out = []
        for acc in interval.accumulators:
            for profile in acc.profiles(resolver, self.tracker, interval.window):
                add_process_meta(profile, self.tracker)
                profile.comments.extend(acc.family.notes())
                profile.comments.extend(f"dropped: {loss.line()}" for loss in interval.losses)
                out.append(profile)
        self.resolver_stats = resolver.stats
        if resolver.stats.user_unresolved:
            log.info("%d of %d user addresses unresolved", resolver.stats.user_unresolved,
                     resolver.stats.user_addresses)
        return out

    def close(self) -> None:
        """Detach and free everything (idempotent)."""
        if self._set is not None:
            self._set.close()
            self._set = None
            self._tables = None

    def __enter__(self) -> CapturePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
