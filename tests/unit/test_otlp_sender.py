"""OtlpExporter against in-process collectors (gRPC and HTTP on port 0) with scripted answers.

Backoff waits go through a fake sleep that advances a fake clock, and jitter
is pinned to 1, so the delays asserted are the policy's, not wall time.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from otlp_collector import GrpcCollector, HttpCollector, Reply, closed_port

from exporters.otlp_sender import (
    Attempt,
    Endpoint,
    ExportResult,
    ExportStatus,
    InMemoryOtlpExporter,
    OtlpExporter,
    Protocol,
    RetryPolicy,
    parse_headers,
    resolve_endpoint,
    retry_after_s,
)
from symbolizer.errors import ConfigError


class FakeTime:
    """A clock that only sleep() moves; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds
        return False  # not interrupted


@pytest.fixture
def fake():
    return FakeTime()


def policy(fake: FakeTime) -> RetryPolicy:
    return RetryPolicy(clock=fake.clock, sleep=fake.sleep, jitter=lambda: 1.0)


def request() -> ExportProfilesServiceRequest:
    r = ExportProfilesServiceRequest()
    r.dictionary.string_table.extend(["", "cpu"])
    r.resource_profiles.add().scope_profiles.add().scope.name = "bpfprof"
    return r


# --- endpoint resolution -------------------------------------------------------

@pytest.mark.parametrize("url,protocol,insecure,expected", [
    ("http://collector:4318", None, False, Endpoint(Protocol.HTTP, "http://collector:4318/v1development/profiles", False)),
    ("https://collector", None, False, Endpoint(Protocol.HTTP, "https://collector:4318/v1development/profiles", True)),
    ("http://c:9/custom/path", None, False, Endpoint(Protocol.HTTP, "http://c:9/custom/path", False)),
    ("grpc://collector:4317", None, False, Endpoint(Protocol.GRPC, "collector:4317", False)),
    ("grpcs://collector", None, False, Endpoint(Protocol.GRPC, "collector:4317", True)),
    ("collector:4317", None, False, Endpoint(Protocol.GRPC, "collector:4317", True)),
    ("collector:4317", None, True, Endpoint(Protocol.GRPC, "collector:4317", False)),
    ("http://collector:4317", "grpc", False, Endpoint(Protocol.GRPC, "collector:4317", False)),
    ("grpc://[::1]:4317", None, False, Endpoint(Protocol.GRPC, "[::1]:4317", False)),
    ("collector", "http", True, Endpoint(Protocol.HTTP, "http://collector:4318/v1development/profiles", False)),
])
def test_endpoint_resolution(url, protocol, insecure, expected):
    assert resolve_endpoint(url, protocol, insecure) == expected


@pytest.mark.parametrize("url,message", [
    ("ftp://x:1", "unknown scheme 'ftp'"),
    ("http://:4318", "names no host"),
    ("http://x:notaport", "OTLP endpoint"),
])
def test_bad_endpoints_are_config_errors(url, message):
    with pytest.raises(ConfigError, match=message):
        resolve_endpoint(url)


def test_headers_and_config_errors(tmp_path):
    assert parse_headers(["Authorization=Bearer a=b", " x-tenant = t1 "]) == {
        "Authorization": "Bearer a=b", "x-tenant": "t1"}
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_headers(["novalue"])
    with pytest.raises(ConfigError, match="cannot read OTLP CA file"):
        OtlpExporter("grpcs://x:1", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="timeout must be positive"):
        OtlpExporter("grpc://x:1", timeout_s=0)


# --- the retry policy alone ----------------------------------------------------

def test_backoff_is_exponential_capped_and_under_the_deadline(fake):
    calls = []

    def attempt(remaining_s: float) -> Attempt:
        calls.append(round(remaining_s, 3))
        return Attempt(reason="UNAVAILABLE", retryable=True)

    p = RetryPolicy(initial_backoff_s=1, max_backoff_s=4, clock=fake.clock, sleep=fake.sleep, jitter=lambda: 1.0)
    result = p.run(attempt, deadline_s=20, sleep=fake.sleep)
    assert fake.sleeps == [1, 2, 4, 4, 4, 4]  # at 19 s, another 4 s wait would pass the deadline
    assert calls == [20, 19, 17, 13, 9, 5, 1]  # each attempt gets what remains
    assert result.status == ExportStatus.FAILURE and result.attempts == 7
    assert "gave up after 7 attempt(s) within the 20s timeout" in result.message


def test_jitter_scales_the_backoff(fake):
    p = RetryPolicy(clock=fake.clock, sleep=fake.sleep, jitter=lambda: 0.8)
    assert [round(p.backoff_s(n), 3) for n in (1, 2, 3)] == [0.8, 1.6, 3.2]


def test_server_hint_wins_and_a_hint_past_the_deadline_gives_up(fake):
    answers = [Attempt(reason="busy", retryable=True, retry_after_s=7),
               Attempt(reason="busy", retryable=True, retry_after_s=100)]
    result = policy(fake).run(lambda _: answers.pop(0), deadline_s=30, sleep=fake.sleep)
    assert fake.sleeps == [7]
    assert result.status == ExportStatus.FAILURE and result.attempts == 2


def test_shutdown_during_backoff_stops_retrying(fake):
    result = RetryPolicy(clock=fake.clock, jitter=lambda: 1.0).run(
        lambda _: Attempt(reason="UNAVAILABLE", retryable=True), deadline_s=30, sleep=lambda s: True)
    assert result.attempts == 1 and "shut down while waiting to retry" in result.message


def test_retry_after_forms():
    assert retry_after_s("3") == 3.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == 10.0


# --- gRPC ----------------------------------------------------------------------

def test_grpc_unavailable_twice_then_ok(fake):
    with GrpcCollector([Reply(grpc.StatusCode.UNAVAILABLE, "restarting")] * 2) as c:
        exporter = OtlpExporter(c.url, headers={"Authorization": "Bearer t0k"}, retry=policy(fake))
        result = exporter.export(request())
        exporter.shutdown()
    assert result == ExportResult(ExportStatus.SUCCESS, attempts=3)
    assert fake.sleeps == [1, 2]
    assert len(c.received.requests) == 3 and c.received.requests[-1] == request()
    assert c.received.headers[-1]["authorization"] == "Bearer t0k"


def test_grpc_resource_exhausted_with_retry_info_waits_as_told(fake):
    with GrpcCollector([Reply(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_delay_s=2.5)]) as c:
        result = OtlpExporter(c.url, retry=policy(fake)).export(request())
    assert result.status == ExportStatus.SUCCESS and result.attempts == 2
    assert fake.sleeps == [2.5]


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.UNAUTHENTICATED])
def test_grpc_not_retryable(fake, code):
    with GrpcCollector([Reply(code, "no")]) as c:
        result = OtlpExporter(c.url, retry=policy(fake)).export(request())
    assert result.status == ExportStatus.FAILURE and result.attempts == 1 and not fake.sleeps
    assert result.message == f"{c.url}: gRPC {code.name}: no (not retryable)"


def test_grpc_partial_success(fake):
    with GrpcCollector([Reply(rejected=2, message="2 profiles without samples")]) as c:
        result = OtlpExporter(c.url, retry=policy(fake)).export(request())
    assert result == ExportResult(ExportStatus.PARTIAL_SUCCESS, "2 profiles without samples", 2, attempts=1)
    assert result.ok


def test_grpc_endpoint_down_for_good(fake):
    url = f"grpc://127.0.0.1:{closed_port()}"
    result = OtlpExporter(url, timeout_s=5, retry=policy(fake)).export(request())
    assert result.status == ExportStatus.FAILURE
    assert result.message.startswith(f"{url}: gRPC UNAVAILABLE")
    assert "gave up after 3 attempt(s) within the 5s timeout" in result.message
    assert fake.sleeps == [1, 2]


# --- HTTP ----------------------------------------------------------------------

def test_http_503_with_retry_after_then_200(fake):
    with HttpCollector([Reply(http_status=503, retry_after="3")]) as c:
        result = OtlpExporter(c.url, headers={"X-Scope-OrgID": "tenant1"}, retry=policy(fake)).export(request())
    assert result == ExportResult(ExportStatus.SUCCESS, attempts=2)
    assert fake.sleeps == [3.0]
    assert c.received.paths == ["/v1development/profiles"] * 2
    h = c.received.headers[-1]
    assert h["content-type"] == "application/x-protobuf" and h["content-encoding"] == "gzip"
    assert h["x-scope-orgid"] == "tenant1"
    assert c.received.requests[-1] == request()


@pytest.mark.parametrize("status", [429, 502, 504])
def test_http_retryable_codes_back_off(fake, status):
    with HttpCollector([Reply(http_status=status)]) as c:
        result = OtlpExporter(c.url, retry=policy(fake)).export(request())
    assert result.status == ExportStatus.SUCCESS and result.attempts == 2 and fake.sleeps == [1]


def test_http_400_is_not_retried_and_carries_the_server_message(fake):
    body = status_pb2.Status(code=3, message="bad dictionary").SerializeToString()
    with HttpCollector([Reply(http_status=400, body=body)]) as c:
        result = OtlpExporter(c.url, retry=policy(fake)).export(request())
    assert result.status == ExportStatus.FAILURE and result.attempts == 1 and not fake.sleeps
    assert result.message == f"{c.url}/v1development/profiles: HTTP 400 Bad Request: bad dictionary (not retryable)"


def test_http_partial_success_and_uncompressed(fake):
    with HttpCollector([Reply(rejected=1, message="one dropped")]) as c:
        result = OtlpExporter(c.url, compression=None, retry=policy(fake)).export(request())
    assert result.status == ExportStatus.PARTIAL_SUCCESS and result.rejected_profiles == 1
    assert "content-encoding" not in c.received.headers[0]


def test_http_endpoint_down_for_good(fake):
    url = f"http://127.0.0.1:{closed_port()}"
    result = OtlpExporter(url, timeout_s=4, retry=policy(fake)).export(request())
    assert result.status == ExportStatus.FAILURE and result.attempts == 3
    assert result.message.startswith(f"{url}/v1development/profiles: ConnectionRefusedError")


def test_shutdown_interrupts_a_backoff_wait():
    """Real Event wait: a 60 s Retry-After ends as soon as shutdown() is called."""
    with HttpCollector([Reply(http_status=503, retry_after="60")]) as c:
        exporter = OtlpExporter(c.url, timeout_s=120)
        results = []
        t = threading.Thread(target=lambda: results.append(exporter.export(request())))
        t.start()
        deadline = time.monotonic() + 10
        while not c.received.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        exporter.shutdown()
        t.join(timeout=10)
    assert not t.is_alive()
    assert "shut down while waiting to retry" in results[0].message
    assert exporter.export(request()).message.endswith("exporter is shut down")


# --- the contract, over every implementation -------------------------------------

@pytest.fixture(params=["memory", "grpc", "http"])
def exporter_and_received(request, fake):
    if request.param == "memory":
        e = InMemoryOtlpExporter()
        yield e, e.requests
        return
    collector = GrpcCollector() if request.param == "grpc" else HttpCollector()
    with collector:
        yield OtlpExporter(collector.url, retry=policy(fake)), collector.received.requests


def test_exporter_contract(exporter_and_received):
    exporter, received = exporter_and_received
    result = exporter.export(request())
    assert result.status == ExportStatus.SUCCESS and result.ok and result.attempts == 1
    assert received == [request()]
    assert exporter.force_flush() is True
    exporter.shutdown(timeout_s=1)
    after = exporter.export(request())
    assert after.status == ExportStatus.FAILURE and "shut down" in after.message
    assert len(received) == 1


def test_in_memory_exporter_scripted_results():
    e = InMemoryOtlpExporter([ExportResult(ExportStatus.FAILURE, "down")])
    assert e.export(request()).message == "down"
    assert e.export(request()).status == ExportStatus.SUCCESS
    assert len(e.requests) == 2
