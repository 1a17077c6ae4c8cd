"""The kinds of profile bpfprof makes, and the sample types of each, in one registry.

Sample types are named as Go's runtime/pprof names them (cpu: samples/count
+ cpu/nanoseconds; heap: alloc_objects, alloc_space, inuse_objects,
inuse_space; lock: contentions/count + delay/nanoseconds; goroutine:
goroutine/count), so `go tool pprof` and backends treat our files as theirs.
Off-CPU has no runtime/pprof twin: it is shaped like CPU, with off_cpu time.
Probes make their empty profiles here; decoders of formats that do not carry
a kind (OTLP, pprof) recognise it from the sample types here.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporters.profile import Profile, ValueType


@dataclass(frozen=True)
class ProfileType:
    """One kind of profile: its sample types, the unit of its period, the type a viewer shows first."""

    kind: str  # Profile.kind
    sample_types: tuple[ValueType, ...]
    period_type: ValueType
    default_sample_type: str


_COUNT = "count"
_NS = "nanoseconds"
_BYTES = "bytes"

# Order matters for kind_of_sample_type: a name two kinds share ("samples") belongs to the first.
PROFILE_TYPES: dict[str, ProfileType] = {t.kind: t for t in (
    ProfileType("cpu", (ValueType("samples", _COUNT), ValueType("cpu", _NS)), ValueType("cpu", _NS), "cpu"),
    ProfileType("offcpu", (ValueType("samples", _COUNT), ValueType("off_cpu", _NS)), ValueType("off_cpu", _NS),
                "off_cpu"),
    ProfileType("heap", (ValueType("alloc_objects", _COUNT), ValueType("alloc_space", _BYTES),
                         ValueType("inuse_objects", _COUNT), ValueType("inuse_space", _BYTES)),
                ValueType("space", _BYTES), "inuse_space"),
    ProfileType("lock", (ValueType("contentions", _COUNT), ValueType("delay", _NS)), ValueType("contentions", _COUNT),
                "delay"),
    ProfileType("goroutine", (ValueType("goroutine", _COUNT),), ValueType("goroutine", _COUNT), "goroutine"),
)}

_KIND_BY_SAMPLE_TYPE: dict[str, str] = {}
for _t in PROFILE_TYPES.values():
    for _st in _t.sample_types:
        _KIND_BY_SAMPLE_TYPE.setdefault(_st.type, _t.kind)


def empty_profile(kind: str, start_time_ns: int, duration_ns: int, period: int = 1) -> Profile:
    """An empty profile of `kind` (a PROFILE_TYPES key; KeyError otherwise); `period` in its period type's unit."""
    t = PROFILE_TYPES[kind]
    return Profile(sample_types=list(t.sample_types), period_type=t.period_type, period=period,
                   start_time_ns=start_time_ns, duration_ns=duration_ns, default_sample_type=t.default_sample_type,
                   kind=t.kind)


def cpu_profile(start_time_ns: int, duration_ns: int, frequency_hz: int) -> Profile:
    """An empty CPU profile sampled at `frequency_hz` (its period is one sampling interval, in ns)."""
    return empty_profile("cpu", start_time_ns, duration_ns, 1_000_000_000 // frequency_hz)


def kind_of_sample_type(sample_type: str) -> str:
    """The kind a sample type's name belongs to ("inuse_space" -> "heap"); "" for one not ours."""
    return _KIND_BY_SAMPLE_TYPE.get(sample_type, "")
