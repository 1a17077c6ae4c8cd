"""`bpfprof view`'s server (viewer.server.FileViewer): profiles from files in serve's API, checked against the
profiles themselves: totals per type, a time range, the diff against `bpfprof diff`'s ranking, the pprof download."""

from __future__ import annotations

import sqlite3

import pytest

from exporters.diff import change_json, function_values, rank_changes
from exporters.otlp import decode_otlp
from exporters.pprof import decode_pprof, encode_pprof
from exporters.pprof_reader import profile_from_pprof
from tests.viewer.conftest import get, get_json
from tests.viewer.data import MS, T0, Ev, cpu, every, heap, profiles_request
from viewer.server import FileViewer
from viewer.store import Store

PID = 77


def split(tenths_a: int, start_ns: int) -> list[Ev]:
    """One second at 100 Hz: spinA for tenths_a tenths of it, then spinB."""
    mid = start_ns + tenths_a * 100 * MS
    return ([Ev(("main", "spinA"), PID, PID, t) for t in every(start_ns, mid)]
            + [Ev(("main", "spinB"), PID, PID, t) for t in every(mid, start_ns + 1000 * MS)])


@pytest.fixture
def viewer():
    base = cpu(split(7, T0), duration_ns=1000 * MS)
    new = cpu(split(4, T0), duration_ns=1000 * MS)
    # base as an OTLP file keeps its timestamps; new goes through pprof (no timestamps), as `record` writes it.
    named = [("base.otlp", decode_otlp(profiles_request([base]))[0]),
             ("new.pb.gz", profile_from_pprof(encode_pprof(new))),
             ("heap.pb.gz", profile_from_pprof(encode_pprof(heap(PID, ("main", "alloc"), 1 << 20))))]
    v = FileViewer(named)
    url = v.start("127.0.0.1", 0)
    yield url.rstrip("/"), base, new
    v.stop()


def test_lists_the_files_profiles(viewer):
    url, _, _ = viewer
    profiles = get_json(f"{url}/api/profiles")["profiles"]
    assert [(p["source"], p["kind"], p["default_type"]) for p in profiles] == [
        ("base.otlp", "cpu", "cpu/cpu"), ("new.pb.gz", "cpu", "cpu/cpu"), ("heap.pb.gz", "heap", "heap/inuse_space")]
    assert {t["key"] for t in profiles[0]["types"]} == {"cpu/samples", "cpu/cpu"}
    status, body, _ = get(f"{url}/profile/{profiles[0]['id']}")
    assert status == 200 and b"bpfdom" in body  # serve's page, which routes /profile/<id> itself
    assert get(f"{url}/api/profile/999/flamegraph")[0] == 404


def test_flame_graph_totals_are_the_profiles(viewer):
    url, base, new = viewer
    ids = [p["id"] for p in get_json(f"{url}/api/profiles")["profiles"]]
    for pid, profile in zip(ids, (base, new), strict=False):
        for index, key in ((0, "cpu/samples"), (1, "cpu/cpu")):
            r = get_json(f"{url}/api/profile/{pid}/flamegraph?type={key}")
            assert r["type"] == key and r["method"] == "profile"
            fg = r["flamegraph"]
            assert fg["total"] == profile.total(index)
            by = {}
            for n, v in zip(fg["nodes"]["name"], fg["nodes"]["self"], strict=True):
                by[fg["names"][n]] = by.get(fg["names"][n], 0) + v
            want = function_values(profile, index).self_
            assert {k: v for k, v in by.items() if v} == dict(want)
    heap_fg = get_json(f"{url}/api/profile/{ids[2]}/flamegraph")
    assert heap_fg["type"] == "heap/inuse_space" and heap_fg["flamegraph"]["total"] == 1 << 20


def test_time_range_of_a_timed_profile(viewer):
    url, _, _ = viewer
    first = get_json(f"{url}/api/profiles")["profiles"][0]["id"]
    r = get_json(f"{url}/api/profile/{first}/flamegraph?type=cpu/samples&from_ms=0&to_ms=500")
    names = {r["flamegraph"]["names"][n] for n in r["flamegraph"]["nodes"]["name"]}
    assert r["flamegraph"]["total"] == 50 and names == {"all", "main", "spinA"}
    assert sum(get_json(f"{url}/api/profile/{first}/flamegraph?type=cpu/samples")["timeline"]["values"]) == 100


def test_diff_ranks_as_bpfprof_diff(viewer):
    url, base, new = viewer
    b, n, h = (p["id"] for p in get_json(f"{url}/api/profiles")["profiles"])
    r = get_json(f"{url}/api/profile/{n}/diff?base={b}")
    assert r["baseline"] == "base.otlp" and r["type"] == "cpu/cpu"
    expected = [change_json(c) for c in rank_changes(function_values(base, 1), function_values(new, 1))]
    assert r["flamegraph"]["changes"] == expected
    top = {(c["function"], c["measure"]): (c["points"], c["significant"]) for c in expected[:4]}
    assert top == {("spinA", "self"): (-30.0, True), ("spinA", "total"): (-30.0, True),
                   ("spinB", "self"): (30.0, True), ("spinB", "total"): (30.0, True)}
    status, body, _ = get(f"{url}/api/profile/{n}/diff?base={h}")
    assert status == 400 and b"same type" in body


def test_pprof_download_holds_the_profile(viewer):
    url, base, _ = viewer
    first = get_json(f"{url}/api/profiles")["profiles"][0]["id"]
    status, body, headers = get(f"{url}/api/profile/{first}/pprof")
    assert status == 200 and 'filename="base.otlp-cpu.pb.gz"' in headers["Content-Disposition"]
    p = decode_pprof(body)
    types = [p.string_table[t.type] for t in p.sample_type]
    for name, index in (("samples", 0), ("cpu", 1)):
        assert sum(s.value[types.index(name)] for s in p.sample) == base.total(index)


def test_a_store_made_before_the_source_column_gets_it(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE profiles (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, sample_types TEXT NOT NULL,"
               " period_type TEXT NOT NULL, period INTEGER NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,"
               " pid INTEGER NOT NULL, service TEXT NOT NULL, executable TEXT NOT NULL, received_ns INTEGER NOT NULL)")
    db.execute("INSERT INTO profiles VALUES (1, 'cpu', '[]', '[\"cpu\",\"nanoseconds\"]', 1, 0, 1, 1, 's', 'e', 0)")
    db.commit()
    db.close()
    store = Store(path)
    assert store.profiles()[1].source == "" and store.loaded_profiles() == []
    store.close()
