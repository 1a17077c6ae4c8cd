"""The JSON API per attribution method: link, thread (native id and Python's ident), process, none;
profile types, time ranges, diffs and the pprof download, over a real server on port 0."""

from __future__ import annotations

import pytest

from exporters.diff import change_json, function_values, rank_changes
from exporters.pprof import decode_pprof
from exporters.profile import TraceLink
from tests.viewer.conftest import get, get_json, post
from tests.viewer.data import MS, T0, Ev, SpanSpec, cpu, every, heap, profiles_request, trace_request

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
TRACE2 = bytes.fromhex("1bf7651916cd43dd8448eb211c80319d")
CHECKOUT, CHARGE, RENDER, BATCH, IDENT, NATIVE, EMPTY, RENDER2 = (bytes([i] * 8) for i in range(1, 9))
PID, OTHER_PID = 4242, 4243
PY_IDENT = 140_234_567_890_123  # threading.get_ident(): a pthread_t address, not a kernel tid


def at(ms: int) -> int:
    return T0 + ms * MS


@pytest.fixture
def loaded(server):
    """Spans and samples laid out so each method has exactly one right answer."""
    spans = [
        SpanSpec(TRACE, CHECKOUT, "checkout", at(1000), at(3000)),
        SpanSpec(TRACE, CHARGE, "charge", at(1500), at(2500), parent=CHECKOUT),
        SpanSpec(TRACE, RENDER, "render", at(4000), at(5000), attributes={"thread.id": 102, "thread.name": "w2"}),
        SpanSpec(TRACE, IDENT, "py-ident", at(4000), at(5000), attributes={"thread.id": PY_IDENT}),
        SpanSpec(TRACE, NATIVE, "py-native", at(4000), at(5000),
                 attributes={"thread.id": PY_IDENT, "thread.native_id": 102}),
        SpanSpec(TRACE2, RENDER2, "render", at(6000), at(7000), attributes={"thread.id": 102}),
    ]
    assert post(f"http://127.0.0.1:{server.receiver.http_port}/v1/traces", trace_request(spans))[0] == 200
    batch = [SpanSpec(TRACE2, BATCH, "batch", at(8000), at(9000))]
    assert post(f"http://127.0.0.1:{server.receiver.http_port}/v1/traces",
                trace_request(batch, service="batcher", pid=None))[0] == 200
    empty = [SpanSpec(TRACE2, EMPTY, "quiet", at(8000), at(9000))]
    assert post(f"http://127.0.0.1:{server.receiver.http_port}/v1/traces",
                trace_request(empty, service="nobody", pid=999))[0] == 200

    events = []
    charge_link = TraceLink(TRACE, CHARGE)
    events += [Ev(("main", "chargeCard"), PID, 101, t, charge_link) for t in every(at(1500), at(2500))]
    events += [Ev(("main", "unlinkedWork"), PID, 101, t) for t in every(at(1000), at(3000), 50 * MS)]
    events += [Ev(("main", "renderPage"), PID, 102, t) for t in every(at(4000), at(4500))]
    events += [Ev(("main", "renderFooter"), PID, 102, t) for t in every(at(4500), at(5000))]
    events += [Ev(("main", "idleLoop"), PID, 102, t) for t in every(at(3000), at(4000))]  # before: outside
    events += [Ev(("main", "otherThread"), PID, 103, t) for t in every(at(4000), at(5000))]
    events += [Ev(("main", "renderPage"), PID, 102, t) for t in every(at(6000), at(6200))]  # RENDER2: less
    events += [Ev(("main", "renderFooter"), PID, 102, t) for t in every(at(6200), at(7000))]
    events += [Ev(("batchMain", "crunch"), OTHER_PID, 201, t) for t in every(at(8000), at(9000))]
    body = profiles_request([cpu([e for e in events if e.pid == PID]),
                             cpu([e for e in events if e.pid == OTHER_PID], service="batcher"),
                             heap(PID, ("main", "allocBuffers"), 64 << 20)])
    status, answer = post(f"http://127.0.0.1:{server.receiver.http_port}/v1development/profiles", body)
    assert status == 200, answer
    return f"http://127.0.0.1:{server.ui_port}"


def names(fg: dict) -> set[str]:
    """Function names with a non-zero value in a compact flame graph."""
    nodes, total = fg["nodes"], {}
    for i in reversed(range(len(nodes["name"]))):
        total[i] = total.get(i, 0) + nodes["self"][i]
        if nodes["parent"][i] >= 0:
            total[nodes["parent"][i]] = total.get(nodes["parent"][i], 0) + total[i]
    return {fg["names"][nodes["name"][i]] for i, v in total.items() if v and i}


def fg(base: str, trace: bytes, span: bytes, query: str = "") -> dict:
    return get_json(f"{base}/api/trace/{trace.hex()}/span/{span.hex()}/flamegraph{query}")


def test_link_method_takes_linked_samples_of_the_span(loaded):
    r = fg(loaded, TRACE, CHARGE)
    assert r["method"] == "link"
    assert names(r["flamegraph"]) == {"main", "chargeCard"}
    assert r["flamegraph"]["total"] == 100 * 10 * MS  # 100 samples of 10 ms
    assert r["type"] == "cpu/cpu"


def test_link_method_counts_descendant_spans_for_the_parent(loaded):
    r = fg(loaded, TRACE, CHECKOUT)
    assert r["method"] == "link"
    assert "chargeCard" in names(r["flamegraph"]) and "unlinkedWork" not in names(r["flamegraph"])


def test_thread_method_cuts_thread_and_window(loaded):
    r = fg(loaded, TRACE, RENDER)
    assert r["method"] == "thread"
    assert "thread 102" in r["reason"] and "no sample carries a link" in r["reason"]
    assert names(r["flamegraph"]) == {"main", "renderPage", "renderFooter"}  # not idleLoop, not otherThread


def test_python_native_id_is_accepted_and_ident_is_explained(loaded):
    assert fg(loaded, TRACE, NATIVE)["method"] == "thread"
    r = fg(loaded, TRACE, IDENT)
    assert r["method"] == "process"
    assert f"thread.id {PY_IDENT} is not a kernel thread id" in r["reason"]
    assert {"renderPage", "otherThread"} <= names(r["flamegraph"])  # the whole process in the window
    assert "idleLoop" not in names(r["flamegraph"])


def test_process_method_by_service_name_when_no_pid(loaded):
    r = fg(loaded, TRACE2, BATCH)
    assert r["method"] == "process"
    assert "service 'batcher'" in r["reason"]
    assert names(r["flamegraph"]) == {"batchMain", "crunch"}


def test_no_samples_says_none_and_pprof_is_404(loaded):
    r = fg(loaded, TRACE2, EMPTY)
    assert r["method"] == "none" and r["flamegraph"]["total"] == 0
    assert "no sample of process 999" in r["reason"]
    assert get(f"{loaded}/api/trace/{TRACE2.hex()}/span/{EMPTY.hex()}/pprof")[0] == 404


def test_profile_type_switch_falls_back_per_type(loaded):
    r = fg(loaded, TRACE, RENDER)
    keys = [t["key"] for t in r["types"]]
    assert keys[0] == "cpu/cpu" and {"cpu/samples", "heap/inuse_space", "heap/alloc_space"} <= set(keys)
    heap = fg(loaded, TRACE, RENDER, "?type=heap/inuse_space")
    assert heap["method"] == "process"  # an untimed heap snapshot has no thread to match
    assert heap["flamegraph"]["total"] == 64 << 20 and heap["flamegraph"]["unit"] == "bytes"
    assert "allocBuffers" in names(heap["flamegraph"])
    samples = fg(loaded, TRACE, RENDER, "?type=cpu/samples")
    assert samples["flamegraph"]["total"] == 100 and samples["method"] == "thread"


def test_time_range_selects_part_of_the_span(loaded):
    first = fg(loaded, TRACE, RENDER, "?from_ms=0&to_ms=400")
    assert names(first["flamegraph"]) == {"main", "renderPage"}
    assert first["window_ms"] == [0, 400]
    second = fg(loaded, TRACE, RENDER, "?from_ms=600")
    assert names(second["flamegraph"]) == {"main", "renderFooter"}
    assert sum(fg(loaded, TRACE, RENDER)["timeline"]["values"]) == 100 * 10 * MS
    assert get(f"{loaded}/api/trace/{TRACE.hex()}/span/{RENDER.hex()}/flamegraph?from_ms=x")[0] == 400


def test_diff_against_spans_of_the_same_name(loaded):
    r = get_json(f"{loaded}/api/trace/{TRACE.hex()}/span/{RENDER.hex()}/diff?baseline=name")
    d = r["flamegraph"]
    assert "1 other spans named 'render'" in r["baseline"]
    by = {d["names"][n]: (s, b) for n, s, b in zip(d["nodes"]["name"], d["nodes"]["self"], d["nodes"]["base"],
                                                    strict=True)}
    # This span: renderPage 50 %, baseline (RENDER2) 20 % scaled to this total: more, footer less.
    assert by["renderPage"][0] == 50 * 10 * MS and by["renderPage"][1] == pytest.approx(20 * 10 * MS)
    assert by["renderFooter"][1] == pytest.approx(80 * 10 * MS)
    assert d["base_total"] == pytest.approx(d["total"])
    # Ranked as `bpfprof diff` ranks the same samples as two profiles (exporters/diff.py, tested on the
    # cpu/samples counts): the two shifted functions first, 30 points each way, significant.
    first = {(c["function"], c["measure"]): c["points"] for c in d["changes"][:4]}
    assert first == pytest.approx({("renderPage", "self"): 30, ("renderPage", "total"): 30,
                                   ("renderFooter", "self"): -30, ("renderFooter", "total"): -30})
    base = cpu([Ev(("main", "renderPage"), PID, 102, t) for t in every(at(6000), at(6200))]
               + [Ev(("main", "renderFooter"), PID, 102, t) for t in every(at(6200), at(7000))])
    new = cpu([Ev(("main", "renderPage"), PID, 102, t) for t in every(at(4000), at(4500))]
              + [Ev(("main", "renderFooter"), PID, 102, t) for t in every(at(4500), at(5000))])
    expected = [change_json(c) for c in rank_changes(function_values(base, 1), function_values(new, 1))]
    assert d["changes"] == expected
    assert [c["significant"] for c in d["changes"][:4]] == [True] * 4


def test_diff_of_two_time_ranges(loaded):
    r = get_json(f"{loaded}/api/trace/{TRACE.hex()}/span/{RENDER.hex()}/diff?baseline=range"
                 "&from_ms=0&to_ms=500&base_from_ms=500&base_to_ms=1000")
    d = r["flamegraph"]
    by = {d["names"][n]: (s, b) for n, s, b in zip(d["nodes"]["name"], d["nodes"]["self"], d["nodes"]["base"],
                                                    strict=True)}
    assert by["renderPage"][0] > 0 and by["renderPage"][1] == 0
    assert by["renderFooter"][0] == 0 and by["renderFooter"][1] > 0


def test_pprof_download_holds_the_flame_graphs_samples(loaded):
    status, body, headers = get(f"{loaded}/api/trace/{TRACE.hex()}/span/{RENDER.hex()}/pprof?from_ms=0&to_ms=400")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    p = decode_pprof(body)
    st = p.string_table
    assert sorted(st[t.type] for t in p.sample_type) == ["cpu", "samples"] and st[p.default_sample_type] == "cpu"
    functions = {st[f.name] for f in p.function}
    assert functions == {"main", "renderPage"}
    samples_column = [st[t.type] for t in p.sample_type].index("samples")
    assert sum(s.value[samples_column] for s in p.sample) == 40
    assert any("method=thread" in st[c] for c in p.comment)


def test_lists_traces_and_deep_links(loaded):
    spans = get_json(f"{loaded}/api/spans")["spans"]
    durations = [s["duration_ms"] for s in spans]
    assert durations == sorted(durations, reverse=True) and spans[0]["name"] == "checkout"
    assert {s["name"] for s in get_json(f"{loaded}/api/spans?service=batcher")["spans"]} == {"batch"}
    assert {s["name"] for s in get_json(f"{loaded}/api/spans?name=RENDER")["spans"]} == {"render"}
    assert [s["name"] for s in get_json(f"{loaded}/api/spans?min_ms=1500")["spans"]] == ["checkout"]
    assert {s["name"] for s in get_json(f"{loaded}/api/spans?max_ms=1000&trace_id={TRACE2.hex()}")["spans"]} == \
        {"render", "batch", "quiet"}
    assert get_json(f"{loaded}/api/spans?since_ms={at(7500) / 1e6}")["spans"][0]["name"] in ("batch", "quiet")
    assert len(get_json(f"{loaded}/api/trace/{TRACE.hex()}")["spans"]) == 5
    for path in ("/", f"/trace/{TRACE.hex()}", f"/trace/{TRACE.hex()}/span/{RENDER.hex()}"):
        status, body, headers = get(loaded + path)
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"d3-flame-graph" in body
    assert get(f"{loaded}/api/trace/{'0' * 32}")[0] == 404
    assert get(f"{loaded}/trace/xyz")[0] == 404
