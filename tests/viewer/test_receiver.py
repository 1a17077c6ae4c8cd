"""OTLP receivers: real exporters in, malformed and oversized input out with the right status,
nothing stored lost, and the server still serving afterwards."""

from __future__ import annotations

import gzip

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from exporters.otlp_sender import OtlpExporter
from tests.viewer.conftest import get_json, post
from tests.viewer.data import MS, T0, Ev, SpanSpec, cpu, every, profiles_request, trace_request
from viewer.receiver import PROFILES_GRPC_SERVICE, TRACES_GRPC_SERVICE

TRACE = bytes.fromhex("5b8efff798038103d269b633813fc60c")
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f\x01"  # field 1, a length running far past the end


def good_profiles() -> bytes:
    return profiles_request([cpu([Ev(("main", "work"), 7, 7, t) for t in every(T0, T0 + 100 * MS)])])


def http_url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.receiver.http_port}{path}"


def grpc_call(server, service: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(f"127.0.0.1:{server.receiver.grpc_port}") as ch:
        call = ch.unary_unary(f"/{service}/Export", request_serializer=None, response_deserializer=None)
        try:
            call(body, timeout=10)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""


def rpc_status(body: bytes) -> status_pb2.Status:
    s = status_pb2.Status()
    s.ParseFromString(body)
    return s


@pytest.fixture
def stored(server):
    """One trace and one profile already stored: what must survive every bad request."""
    assert post(http_url(server, "/v1/traces"), trace_request([SpanSpec(TRACE, b"\x01" * 8, "kept", T0, T0 + MS)]))[0] == 200
    assert post(http_url(server, "/v1development/profiles"), good_profiles())[0] == 200
    counts = server.store.counts()
    assert counts["spans"] == 1 and counts["samples"] == 10
    return counts


def test_real_sdk_exporters_and_our_sender_are_taken(server):
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk-app", "process.pid": 77}))
    http_exp = HttpSpanExporter(endpoint=http_url(server, "/v1/traces"))
    grpc_exp = GrpcSpanExporter(endpoint=f"127.0.0.1:{server.receiver.grpc_port}", insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(http_exp))
    provider.add_span_processor(SimpleSpanProcessor(grpc_exp))
    with provider.get_tracer("t").start_as_current_span("op", attributes={"thread.id": 1234}):
        pass
    provider.shutdown()
    spans = get_json(f"http://127.0.0.1:{server.ui_port}/api/spans?service=sdk-app")["spans"]
    assert len(spans) == 1 and spans[0]["tid"] == 1234 and spans[0]["pid"] == 77  # both exporters: one span
    for url in (f"grpc://127.0.0.1:{server.receiver.grpc_port}", http_url(server, "/v1development/profiles")):
        sender = OtlpExporter(url, timeout_s=10)
        result = sender.export(ExportProfilesServiceRequest.FromString(good_profiles()))
        sender.shutdown(1)
        assert result.ok, result.message
    assert server.store.counts()["samples"] == 20
    assert server.receiver.counters.counts["traces.ok"] == 2


def test_malformed_bytes_are_rejected_and_nothing_is_lost(server, stored):
    for path in ("/v1/traces", "/v1development/profiles"):
        status, body = post(http_url(server, path), GARBAGE)
        assert status == 400 and rpc_status(body).code == code_pb2.INVALID_ARGUMENT
    for service in (TRACES_GRPC_SERVICE, PROFILES_GRPC_SERVICE):
        assert grpc_call(server, service, GARBAGE)[0] == grpc.StatusCode.INVALID_ARGUMENT
    status, body = post(http_url(server, "/v1/traces"), gzip.compress(b"x") + b"junk",
                        {"Content-Encoding": "gzip"})
    assert status == 400
    assert server.store.counts() == stored
    assert post(http_url(server, "/v1development/profiles"), good_profiles())[0] == 200  # still serving


@pytest.mark.parametrize("corrupt", [
    lambda r: setattr(r.resource_profiles[0].scope_profiles[0].profiles[0].samples[0], "stack_index", 999),
    lambda r: setattr(r.dictionary.location_table[1].lines[0], "function_index", 50),
    lambda r: r.dictionary.stack_table[1].location_indices.append(0),
    lambda r: setattr(r.dictionary.link_table.add(), "trace_id", b"short"),
    lambda r: r.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].timestamps_unix_nano.append(1),
], ids=["stack-index", "function-index", "location-zero", "link-length", "timestamp-outside"])
def test_out_of_range_indices_and_broken_rules_are_rejected_whole(server, stored, corrupt):
    request = ExportProfilesServiceRequest.FromString(good_profiles())
    corrupt(request)
    body = request.SerializeToString()
    status, answer = post(http_url(server, "/v1development/profiles"), body)
    assert status == 400 and "invalid OTLP profiles" in rpc_status(answer).message
    code, details = grpc_call(server, PROFILES_GRPC_SERVICE, body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("invalid OTLP profiles")
    assert server.store.counts() == stored


def test_bad_spans_are_partial_success_and_wrong_types_do_not_break(server, stored):
    spans = [SpanSpec(b"\x01\x02\x03", b"\x02" * 8, "short-trace-id", T0, T0 + MS),
             SpanSpec(TRACE, b"\x00" * 8, "zero-span-id", T0, T0 + MS),
             SpanSpec(TRACE, b"\x03" * 8, "backwards", T0 + MS, T0),
             SpanSpec(TRACE, b"\x04" * 8, "fine", T0, T0 + 2 * MS,
                      attributes={"thread.id": "not-a-number", "process.pid": 1.5})]
    status, body = post(http_url(server, "/v1/traces"), trace_request(spans, pid=None))
    assert status == 200
    response = ExportTraceServiceResponse.FromString(body)
    assert response.partial_success.rejected_spans == 3
    assert "trace_id must be 16 bytes" in response.partial_success.error_message
    fine = get_json(f"http://127.0.0.1:{server.ui_port}/api/spans?name=fine")["spans"]
    assert len(fine) == 1 and fine[0]["tid"] is None and fine[0]["pid"] is None
    assert server.store.counts()["spans"] == stored["spans"] + 1


def test_huge_payloads_get_413_and_resource_exhausted(server, stored):
    limit = server.config.max_request_bytes
    status, body = post(http_url(server, "/v1development/profiles"), b"\0" * (limit + 1))
    assert status == 413 and rpc_status(body).code == code_pb2.RESOURCE_EXHAUSTED
    bomb = gzip.compress(b"\0" * (limit * 8))  # small on the wire, 8x the limit inside
    assert len(bomb) < limit
    assert post(http_url(server, "/v1development/profiles"), bomb, {"Content-Encoding": "gzip"})[0] == 413
    assert grpc_call(server, PROFILES_GRPC_SERVICE, b"\0" * (limit + 1))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.store.counts() == stored
    assert post(http_url(server, "/v1development/profiles"), good_profiles())[0] == 200


def test_unsupported_media_paths_and_methods(server, stored):
    assert post(http_url(server, "/v1/traces"), b"{}", {"Content-Type": "application/json"})[0] == 415
    assert post(http_url(server, "/v1/logs"), b"")[0] == 404
    assert post(http_url(server, "/v1/traces"), b"", {"Content-Encoding": "br"})[0] == 400
    assert server.store.counts() == stored
