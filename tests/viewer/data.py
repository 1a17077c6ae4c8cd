"""Synthetic OTLP for viewer tests: traces built with the proto classes, profiles with exporters.otlp.

Times are Unix ns from a fixed origin so tests never depend on the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from exporters.otlp import FrameKind, encode_otlp_bytes
from exporters.profile import Frame, Location, ProcessMeta, Profile, SampleKey, TraceLink, ValueType
from exporters.profile_types import cpu_profile

T0 = 1_700_000_000_000_000_000  # a fixed Unix ns origin
MS = 1_000_000
PERIOD_NS = 10 * MS  # 100 Hz


def kv(key: str, value: object) -> KeyValue:
    v = AnyValue()
    if isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int):
        v.int_value = value
    elif isinstance(value, float):
        v.double_value = value
    else:
        v.string_value = str(value)
    return KeyValue(key=key, value=v)


@dataclass
class SpanSpec:
    trace_id: bytes
    span_id: bytes
    name: str
    start_ns: int
    end_ns: int
    parent: bytes = b""
    attributes: dict = field(default_factory=dict)


def trace_request(spans: list[SpanSpec], service: str = "shop", pid: int | None = 4242) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(kv("service.name", service))
    if pid is not None:
        rs.resource.attributes.append(kv("process.pid", pid))
    ss = rs.scope_spans.add()
    ss.scope.name = "tests"
    for s in spans:
        out = ss.spans.add(trace_id=s.trace_id, span_id=s.span_id, parent_span_id=s.parent, name=s.name,
                           start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns, kind=1)
        out.attributes.extend(kv(k, v) for k, v in s.attributes.items())
    return req.SerializeToString()


def stack(*names: str) -> tuple[Location, ...]:
    """Leaf-first Locations of Go frames, given root first (as one reads a flame graph)."""
    return tuple(Location(address=0x1000 + 16 * i, mapping=None, frames=(Frame(function=n, kind=FrameKind.GO),))
                 for i, n in reversed(list(enumerate(names))))


@dataclass(frozen=True)
class Ev:
    """One CPU sample event: root-first function names, process, thread, time, optional link."""

    names: tuple[str, ...]
    pid: int
    tid: int
    ts_ns: int
    link: TraceLink | None = None


def cpu(events: list[Ev], service: str = "shop", start_ns: int = T0, duration_ns: int = 10_000 * MS) -> Profile:
    p = cpu_profile(start_ns, duration_ns, 100)
    for e in events:
        p.processes.setdefault(e.pid, ProcessMeta(pid=e.pid, name="shop", executable_path="/usr/bin/shop",
                                                  service_name=service))
        p.add(SampleKey(stack=stack(*e.names), pid=e.pid, tid=e.tid, thread_name="worker", link=e.link),
              [1, PERIOD_NS], e.ts_ns)
    return p


def heap(pid: int, names: tuple[str, ...], inuse_bytes: int, start_ns: int = T0, service: str = "shop") -> Profile:
    """An untimed heap profile (as a heap snapshot is): no timestamps, values per sample type."""
    p = Profile(sample_types=[ValueType("alloc_space", "bytes"), ValueType("inuse_space", "bytes")],
                period_type=ValueType("space", "bytes"), period=512 * 1024, start_time_ns=start_ns,
                duration_ns=10_000 * MS, default_sample_type="inuse_space", kind="heap")
    p.processes[pid] = ProcessMeta(pid=pid, name="shop", service_name=service)
    p.add(SampleKey(stack=stack(*names), pid=pid, tid=pid, thread_name="shop"), [2 * inuse_bytes, inuse_bytes])
    return p


def profiles_request(profiles: list[Profile]) -> bytes:
    return encode_otlp_bytes(profiles, "testhost")


def every(start_ns: int, end_ns: int, step_ns: int = PERIOD_NS) -> range:
    return range(start_ns, end_ns, step_ns)
