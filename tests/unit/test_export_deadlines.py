"""Collectors that misbehave: one that drips its answer, one that hangs, one that throttles, one that refuses.

Real loopback servers (tests/otlp_collector.py) and the real exporter and
queue. What is judged is the outcome: the export ends as a counted timed-out
failure (it would otherwise block for an hour), the queue waits what the
server asked (recorded through the queue's injectable sleep, not measured),
and every sample ends in exactly one counter. Waits are bounded polls on
state, never wall-clock asserts.
"""

from __future__ import annotations

import email.utils
import logging
import re
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_collector import BadCollector, GrpcCollector, HttpCollector, Reply

from agent.daemon.daemon import SHUTDOWN_BUILD_S, STOP_BUDGET_S
from agent.daemon.export_queue import QUEUE_FULL, REFUSED, SHUTDOWN, Batch, ExportQueue, OtlpBatchExporter
from exporters.otlp_sender import Attempt, ExportStatus, OtlpExporter, RetryPolicy
from exporters.profile import SampleKey
from exporters.profile_types import cpu_profile


def request() -> ExportProfilesServiceRequest:
    r = ExportProfilesServiceRequest()
    r.dictionary.string_table.extend(["", "cpu"])
    return r


def batch(seq: int, samples: int = 3) -> Batch:
    p = cpu_profile(1_700_000_000_000_000_000, 10**9, 99)
    for i in range(samples):
        p.add(SampleKey((), 1, i, "t"), [1, 10], 1_700_000_000_000_000_000 + i)
    return Batch([p], 1_700_000_000_000_000_000 + seq * 10**9, seq)


def wait_for(cond, what: str, timeout_s: float = 30.0) -> None:
    """Poll `cond` until true; a liveness bound (a hang fails here), not a timing assert."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {timeout_s:g}s")
        time.sleep(0.02)


def in_thread(fn):  # noqa: ANN001, ANN201
    """Run fn() on a thread; return a getter that fails if it is still running after 60 s."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()

    def result():  # noqa: ANN202
        t.join(60)
        assert not t.is_alive(), "the export is still running: its deadline did not hold"
        return out[0]

    return result


def otlp_queue(url: str, timeout_s: float, sleep=None, max_retry_after_s: float = 300.0,  # noqa: ANN001
               retry_initial_s: float = 1.0) -> ExportQueue:
    sender = OtlpExporter(url, timeout_s=timeout_s, max_retry_after_s=max_retry_after_s,
                          retry=RetryPolicy(jitter=lambda: 1.0, max_retry_after_s=max_retry_after_s))
    return ExportQueue(OtlpBatchExporter("otlp", sender, "host"), max_batches=4, retry_initial_s=retry_initial_s,
                       jitter=lambda: 1.0, sleep=sleep)


# --- the deadline covers the whole answer ------------------------------------------------

@pytest.mark.parametrize("mode", ["drip_body", "drip_headers", "hang"])
def test_an_export_ends_at_its_deadline_whatever_the_collector_does(mode):
    # A byte every 0.25 s: each read is well inside a socket timeout, the whole answer 15 minutes away.
    with BadCollector(mode, byte_every_s=0.25) as c:
        exporter = OtlpExporter(c.url, timeout_s=1.0, retry=RetryPolicy(jitter=lambda: 1.0))
        result = in_thread(lambda: exporter.export(request()))()
        assert result.status == ExportStatus.FAILURE and result.retryable
        assert result.timed_out_attempts == 1 and result.attempts == 1
        assert "no complete response within 1s" in result.message
        wait_for(lambda: c.closed_by_client == 1, "the exporter to close its connection")
        exporter.shutdown()


def test_a_hanging_grpc_collector_ends_at_the_deadline_as_a_timeout():
    with GrpcCollector([Reply(hang=True)]) as c:
        exporter = OtlpExporter(c.url, timeout_s=1.0, retry=RetryPolicy(jitter=lambda: 1.0))
        result = in_thread(lambda: exporter.export(request()))()
        exporter.shutdown()
    assert result.status == ExportStatus.FAILURE and result.retryable
    assert result.timed_out_attempts == 1 and "DEADLINE_EXCEEDED" in result.message


def test_a_timed_out_export_is_counted_logged_and_kept_for_a_retry(caplog):
    caplog.set_level(logging.INFO, logger="agent.daemon.export_queue")
    with BadCollector("drip_body", byte_every_s=0.25) as c:
        q = otlp_queue(c.url, timeout_s=1.0, retry_initial_s=3600)  # one try, then a backoff shutdown ends
        b = batch(0)
        q.put(b)
        wait_for(lambda: q.stats.failed_attempts == 1, "the first attempt to fail")
        assert q.stats.timed_out_attempts == 1 and q.stats.exported_samples == 0
        assert len(q) == 1 and q.stats.queued_samples == b.samples  # kept for the retry
        assert any("not delivered, will retry" in r.message and "no complete response within 1s" in r.message
                   for r in caplog.records)
        assert q.shutdown(0.5) == 1
    assert q.stats.dropped_samples_by_reason[SHUTDOWN] == b.samples == q.stats.dropped_samples
    assert q.stats.queued_samples == 0


@pytest.mark.parametrize("mode", ["hang", "drip_body"])
def test_shutdown_aborts_an_export_in_flight_and_counts_it_once(mode):
    """SIGTERM's flush window ends while a bad collector holds the export (timeout_s far away): the
    aborted attempt is not taken for a delivery (a body cut short is no answer)."""
    with BadCollector(mode, byte_every_s=0.1) as c:
        q = otlp_queue(c.url, timeout_s=120)
        b = batch(0)
        q.put(b)
        wait_for(lambda: c.connections == 1, "the export to connect")
        assert q.shutdown(0.3) == 1
        wait_for(lambda: c.closed_by_client == 1, "the aborted attempt's connection to close")
        assert not [t for t in threading.enumerate() if t.name == "export-otlp"]
    s = q.stats
    assert s.dropped_samples_by_reason == {QUEUE_FULL: 0, REFUSED: 0, SHUTDOWN: b.samples}
    assert s.exported_samples == 0 and s.dropped_batches == 1


# --- Retry-After, past the deadline and capped -----------------------------------------------

def _http_date_in(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize("retry_after,cap,low,high", [
    ("20", 300.0, 20, 20),  # longer than timeout_s: waited all the same
    ("20", 5.0, 5, 5),  # cut to export.max_retry_after_s
    ("date+30", 300.0, 25, 30),  # the HTTP-date form
])
def test_the_queue_waits_what_a_throttling_collector_asks(retry_after, cap, low, high):
    value = _http_date_in(30) if retry_after == "date+30" else retry_after
    waits: list[float] = []
    with HttpCollector([Reply(http_status=429, retry_after=value)]) as c:
        q = otlp_queue(c.url, timeout_s=2, max_retry_after_s=cap, sleep=lambda s: waits.append(s) or False)
        q.put(batch(0))
        assert q.flush(30)
        q.shutdown(1)
    assert len(waits) == 1 and low <= waits[0] <= high, waits
    assert len(c.received.requests) == 2 and q.stats.exported_batches == 1 and q.stats.failed_attempts == 1


def test_retry_policy_sleeps_a_hint_within_the_deadline_and_hands_a_longer_one_up():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> bool:
        slept.append(s)
        now[0] += s
        return False

    answers = [Attempt(reason="busy", retryable=True, retry_after_s=3),
               Attempt(reason="busy", retryable=True, retry_after_s=0),  # no hint worth the name: backoff
               Attempt(reason="busy", retryable=True, retry_after_s=900)]
    p = RetryPolicy(jitter=lambda: 1.0, clock=lambda: now[0], sleep=sleep, max_retry_after_s=60)
    result = p.run(lambda _: answers.pop(0), deadline_s=30, sleep=sleep)
    assert slept == [3, 2]  # the hint, then backoff number 2
    assert result.status == ExportStatus.FAILURE and result.retry_after_s == 60 and result.retryable
    assert "the server asked to wait 60s" in result.message


# --- every dropped sample counted once, by reason ----------------------------------------------

@pytest.mark.parametrize("status", [400, 401, 500, 501])
def test_a_reply_not_worth_retrying_drops_the_batch_counted(status):
    with HttpCollector([Reply(http_status=status)]) as c:
        q = otlp_queue(c.url, timeout_s=5)
        refused, ok = batch(0, samples=4), batch(1, samples=7)
        q.put(refused)
        q.put(ok)
        assert q.flush(30)
        q.shutdown(1)
    s = q.stats
    assert s.dropped_samples_by_reason == {QUEUE_FULL: 0, REFUSED: 4, SHUTDOWN: 0} and s.dropped_samples == 4
    assert s.dropped_batches_by_reason[REFUSED] == 1 and s.exported_samples == 7
    assert len(c.received.requests) == 2  # the refused one was not sent again


# --- SIGTERM within the service manager's patience ---------------------------------------------

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def test_the_stop_budget_fits_the_units_stop_timeout_and_the_pods_grace_period():
    unit = (PACKAGING / "systemd" / "bpfprof.service").read_text()
    [stop_s] = re.findall(r"^TimeoutStopSec=(\d+)s?$", unit, re.M)
    graces = [int(g) for f in ("kubernetes/daemonset.yaml", "helm/bpfprof/templates/daemonset.yaml")
              for g in re.findall(r"terminationGracePeriodSeconds: (\d+)", (PACKAGING / f).read_text())]
    assert len(graces) == 2
    # the budget holds the build and at least a few seconds of flush, and leaves the manager a margin
    assert SHUTDOWN_BUILD_S + 5 <= STOP_BUDGET_S <= min(int(stop_s), *graces) - 5
