"""Self-metrics in Prometheus format, and /healthz, /readyz, on 127.0.0.1:9464 by default.

The daemon keeps plain counters (AgentStats, the export queues' QueueStats,
the SymbolCache's hits/misses); a prometheus_client Collector reads them at
scrape time, so the sampling path never touches a metric object. The
registry is our own (not the global one), so tests can build several.

/healthz: 200 while the sampling loop has turned within HEALTHY_LAG_S (it
is stuck otherwise); /readyz: 200 once the probes are attached and
sampling, 503 before and after. Served by exporters/http_server.py within
METRICS_LIMITS: idle and slow scrapers are closed after a deadline, a
flood of connections costs no threads, and the server's own connection
outcomes are metrics too (bpfprof_metrics_http_*).
"""

from __future__ import annotations

import http.server
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent.daemon.config import parse_listen
from agent.daemon.export_queue import QueueStats
from exporters.http_server import BoundedHttpServer, HttpLimits, HttpServerStats
from symbolizer.debuginfod import OUTCOMES as DEBUGINFOD_OUTCOMES
from symbolizer.errors import ConfigError
from symbolizer.file_symbols import SymbolCache

if TYPE_CHECKING:
    from agent.daemon.opamp import OpampStats

log = logging.getLogger(__name__)

HEALTHY_LAG_S = 30.0
PREFIX = "bpfprof"
# A scraper sends a GET every few seconds: two workers, short deadlines, no bodies.
METRICS_LIMITS = HttpLimits(max_connections=64, workers=2, idle_timeout_s=30.0, request_timeout_s=10.0,
                            write_timeout_s=10.0, max_head_bytes=16 << 10, max_body_bytes=0,
                            max_buffered_bytes=0)


@dataclass
class AgentStats:
    """Counters of the daemon; every field is a plain int the sampling thread bumps."""

    samples: int = 0  # records accepted into an interval
    lost_samples: dict[str, int] = field(default_factory=dict)  # reason -> count (BPF drops and our own)
    unselected_samples: int = 0
    relabel_dropped_samples: int = 0
    processes_tracked: int = 0
    process_evictions: int = 0
    snapshot_failures: int = 0
    intervals: int = 0
    interval_build_s: float = 0.0  # last interval's symbolization + encoding time
    user_addresses: int = 0
    user_unresolved: int = 0
    ring_buffer_bytes: int = 0  # records' bytes read from the ring buffer
    unwind: dict[str, int] = field(default_factory=dict)  # the BPF walker's counters (UnwindTables.totals)
    reloads_ok: int = 0
    frequency_hz: int = 0  # what the cpu family samples at now (the overhead governor moves it)
    heap_sample_bytes: int = 0  # the heap family's BPF sample rate now (the governor moves it)
    offcpu_min_ns: int = 0  # the off-CPU threshold now (the governor moves it)
    governor_changes: int = 0
    cost_percent: float = 0.0  # the agent's measured cost (process + BPF), % of all CPUs, at the last decision
    family_cost_percent: dict[str, float] = field(default_factory=dict)  # the same by family (governor.py)
    bpf_run_s: float = 0.0  # BPF programs' run time (kernel count, or the estimate: governor.CostMeter)
    reloads_failed: int = 0
    loop_errors: int = 0  # unexpected exceptions in the sampling loop, logged; the loop went on
    opamp: OpampStats | None = None  # the OpAMP client's counters, when opamp.endpoint is set
    ready: bool = False
    last_loop_monotonic: float = field(default_factory=time.monotonic)

    def lose(self, reason: str, n: int = 1) -> None:
        self.lost_samples[reason] = self.lost_samples.get(reason, 0) + n


class AgentCollector(Collector):
    """Turns AgentStats, queue stats and the symbol cache into metric families at scrape time."""

    def __init__(self, stats: AgentStats, queues: Callable[[], Iterable[QueueStats | tuple[str, QueueStats]]],
                 cache: SymbolCache) -> None:
        self.stats = stats
        self.queues = queues
        self.cache = cache
        self.http: HttpServerStats | None = None  # the metrics endpoint's own connections, once it serves

    def collect(self) -> Iterable[Metric]:
        s = self.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield counter("samples", "Samples accepted into an export interval.", s.samples)
        lost = CounterMetricFamily(f"{PREFIX}_lost_samples", "Samples lost, by reason.", labels=["reason"])
        for reason, n in sorted(s.lost_samples.copy().items()):
            lost.add_metric([reason], n)
        yield lost
        yield counter("stack_collisions", "Stacks that could not be read or were truncated (BPF stack errors).",
                      sum(n for r, n in s.lost_samples.copy().items() if "stack" in r))  # builder adds keys
        yield counter("ring_buffer_bytes", "Bytes of records read from the BPF ring buffer.", s.ring_buffer_bytes)
        yield from _unwind_metrics(s.unwind)
        yield counter("loop_errors", "Unexpected errors in the sampling loop (logged with a traceback; sampling "
                      "went on).", s.loop_errors)
        yield counter("unselected_samples", "Samples of processes the selection leaves out.", s.unselected_samples)
        yield counter("relabel_dropped_samples", "Samples dropped by relabel rules.", s.relabel_dropped_samples)
        yield gauge("processes_tracked", "Processes in the process table.", s.processes_tracked)
        yield counter("process_evictions", "Processes evicted from the process table.", s.process_evictions)
        yield counter("process_snapshot_failures", "Processes gone before their maps could be read.",
                      s.snapshot_failures)
        yield counter("intervals", "Export intervals completed.", s.intervals)
        yield gauge("interval_build_seconds", "Symbolization and encoding time of the last interval.",
                    s.interval_build_s)
        yield counter("symbolizer_user_addresses", "Distinct user addresses symbolized.", s.user_addresses)
        yield counter("symbolizer_user_unresolved", "Distinct user addresses left unresolved.", s.user_unresolved)
        yield counter("symbolizer_cache_hits", "Symbol cache hits (files by build id).", self.cache.hits)
        yield counter("symbolizer_cache_misses", "Symbol cache misses.", self.cache.misses)
        debuginfod = CounterMetricFamily(f"{PREFIX}_debuginfod_requests",
                                         "debuginfod lookups by outcome (off unless servers are configured).",
                                         labels=["outcome"])
        client = getattr(self.cache, "debuginfod", None)
        for outcome in DEBUGINFOD_OUTCOMES:
            debuginfod.add_metric([outcome], client.outcomes[outcome] if client is not None else 0)
        yield debuginfod
        yield counter("symbolizer_cache_evictions", "Symbol cache evictions (LRU).", self.cache.evictions)
        yield counter("symbolizer_cache_budget_evictions",
                      "Files whose copies the symbol cache released to stay within limits.max_symbol_cache_bytes.",
                      self.cache.budget_evictions)
        yield gauge("symbolizer_cache_files", "Files in the symbol cache.", len(self.cache))
        yield gauge("symbolizer_cache_bytes", "Bytes of files the symbol cache holds copied or inflated in memory.", self.cache.mapped_bytes())
        yield gauge("sampling_frequency_hz", "CPU sampling frequency now (the overhead governor moves it).",
                    s.frequency_hz)
        yield gauge("heap_sample_bytes", "Mean bytes between the allocations BPF samples now (heap; the overhead "
                    "governor moves it; Go and the preloaded sampler keep their own).", s.heap_sample_bytes)
        yield gauge("offcpu_min_block_seconds", "Off-CPU blocks shorter than this are left out now (the overhead "
                    "governor moves it).", s.offcpu_min_ns / 1e9)
        yield counter("governor_changes", "Rate changes made by the overhead governor (each decision that moved "
                      "the CPU frequency, the heap sample rate or the off-CPU threshold).", s.governor_changes)
        yield gauge("cost_cpu_percent", "The agent's CPU cost (process + BPF) in % of all CPUs, last measured.",
                    s.cost_percent)
        by_family = GaugeMetricFamily(f"{PREFIX}_family_cost_cpu_percent", "The agent's cost by profile family, "
                                      "% of all CPUs, last measured: its BPF programs plus the agent's CPU shared "
                                      "out by records (shared: BPF hooks of no one family).", labels=["family"])
        for name, pct in sorted(s.family_cost_percent.copy().items()):
            by_family.add_metric([name], pct)
        yield by_family
        yield counter("bpf_run_seconds", "Run time of the agent's BPF programs (kernel bpf_stats, else estimated).",
                      s.bpf_run_s)
        yield counter("config_reloads", "Successful reloads (SIGHUP or a remote config).", s.reloads_ok)
        yield counter("config_reload_failures", "Reloads rejected, SIGHUP or remote (old config kept).",
                      s.reloads_failed)
        if s.opamp is not None:
            yield from _opamp_metrics(s.opamp)
        yield gauge("ready", "1 while sampling.", int(s.ready))
        families = {
            "export_batches": ("Intervals delivered.", CounterMetricFamily, "exported_batches"),
            "export_samples": ("Samples delivered.", CounterMetricFamily, "exported_samples"),
            "export_failures": ("Failed export attempts (each retried).", CounterMetricFamily, "failed_attempts"),
            "export_timeouts": ("Export attempts with no complete answer within their deadline (also failures).",
                                CounterMetricFamily, "timed_out_attempts"),
            "export_queue_depth": ("Intervals waiting to be exported.", GaugeMetricFamily, "depth"),
            "export_queued_samples": ("Samples in the intervals waiting to be exported.", GaugeMetricFamily,
                                      "queued_samples"),
        }
        queues = list(self.queues())
        for name, (doc, cls, attr) in families.items():
            fam = cls(f"{PREFIX}_{name}", doc, labels=["exporter"])
            for exporter, qs in queues:
                fam.add_metric([exporter], getattr(qs, attr))
            yield fam
        if self.http is not None:
            yield from _http_metrics(self.http)
        by_reason = {
            "export_dropped_batches": ("Intervals dropped, by reason: queue_full, refused (a reply not worth "
                                       "retrying), shutdown (unsent at exit).", "dropped_batches_by_reason"),
            "export_dropped_samples": ("Samples in dropped intervals, by reason (as export_dropped_batches).",
                                       "dropped_samples_by_reason"),
        }
        for name, (doc, attr) in by_reason.items():
            fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["exporter", "reason"])
            for exporter, qs in queues:
                for reason, n in sorted(getattr(qs, attr).items()):
                    fam.add_metric([exporter, reason], n)
            yield fam


def make_registry(collector: AgentCollector) -> CollectorRegistry:
    """Our metrics plus process_* (CPU seconds, resident memory bytes, open fds)."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """/metrics, /healthz and /readyz on one address (exporters/http_server.py, METRICS_LIMITS)."""

    def __init__(self, listen: str, registry: CollectorRegistry, stats: AgentStats,
                 limits: HttpLimits = METRICS_LIMITS, collector: AgentCollector | None = None) -> None:
        host, port = parse_listen(listen)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (BaseHTTPRequestHandler's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    lag = time.monotonic() - stats.last_loop_monotonic
                    ok = lag < HEALTHY_LAG_S
                    self._reply(200 if ok else 503, b"ok\n" if ok else f"sampling loop stuck {lag:.0f}s\n".encode())
                elif path == "/readyz":
                    self._reply(200 if stats.ready else 503, b"ready\n" if stats.ready else b"not sampling\n")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz, /readyz\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        try:
            self._server = BoundedHttpServer(Handler, host, port, limits, name="metrics")
        except OSError as e:
            raise ConfigError(f"metrics.listen {listen}: cannot listen: {e.strerror}") from None
        if collector is not None:
            collector.http = self._server.stats
        self.port = self._server.port
        self._server.start()

    @property
    def http_stats(self) -> HttpServerStats:
        return self._server.stats

    def close(self) -> None:
        self._server.close()


def _http_metrics(h: HttpServerStats) -> Iterable[Metric]:
    """The metrics endpoint's connections by outcome, and how many are open."""
    outcomes = CounterMetricFamily(f"{PREFIX}_metrics_http_connections", "Connections to this endpoint by outcome "
                                   "(refused: at the limit with none idle; evicted_idle: closed to make room; "
                                   "idle_closed, timed_out, client_gone, bad_request).", labels=["outcome"])
    for outcome, n in (("accepted", h.accepted), ("refused", h.refused), ("evicted_idle", h.evicted_idle),
                       ("idle_closed", h.idle_closed), ("timed_out", h.timed_out), ("client_gone", h.client_gone),
                       ("bad_request", h.bad_requests)):
        outcomes.add_metric([outcome], n)
    yield outcomes
    yield CounterMetricFamily(f"{PREFIX}_metrics_http_requests", "Requests answered by this endpoint.",
                              value=h.requests)
    yield GaugeMetricFamily(f"{PREFIX}_metrics_http_open_connections", "Connections open to this endpoint.",
                            value=h.open)


def _opamp_metrics(o: OpampStats) -> Iterable[Metric]:
    """The OpAMP client's exchanges by outcome, remote configs by status, and whether the server answers."""
    requests = CounterMetricFamily(f"{PREFIX}_opamp_requests", "Exchanges with the OpAMP server by outcome (ok, "
                                   "unreachable, timeout, http_error, bad_response, server_error).",
                                   labels=["outcome"])
    for outcome, n in o.requests.items():
        requests.add_metric([str(outcome)], n)
    yield requests
    configs = CounterMetricFamily(f"{PREFIX}_opamp_remote_configs", "Remote configs applied or failed.",
                                  labels=["status"])
    for status, n in o.remote_configs.items():
        configs.add_metric([str(status)], n)
    yield configs
    yield GaugeMetricFamily(f"{PREFIX}_opamp_connected", "1 while the OpAMP server answers.", value=int(o.connected))


# UnwindTables.totals() keys that are not walk outcomes -> (metric, help).
_UNWIND_TABLE_METRICS = {
    "files_loaded": ("unwind_table_files_loaded", "Files whose unwind rows were loaded into the BPF walker's table."),
    "table_bytes": ("unwind_table_bytes_loaded", "Bytes of unwind rows loaded into the BPF walker's table."),
    "files_evicted": ("unwind_table_files_evicted", "Files evicted from the walker's table by its byte budget."),
    "files_over_budget": ("unwind_table_files_over_budget",
                          "Files that did not fit the walker's table (walked with frame pointers)."),
    "processes_registered": ("unwind_processes_registered", "Processes given a table of mappings."),
    "process_table_full": ("unwind_process_table_full", "Registrations refused: the process table was full."),
    "stale_deleted": ("unwind_stale_tables_deleted", "Tables of processes registered after their exit, "
                      "deleted when they were found gone."),
}


def _unwind_metrics(totals: dict[str, int]) -> Iterable[Metric]:
    """How user stacks were walked in BPF (by outcome) and what the walker's tables hold."""
    if not totals:
        return
    outcomes = CounterMetricFamily(f"{PREFIX}_unwind_stacks", "User stacks walked in BPF, by how the walk ended "
                                   "(fallback_*: a stack copy or frame pointers instead).", labels=["outcome"])
    for key, n in totals.items():
        if key in _UNWIND_TABLE_METRICS or key == "registrations" or key == "build_ms":
            continue
        outcomes.add_metric([key], n)
    yield outcomes
    for key, (name, doc) in _UNWIND_TABLE_METRICS.items():
        yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=totals.get(key, 0))
    yield CounterMetricFamily(f"{PREFIX}_unwind_table_build_seconds", "CPU time building unwind rows.",
                              value=totals.get("build_ms", 0) / 1000)
