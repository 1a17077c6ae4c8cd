"""End to end, method 1: a Go program's labelled spans, profiled by `bpfprof agent`, found by `bpfprof serve`
through the samples' links (pprof labels trace_id/span_id -> OTLP Sample.link_index).

The Go fixture (tests/fixtures/go/labels) runs spans under pprof.Do labels and
writes their ids and times; the test sends those spans as OTLP traces, as an
instrumented service would, and asks the viewer's API for each span's flame
graph: it must come from the linked samples and show main.inSpan, never
main.between (the work the fixture does outside its spans).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from fixtures.builder import build_go
from integration.test_serve_e2e import _json, _start_agent, _start_serve, _stop, _wait

# Its fixtures run for a wall time and need the CPU they ask for (sample counts): no other test beside.
pytestmark = pytest.mark.alone

SPANS = 6


def _send_spans(http_port: str, spans: list[dict]) -> None:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    attr = rs.resource.attributes.add()
    attr.key, attr.value.string_value = "service.name", "go-labels"
    ss = rs.scope_spans.add()
    for s in spans:
        span = ss.spans.add()
        span.trace_id, span.span_id = bytes.fromhex(s["trace_id"]), bytes.fromhex(s["span_id"])
        span.name, span.start_time_unix_nano, span.end_time_unix_nano = "work", s["start_ns"], s["end_ns"]
    post = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/traces", data=req.SerializeToString(),
                                  headers={"Content-Type": "application/x-protobuf"}, method="POST")
    with urllib.request.urlopen(post, timeout=10) as r:
        assert r.status == 200


def test_go_spans_open_on_their_linked_samples(tmp_path):
    binary = build_go("labels")
    truth = tmp_path / "spans.jsonl"
    serve, http_port, ui = _start_serve(tmp_path)
    agent = app = None
    try:
        app = subprocess.Popen([str(binary), "-wait-stdin", "-out", str(truth), "-spans", str(SPANS),
                                "-span-ms", "300", "-gap-ms", "300", "-warmup-ms", "300"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdout.readline().strip() == "ready"
        agent = _start_agent(app.pid, http_port, "--frequency", "199")
        app.stdin.write("go\n")
        app.stdin.flush()
        assert app.wait(timeout=60) == 0
        _stop(agent)  # SIGTERM: the last interval is exported before it exits
        assert agent.returncode == 0

        spans = [json.loads(line) for line in truth.read_text().splitlines()]
        assert len(spans) == SPANS
        _send_spans(http_port, spans)
        _wait(lambda: len(_json(f"{ui}api/spans?service=go-labels")["spans"]) == SPANS, 20, "the spans")

        for s in spans:
            fg = _json(f"{ui}api/trace/{s['trace_id']}/span/{s['span_id']}/flamegraph")
            assert fg["method"] == "link", (s, fg["method"], fg["reason"])
            names = fg["flamegraph"]["names"]
            functions = {names[i] for i in fg["flamegraph"]["nodes"]["name"]}
            assert "main.inSpan" in functions, functions
            assert "main.between" not in functions, functions
            # 300 ms at 199 Hz on one busy thread: ~60 samples; allow a loaded machine
            assert fg["samples"] >= 15, fg["samples"]
    finally:
        for p in (agent, app, serve):
            if p is not None:
                _stop(p)
