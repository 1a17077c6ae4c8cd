"""Self-metrics and health endpoints, and the export queue whose counters they report.

The queue tests use InMemoryBatchExporter with `block` to hold an export in
flight: no sleeps decide an outcome, only events and bounded waits.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

from agent.daemon.export_queue import Batch, ExportQueue, InMemoryBatchExporter, PprofDirExporter
from agent.daemon.metrics import AgentCollector, AgentStats, MetricsServer, make_registry
from exporters.otlp_sender import ExportResult, ExportStatus
from exporters.profile import SampleKey
from exporters.profile_types import cpu_profile
from symbolizer.file_symbols import SymbolCache


def batch(seq: int, samples: int = 1) -> Batch:
    p = cpu_profile(0, 10**9, 99)
    for i in range(samples):
        p.add(SampleKey((), 1, i, "t"), [1, 10], 1_700_000_000_000_000_000 + i)
    return Batch([p], 1_700_000_000_000_000_000 + seq * 10**9, seq)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_scrape_reports_stats_queues_cache_and_rss():
    stats = AgentStats(samples=42, ring_buffer_bytes=8192)
    stats.lose("ringbuf_full", 3)
    stats.lose("user_stack_err", 2)
    q = ExportQueue(InMemoryBatchExporter(), 4)
    try:
        q.put(batch(0, 5))
        assert q.flush(10)
        server = MetricsServer("127.0.0.1:0", make_registry(AgentCollector(stats, lambda: [("otlp", q.stats)],
                                                                           SymbolCache())), stats)
        try:
            base = f"http://127.0.0.1:{server.port}"
            code, text = get(base + "/metrics")
            assert code == 200
            for line in ("bpfprof_samples_total 42.0", 'bpfprof_lost_samples_total{reason="ringbuf_full"} 3.0',
                         "bpfprof_stack_collisions_total 2.0", 'bpfprof_export_batches_total{exporter="otlp"} 1.0',
                         'bpfprof_export_samples_total{exporter="otlp"} 5.0',
                         'bpfprof_export_queue_depth{exporter="otlp"} 0.0', "bpfprof_symbolizer_cache_hits_total 0.0",
                         'bpfprof_export_dropped_samples_total{exporter="otlp",reason="refused"} 0.0',
                         'bpfprof_export_dropped_batches_total{exporter="otlp",reason="queue_full"} 0.0',
                         'bpfprof_export_timeouts_total{exporter="otlp"} 0.0',
                         'bpfprof_export_queued_samples{exporter="otlp"} 0.0',
                         "bpfprof_ring_buffer_bytes_total 8192.0"):
                assert line in text, line
            assert "process_resident_memory_bytes" in text
            assert get(base + "/readyz")[0] == 503
            stats.ready = True
            assert get(base + "/readyz")[0] == 200
            assert get(base + "/healthz")[0] == 200
            stats.last_loop_monotonic = time.monotonic() - 3600
            assert get(base + "/healthz")[0] == 503
            assert get(base + "/nope")[0] == 404
        finally:
            server.close()
    finally:
        q.shutdown(1)


def test_put_never_blocks_and_full_queue_drops_oldest_counted():
    exp = InMemoryBatchExporter()
    exp.block.clear()  # the worker is stuck in export(batch 0)
    q = ExportQueue(exp, max_batches=2)
    try:
        q.put(batch(0, samples=2))
        assert exp.entered.wait(10)
        for seq in range(1, 5):
            q.put(batch(seq, samples=2))  # returns at once even though export is blocked
        # batch 0 is in flight and stays; each new one pushes out the one before it
        assert q.stats.dropped_batches == 3 and q.stats.dropped_samples == 6
        assert q.stats.dropped_samples_by_reason == {"queue_full": 6, "refused": 0, "shutdown": 0}
        exp.block.set()
        assert q.flush(10)
        assert [b.seq for b in exp.batches] == [0, 4]
    finally:
        q.shutdown(1)


def test_failed_batches_are_retried_in_order_and_counted():
    fail = ExportResult(ExportStatus.FAILURE, "down")
    exp = InMemoryBatchExporter([fail, fail, fail])
    q = ExportQueue(exp, max_batches=10, retry_initial_s=0.001, retry_max_s=0.001)
    try:
        for seq in range(3):
            q.put(batch(seq))
        assert q.flush(10)
        assert [b.seq for b in exp.batches] == [0, 1, 2]
        assert q.stats.failed_attempts == 3 and q.stats.dropped_batches == 0 and q.stats.exported_batches == 3
    finally:
        q.shutdown(1)


def test_a_batch_refused_for_good_is_dropped_not_retried():
    refused = ExportResult(ExportStatus.FAILURE, "400 bad request (not retryable)", retryable=False)
    exp = InMemoryBatchExporter([refused])
    q = ExportQueue(exp, max_batches=10, retry_initial_s=10, retry_max_s=10)  # a retry would stall flush
    try:
        for seq in range(3):
            q.put(batch(seq, samples=1))
        assert q.flush(10)
        assert [b.seq for b in exp.batches] == [1, 2]
        assert q.stats.dropped_batches == 1 and q.stats.failed_attempts == 1
        assert q.stats.dropped_samples == 1 and q.stats.dropped_samples_by_reason["refused"] == 1
    finally:
        q.shutdown(1)


def test_shutdown_is_bounded_and_counts_what_was_not_sent():
    exp = InMemoryBatchExporter([ExportResult(ExportStatus.FAILURE, "down")] * 1000)
    q = ExportQueue(exp, max_batches=10, retry_initial_s=0.01, retry_max_s=0.01)
    q.put(batch(0, 4))
    t0 = time.monotonic()
    assert q.shutdown(0.3) == 1
    assert time.monotonic() - t0 < 5
    assert q.stats.dropped_samples == 4 and exp.is_shutdown


def test_an_exporter_that_raises_does_not_kill_the_worker():
    class Boom(InMemoryBatchExporter):
        def export(self, b):
            if not self.calls:
                self.calls += 1
                raise RuntimeError("bug")
            return super().export(b)

    exp = Boom()
    q = ExportQueue(exp, 4, retry_initial_s=0.001, retry_max_s=0.001)
    try:
        q.put(batch(0))
        assert q.flush(10) and len(exp.batches) == 1 and q.stats.failed_attempts == 1
    finally:
        q.shutdown(1)


def test_pprof_dir_writes_gzip_files_and_enforces_retention(tmp_path):
    now = [time.time()]
    d = PprofDirExporter(str(tmp_path / "out"), "host/1", max_files=3, max_total_bytes=10**9, max_age_s=100,
                         clock=lambda: now[0])
    for seq in range(5):
        assert d.export(batch(seq)).ok
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 3 and all(f.startswith("bpfprof-host_1-") and f.endswith(".cpu.pb.gz") for f in files)
    assert [f.split("-")[3].split(".")[0] for f in files] == ["000002", "000003", "000004"]
    assert gzip.decompress((tmp_path / "out" / files[0]).read_bytes())
    stranger = tmp_path / "out" / "keep-me.pb.gz"
    stranger.write_bytes(b"x")
    old = tmp_path / "out" / files[0]
    os.utime(old, (now[0] - 1000, now[0] - 1000))
    d.enforce_retention()
    assert not old.exists() and stranger.exists()
    tiny = PprofDirExporter(str(tmp_path / "out"), "host/1", max_files=100, max_total_bytes=1, max_age_s=100,
                            clock=lambda: now[0])
    tiny.enforce_retention()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep-me.pb.gz"]


def test_pprof_dir_failure_is_a_result_not_an_exception(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = PprofDirExporter(str(blocker / "sub"), "h", 1, 10**6, 1).export(batch(0))
    assert not result.ok and "file" in result.message


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.name.startswith(("export-", "metrics"))]
        if not extra:
            return
        time.sleep(0.01)
    pytest.fail(f"threads left behind: {extra}")
