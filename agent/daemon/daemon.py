"""`bpfprof agent`: continuous profiling, one export per interval, until SIGTERM.

Three threads, so that sampling never waits on symbolization or export:

  main     drives the capture pipeline `record` uses (agent/capture/pipeline.py):
           drains the ring buffer every 100 ms; at each interval boundary
           it *cuts*: the interval's accumulators are handed over and fresh
           ones take the next records (cheap, no BPF restart, no gap)
  builder  symbolizes a cut interval into Profiles, applies relabel rules,
           and puts the Batch into every exporter's queue
  export   one worker per exporter (agent/daemon/export_queue.py): bounded queue,
           retries, drop counters

Memory is bounded by config: the process table (ProcessTracker, LRU
over processes not needed by a pending interval; what else is kept per
process goes with it), the symbol cache (files by build id, LRU by count
and by the bytes of their copies, released after each build), records per
interval, cut intervals waiting for the builder (MAX_PENDING_INTERVALS) and
batches per exporter queue. After each build the C heap's free pages are
given back (malloc_trim).

SIGTERM/SIGINT: stop sampling, cut the last interval, build it, flush the
queues for up to export.timeout_s, exit 0; all within STOP_BUDGET_S, what
is still unsent then counted as dropped. SIGHUP: reload the config; a bad
one is logged and the old one kept. A remote config (OpAMP,
agent/daemon/opamp.py) takes the same path, on top of the local config,
and its outcome is reported back: APPLIED, or FAILED with the reason.
Changing what BPF loads (profiles, pids, host_proc, ...) restarts the
probes, the interval in progress cut and exported first; the frequency
alone changes in place; the rest applies at once.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from agent.bpfload import libbpf
from agent.bpfload.records import RawRecord
from agent.capture.pipeline import CapturePipeline, Interval
from agent.daemon.config import AgentConfig, effective_config_text
from agent.daemon.export_queue import Batch, BatchExporter, ExportQueue, OtlpBatchExporter, PprofDirExporter
from agent.daemon.governor import GOVERN_PERIOD_S, CostMeter, Governor, Steered, steered
from agent.daemon.metrics import AgentCollector, AgentStats, MetricsServer, make_registry
from agent.daemon.opamp import (
    Health,
    OpampClient,
    RemoteOffer,
    RemoteStatus,
    load_instance_uid,
    load_remote_config,
    save_remote_config,
)
from agent.daemon.relabel import Relabeler
from agent.daemon.selection import Selector, read_identity
from agent.probes.family import ProbeConfig
from agent.processes.stack_resolver import UnwindMode
from agent.processes.tracker import ProcessTracker
from exporters.otlp_sender import OtlpExporter
from exporters.profile import Profile
from symbolizer.debug_files import DEFAULT_DEBUG_DIRS
from symbolizer.debuginfod import DebuginfodClient, urls_from
from symbolizer.errors import BpfprofError
from symbolizer.file_symbols import SymbolCache

log = logging.getLogger(__name__)

# Losses of samples already accepted into an interval, before any exporter saw them (AgentStats.lost_samples).
PRE_EXPORT_LOSSES = ("builder_behind", "build_error", "not_built_at_shutdown")
MAX_PENDING_INTERVALS = 2  # cut intervals waiting for the builder; past it the oldest is dropped
LOOP_ERROR_PAUSE_S = 0.5  # after an unexpected error in the sampling loop, before the next turn
SHUTDOWN_BUILD_S = 30.0  # symbolizing the last interval at SIGTERM; the export flush has its own bound
# SIGTERM to exit, build and flush together: under systemd's TimeoutStopSec and the pods'
# terminationGracePeriodSeconds (60 s, packaging/; tests/unit/test_export_deadlines.py keeps them apart).
STOP_BUDGET_S = 50.0


class BpfCollector:
    """The daemon's side of the capture pipeline: selection and the per-interval cap on every sample,
    losses into the agent's metrics. One pipeline for the agent's life (until a reload changes it)."""

    def __init__(self, cfg: AgentConfig, tracker: ProcessTracker, stats: AgentStats) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.stats = stats
        self.selector = Selector(cfg.selection)
        p = cfg.profiling
        pids = tuple(cfg.selection.pids) if self.selector.pid_only else None
        config = ProbeConfig(frequency_hz=p.frequency_hz, with_kernel=p.kernel_stacks,
                             offcpu_min_ns=p.offcpu_min_us * 1000, heap_sample_bytes=p.heap_sample_bytes,
                             pids=pids, unwind=UnwindMode(p.unwind), unwind_table_bytes=p.unwind_table_bytes)
        self.pipeline = CapturePipeline(config, p.profiles, tracker, targets=pids, accept=self.accept,
                                        interval_cap=lambda: self.cfg.limits.max_interval_samples)
        self._selected: dict[tuple[int, str], bool] = {}  # (pid, thread name) -> selected

    def start(self) -> None:
        """Compile, load and attach (BpfprofError if that fails)."""
        self.pipeline.start()

    def set_selection(self, selector: Selector) -> None:
        self.selector = selector
        self._selected.clear()
        self.pipeline.forget_repeats()

    def accept(self, rec: RawRecord) -> bool:
        """Selection, the per-interval cap, and the process kept for this interval; runs for every sample."""
        pid = rec.pid
        # Keyed by the thread's name too: a process sampled between fork and exec has its parent's
        # identity, and its decision must not outlive the exec (whose new name is in the next records).
        key = (pid, rec.thread_name)
        chosen = self._selected.get(key)
        if chosen is None:
            ident = read_identity(pid, self.cfg.host_proc) if not self.selector.select_all else None
            chosen = self.selector.select_all or (ident is not None and self.selector.matches(ident))
            self._selected[key] = chosen
        if not chosen:
            self.stats.unselected_samples += 1
            return False
        if self.pipeline.interval_samples >= self.cfg.limits.max_interval_samples:
            self.stats.lose("interval_full")
            return False
        self.stats.samples += 1
        self.tracker.seen(pid, self.pipeline.seq)
        return True

    def poll(self, timeout_s: float) -> None:
        """Records until `timeout_s` (at most the pipeline's wait) or wake()."""
        self.pipeline.poll(min(timeout_s, self.pipeline.wait_s))
        self.count_repeats()
        self.stats.ring_buffer_bytes += self.pipeline.take_ring_bytes()

    def count_repeats(self) -> None:
        """Into the books: repeats of samples accepted this interval (CapturePipeline.deliver_bufs; their
        selection holds, set_selection forgets repeats), and those the per-interval cap refused."""
        taken, capped = self.pipeline.take_repeat_counts()
        self.stats.samples += taken
        if capped:
            self.stats.lose("interval_full", capped)

    def wake(self) -> None:
        self.pipeline.wake()

    def cut(self) -> Interval:
        """End the current interval (call from the polling thread); sampling goes on."""
        interval = self.pipeline.cut()
        self.count_repeats()  # cut() drains the ring buffer first
        self.stats.unwind = self.pipeline.unwind_totals()
        for loss in interval.losses:
            self.stats.lose(loss.reason, loss.count)
            if loss.warn:
                log.warning("%d %s", loss.count, loss.description)
        self._selected = {key: v for key, v in self._selected.items() if key[0] in self.tracker or not v}
        if len(self._selected) > self.tracker.max_processes * 4:
            self._selected.clear()  # decisions are cheap to redo; keep the cache bounded under churn
        return interval

    @property
    def seq(self) -> int:
        return self.pipeline.seq

    @seq.setter
    def seq(self, value: int) -> None:
        """Numbering goes on across a probe restart: the process table keys what to keep by it."""
        self.pipeline.seq = value

    def build(self, interval: Interval) -> tuple[list[Profile], dict[int, str]]:
        """Symbolize an interval (builder thread). Returns the profiles and pid -> pod uid."""
        out = self.pipeline.build(interval)
        rs = self.pipeline.resolver_stats
        self.stats.user_addresses += rs.user_addresses
        self.stats.user_unresolved += rs.user_unresolved
        pod_uids = {}
        for profile in out:
            for pid in profile.processes:
                info = self.tracker.get(pid)
                if info is not None and info.container.pod_uid:
                    pod_uids[pid] = info.container.pod_uid
        return out, pod_uids

    def steer(self, rates: Steered) -> list[str]:
        """The families' rates from now on, in place (perf ioctl, map writes); the names of the families
        that have one (cpu, heap, offcpu). BpfprofError if the kernel refuses."""
        p = self.pipeline
        moved = ["cpu"] if p.set_frequency(rates.frequency_hz) else []
        moved += ["heap"] if p.set_heap_sample_bytes(rates.heap_sample_bytes) else []
        moved += ["offcpu"] if p.set_offcpu_min_ns(rates.offcpu_min_ns) else []
        return moved

    def bpf_run_time_ns(self) -> dict[str, int]:
        return self.pipeline.bpf_run_time_ns()

    def family_records(self) -> dict[str, int]:
        return dict(self.pipeline.family_records)

    def close(self) -> None:
        self.pipeline.close()


def make_exporters(cfg: AgentConfig, host_name: str) -> list[BatchExporter]:
    """One exporter per configured destination (ConfigError for a bad one)."""
    e = cfg.export
    out: list[BatchExporter] = []
    if e.otlp.endpoint:
        o = e.otlp
        sender = OtlpExporter(o.endpoint, protocol=o.protocol or None, headers=o.headers, timeout_s=e.timeout_s,
                              insecure=o.insecure, ca_file=o.ca_file or None,
                              compression=None if o.compression == "none" else o.compression,
                              max_retry_after_s=e.max_retry_after_s)
        out.append(OtlpBatchExporter("otlp", sender, host_name, cfg.node_name))
    if e.viewer.endpoint:
        sender = OtlpExporter(e.viewer.endpoint, protocol="http", timeout_s=e.timeout_s,
                              max_retry_after_s=e.max_retry_after_s)
        out.append(OtlpBatchExporter("viewer", sender, host_name, cfg.node_name))
    if e.pprof_dir.path:
        d = e.pprof_dir
        out.append(PprofDirExporter(d.path, host_name, d.max_files, d.max_total_bytes, d.max_age_s))
    return out


CollectorFactory = Callable[[AgentConfig, ProcessTracker, AgentStats], BpfCollector]
ExportersFactory = Callable[[AgentConfig, str], list[BatchExporter]]

class LongLivedHeap:
    """Keeps the cyclic GC off the agent's long-lived objects.

    After the first build the heap is mostly long-lived: symbol tables,
    unwind rows, the process table (~2e5 objects). CPython's full collection
    rescans all of them each time the objects surviving younger collections
    pass a quarter of that, about once a minute at 99 Hz, ~25 ms each here:
    ~2 us of every sample. So after the first build, and every FULL_EVERY_S
    after, the heap is collected once and frozen (gc.freeze): what is frozen
    is left out of later collections; what refcounting frees is freed as
    before. Objects made later (each interval's records and profiles, whose
    cycles must be collected) stay in the collected generations; anything
    frozen that later ends in a cycle waits for the next full collection.
    """

    FULL_EVERY_S = 600.0
    # The soonest after the last full collection that a release of cached files asks for another: what they
    # parsed (DWARF units, pyelftools' objects) is full of cycles, frozen, and would wait FULL_EVERY_S.
    RELEASED_EVERY_S = 60.0

    def __init__(self, full_every_s: float = FULL_EVERY_S) -> None:
        self.full_every_s = full_every_s
        self._last_full = -math.inf
        libc = ctypes.CDLL(None)
        self._malloc_trim = getattr(libc, "malloc_trim", None)  # glibc's; musl has none

    def after_build(self, released: bool = False) -> None:
        """After each build; `released`: the symbol cache let files go (their parsed state is garbage)."""
        now = time.monotonic()
        since = now - self._last_full
        if since >= self.full_every_s or (released and since >= self.RELEASED_EVERY_S):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._last_full = now
        self.trim()

    def trim(self) -> None:
        """Give the C heap's free pages back to the system. An interval's build frees as much as it
        made (records, profiles, parse scratch, released files), and glibc keeps freed blocks in the
        arenas of the threads that used them: in a soak, 70-120 MB of RSS was free memory, which
        malloc_trim(0) returned (one call after each build: a few ms)."""
        if self._malloc_trim is not None:
            self._malloc_trim(0)


class Daemon:
    """The agent. run() returns the exit code; stop() and request_reload() are signal-safe."""

    def __init__(self, cfg: AgentConfig, reload_config: Callable[[dict | None], AgentConfig] | None = None,
                 collector_factory: CollectorFactory = BpfCollector,
                 exporters_factory: ExportersFactory = make_exporters, host_name: str | None = None,
                 cache: SymbolCache | None = None) -> None:
        self.reload_config = reload_config
        self._remote: dict | None = None  # the last remote config applied; every reload puts it on top
        self._restored: RemoteOffer | None = None  # the one kept from the last run, started with
        self.cfg = cfg = self._restore_remote(cfg)
        self.collector_factory = collector_factory
        self.exporters_factory = exporters_factory
        self.host_name = host_name or cfg.node_name or socket.gethostname()
        self.stats = AgentStats()
        if cache is None:
            urls = urls_from(cfg.profiling.debuginfod_urls)
            debuginfod = DebuginfodClient(urls, deadline_s=cfg.profiling.debuginfod_timeout_s,
                                          cache_bytes=cfg.profiling.debuginfod_cache_bytes) if urls else None
            cache = SymbolCache(cfg.limits.max_symbol_files, DEFAULT_DEBUG_DIRS + cfg.profiling.debug_dirs,
                                debuginfod, max_bytes=cfg.limits.max_symbol_cache_bytes)
        self.cache = cache
        self.tracker = ProcessTracker(self.cache, cfg.host_proc, max_processes=cfg.limits.max_processes)
        self.relabeler = Relabeler(cfg.relabel)
        self.queues: list[ExportQueue] = []
        self._retired: list[ExportQueue] = []
        self._stop = threading.Event()
        self._reload = threading.Event()
        # SIGHUP's config is read and validated on a thread of its own (a slow or hostile
        # file must not stall sampling); the main loop applies what it leaves here.
        self._reloader: threading.Thread | None = None
        self._reloaded: tuple[AgentConfig, list[ExportQueue] | None] | BpfprofError | None = None
        self._reload_offer: RemoteOffer | None = None  # the remote config the reload in flight applies
        self.opamp: OpampClient | None = None
        self._last_losses: dict[str, int] = {}  # the last cut interval's losses, for the health reported
        self._pending: collections.deque[Interval] = collections.deque()
        self._pending_lock = threading.Lock()
        self._building: int | None = None
        self._builder_wake = threading.Event()
        self._builder_done = threading.Event()
        self._built = threading.Event()  # an interval was built since the last eviction
        self._builder: threading.Thread | None = None
        self._gc = LongLivedHeap()
        self.collector: BpfCollector | None = None
        self.metrics: MetricsServer | None = None
        self.started = threading.Event()  # set once sampling (for tests)
        self._started_ns = time.time_ns()
        self._probe_hz = cfg.profiling.frequency_hz  # the frequency the running probes were loaded for
        self.governor: Governor | None = None
        self.meter = CostMeter(libbpf.bpf_stats_enabled())
        self._next_cut = self._next_govern = 0.0  # monotonic times of the next cut and governor decision

    # --- signals -------------------------------------------------------------

    def stop(self) -> None:
        """Stop sampling, flush and return from run() (signal-handler safe)."""
        self._stop.set()
        self._wake()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake()

    def _wake(self) -> None:
        collector = self.collector
        if collector is not None:
            collector.wake()

    # --- the main loop -----------------------------------------------------------

    def run(self) -> int:
        """Sample until stop(); returns 0 after the final flush. BpfprofError if start-up fails."""
        cfg = self.cfg
        self.queues = [ExportQueue(e, cfg.export.queue_max_batches) for e in self.exporters_factory(cfg,
                                                                                                   self.host_name)]
        if not self.queues:
            log.warning("no exporter configured (export.otlp, export.pprof_dir, export.viewer): profiles are dropped")
        if cfg.metrics.listen:
            self._start_metrics(cfg.metrics.listen)
        self._builder = threading.Thread(target=self._build_loop, name="builder", daemon=True)
        self._builder.start()
        try:
            self.collector = self.collector_factory(cfg, self.tracker, self.stats)
            self.collector.start()
            self._probe_hz = cfg.profiling.frequency_hz
        except BaseException:
            self._shutdown_exports(0.5)
            if self.metrics:
                self.metrics.close()
            raise
        self.stats.ready = True
        self.started.set()
        log.info("sampling %s at %d Hz; exporting every %gs to %s", ",".join(cfg.profiling.profiles),
                 cfg.profiling.frequency_hz, cfg.export.interval_s,
                 ", ".join(q.name for q in self.queues) or "nothing")
        self._new_governor()
        self._start_opamp()
        self._next_cut = time.monotonic() + cfg.export.interval_s
        self._next_govern = time.monotonic() + GOVERN_PERIOD_S
        while not self._stop.is_set():
            try:
                self._loop_once()
            except Exception:  # a bug must not end a fleet's profiling, nor lose what was collected
                self.stats.loop_errors += 1
                log.exception("sampling loop error %d (it goes on)", self.stats.loop_errors)
                self._stop.wait(LOOP_ERROR_PAUSE_S)  # an error that repeats does not spin a CPU
        return self._shutdown()

    def _loop_once(self) -> None:
        """One turn of the sampling loop: drain, reload, govern, cut. The next govern and cut times move
        before each runs, so one that raises is not retried at once."""
        assert self.collector is not None
        self.collector.poll(max(0.0, self._next_cut - time.monotonic()))
        now = time.monotonic()
        self.stats.last_loop_monotonic = now
        self.stats.processes_tracked = len(self.tracker)
        if self._reload.is_set() and self._reloader is None:
            self._reload.clear()
            self._start_reload()
        if self.opamp is not None and self._reloader is None:
            offer = self.opamp.take_offer()
            if offer is not None:
                self._start_reload(offer)
        if self._reloader is not None and not self._reloader.is_alive():
            self._reloader = None
            self._next_cut = self._apply_reload(self._next_cut)
        if now >= self._next_govern:
            self._next_govern = now + GOVERN_PERIOD_S
            self._govern()
            self._report_health()
        if now >= self._next_cut:
            self._next_cut = max(self._next_cut + self.cfg.export.interval_s, now + 1.0)
            self._cut()
        elif self._built.is_set():
            self._built.clear()
            self._evict()

    # --- the overhead governor ------------------------------------------------------

    def _new_governor(self) -> None:
        """A governor for the running config (again after a reload): every family at its configured rate."""
        lim, p = self.cfg.limits, self.cfg.profiling
        self.governor = Governor(lim.cpu_percent, lim.min_frequency_hz, p.frequency_hz, families=p.profiles)
        self._set_rate_stats(self._rates_at(self.governor.factors))
        self._govern_reading()
        if self.governor.enabled:
            log.info("overhead governor: budget %.3g%% of %d CPUs, steering %s down to %.3g of their rates "
                     "(%d Hz), BPF cost from %s", lim.cpu_percent, self.governor.cpus,
                     ", ".join(self.governor.factors), self.governor.floor, self.governor.floor_hz,
                     self.meter.source)

    def _govern_reading(self) -> None:
        assert self.collector is not None and self.governor is not None
        reading = self.meter.read(self.collector.bpf_run_time_ns(),
                                  self.stats.samples + self.stats.unselected_samples,
                                  self.collector.family_records())
        self.stats.bpf_run_s = reading.bpf_s
        self.governor.observe(reading)

    def _govern(self) -> None:
        """Measure; change the families' rates if the governor says so (in place, no reload)."""
        gov, collector = self.governor, self.collector
        if gov is None or collector is None:
            return
        self._govern_reading()
        new = gov.decide()
        self.stats.cost_percent = gov.last_cost / gov.cpus * 100
        self.stats.family_cost_percent = {name: c / gov.cpus * 100 for name, c in gov.last_family_costs.items()}
        if new is None:
            return
        before, after = self._rates_at(gov.factors), self._rates_at(new)
        try:
            moved = collector.steer(after)
        except BpfprofError as e:
            log.error("overhead governor: cannot set %s: %s", after, e)
            return
        if not moved:
            gov.budget = 0.0  # no family with a rate: nothing to steer
            return
        gov.applied(new)
        self._set_rate_stats(after)
        self.stats.governor_changes += 1
        changes = {"cpu": f"sampling frequency {before.frequency_hz} -> {after.frequency_hz} Hz",
                   "heap": f"heap sample rate {before.heap_sample_bytes} -> {after.heap_sample_bytes} bytes",
                   "offcpu": f"off-CPU threshold {before.offcpu_min_ns // 1000} -> {after.offcpu_min_ns // 1000} us"}
        differ = {"cpu": before.frequency_hz != after.frequency_hz,
                  "heap": before.heap_sample_bytes != after.heap_sample_bytes,
                  "offcpu": before.offcpu_min_ns != after.offcpu_min_ns}
        moved = [name for name in moved if differ[name]] or moved
        shares = ", ".join(f"{name} {c:.2f}%" for name, c in sorted(self.stats.family_cost_percent.items(),
                                                                   key=lambda kv: -kv[1]))
        log.info("overhead governor: cost %.2f%% of %d CPUs (budget %.2f%%; %s): %s%s", self.stats.cost_percent,
                 gov.cpus, gov.budget / gov.cpus * 100, shares or "no cost by family",
                 ", ".join(changes[name] for name in moved),
                 " (the floor: still over budget)" if gov.at_floor_over_budget else "")

    def _rates_at(self, factors: Mapping[str, float]) -> Steered:
        """What every family samples at when the governor's factors are `factors`."""
        p = self.cfg.profiling
        return steered(factors, p.frequency_hz, p.heap_sample_bytes, p.offcpu_min_us * 1000)

    def _set_rate_stats(self, rates: Steered) -> None:
        self.stats.frequency_hz = rates.frequency_hz
        self.stats.heap_sample_bytes = rates.heap_sample_bytes
        self.stats.offcpu_min_ns = rates.offcpu_min_ns

    def _cut(self) -> None:
        assert self.collector is not None
        interval = self.collector.cut()
        self._last_losses = {loss.reason: loss.count for loss in interval.losses if loss.count}
        with self._pending_lock:
            while len(self._pending) >= MAX_PENDING_INTERVALS:
                old = self._pending.popleft()
                self.stats.lose("builder_behind", old.samples)
                log.warning("interval %d dropped: symbolization is behind", old.seq)
            self._pending.append(interval)
        self._builder_wake.set()
        self._evict()

    def _evict(self) -> None:
        """Drop the processes no interval still to be built needs (on this thread: it owns the table). At
        each cut, and as soon as the builder has built one: a process sampled only in that interval goes
        then, not a cut later, so under churn the table holds one interval's processes, not two."""
        assert self.collector is not None
        with self._pending_lock:
            safe = min([i.seq for i in self._pending] + ([self._building] if self._building is not None else [])
                       + [self.collector.seq])
        evicted = self.tracker.evict(safe)
        self.stats.process_evictions = self.tracker.stats.evictions
        self.stats.processes_tracked = len(self.tracker)
        self.stats.snapshot_failures = self.tracker.stats.snapshot_failures
        if evicted:
            log.debug("evicted %d processes", evicted)

    def _build_loop(self) -> None:
        while True:
            with self._pending_lock:
                interval = self._pending.popleft() if self._pending else None
                self._building = interval.seq if interval else None
                if interval is None:
                    self._builder_done.set()
                    self._builder_wake.clear()
            if interval is None:
                self._builder_wake.wait()  # set by _cut and the shutdown: no timeout, no idle wake-ups
                continue
            self._builder_done.clear()
            cpu0 = time.thread_time()
            try:
                self._build_one(interval)
            except Exception:  # noqa: BLE001  (one bad interval must not end the agent)
                log.exception("interval %d could not be built; its samples are lost", interval.seq)
                self.stats.lose("build_error", interval.samples)
            released = self.cache.enforce_budget()  # here: no lookup is under way between two builds
            self._gc.after_build(released > 0)
            self.meter.built(time.thread_time() - cpu0, self.cfg.export.interval_s)
            self._built.set()  # the sampling loop evicts what only this interval needed
            self._wake()

    def _build_one(self, interval: Interval) -> None:
        assert self.collector is not None
        t0 = time.monotonic()
        profiles, pod_uids = self.collector.build(interval)
        relabeler = self.relabeler
        before = relabeler.stats.dropped_samples
        profiles = [relabeler.apply(p) for p in profiles]
        self.stats.relabel_dropped_samples += relabeler.stats.dropped_samples - before
        batch = Batch(profiles, interval.window.start_ns, interval.seq, pod_uids)
        for q in list(self.queues):
            q.put(batch)
        self.stats.intervals += 1
        self.stats.interval_build_s = time.monotonic() - t0
        log.info("interval %d: %d samples of %d processes, built in %.2fs", interval.seq, interval.samples,
                 len({pid for p in profiles for pid in p.processes}), self.stats.interval_build_s)

    def _wait_built(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._pending_lock:
                idle = not self._pending and self._building is None
            if idle:
                return True
            self._builder_wake.set()
            self._builder_done.wait(0.05)
        return False

    def _shutdown(self) -> int:
        """Last interval, built and flushed within export.timeout_s; then exit 0."""
        self.stats.ready = False
        assert self.collector is not None
        log.info("stopping: exporting the last interval")
        t0 = time.monotonic()
        try:
            self._cut()
        finally:
            self.collector.close()
        if not self._wait_built(SHUTDOWN_BUILD_S):
            log.error("the last interval was not symbolized in %gs", SHUTDOWN_BUILD_S)
            with self._pending_lock:
                unbuilt, self._pending = list(self._pending), collections.deque()
            for interval in unbuilt:
                self.stats.lose("not_built_at_shutdown", interval.samples)
        left_s = STOP_BUDGET_S - (time.monotonic() - t0)
        self._shutdown_exports(max(1.0, min(self.cfg.export.timeout_s, left_s)))
        if self.opamp is not None:
            self.opamp.stop()
        if self.metrics is not None:
            self.metrics.close()
        self._builder_wake.set()
        self._log_books()
        log.info("stopped")
        return 0

    def _log_books(self) -> None:
        """At exit, where every accepted sample went (the metrics endpoint is closed by then):
        accepted = lost before export + relabel-dropped + per exporter (delivered + dropped + queued)."""
        s = self.stats
        before = {k: n for k, n in s.lost_samples.copy().items() if k in PRE_EXPORT_LOSSES and n}
        log.info("books: %d samples accepted; before export %d relabel-dropped, lost %s", s.samples,
                 s.relabel_dropped_samples, before or "none")
        for q in self._retired + self.queues:
            st = q.stats
            dropped = {k: n for k, n in st.dropped_samples_by_reason.items() if n}
            log.info("books: export %s: %d samples delivered, dropped %s, %d queued", q.name, st.exported_samples,
                     dropped or "none", st.queued_samples)

    def _shutdown_exports(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for q in self._retired + self.queues:  # they flushed in parallel; each waits for what is left
            q.flush(max(0.0, deadline - time.monotonic()))
        for q in self._retired + self.queues:
            left = q.shutdown(max(0.1, deadline - time.monotonic()))
            if left:
                log.error("export %s: %d interval(s) not delivered before shutdown", q.name, left)

    def _start_metrics(self, listen: str) -> None:
        collector = AgentCollector(self.stats, lambda: [(q.name, q.stats) for q in self.queues + self._retired],
                                   self.cache)
        self.metrics = MetricsServer(listen, make_registry(collector), self.stats, collector=collector)
        log.info("metrics on http://%s/metrics", listen)

    def _restore_remote(self, local: AgentConfig) -> AgentConfig:
        """`local` with the remote config the last run applied on top (kept in opamp.remote_config_file),
        validated against the local file as any offer is: a fleet's config holds across a restart while
        the server is down. One no longer valid (the local file changed) is logged and dropped."""
        if not local.opamp.endpoint or self.reload_config is None:
            return local
        kept = load_remote_config(local.opamp.remote_config_file, local.opamp.endpoint)
        if kept is None:
            return local
        try:
            cfg = self.reload_config(kept.tree)
        except BpfprofError as e:
            log.warning("opamp: the remote config %s kept from the last run is not valid here (%s): starting "
                        "with the local config", kept.config_hash.hex()[:16], e)
            save_remote_config(local.opamp.remote_config_file, RemoteOffer(kept.config_hash, {}), local.opamp.endpoint)
            return local
        log.info("opamp: starting with the remote config %s kept from the last run", kept.config_hash.hex()[:16])
        self._remote, self._restored = kept.tree, kept
        return cfg

    # --- SIGHUP -------------------------------------------------------------------

    def _start_reload(self, offer: RemoteOffer | None = None) -> None:
        """Read and validate the config on a thread; the main loop applies the outcome (_apply_reload).

        `offer`: a remote config to put on top of the local one (else the last one applied stays on top).
        """
        if self.reload_config is None or (offer is not None and offer.tree is None):
            if offer is not None:  # unreadable (not YAML, several files): nothing to validate
                self._remote_outcome(offer, offer.error or "remote configs are not accepted here")
            return
        load, running = self.reload_config, self.cfg
        remote = offer.tree if offer is not None else self._remote

        def read() -> None:
            try:
                new = load(remote)
                queues = None  # new exporters (they read CA files) only when export changed
                if new.export != running.export or new.node_name != running.node_name:
                    queues = [ExportQueue(e, new.export.queue_max_batches)
                              for e in self.exporters_factory(new, self.host_name)]
                self._reloaded = (new, queues)
            except BpfprofError as e:
                self._reloaded = e
            except Exception as e:  # noqa: BLE001  (a loader bug must not end reloads: counted, logged)
                self._reloaded = BpfprofError(f"{type(e).__name__}: {e}")

        self._reloaded = None
        self._reload_offer = offer
        self._reloader = threading.Thread(target=read, name="config-reload", daemon=True)
        self._reloader.start()

    def _remote_outcome(self, offer: RemoteOffer, error: str = "") -> None:
        """Tell the OpAMP server what became of its config."""
        if self.opamp is None:
            return
        if error:
            log.error("remote config %s rejected, keeping the running config: %s", offer.config_hash.hex()[:16],
                      error)
            self.opamp.report_remote_status(offer.config_hash, RemoteStatus.FAILED, error)
        else:
            log.info("remote config %s applied", offer.config_hash.hex()[:16])
            self.opamp.report_remote_status(offer.config_hash, RemoteStatus.APPLIED)

    def _apply_reload(self, next_cut: float) -> float:
        """Apply the config the reload thread read; keep the old one if it is bad."""
        outcome, self._reloaded = self._reloaded, None
        offer, self._reload_offer = self._reload_offer, None
        try:
            if outcome is None:
                raise BpfprofError("the config loader ended without a result")
            if isinstance(outcome, BpfprofError):
                raise outcome
        except BpfprofError as e:
            self.stats.reloads_failed += 1
            if offer is not None:
                self._remote_outcome(offer, str(e))
            else:
                log.error("reload rejected, keeping the running config: %s", e)
            return next_cut
        new, queues = outcome
        old = self.cfg
        logging.getLogger().setLevel(new.log_level.upper())
        if queues is not None:
            for q in self.queues:  # they deliver what they hold, then are shut down at exit or next reload
                q.flush(0)
            self._retired = [q for q in self._retired if len(q)] + self.queues
            self.queues = queues
        self.relabeler = Relabeler(new.relabel)
        self.tracker.max_processes = new.limits.max_processes
        self.cache.max_files = new.limits.max_symbol_files
        self.cache.max_bytes = new.limits.max_symbol_cache_bytes
        if new.metrics.listen != old.metrics.listen:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            if new.metrics.listen:
                try:
                    self._start_metrics(new.metrics.listen)
                except BpfprofError as e:
                    log.error("reload: %s", e)
        self.cfg = new
        assert self.collector is not None
        # The rates change in place (perf_event ioctl, map writes), the frequency up to what the probes
        # were loaded for (their ring buffer is sized for it); the rest of profiling needs new probes.
        rates = ("frequency_hz", "heap_sample_bytes", "offcpu_min_us")
        same_probes = (replace(new.profiling, **{k: getattr(old.profiling, k) for k in rates}) == old.profiling
                       and new.profiling.frequency_hz <= self._probe_hz)
        if not same_probes or new.host_proc != old.host_proc or new.selection.pids != old.selection.pids:
            if not self._restart_collector(old):
                new = self.cfg  # the old config again
                if offer is not None:
                    self._remote_outcome(offer, "the probes for the new profiling settings failed to load; "
                                                "the previous ones run")
                    offer = None
        else:
            self.collector.cfg = new
            self.collector.set_selection(Selector(new.selection))
            if new.limits != old.limits or new.profiling != old.profiling:
                self._new_governor()  # from the configured rates again
                try:
                    self.collector.steer(self._rates_at({}))
                except BpfprofError as e:
                    log.error("reload: cannot set the new rates: %s", e)
        if new.opamp != old.opamp:
            if self.opamp is not None:
                self.opamp.stop()
                self.opamp = None
            self._start_opamp()
        elif self.opamp is not None:
            self.opamp.set_effective_config(effective_config_text(new))
        self.stats.reloads_ok += 1
        if offer is not None:
            self._remote = offer.tree
            self._remote_outcome(offer)
            save_remote_config(new.opamp.remote_config_file, offer, new.opamp.endpoint)
        else:
            log.info("config reloaded")
        if new.export.interval_s != old.export.interval_s:
            return time.monotonic() + new.export.interval_s
        return next_cut

    # --- OpAMP -----------------------------------------------------------------------

    def _start_opamp(self) -> None:
        o = self.cfg.opamp
        if not o.endpoint:
            return
        try:
            self.opamp = OpampClient(o, load_instance_uid(o.instance_uid_file), self.host_name, self.cfg.node_name)
        except BpfprofError as e:
            log.error("opamp: %s; running without remote configuration", e)
            return
        self.stats.opamp = self.opamp.stats
        self.opamp.set_effective_config(effective_config_text(self.cfg))
        if self._restored is not None:
            self.opamp.restored(self._restored)
            self._restored = None
        self._report_health()
        self.opamp.start()

    def health(self) -> Health:
        """Healthy, or degraded with every reason: probes not attached, an exporter failing, samples lost
        in the last interval, over the CPU budget at the governor's floor."""
        reasons = []
        if not self.stats.ready:
            reasons.append("probes not attached")
        for q in self.queues:
            if q.stats.last_error:
                reasons.append(f"export {q.name} failing: {q.stats.last_error}")
        if self._last_losses:
            lost = ", ".join(f"{n} {reason}" for reason, n in sorted(self._last_losses.items()))
            reasons.append(f"samples lost in the last interval: {lost}")
        gov = self.governor
        if gov is not None and gov.enabled and gov.at_floor_over_budget:
            reasons.append(f"over the CPU budget with {', '.join(gov.factors)} at their floor ({gov.floor_hz} Hz)")
        return Health(not reasons, "; ".join(reasons), self._started_ns)

    def _report_health(self) -> None:
        if self.opamp is not None:
            self.opamp.set_health(self.health())

    def _restart_collector(self, old: AgentConfig) -> bool:
        """New probes for self.cfg, the interval in progress cut (and exported) first; False if they failed
        to load and the previous ones run again."""
        assert self.collector is not None
        self._cut()
        seq = self.collector.seq
        self.collector.close()
        self.tracker.proc_root = self.cfg.host_proc
        try:
            self.collector = self.collector_factory(self.cfg, self.tracker, self.stats)
            self.collector.seq = seq
            self.collector.start()
            self._probe_hz = self.cfg.profiling.frequency_hz
            self._new_governor()
            log.info("probes restarted for the new config")
            return True
        except BpfprofError as e:
            log.error("new probes failed (%s); going back to the previous profiling settings", e)
            self.cfg = old
            self.tracker.proc_root = old.host_proc
            self.collector = self.collector_factory(old, self.tracker, self.stats)
            self.collector.seq = seq
            self.collector.start()
            self._new_governor()
            return False

