"""The profile-type registry: runtime/pprof's sample types per kind (DESIGN.md, Output conventions), and
every kind recognised again when a profile comes back from OTLP, which carries no kind."""

from __future__ import annotations

import dataclasses

import pytest

from exporters.otlp import decode_otlp, encode_otlp
from exporters.pprof import decode_pprof, encode_pprof
from exporters.profile import Location, SampleKey
from exporters.profile_types import PROFILE_TYPES, cpu_profile, empty_profile, kind_of_sample_type
from symbolizer.frames import Frame, FrameKind, Mapping

# What Go's runtime/pprof writes (src/runtime/pprof/proto.go, protomem.go, pprof.go), off-CPU shaped like CPU.
RUNTIME_PPROF = {
    "cpu": ([("samples", "count"), ("cpu", "nanoseconds")], ("cpu", "nanoseconds")),
    "offcpu": ([("samples", "count"), ("off_cpu", "nanoseconds")], ("off_cpu", "nanoseconds")),
    "heap": ([("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"),
              ("inuse_space", "bytes")], ("space", "bytes")),
    "lock": ([("contentions", "count"), ("delay", "nanoseconds")], ("contentions", "count")),
    "goroutine": ([("goroutine", "count")], ("goroutine", "count")),
}


@pytest.mark.parametrize("kind", sorted(RUNTIME_PPROF))
def test_empty_profiles_have_runtime_pprof_sample_types(kind):
    p = empty_profile(kind, 5, 7, period=3)
    msg = decode_pprof(encode_pprof(p))
    st = msg.string_table
    sample_types, period_type = RUNTIME_PPROF[kind]
    assert [(st[t.type], st[t.unit]) for t in msg.sample_type] == sample_types
    assert (st[msg.period_type.type], st[msg.period_type.unit]) == period_type
    assert msg.period == 3 and msg.time_nanos == 5 and msg.duration_nanos == 7
    assert p.kind == kind and st[msg.default_sample_type] == PROFILE_TYPES[kind].default_sample_type


@pytest.mark.parametrize("kind", sorted(RUNTIME_PPROF))
def test_otlp_gives_each_kind_back(kind):
    p = empty_profile(kind, 10**18, 10**9)
    p.add(SampleKey(stack=(Location(0x401000, None),), pid=1, tid=1, thread_name="t"),
          [1] * len(p.sample_types), 10**18 + 1)
    (back,) = decode_otlp(encode_otlp([p], "host"))
    assert back.kind == kind and set(back.sample_types) == set(p.sample_types)  # OTLP puts the default first
    assert back.default_sample_type == p.default_sample_type


def test_cpu_period_is_one_sampling_interval_and_names_not_ours_have_no_kind():
    assert cpu_profile(0, 0, 99).period == 1_000_000_000 // 99
    assert kind_of_sample_type("samples") == "cpu" and kind_of_sample_type("inuse_objects") == "heap"
    assert kind_of_sample_type("wall") == ""
    with pytest.raises(KeyError):
        empty_profile("wall", 0, 0)


def test_locations_and_sample_keys_hash_once_and_as_their_fields_do():
    """Their hash is kept at first use (symbolizer.frames.hash_once): equal objects built apart must
    still hash and look up alike, and a changed copy must not carry the old hash."""
    def loc(address: int) -> Location:
        return Location(address, Mapping(0x1000, 0x2000, 0, "/usr/bin/app", "ab" * 20),
                        (Frame(function="main", kind=FrameKind.NATIVE, file="app.c", line=3),))

    a, b = loc(0x1234), loc(0x1234)
    assert a is not b and a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1 and {SampleKey((a,), 1, 2, "t"): 1}[SampleKey((b,), 1, 2, "t")] == 1
    hash(a)
    moved = dataclasses.replace(a, address=0x1235)
    assert moved != a and hash(moved) == hash(loc(0x1235))
    assert hash(a.mapping) == hash(dataclasses.replace(b.mapping))
    assert SampleKey((a,), 1, 2, "t") != SampleKey((a,), 1, 3, "t")
