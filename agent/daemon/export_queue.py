"""What the agent does with an interval's profiles: exporters and the export queue.

Exporter contract (as exporters/otlp_sender.py): `export(batch) ->
ExportResult` never raises for a delivery problem, `shutdown(timeout_s)`,
`force_flush()`. A Batch is one interval's profiles. Exporters here:

  OtlpBatchExporter   encode_otlp + OtlpExporter (also the viewer of `bpfprof serve`)
  PprofDirExporter    one pprof file per profile in a directory, with retention
  InMemoryBatchExporter  for tests

ExportQueue is the one batcher: one per exporter (a collector that is down
must not hold up the local files), a bounded deque, a worker woken by an
Event, failed batches kept at the head and retried with backoff (or after
the server's Retry-After, which the exporter caps), the oldest batch dropped
and counted when a new one does not fit. put() never blocks, so sampling
never waits on an export. Every sample of a batch ends in exactly one
counter: exported, or dropped by one of DROP_REASONS.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from exporters.otlp import encode_otlp
from exporters.otlp_sender import ExportResult, ExportStatus, OtlpExporter
from exporters.pprof import encode_pprof
from exporters.profile import Profile

log = logging.getLogger(__name__)

# Why a batch was dropped (the `reason` label of bpfprof_export_dropped_*).
QUEUE_FULL = "queue_full"  # pushed out by newer intervals while the destination was down or slow
REFUSED = "refused"  # a reply that is not retryable (HTTP 400/401/500..., gRPC INVALID_ARGUMENT...), or unencodable
SHUTDOWN = "shutdown"  # not delivered before the flush window at shutdown ended
DROP_REASONS = (QUEUE_FULL, REFUSED, SHUTDOWN)

K8S_NODE_NAME = "k8s.node.name"
K8S_POD_UID = "k8s.pod.uid"


@dataclass
class Batch:
    """One interval's profiles, ready to export."""

    profiles: list[Profile]
    start_ns: int  # wall clock of the interval's start
    seq: int  # interval number since the agent started
    pod_uids: dict[int, str] = field(default_factory=dict)  # pid -> k8s pod uid

    @functools.cached_property
    def samples(self) -> int:
        """Sample events (timestamps, else 1 a sample): the unit every export counter counts in."""
        return sum(len(s.timestamps_ns) or 1 for p in self.profiles for s in p.samples)


class BatchExporter(Protocol):
    name: str

    def export(self, batch: Batch) -> ExportResult: ...

    def force_flush(self, timeout_s: float | None = None) -> bool: ...

    def shutdown(self, timeout_s: float = 5.0) -> None: ...


def add_resource_attributes(request: ExportProfilesServiceRequest, node_name: str, pod_uids: dict[int, str]) -> None:
    """k8s.node.name on every resource and k8s.pod.uid on those of pods (encode_otlp does not know them)."""
    for rp in request.resource_profiles:
        attrs = rp.resource.attributes
        pid = next((a.value.int_value for a in attrs if a.key == "process.pid"), 0)
        if node_name:
            attrs.add(key=K8S_NODE_NAME).value.string_value = node_name
        uid = pod_uids.get(pid, "")
        if uid:
            attrs.add(key=K8S_POD_UID).value.string_value = uid


class OtlpBatchExporter:
    """Sends each batch as one OTLP ExportProfilesServiceRequest."""

    def __init__(self, name: str, exporter: OtlpExporter, host_name: str, node_name: str = "") -> None:
        self.name = name
        self.exporter = exporter
        self.host_name = host_name
        self.node_name = node_name

    def export(self, batch: Batch) -> ExportResult:
        try:
            request = encode_otlp(batch.profiles, self.host_name)
        except ValueError as e:  # a bug, not a delivery problem: never retry it
            return ExportResult(ExportStatus.FAILURE, f"cannot encode: {e}", retryable=False)
        add_resource_attributes(request, self.node_name, batch.pod_uids)
        return self.exporter.export(request)

    def force_flush(self, timeout_s: float | None = None) -> bool:
        return self.exporter.force_flush(timeout_s)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.exporter.shutdown(timeout_s)


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class PprofDirExporter:
    """Writes `<prefix>-<UTC time>-<seq>.<kind>.pb.gz` files, then enforces retention.

    Retention after every write: files older than `max_age_s` go, then the
    oldest until at most `max_files` and `max_total_bytes` remain. Only files
    this exporter names (prefix and suffix) are ever deleted. Files appear
    atomically (written to a dot-file, then renamed).
    """

    SUFFIX = ".pb.gz"

    def __init__(self, path: str, host_name: str, max_files: int, max_total_bytes: int, max_age_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = "pprof_dir"
        self.dir = Path(path)
        self.prefix = "bpfprof-" + _SAFE.sub("_", host_name)
        self.max_files = max_files
        self.max_total_bytes = max_total_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        self.deleted = 0

    def export(self, batch: Batch) -> ExportResult:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(batch.start_ns / 1e9))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for profile in batch.profiles:
                name = f"{self.prefix}-{stamp}-{batch.seq:06d}.{profile.kind or 'profile'}{self.SUFFIX}"
                tmp = self.dir / f".{name}.tmp"
                tmp.write_bytes(encode_pprof(profile))
                os.replace(tmp, self.dir / name)
            self.enforce_retention()
        except OSError as e:
            return ExportResult(ExportStatus.FAILURE, f"{self.dir}: {e.strerror or e}")
        return ExportResult(ExportStatus.SUCCESS)

    def files(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of our files, oldest first."""
        out = []
        for p in self.dir.glob(f"{self.prefix}-*{self.SUFFIX}"):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def enforce_retention(self) -> None:
        files = self.files()
        now = self.clock()
        total = sum(size for _, size, _ in files)
        keep = len(files)
        for mtime, size, path in files:
            if keep <= self.max_files and total <= self.max_total_bytes and now - mtime <= self.max_age_s:
                break
            try:
                path.unlink()
                self.deleted += 1
            except FileNotFoundError:
                pass
            keep -= 1
            total -= size

    def force_flush(self, timeout_s: float | None = None) -> bool:
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        pass


class InMemoryBatchExporter:
    """Keeps batches; answers from a script of results, then SUCCESS. `block` holds export() until set."""

    def __init__(self, results: Iterable[ExportResult] = (), name: str = "memory") -> None:
        self.name = name
        self.batches: list[Batch] = []
        self.results = list(results)
        self.calls = 0
        self.block = threading.Event()
        self.block.set()
        self.entered = threading.Event()  # set once export() has been called
        self.is_shutdown = False

    def export(self, batch: Batch) -> ExportResult:
        self.entered.set()
        self.block.wait()
        self.calls += 1
        result = self.results.pop(0) if self.results else ExportResult(ExportStatus.SUCCESS)
        if result.ok:
            self.batches.append(batch)
        return result

    def force_flush(self, timeout_s: float | None = None) -> bool:
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.is_shutdown = True


@dataclass
class QueueStats:
    """Counters of one exporter's queue (read by the metrics endpoint)."""

    exported_batches: int = 0
    exported_samples: int = 0
    failed_attempts: int = 0
    timed_out_attempts: int = 0  # attempts with no complete answer within their deadline (also failed)
    dropped_batches: int = 0  # every reason together
    dropped_samples: int = 0
    dropped_batches_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    dropped_samples_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    depth: int = 0
    queued_samples: int = 0  # samples of the batches held (the one in flight included)
    last_error: str = ""


class ExportQueue:
    """Bounded queue + worker for one exporter. put() never blocks; see the module docstring."""

    def __init__(self, exporter: BatchExporter, max_batches: int, retry_initial_s: float = 1.0,
                 retry_max_s: float = 30.0, jitter: Callable[[], float] = lambda: random.uniform(0.8, 1.2),
                 sleep: Callable[[float], bool] | None = None) -> None:
        """`sleep(seconds) -> interrupted` waits before a retry; by default on the stop Event (tests record it)."""
        self.exporter = exporter
        self.name = exporter.name
        self.max_batches = max_batches
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.jitter = jitter
        self.stats = QueueStats()
        self._queue: collections.deque[Batch] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._idle = threading.Event()
        self._idle.set()
        self._failures = 0
        self._inflight: Batch | None = None
        self._closed = False  # shutdown() counted what was left: a late answer changes no counter
        self._thread = threading.Thread(target=self._run, name=f"export-{self.name}", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        with self._lock:
            if self._closed:
                self._drop(batch, SHUTDOWN, "the queue is shut down")
                return
            while len(self._queue) >= self.max_batches:
                # the batch being sent stays: it may be delivered, and must not count as dropped too
                if self._queue[0] is self._inflight:
                    if len(self._queue) == 1:
                        break
                    victim = self._queue[1]
                    del self._queue[1]
                else:
                    victim = self._queue.popleft()
                self._drop(victim, QUEUE_FULL, "queue full")
            self._queue.append(batch)
            self._update_depth()
            self._idle.clear()
        self._wake.set()

    def _update_depth(self) -> None:
        """Depth gauges (lock held)."""
        self.stats.depth = len(self._queue)
        self.stats.queued_samples = sum(b.samples for b in self._queue)

    def _drop(self, batch: Batch, reason: str, why: str) -> None:
        """Count a batch out (lock held): once, under one reason."""
        n = batch.samples
        st = self.stats
        st.dropped_batches += 1
        st.dropped_samples += n
        st.dropped_batches_by_reason[reason] = st.dropped_batches_by_reason.get(reason, 0) + 1
        st.dropped_samples_by_reason[reason] = st.dropped_samples_by_reason.get(reason, 0) + n
        log.warning("export %s: dropped interval %d (%d samples): %s", self.name, batch.seq, n, why)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                batch = self._inflight = self._queue[0] if self._queue else None
                if batch is None:
                    self._idle.set()
                    self._wake.clear()
            if batch is None:
                self._wake.wait()
                continue
            self._send(batch)

    def _send(self, batch: Batch) -> bool:
        try:
            result = self.exporter.export(batch)
        except Exception as e:  # noqa: BLE001  (an exporter bug must not kill the worker)
            result = ExportResult(ExportStatus.FAILURE, f"{type(e).__name__}: {e}")
        with self._lock:
            self._inflight = None
            if self._closed:  # shutdown() already counted this batch as not delivered
                return False
            held = bool(self._queue) and self._queue[0] is batch
            self.stats.timed_out_attempts += result.timed_out_attempts
            if result.ok:
                if held:
                    self._queue.popleft()
                self.stats.exported_batches += 1
                self.stats.exported_samples += batch.samples
                self._failures = 0
            elif not result.retryable:
                # the server will never take it: sending it again would only
                # hold back the intervals queued behind it
                if held:
                    self._queue.popleft()
                self.stats.failed_attempts += 1
                self._drop(batch, REFUSED, f"refused for good: {result.message}")
            else:
                self.stats.failed_attempts += 1
                self._failures += 1
            self._update_depth()
        if result.ok:
            if self.stats.last_error:
                log.info("export %s: delivering again", self.name)
                self.stats.last_error = ""
            return True
        if not result.retryable:
            self.stats.last_error = result.message
            return False
        if result.message != self.stats.last_error:
            log.warning("export %s: interval %d not delivered, will retry: %s", self.name, batch.seq, result.message)
            self.stats.last_error = result.message
        elif result.timed_out_attempts:
            log.info("export %s: interval %d timed out again, will retry", self.name, batch.seq)
        if result.retry_after_s is not None:
            delay = result.retry_after_s  # the server's word (capped by the exporter), no jitter
        else:
            delay = min(self.retry_max_s, self.retry_initial_s * 2 ** (self._failures - 1)) * self.jitter()
        self._sleep(delay)  # shutdown interrupts the backoff
        return False

    def flush(self, timeout_s: float) -> bool:
        """Wait until the queue is empty or `timeout_s` passes; True if empty."""
        self._wake.set()
        return self._idle.wait(timeout_s)

    def shutdown(self, timeout_s: float) -> int:
        """Flush for up to `timeout_s`, stop the worker, shut the exporter down (which aborts an export
        in flight); returns batches left unsent, counted as dropped (reason "shutdown")."""
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        self.exporter.shutdown(max(0.1, deadline - time.monotonic()))
        self._thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
            self._closed = True
            for batch in left:
                self._drop(batch, SHUTDOWN, "not delivered before shutdown")
            self._update_depth()
        return len(left)

    def __len__(self) -> int:
        return len(self._queue)
