"""`bpfprof record --otlp-endpoint` with real BPF: what the collector gets equals the pprof of the same capture."""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import grpc
import pytest
from otlp_collector import GrpcCollector, HttpCollector, Reply, closed_port

from exporters.otlp import decode_otlp, validate_otlp
from exporters.profile import Profile
from fixtures.builder import build_c
from recording import BPFPROF, Decoded, read_pprof, run_bpfprof

# Its fixtures run for a wall time and need the CPU they ask for (sample counts): no other test beside.
pytestmark = pytest.mark.alone

SECONDS = "2"


def stacks_of_profile(profile: Profile) -> Counter:
    """Sample count per stack of function names (leaf first, innermost first per location)."""
    column = profile.sample_types.index(next(t for t in profile.sample_types if t.type == "samples"))
    out: Counter = Counter()
    for s in profile.samples:
        out[tuple(f.function for loc in s.stack for f in loc.frames)] += s.values[column]
    return out


def stacks_of_pprof(decoded: Decoded) -> Counter:
    out: Counter = Counter()
    for s in decoded.samples:
        out[tuple(s.functions)] += s.values[0]
    return out


def top_leaves(stacks: Counter, n: int = 5) -> list[tuple[str, int]]:
    leaves: Counter = Counter()
    for stack, count in stacks.items():
        leaves[stack[0] if stack else ""] += count
    return sorted(leaves.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def check_received(collector, out) -> None:
    assert len(collector.received.requests) >= 1
    request = collector.received.requests[-1]
    assert validate_otlp(request) == []
    [profile] = decode_otlp(request)
    pprof = read_pprof(out)
    assert profile.total(profile.sample_types.index(next(t for t in profile.sample_types if t.type == "samples"))) \
        == pprof.total() > 100
    received, written = stacks_of_profile(profile), stacks_of_pprof(pprof)
    assert received == written
    assert top_leaves(received) == top_leaves(written)
    assert top_leaves(received)[0][0] == "spin"  # where callchain burns its CPU
    names = {meta.name for meta in profile.processes.values()}
    assert any(n.startswith("c-callchain") for n in names), names
    # every sample says which CPU it ran on (cpu.logical_number) and which thread
    cpus = os.cpu_count() or 1
    assert all(0 <= s.key.cpu < cpus and s.key.tid > 0 for s in profile.samples)


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_record_sends_to_collector(tmp_path, kind):
    binary = build_c("callchain")
    out = tmp_path / "c.pb.gz"
    with (GrpcCollector() if kind == "grpc" else HttpCollector()) as collector:
        proc = run_bpfprof("record", "--frequency", "199", "-o", str(out), "--otlp-endpoint", collector.url,
                           "--otlp-header", "authorization=Bearer t0k", "--", str(binary), SECONDS)
    assert f"sent to {collector.url}" in proc.stdout and "in 1 attempt(s)" in proc.stdout
    assert collector.received.headers[0]["authorization"] == "Bearer t0k"
    check_received(collector, out)  # -o given explicitly: written as well as sent


def test_record_retries_until_the_collector_answers(tmp_path):
    binary = build_c("callchain")
    out = tmp_path / "c.pb.gz"
    with GrpcCollector([Reply(grpc.StatusCode.UNAVAILABLE, "starting")]) as collector:
        proc = run_bpfprof("record", "--frequency", "199", "-o", str(out), "--otlp-endpoint", collector.url,
                           "--", str(binary), "1")
    assert "in 2 attempt(s)" in proc.stdout
    assert len(collector.received.requests) == 2
    check_received(collector, out)


def test_endpoint_down_saves_the_capture_and_exits_1(tmp_path):
    binary = build_c("callchain")
    url = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run([str(BPFPROF), "record", "--frequency", "199", "--otlp-endpoint", url,
                           "--otlp-timeout", "2", "--", str(binary), "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    saved = list(tmp_path.glob("bpfprof-*.pb.gz"))
    assert len(errors) == 1 and len(saved) == 1, (proc.stderr, saved)
    assert errors[0].startswith(f"bpfprof: error: could not export to {url}/v1development/profiles: ")
    assert "ConnectionRefusedError" in errors[0] and errors[0].endswith(f"capture saved to {saved[0].name}")
    assert "Traceback" not in proc.stderr
    prof = read_pprof(saved[0])
    assert prof.total() == int(proc.stdout.split(" samples", 1)[0]) > 50


def test_sent_without_output_writes_no_file(tmp_path):
    binary = build_c("callchain")
    with HttpCollector() as collector:
        proc = subprocess.run([str(BPFPROF), "record", "--frequency", "99", "--otlp-endpoint", collector.url,
                               "--", str(binary), "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(collector.received.requests) == 1 and validate_otlp(collector.received.requests[0]) == []
    assert not list(tmp_path.iterdir()), "no --output: the profile goes to the collector only"
