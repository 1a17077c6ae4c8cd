"""encode_otlp / decode_otlp / validate_otlp on hand-made Profiles, and `bpfprof convert`.

Every expected attribute, index and value below is known up front; the
pprof -> OTLP -> pprof round trip is judged by `go tool pprof`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

import gotool
from exporters.formats import FORMATS
from exporters.otlp import decode_otlp, encode_otlp, encode_otlp_bytes, parse_otlp, validate_otlp
from exporters.pprof import encode_pprof
from exporters.profile import Location, ProcessMeta, Profile, SampleKey, TraceLink
from exporters.profile_types import cpu_profile
from recording import read_pprof, run_bpfprof
from symbolizer.errors import ExportError
from symbolizer.frames import BuildIdKind, Frame, FrameKind, Mapping

APP = Mapping(0x400000, 0x600000, 0, "/usr/local/bin/app", "Xa1/Xb2/Xc3/Xd4", BuildIdKind.GO)
ENGINE = Mapping(0x555555554000, 0x555555556000, 0x1000, "/opt/bin/engine", "e" * 40, BuildIdKind.GNU)
LIBFOO = Mapping(0x7F3000000000, 0x7F3000010000, 0x1000, "/opt/lib/libfoo.so", "f" * 32, BuildIdKind.HASH)
VDSO = Mapping(0x7FFF0000, 0x7FFF2000, 0, "[vdso]")
KERNEL = Mapping(0, 0, 0, "[kernel.kallsyms]", "b" * 40, BuildIdKind.GNU)

L_HOT = Location(0x401234, APP, (Frame("main.hot", FrameKind.GO, "/src/main.go", 12, inlined=True, start_line=10),
                                 Frame("main.work", FrameKind.GO, "/src/main.go", 30, start_line=25)))
L_WORK = Location(0x401300, APP, (Frame("main.work", FrameKind.GO, "/src/main.go", 33, start_line=25),))
L_MAIN = Location(0x401100, APP, (Frame("main.main", FrameKind.GO, "/src/main.go", 40, start_line=38),))
L_EMAIN = Location(0x555555554800, ENGINE, (Frame("main", FrameKind.NATIVE, "/src/engine.c", 12),))
L_CPP = Location(0x555555554900, ENGINE, (
    Frame("ns::step(int)", FrameKind.NATIVE, "/src/engine.cc", 88, system_name="_ZN2ns4stepEi", start_line=80),))
L_UNRESOLVED = Location(0x7F3000000ABC, LIBFOO)
L_VDSO = Location(0x7FFF0100, VDSO)
L_KSYS = Location(0xFFFFFFFF81001000, KERNEL, (Frame("do_syscall_64", FrameKind.KERNEL),))
L_KUNRESOLVED = Location(0xFFFFFFFF81009000, KERNEL)

T0 = 1_700_000_000_000_000_000
SPAN_A = TraceLink(bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), bytes.fromhex("00f067aa0ba902b7"))
SPAN_B = TraceLink(bytes(16), bytes.fromhex("1111111111111111"))  # lone span id: zero trace id
LABELS = (("span_id", "00f067aa0ba902b7"), ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"))

# (stack leaf first, pid, tid, thread name, labels, cpu, link, events)
EVENTS = [
    ((L_HOT, L_MAIN), 100, 100, "app", LABELS, 0, SPAN_A, 5),
    ((L_WORK, L_MAIN), 100, 101, "app-worker", (), 1, SPAN_B, 2),
    ((L_WORK, L_MAIN), 100, 101, "app-worker", (), 1, None, 3),
    ((L_KSYS, L_KUNRESOLVED, L_CPP, L_EMAIN), 200, 201, "engine", (), -1, None, 3),
    ((L_UNRESOLVED, L_VDSO, L_CPP, L_EMAIN), 200, 202, "", (("req", "r1"),), -1, None, 4),
]
TOTAL = 17


def make_profile(start_ns: int = T0) -> Profile:
    profile = cpu_profile(start_time_ns=start_ns, duration_ns=10_000_000_000, frequency_hz=100)
    profile.processes[100] = ProcessMeta(100, "app", "/usr/local/bin/app", "", "checkout")
    profile.processes[200] = ProcessMeta(200, "engine", "/opt/bin/engine", "c0ffee" * 10, "engine")
    t = start_ns
    for stack, pid, tid, name, labels, cpu, link, n in EVENTS:
        for _ in range(n):
            t += 1_000_000
            profile.add(SampleKey(stack, pid, tid, name, labels, cpu, link), [1, profile.period], timestamp_ns=t)
    return profile


@pytest.fixture(scope="module")
def req() -> ExportProfilesServiceRequest:
    return encode_otlp([make_profile()], "node-1")


def strings(r):
    return r.dictionary.string_table


def attrs(r, indices) -> dict:
    out = {}
    for i in indices:
        kv = r.dictionary.attribute_table[i]
        v = kv.value
        out[strings(r)[kv.key_strindex]] = v.int_value if v.WhichOneof("value") == "int_value" else v.string_value
    return out


def resource_of(r, pid):
    for rp in r.resource_profiles:
        a = {kv.key: kv.value for kv in rp.resource.attributes}
        if a["process.pid"].int_value == pid:
            return rp
    raise AssertionError(pid)


def test_validator_passes(req):
    assert validate_otlp(req) == []
    # through bytes too, as the file and the wire carry it
    assert validate_otlp(parse_otlp(req.SerializeToString())) == []


def test_index_zero_of_every_table_is_the_zero_value(req):
    d = req.dictionary
    assert d.string_table[0] == ""
    for table in (d.mapping_table, d.location_table, d.function_table, d.link_table, d.attribute_table,
                  d.stack_table):
        assert table[0] == type(table[0])()


def test_one_resource_per_process_with_its_attributes(req):
    assert len(req.resource_profiles) == 2

    def resource_attrs(pid):
        return {kv.key: (kv.value.int_value or kv.value.string_value) for kv in resource_of(req, pid).resource.attributes}

    assert resource_attrs(100) == {
        "host.name": "node-1", "process.pid": 100, "process.executable.name": "app",
        "process.executable.path": "/usr/local/bin/app", "service.name": "checkout"}
    assert resource_attrs(200) == {
        "host.name": "node-1", "process.pid": 200, "process.executable.name": "engine",
        "process.executable.path": "/opt/bin/engine", "container.id": "c0ffee" * 10, "service.name": "engine"}
    for rp in req.resource_profiles:
        assert [sp.scope.name for sp in rp.scope_profiles] == ["bpfprof"]


def test_sample_types_one_profile_each_default_first(req):
    for rp in req.resource_profiles:
        profiles = rp.scope_profiles[0].profiles
        types = [(strings(req)[p.sample_type.type_strindex], strings(req)[p.sample_type.unit_strindex])
                 for p in profiles]
        assert types == [("cpu", "nanoseconds"), ("samples", "count")]
        for p in profiles:
            assert strings(req)[p.period_type.type_strindex] == "cpu" and p.period == 10_000_000
            assert p.time_unix_nano == T0 and p.duration_nano == 10_000_000_000
    totals = Counter()
    for rp in req.resource_profiles:
        for p in rp.scope_profiles[0].profiles:
            totals[strings(req)[p.sample_type.type_strindex]] += sum(v for s in p.samples for v in s.values)
    assert totals == {"samples": TOTAL, "cpu": TOTAL * 10_000_000}


def test_mappings_carry_build_ids_by_kind(req):
    d = req.dictionary
    by_file = {strings(req)[m.filename_strindex]: attrs(req, m.attribute_indices) for m in d.mapping_table[1:]}
    assert by_file == {
        "/usr/local/bin/app": {"process.executable.build_id.go": "Xa1/Xb2/Xc3/Xd4"},
        "/opt/bin/engine": {"process.executable.build_id.gnu": "e" * 40},
        "/opt/lib/libfoo.so": {"process.executable.build_id.htlhash": "f" * 32},
        "[vdso]": {},
        "[kernel.kallsyms]": {"process.executable.build_id.gnu": "b" * 40},
    }
    app = next(m for m in d.mapping_table if strings(req)[m.filename_strindex] == "/usr/local/bin/app")
    assert (app.memory_start, app.memory_limit, app.file_offset) == (0x400000, 0x600000, 0)


def test_locations_carry_frame_type_and_inlined_lines(req):
    d = req.dictionary
    by_address = {loc.address: loc for loc in d.location_table[1:]}
    kinds = {addr: attrs(req, loc.attribute_indices)["profile.frame.type"] for addr, loc in by_address.items()}
    assert kinds == {L_HOT.address: "go", L_WORK.address: "go", L_MAIN.address: "go", L_EMAIN.address: "native",
                     L_CPP.address: "native", L_UNRESOLVED.address: "native", L_VDSO.address: "native",
                     L_KSYS.address: "kernel", L_KUNRESOLVED.address: "kernel"}
    hot = by_address[L_HOT.address]
    names = [strings(req)[d.function_table[line.function_index].name_strindex] for line in hot.lines]
    assert names == ["main.hot", "main.work"] and [line.line for line in hot.lines] == [12, 30]
    # Unresolved: one placeholder line that reads module+0xoffset (the file offset, not the address).
    unresolved = [strings(req)[d.function_table[line.function_index].name_strindex]
                  for line in by_address[L_UNRESOLVED.address].lines]
    assert unresolved == [f"libfoo.so+0x{L_UNRESOLVED.address - LIBFOO.start + LIBFOO.file_offset:x}"]
    cpp = d.function_table[by_address[L_CPP.address].lines[0].function_index]
    assert (strings(req)[cpp.system_name_strindex], cpp.start_line) == ("_ZN2ns4stepEi", 80)


def test_tables_are_deduplicated(req):
    d = req.dictionary
    assert len(set(d.string_table)) == len(d.string_table)
    assert len(d.location_table) == 1 + 9 and len(d.mapping_table) == 1 + 5
    # main.work appears at two pcs and inlined: one Function
    names = [strings(req)[f.name_strindex] for f in d.function_table[1:]]
    placeholders = ["libfoo.so+0x1abc", "[vdso]+0x100", "[kernel.kallsyms]+0xffffffff81009000"]  # unresolved
    assert sorted(names) == sorted(["main.hot", "main.work", "main.main", "main", "ns::step(int)", "do_syscall_64",
                                    *placeholders])
    assert len({tuple(s.location_indices) for s in d.stack_table}) == len(d.stack_table) == 1 + 4
    keys = [(kv.key_strindex, kv.value.SerializeToString()) for kv in d.attribute_table]
    assert len(set(keys)) == len(keys)
    assert len(d.link_table) == 1 + 2


def test_samples_carry_thread_cpu_labels_link_and_timestamps(req):
    d = req.dictionary
    rp = resource_of(req, 100)
    cpu_ns = rp.scope_profiles[0].profiles[0]
    got = {}
    for s in cpu_ns.samples:
        a = attrs(req, s.attribute_indices)
        link = d.link_table[s.link_index]
        got[(a["thread.id"], s.link_index != 0)] = (a, link, list(s.values), list(s.timestamps_unix_nano))
    a, link, values, ts = got[(100, True)]
    assert a == {"thread.id": 100, "thread.name": "app", "cpu.logical_number": 0,
                 "process.context.label.span_id": "00f067aa0ba902b7",
                 "process.context.label.trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert (link.trace_id, link.span_id) == (SPAN_A.trace_id, SPAN_A.span_id)
    assert values == [10_000_000] * 5 and ts == [T0 + i * 1_000_000 for i in range(1, 6)]
    a, link, values, ts = got[(101, True)]
    assert a == {"thread.id": 101, "thread.name": "app-worker", "cpu.logical_number": 1}
    assert (link.trace_id, link.span_id) == (bytes(16), SPAN_B.span_id) and len(ts) == 2
    a, link, values, ts = got[(101, False)]
    assert link == type(link)() and len(ts) == len(values) == 3
    # cpu -1: no cpu.logical_number; empty thread name: no thread.name
    engine = resource_of(req, 200).scope_profiles[0].profiles[0]
    assert {frozenset(attrs(req, s.attribute_indices)) for s in engine.samples} == {
        frozenset({"thread.id", "thread.name"}), frozenset({"thread.id", "process.context.label.req"})}


def test_window_widens_to_cover_every_timestamp():
    profile = make_profile()
    profile.duration_ns = 2_000_000  # samples run until T0 + 17 ms
    r = encode_otlp([profile], "h")
    p = r.resource_profiles[0].scope_profiles[0].profiles[0]
    assert p.time_unix_nano == T0 and p.duration_nano == 17_000_001
    assert validate_otlp(r) == []


def test_values_split_evenly_per_timestamp_and_aggregate_without():
    profile = cpu_profile(T0, 10**9, 100)
    key = SampleKey((L_MAIN,), 1, 1, "t")
    profile.add(key, [3, 7], T0 + 1)
    profile.add(key, [0, 0], T0 + 2)
    profile.add(SampleKey((L_WORK,), 1, 1, "t"), [4, 40])
    r = encode_otlp([profile], "h")
    by_type = {strings(r)[p.sample_type.type_strindex]: p for p in r.resource_profiles[0].scope_profiles[0].profiles}
    assert [list(s.values) for s in by_type["samples"].samples] == [[1, 2], [4]]
    assert [list(s.values) for s in by_type["cpu"].samples] == [[3, 4], [40]]
    assert validate_otlp(r) == []


def test_several_profiles_share_one_dictionary_and_decode_apart():
    a, b = make_profile(), make_profile(T0 + 60_000_000_000)
    r = encode_otlp([a, b], "h")
    assert len(r.resource_profiles) == 2  # per process, not per profile
    assert [len(rp.scope_profiles[0].profiles) for rp in r.resource_profiles] == [4, 4]
    assert len(r.dictionary.location_table) == 1 + 9
    decoded = decode_otlp(r.SerializeToString())
    assert [p.start_time_ns for p in decoded] == [T0, T0 + 60_000_000_000]
    assert [p.total(1) for p in decoded] == [TOTAL, TOTAL]


def test_decode_is_the_inverse_of_encode(req):
    [back] = decode_otlp(req.SerializeToString())
    original = make_profile()
    assert back.kind == "cpu" and back.default_sample_type == "cpu"
    assert back.sample_types == [original.sample_types[1], original.sample_types[0]]  # default first
    assert back.processes == original.processes
    assert {s.key: (s.values[::-1], s.timestamps_ns) for s in back.samples} == {
        s.key: (s.values, s.timestamps_ns) for s in original.samples}


def test_otlp_format_in_the_registry():
    fmt = FORMATS["otlp"]
    assert fmt.extension == ".otlp.pb"
    r = parse_otlp(fmt.encode(make_profile()))
    assert validate_otlp(r) == [] and len(r.resource_profiles) == 2
    assert encode_otlp_bytes([make_profile()], "h") == encode_otlp_bytes([make_profile()], "h")  # deterministic


# --- the validator on broken requests ------------------------------------------------

def _broken(how):
    r = encode_otlp([make_profile()], "node-1")
    how(r)
    return r


def _sample(r, ri=0, k=0):
    return r.resource_profiles[ri].scope_profiles[0].profiles[0].samples[k]


CORRUPTIONS = {
    "table zero value": (lambda r: setattr(r.dictionary.location_table[0], "address", 1),
                         "dictionary.location_table[0] is not the zero value"),
    "empty table": (lambda r: r.dictionary.ClearField("link_table"),
                    "dictionary.link_table is empty: element 0 must be the zero value"),
    "string zero": (lambda r: r.dictionary.string_table.__setitem__(0, "x"), 'dictionary.string_table[0] must be ""'),
    "stack index": (lambda r: setattr(_sample(r), "stack_index", 99),
                    "resource_profiles[0].scope_profiles[0].profiles[0].samples[0]: stack_index 99 out of range "
                    "(table has 5)"),
    "link index": (lambda r: setattr(_sample(r), "link_index", 3), "samples[0]: link_index 3 out of range"),
    "location index": (lambda r: r.dictionary.stack_table[1].location_indices.append(50),
                       "stack_table[1]: location index 50 out of range (table has 10)"),
    "location zero": (lambda r: r.dictionary.stack_table[1].location_indices.append(0),
                      "stack_table[1]: references location 0 (the zero value)"),
    "function index": (lambda r: setattr(r.dictionary.location_table[1].lines[0], "function_index", 77),
                       "location_table[1]: function_index 77 out of range"),
    "string index": (lambda r: setattr(r.dictionary.function_table[1], "name_strindex", 10_000),
                     "function_table[1]: name_strindex 10000 out of range"),
    "duplicate key": (lambda r: _sample(r).attribute_indices.append(_sample(r).attribute_indices[0]),
                      "samples[0]: attribute key 'thread.id' repeated"),
    "timestamp outside": (lambda r: _sample(r).timestamps_unix_nano.__setitem__(0, T0 - 1),
                          f"samples[0]: timestamp {T0 - 1} outside the profile window [{T0}, {T0 + 10_000_000_000})"),
    "values vs timestamps": (lambda r: _sample(r).values.append(1), "samples[0]: 6 values but 5 timestamps"),
    "empty sample": (lambda r: (_sample(r).ClearField("values"), _sample(r).ClearField("timestamps_unix_nano")),
                     "samples[0]: neither values nor timestamps"),
    "link length": (lambda r: setattr(r.dictionary.link_table[1], "span_id", b"\x01"),
                    "link_table[1]: trace_id must be 16 bytes and span_id 8, got 16 and 1"),
    "resource key": (lambda r: r.resource_profiles[0].resource.attributes.add(key="host.name"),
                     "resource_profiles[0].resource: attribute key 'host.name' repeated"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_validator_names_the_broken_rule(name):
    how, message = CORRUPTIONS[name]
    errors = validate_otlp(_broken(how))
    assert any(message in e for e in errors), errors


def test_garbage_bytes_are_an_export_error():
    with pytest.raises(ExportError, match="not an OTLP profiles request"):
        decode_otlp(b"\xff\xff\xff\xff")
    with pytest.raises(ExportError, match="index out of range"):
        decode_otlp(_broken(lambda r: setattr(_sample(r), "stack_index", 99)))


# --- convert: pprof -> OTLP -> pprof, read by go tool pprof ---------------------------

@pytest.fixture(scope="module")
def round_trip(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("convert")
    src, otlp, back = d / "cpu.pb.gz", d / "cpu.otlp.pb", d / "back.pb.gz"
    profile = make_profile()
    src.write_bytes(encode_pprof(profile))
    run_bpfprof("convert", str(src), str(otlp))
    run_bpfprof("convert", str(otlp), str(back))
    return src, otlp, back


def test_converted_otlp_is_valid(round_trip):
    _, otlp, _ = round_trip
    r = parse_otlp(otlp.read_bytes())
    assert validate_otlp(r) == []
    assert len(r.resource_profiles) == 2


@pytest.mark.parametrize("sample_index", ["samples", "cpu"])
def test_round_trip_equals_in_go_tool_pprof(round_trip, tmp_path, sample_index):
    src, _, back = round_trip
    unit = "ns" if sample_index == "cpu" else "minimum"

    def top(path):
        return gotool.parse_top(gotool.go_pprof(tmp_path, "-top", "-nodecount=100", "-nodefraction=0",
                                                "-edgefraction=0", f"-unit={unit}",
                                                f"-sample_index={sample_index}", str(path)))

    total, rows = top(back)
    assert (total, rows) == top(src)
    assert total == (TOTAL if sample_index == "samples" else TOTAL * 10_000_000)
    assert "main.hot" in rows and "ns::step(int)" in rows and "do_syscall_64" in rows


def test_round_trip_keeps_labels_threads_and_functions(round_trip):
    src, _, back = round_trip
    a, b = read_pprof(src), read_pprof(back)

    def summary(decoded):
        # pprof keeps neither cpu nor links: samples that differed only in those merge on the way back
        out: Counter = Counter()
        column = decoded.sample_types.index(("samples", "count"))
        for s in decoded.samples:
            out[tuple(s.functions), tuple(sorted(s.labels.items())), tuple(sorted(s.num_labels.items()))] += \
                s.values[column]
        return out

    assert summary(a) == summary(b)
    assert sorted(a.sample_types) == sorted(b.sample_types)
    assert a.inline_pairs == b.inline_pairs == {("main.hot", "main.work")}


def test_convert_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.otlp.pb"
    bad.write_bytes(b"\xff\xff\xff")
    proc = run_bpfprof("convert", str(bad), str(tmp_path / "out.pb.gz"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not an OTLP profiles request" in proc.stderr
    proc = run_bpfprof("convert", str(tmp_path / "missing.pb.gz"), str(tmp_path / "o.otlp.pb"), check=False)
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_python_frames_are_typed_cpython_and_round_trip():
    """Python frames (agent/python/frames.py) have no mapping: OTLP names them by profile.frame.type."""
    py = Location(0x7F0000123450, None, (Frame("Worker.compress_block", FrameKind.CPYTHON, "/app/worker.py", 41,
                                               system_name="Worker.compress_block", start_line=38),))
    profile = cpu_profile(start_time_ns=T0, duration_ns=1_000_000_000, frequency_hz=100)
    profile.processes[300] = ProcessMeta(300, "python3", "/usr/bin/python3.11", "", "worker")
    profile.add(SampleKey((L_CPP, py, L_EMAIN), 300, 300, "python3", (), 0, None), [1, profile.period],
                timestamp_ns=T0 + 1)
    r = encode_otlp([profile], "node-1")
    by_address = {loc.address: loc for loc in r.dictionary.location_table[1:]}
    assert attrs(r, by_address[py.address].attribute_indices)["profile.frame.type"] == "cpython"
    back = decode_otlp(encode_otlp_bytes([profile], "node-1"))
    frames = [f for p in back for s in p.samples for loc in s.key.stack for f in loc.frames]
    assert [f.kind for f in frames] == [FrameKind.NATIVE, FrameKind.CPYTHON, FrameKind.NATIVE]
    assert (frames[1].function, frames[1].file, frames[1].line) == ("Worker.compress_block", "/app/worker.py", 41)
