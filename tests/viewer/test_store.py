"""Store retention by age and by size (with an injected clock), stack round trip, config parsing."""

from __future__ import annotations

import pytest

from exporters.otlp import decode_otlp
from exporters.otlp_sender import ConfigError
from tests.viewer.data import MS, T0, Ev, SpanSpec, cpu, every, profiles_request, trace_request
from viewer.config import parse_addr, parse_duration_s, parse_size_bytes
from viewer.ingest import parse_traces
from viewer.store import SpanFilter, Store, decode_stack
from viewer.store import _encode_stack as encode_stack

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def batch(store: Store, n: int, trace_byte: int, tid: int) -> None:
    """One span and n CPU samples, all received at the store's current clock."""
    trace = bytes([trace_byte]) * 16
    spans, _ = parse_traces(trace_request([SpanSpec(trace, b"\x01" * 8, f"op{trace_byte}", T0, T0 + MS)]))
    store.add_spans(spans)
    store.add_profiles(decode_otlp(profiles_request(
        [cpu([Ev(("main", f"fn{trace_byte}", f"leaf{i % 50}"), 9, tid, t) for i, t in
              enumerate(every(T0, T0 + n * MS, MS))])])))


def test_retention_by_age_drops_old_and_keeps_new(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "s.sqlite", clock_ns=clock)
    batch(store, 100, 1, tid=1)
    clock.now += 3600 * S
    batch(store, 100, 2, tid=2)
    assert store.counts() == {"spans": 2, "profiles": 2, "samples": 200, "stacks": 100}
    clock.now += 1800 * S
    deleted = store.enforce_retention(max_age_s=3000, max_bytes=1 << 30)
    assert deleted == {"spans": 1, "profiles": 1}
    assert store.counts() == {"spans": 1, "profiles": 1, "samples": 100, "stacks": 50}  # orphaned stacks gone
    assert [s.name for s in store.spans(SpanFilter())] == ["op2"]
    assert {s.tid for s in store.samples()} == {2}


def test_retention_by_size_drops_oldest_until_under_limit(tmp_path):
    clock = Clock()
    path = tmp_path / "s.sqlite"
    store = Store(path, clock_ns=clock)
    for i in range(1, 11):
        batch(store, 300, i, tid=i)
        clock.now += S
    full = store.size_bytes()
    store.enforce_retention(max_age_s=1e9, max_bytes=full // 2)
    assert store.size_bytes() <= full // 2
    assert path.stat().st_size <= full // 2 + 64 * 1024  # incremental vacuum gave the pages back
    names = {s.name for s in store.spans(SpanFilter())}
    tids = {s.tid for s in store.samples()}
    assert "op10" in names and 10 in tids  # newest kept
    assert "op1" not in names and 1 not in tids  # oldest dropped first
    store.close()
    assert Store(path).counts()["spans"] == len(names)  # one file, reopened as it was


def test_stacks_round_trip_through_the_store():
    profile = cpu([Ev(("main", "work"), 9, 9, T0)])
    stack = profile.samples[0].stack
    assert decode_stack(encode_stack(stack)) == stack


def test_config_values():
    assert parse_addr("0.0.0.0:4317", "--grpc") == ("0.0.0.0", 4317)
    assert parse_addr("[::1]:0", "--ui") == ("::1", 0)
    assert parse_addr(":4318", "--http") == ("127.0.0.1", 4318)
    assert parse_duration_s("90m", "--retention") == 5400 and parse_duration_s("7d", "x") == 7 * 86400
    assert parse_size_bytes("512MB", "x") == 512 << 20 and parse_size_bytes("2G", "x") == 2 << 30
    for bad in (lambda: parse_addr("host", "--ui"), lambda: parse_addr("example.com:80", "--ui"),
                lambda: parse_duration_s("soon", "--retention"), lambda: parse_duration_s("0s", "--retention"),
                lambda: parse_size_bytes("lots", "--max-db-size")):
        with pytest.raises(ConfigError):
            bad()


def test_serve_holds_max_db_size_at_every_write_not_once_a_minute(tmp_path):
    """--max-db-size 5MB, requests arriving faster than the retention thread's minute: the file never
    holds more than the cap plus the request just written, the newest data stays, the oldest goes."""
    from tests.viewer.conftest import post
    from viewer.config import ServeConfig
    from viewer.server import Server

    cap = parse_size_bytes("5MB", "--max-db-size")
    db = tmp_path / "serve.sqlite"
    server = Server(ServeConfig(grpc_addr=("127.0.0.1", 0), http_addr=("127.0.0.1", 0), ui_addr=("127.0.0.1", 0),
                                db_path=db, retention_bytes=cap, retention_interval_s=3600))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.receiver.http_port}/v1development/profiles"
        sizes, written = [], 0
        for n in range(60):  # ~3x the cap in all
            start = T0 + n * 10 * S
            body = profiles_request([cpu([Ev(("main", f"req{n}", f"leaf{i % 400}"), 9, 100 + n, t)
                                          for i, t in enumerate(every(start, start + 2500 * MS, MS))],
                                         start_ns=start)])
            assert post(url, body)[0] == 200
            written += 2500
            sizes.append(db.stat().st_size)
        one_request = max(b - a for a, b in zip(sizes, sizes[1:], strict=False) if b > a)
        assert max(sizes) <= cap + one_request + 64 * 1024, (max(sizes), one_request)
        assert server.store.size_evictions > 0
        tids = {s.tid for s in server.store.samples()}
        assert 159 in tids and 100 not in tids  # the newest kept, the oldest dropped
        assert server.store.counts()["samples"] < written
    finally:
        server.stop()
