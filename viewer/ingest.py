"""OTLP requests in, store rows out: parsing, validation and the answer to give.

Transport-neutral: the gRPC and HTTP receivers both call `ingest_traces` /
`ingest_profiles` with the request bytes. A request that does not parse, or a
profiles request that breaks the spec's rules (indices out of range, a
non-zero element 0...), is rejected whole with InvalidRequest and nothing of
it is stored; spans with bad ids are dropped one by one and counted as
OTLP's partial success. Stores are transactions, so a failure stores nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from exporters.otlp import ExportError, decode_otlp, parse_otlp, validate_otlp
from viewer.store import SpanRecord, Store

# The largest pid/tid Linux hands out (PID_MAX_LIMIT on 64-bit): a `thread.id`
# above it is no kernel tid (Python's semconv `thread.id` is threading.get_ident(),
# a pthread_t address), so it cannot match samples.
PID_MAX_LIMIT = 1 << 22
# Span attributes that name the kernel thread, best first: an explicit native id
# (Python: threading.get_native_id()), then semconv's thread.id when it is one.
NATIVE_THREAD_ATTRS = ("thread.native_id", "process.thread.native_id", "thread.id")
MAX_MESSAGES = 3  # problems named in one error answer


class InvalidRequest(Exception):
    """The request is malformed: gRPC INVALID_ARGUMENT, HTTP 400. Nothing of it was stored."""


@dataclass(frozen=True)
class IngestResult:
    """What was stored and what was rejected; `message` explains the rejections."""

    accepted: int
    rejected: int = 0
    message: str = ""


def any_value(v: AnyValue) -> object:
    """A JSON-able Python value of an OTLP AnyValue."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def native_tid(attrs: dict) -> int | None:
    """The kernel thread id a span ran on, from its attributes, else None."""
    for key in NATIVE_THREAD_ATTRS:
        tid = _int(attrs.get(key))
        if tid is not None and 0 < tid <= PID_MAX_LIMIT:
            return tid
    return None


def _span_problem(span) -> str:  # noqa: ANN001  (opentelemetry.proto Span)
    if len(span.trace_id) != 16 or not any(span.trace_id):
        return f"trace_id must be 16 bytes, not all zero (got {len(span.trace_id)} bytes)"
    if len(span.span_id) != 8 or not any(span.span_id):
        return f"span_id must be 8 bytes, not all zero (got {len(span.span_id)} bytes)"
    if span.parent_span_id and len(span.parent_span_id) != 8:
        return f"parent_span_id must be empty or 8 bytes (got {len(span.parent_span_id)})"
    if span.end_time_unix_nano < span.start_time_unix_nano:
        return "end_time_unix_nano is before start_time_unix_nano"
    return ""


def parse_traces(data: bytes) -> tuple[list[SpanRecord], list[str]]:
    """Spans of an ExportTraceServiceRequest and one message per span rejected.

    Raises InvalidRequest when the bytes are not such a request.
    """
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(data)
    except DecodeError as e:
        raise InvalidRequest(f"not an OTLP traces request: {e}") from None
    spans, problems = [], []
    for rs in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name") or "unknown_service")
        pid = _int(resource.get("process.pid"))
        for ss in rs.scope_spans:
            for span in ss.spans:
                problem = _span_problem(span)
                if problem:
                    problems.append(f"span {span.name!r}: {problem}")
                    continue
                attrs = {kv.key: any_value(kv.value) for kv in span.attributes}
                thread_attr = attrs.get("thread.id")
                spans.append(SpanRecord(
                    trace_id=span.trace_id, span_id=span.span_id, parent_span_id=span.parent_span_id,
                    name=span.name, service=service, kind=span.kind, start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano, status_code=span.status.code, status_message=span.status.message,
                    pid=_int(attrs.get("process.pid")) or pid, tid=native_tid(attrs),
                    thread_attr=None if thread_attr is None else json.dumps(thread_attr),
                    thread_name=str(attrs.get("thread.name", "")), attributes=attrs, resource=resource))
    return spans, problems


def ingest_traces(store: Store, data: bytes) -> tuple[IngestResult, ExportTraceServiceResponse]:
    """Store the valid spans of a request; raises InvalidRequest for bytes that are not one."""
    spans, problems = parse_traces(data)
    store.add_spans(spans)
    response = ExportTraceServiceResponse()
    message = "; ".join(problems[:MAX_MESSAGES]) + (f" (+{len(problems) - MAX_MESSAGES} more)"
                                                    if len(problems) > MAX_MESSAGES else "")
    if problems:
        response.partial_success.rejected_spans = len(problems)
        response.partial_success.error_message = message
    return IngestResult(len(spans), len(problems), message), response


def ingest_profiles(store: Store, data: bytes) -> tuple[IngestResult, ExportProfilesServiceResponse]:
    """Validate and store a profiles request whole; raises InvalidRequest if it breaks a rule."""
    try:
        request = parse_otlp(data)
    except ExportError as e:
        raise InvalidRequest(str(e)) from None
    errors = validate_otlp(request)
    if errors:
        more = f" (+{len(errors) - MAX_MESSAGES} more)" if len(errors) > MAX_MESSAGES else ""
        raise InvalidRequest("invalid OTLP profiles: " + "; ".join(errors[:MAX_MESSAGES]) + more)
    try:
        profiles = decode_otlp(request)
    except (ExportError, ValueError) as e:
        raise InvalidRequest(str(e)) from None
    events = store.add_profiles(profiles)
    return IngestResult(events), ExportProfilesServiceResponse()
