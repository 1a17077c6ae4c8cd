"""encode_pprof, checked by the independent reader: `go tool pprof`.

The profile is built by hand so every expected figure below is known up front
rather than read back from our own encoder.
"""

from __future__ import annotations

import gzip
import re
from collections import defaultdict
from pathlib import Path

import pytest

import gotool
from exporters.otlp import decode_otlp, encode_otlp_bytes
from exporters.pprof import decode_pprof, encode_pprof
from exporters.pprof_reader import profile_from_pprof
from exporters.profile import Location, Profile, SampleKey
from exporters.profile_types import cpu_profile, empty_profile
from symbolizer.frames import BuildIdKind, Frame, FrameKind, Mapping

APP = Mapping(0x400000, 0x600000, 0, "/usr/local/bin/app", "Xa1/Xb2/Xc3/Xd4", BuildIdKind.GO)
ENGINE = Mapping(0x555555554000, 0x555555556000, 0x1000, "/opt/bin/engine", "e" * 40, BuildIdKind.GNU)
LIBC = Mapping(
    0x7F1000000000, 0x7F1000200000, 0x28000, "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", BuildIdKind.GNU,
)
LIBENGINE = Mapping(0x7F2000000000, 0x7F2000100000, 0, "/opt/lib/libengine.so", "0123456789abcdef" * 2, BuildIdKind.GNU)
LIBFOO = Mapping(0x7F3000000000, 0x7F3000010000, 0x1000, "/opt/lib/libfoo.so", "deadbeef" * 5, BuildIdKind.GNU)
KERNEL = Mapping(0xFFFFFFFF81000000, 0xFFFFFFFF83000000, 0, "[kernel.kallsyms]")

MAIN_GO = "/src/app/main.go"
# main.hot is inlined into main.work at this address: innermost first.
L_HOT = Location(0x401234, APP, (
    Frame("main.hot", FrameKind.GO, MAIN_GO, 12, inlined=True, start_line=10),
    Frame("main.work", FrameKind.GO, MAIN_GO, 30, start_line=25),
))
# main.work again at another pc: must reuse the same Function.
L_WORK = Location(0x401300, APP, (Frame("main.work", FrameKind.GO, MAIN_GO, 33, start_line=25),))
L_MAIN = Location(0x401100, APP, (Frame("main.main", FrameKind.GO, MAIN_GO, 40, start_line=38),))
L_EMAIN = Location(0x555555554800, ENGINE, (Frame("main", FrameKind.NATIVE, "/src/engine/main.c", 12),))
L_CPP = Location(0x7F2000000400, LIBENGINE, (
    Frame("ns::Engine::step(int)", FrameKind.NATIVE, "/src/engine.cc", 88, system_name="_ZN2ns6Engine4stepEi", start_line=80),
))
L_MEMMOVE = Location(0x7F1000001000, LIBC, (Frame("__memmove_avx_unaligned_erms", FrameKind.NATIVE),))
L_UNRESOLVED = Location(0x7F3000000ABC, LIBFOO)
L_KSYS = Location(0xFFFFFFFF81001000, KERNEL, (Frame("do_syscall_64", FrameKind.KERNEL),))
L_KENTRY = Location(0xFFFFFFFF81002000, KERNEL, (Frame("entry_SYSCALL_64_after_hwframe", FrameKind.KERNEL),))
# A kernel frame whose mapping the agent did not record: mapping_id 0.
L_KIRQ = Location(0xFFFFFFFF81003000, None, (Frame("asm_sysvec_apic_timer_interrupt", FrameKind.KERNEL),))

SPAN = (("span_id", "00f067aa0ba902b7"), ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"))

# (stack leaf first, pid, tid, thread name, labels, events)
EVENTS = [
    ((L_HOT, L_MAIN), 100, 100, "app", SPAN, 5),
    ((L_WORK, L_MAIN), 100, 101, "app", (), 2),
    ((L_KIRQ, L_HOT, L_MAIN), 100, 100, "app", (), 1),
    ((L_KSYS, L_KENTRY, L_MEMMOVE, L_CPP, L_EMAIN), 200, 201, "engine", (), 3),
    ((L_UNRESOLVED, L_CPP, L_EMAIN), 200, 202, "engine-io", (), 4),
]
TOTAL_EVENTS = 15
# Flat sample counts per leaf function, as pprof names them.
EXPECTED_FLAT = {
    "main.hot": 5,
    "main.work": 2,
    "asm_sysvec_apic_timer_interrupt": 1,
    "do_syscall_64": 3,
    "libfoo.so+0x1abc": 4,  # unresolved: file name + file offset, as in every output
}
EXPECTED_CUM = {"main.main": 8, "main": 7, "ns::Engine::step(int)": 7, "__memmove_avx_unaligned_erms": 3}


def make_profile() -> Profile:
    profile = cpu_profile(start_time_ns=1_700_000_000_000_000_000, duration_ns=10_000_000_000, frequency_hz=99)
    t = profile.start_time_ns
    for stack, pid, tid, name, labels, n in EVENTS:
        for _ in range(n):
            t += 1_000_000
            profile.add(SampleKey(stack, pid, tid, name, labels), [1, profile.period], timestamp_ns=t)
    profile.comments.append("dropped: 0 ring buffer, 0 stack id")
    return profile


@pytest.fixture(scope="module")
def pprof_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pprof") / "cpu.pb.gz"
    path.write_bytes(encode_pprof(make_profile()))
    return path


@pytest.fixture(scope="module")
def go_pprof(tmp_path_factory):
    """Run `go tool pprof ARGS FILE` offline; returns stdout."""
    home = tmp_path_factory.mktemp("home")
    return lambda *args: gotool.go_pprof(home, *args)


parse_top = gotool.parse_top


def parse_raw(text: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """Locations {address: {mapping, functions}} and mappings {id: {...}} from `-raw`."""
    locations: dict[int, dict] = {}
    mappings: dict[int, dict] = {}
    section = ""
    current: dict | None = None
    for line in text.splitlines():
        if line in ("Samples:", "Locations", "Mappings"):
            section = line
            continue
        if section == "Locations":
            m = re.match(r"\s*\d+: 0x([0-9a-f]+)(?: M=(\d+))? ?(.*)$", line)
            body = line.strip()
            if m:
                current = {"mapping": int(m.group(2) or 0), "functions": []}
                locations[int(m.group(1), 16)] = current
                body = m.group(3)
            if body:
                # "name file:line:column s=start_line(system_name if it differs)"
                fn = re.match(r"(.*) \S*:\d+:\d+ s=\d+(\(.*\))?$", body)
                current["functions"].append(fn.group(1) + (fn.group(2) or ""))
        elif section == "Mappings":
            m = re.match(r"(\d+): 0x([0-9a-f]+)/0x([0-9a-f]+)/0x([0-9a-f]+) (\S*) (\S*)\s*(.*)$", line)
            if m:
                mappings[int(m.group(1))] = {
                    "start": int(m.group(2), 16), "limit": int(m.group(3), 16), "offset": int(m.group(4), 16),
                    "file": m.group(5), "build_id": m.group(6), "flags": m.group(7),
                }
    return locations, mappings


@pytest.mark.parametrize("sample_index,value_index", [("samples", 0), ("cpu", 1)])
def test_totals_and_flat_counts_match(go_pprof, pprof_file, sample_index, value_index):
    profile = make_profile()
    out = go_pprof("-top", "-nodecount=100", "-nodefraction=0", "-edgefraction=0",
                   f"-sample_index={sample_index}", "-unit=ns", str(pprof_file))
    total, rows = parse_top(out)
    scale = 1 if value_index == 0 else profile.period
    assert total == profile.total(value_index) == TOTAL_EVENTS * scale
    flats = {name: flat for name, (flat, _) in rows.items() if flat}
    assert flats == {name: n * scale for name, n in EXPECTED_FLAT.items()}
    for name, n in EXPECTED_CUM.items():
        assert rows[name][1] == n * scale
    assert "File: app" in out  # the main executable is mapping 1


def test_raw_locations_keep_inlining_mappings_and_build_ids(go_pprof, pprof_file):
    out = go_pprof("-raw", str(pprof_file))
    locations, mappings = parse_raw(out)
    by_file = {m["file"]: (mid, m) for mid, m in mappings.items()}

    # Inlined frames: several lines on one location, innermost first.
    assert locations[L_HOT.address]["functions"] == ["main.hot", "main.work"]
    assert locations[L_CPP.address]["functions"] == ["ns::Engine::step(int)(_ZN2ns6Engine4stepEi)"]
    # Unresolved: a placeholder line module+0xoffset; the runtime address and its mapping survive.
    assert locations[L_UNRESOLVED.address] == {"mapping": by_file["/opt/lib/libfoo.so"][0],
                                               "functions": ["libfoo.so+0x1abc"]}
    # Kernel frames: the [kernel.kallsyms] mapping when known, else none.
    assert locations[L_KSYS.address]["mapping"] == by_file["[kernel.kallsyms]"][0]
    assert locations[L_KIRQ.address] == {"mapping": 0, "functions": ["asm_sysvec_apic_timer_interrupt"]}

    assert mappings[1]["file"] == APP.path
    for m in (APP, ENGINE, LIBC, LIBENGINE, LIBFOO, KERNEL):
        _, got = by_file[m.path]
        assert (got["start"], got["limit"], got["offset"], got["build_id"]) == (m.start, m.end, m.file_offset, m.build_id)
    assert by_file[APP.path][1]["flags"] == "[FN][FL][LN][IN]"
    assert by_file[LIBC.path][1]["flags"] == "[FN]"
    assert by_file[LIBFOO.path][1]["flags"] == ""
    assert "Comment: dropped: 0 ring buffer, 0 stack id" in out


def test_labels_show_as_tags(go_pprof, pprof_file):
    out = go_pprof("-tags", "-sample_index=samples", str(pprof_file))
    tags: dict[str, dict[str, int]] = defaultdict(dict)
    key = ""
    for line in out.splitlines():
        if m := re.match(r"\s*(\S+): Total", line):
            key = m.group(1)
        elif m := re.match(r"\s*(\d+) \(\s*[\d.]+%\): (.*)$", line):
            tags[key][m.group(2)] = int(m.group(1))
    assert tags["pid"] == {"100": 8, "200": 7}
    assert tags["tid"] == {"100": 6, "101": 2, "201": 3, "202": 4}
    assert tags["thread_name"] == {"app": 8, "engine": 3, "engine-io": 4}
    assert tags["span_id"] == {"00f067aa0ba902b7": 5}
    assert tags["trace_id"] == {"4bf92f3577b34da6a3ce929d0e0e4736": 5}


def test_round_trip_through_decode():
    profile = make_profile()
    data = encode_pprof(profile)
    assert data[:2] == b"\x1f\x8b"
    msg = decode_pprof(data)
    assert decode_pprof(gzip.decompress(data)) == msg  # plain protobuf too
    st = msg.string_table
    assert st[0] == ""
    assert len(set(st)) == len(st)

    assert [(st[v.type], st[v.unit]) for v in msg.sample_type] == [("samples", "count"), ("cpu", "nanoseconds")]
    assert (st[msg.period_type.type], st[msg.period_type.unit], msg.period) == ("cpu", "nanoseconds", profile.period)
    assert (msg.time_nanos, msg.duration_nanos) == (profile.start_time_ns, profile.duration_ns)
    assert st[msg.default_sample_type] == "cpu"
    assert [st[c] for c in msg.comment] == profile.comments

    assert [m.id for m in msg.mapping] == list(range(1, 7))
    functions = {f.id: f for f in msg.function}
    names = [st[f.name] for f in msg.function]
    assert sorted(names) == sorted(set(names))  # main.work at two pcs: one Function
    cpp = next(f for f in msg.function if st[f.name] == "ns::Engine::step(int)")
    assert (st[cpp.system_name], st[cpp.filename], cpp.start_line) == ("_ZN2ns6Engine4stepEi", "/src/engine.cc", 80)
    assert len(msg.location) == 10
    hot = next(loc for loc in msg.location if loc.address == L_HOT.address)
    assert [(st[functions[ln.function_id].name], ln.line) for ln in hot.line] == [("main.hot", 12), ("main.work", 30)]

    decoded = []
    for s in msg.sample:
        labels = {st[lb.key]: (lb.num if not lb.str else st[lb.str]) for lb in s.label}
        decoded.append((len(s.location_id), list(s.value), labels))
    assert decoded[0] == (2, [5, 5 * profile.period], {
        "pid": 100, "tid": 100, "thread_name": "app",
        "span_id": "00f067aa0ba902b7", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    })
    assert sum(v[1][0] for v in decoded) == TOTAL_EVENTS


# Every kind of profile the agent writes, by the constructors it writes them with.
KIND_PROFILES = {
    "cpu": lambda t, d: cpu_profile(t, d, frequency_hz=99),
    "offcpu": lambda t, d: empty_profile("offcpu", t, d),
    "heap": lambda t, d: empty_profile("heap", t, d, period=512 * 1024),
    "lock": lambda t, d: empty_profile("lock", t, d),
    "goroutine": lambda t, d: empty_profile("goroutine", t, d),
}


def _stacks(profile: Profile) -> dict:
    return {(tuple(f.function for loc in s.stack for f in loc.frames), s.key.pid, s.key.tid, s.key.thread_name,
             s.key.labels): s.values for s in profile.samples}


@pytest.mark.parametrize("without_default", [False, True], ids=["default-type", "no-default-type"])
@pytest.mark.parametrize("kind", sorted(KIND_PROFILES))
def test_reader_round_trip_keeps_the_kind(kind, without_default):
    """encode_pprof -> profile_from_pprof (`bpfprof convert`) keeps each kind, its types and samples. Without
    a default sample type (Go's runtime/pprof writes none) the last type decides, as pprof shows it."""
    profile = KIND_PROFILES[kind](1_700_000_000_000_000_000, 10_000_000_000)
    assert profile.kind == kind
    if without_default:
        if profile.sample_types[-1].type != profile.default_sample_type:
            pytest.skip("the last sample type is not the default one: pprof would show another")
        profile.default_sample_type = ""
    for stack, pid, tid, name, labels, events in EVENTS:
        profile.add(SampleKey(stack, pid, tid, name, labels), [events * (j + 1) for j in range(len(profile.sample_types))])
    back = profile_from_pprof(encode_pprof(profile))
    assert back.kind == kind
    assert (back.sample_types, back.period_type, back.period, back.default_sample_type) == (
        profile.sample_types, profile.period_type, profile.period, profile.default_sample_type)
    assert _stacks(back) == _stacks(profile)
    if not without_default:  # OTLP carries no kind either: its reader takes it from the first (default) type
        [otlp_back] = decode_otlp(encode_otlp_bytes([profile], "host"))
        assert otlp_back.kind == kind and otlp_back.default_sample_type == profile.default_sample_type


def test_encoding_is_deterministic():
    assert encode_pprof(make_profile()) == encode_pprof(make_profile())


def test_empty_profile_encodes():
    msg = decode_pprof(encode_pprof(cpu_profile(0, 0, 99)))
    assert list(msg.sample) == [] and msg.string_table[0] == ""


def test_value_count_mismatch_is_an_error():
    profile = make_profile()
    profile.samples[0].values.append(1)
    with pytest.raises(ValueError, match="3 values"):
        encode_pprof(profile)


def test_regenerating_profile_pb2_gives_the_committed_file(tmp_path):
    pytest.importorskip("grpc_tools")
    from exporters.proto import generate

    fresh = generate.generate(tmp_path).read_text()
    committed = generate.GENERATED.read_text()
    assert fresh == committed, (
        "profile_pb2.py is stale or protoc's version changed: run `python -m exporters.proto.generate` "
        "and keep pyproject's protobuf lower bound >= the 'Protobuf Python Version' it stamps"
    )


def test_out_of_range_lines_are_unknown_not_an_encoding_error():
    """A line decoded from garbage (a torn read of a Python code object gave -2e37) must not lose the capture."""
    bad = Frame("app.handler", FrameKind.NATIVE, "/srv/app.py", -21897790768154323722524284729129751669,
                start_line=1 << 40)
    assert (bad.line, bad.start_line) == (0, 0)
    assert Frame("f", FrameKind.NATIVE, "x.c", (1 << 31) - 1).line == (1 << 31) - 1
    profile = cpu_profile(0, 10**9, 99)
    profile.add(SampleKey((Location(0x555555554900, ENGINE, (bad,)),), 7, 7, "app"), [10_101_010, 1])
    msg = decode_pprof(encode_pprof(profile))
    assert [line.line for loc in msg.location for line in loc.line] == [0]
    [back] = decode_otlp(encode_otlp_bytes([profile], "host"))
    assert {back.total(0), back.total(1)} == {10_101_010, 1}
