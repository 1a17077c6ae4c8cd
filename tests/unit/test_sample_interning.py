"""Identical records are interned as they arrive (agent/probes/sample_store.py) and their stacks when an
interval is built (agent/probes/profile_builder.py add_records).

The records are the replay capture's (tests/replay/data/unwind_split_fp.json: real frame-pointer
records and the snapshot of their process), with thread and time rewritten; no BPF, no /proc.
"""

from __future__ import annotations

import copy
import struct
from collections import Counter

import pytest

from agent.bpfload.records import parse_record
from agent.capture.pipeline import CapturePipeline
from agent.probes.family import ProbeConfig, Window
from agent.probes.profile_builder import add_records
from agent.probes.sample_store import SampleStore
from agent.processes.stack_resolver import StackResolver, UnwindMode
from agent.processes.tracker import ProcessTracker
from exporters.profile_types import cpu_profile
from replay.recording import DATA, Recording, folded

HEADER = struct.Struct("<IIIIQQQHHhh16s")
TID, KTIME = 2, 4  # header fields


@pytest.fixture(scope="module")
def recording() -> Recording:
    return Recording.load(DATA / "unwind_split_fp.json")


def rewritten(buf: bytes, **fields: int) -> bytes:
    """The record `buf` with header fields replaced (tid=, ktime=)."""
    f = list(HEADER.unpack_from(buf))
    for name, value in fields.items():
        f[{"tid": TID, "ktime": KTIME}[name]] = value
    return HEADER.pack(*f) + buf[HEADER.size:]


def test_one_stack_on_two_threads_resolves_once_and_counts_each_event(recording, tmp_path):
    tracker = recording.tracker(str(tmp_path))
    first = parse_record(recording.records[0])
    pid = first.pid
    bufs = [rewritten(recording.records[0], tid=tid, ktime=t) for tid, t in
            ((pid, 1000), (pid + 1, 2000), (pid, 3000), (pid + 1, 4000), (pid + 1, 5000))]
    records = [parse_record(b) for b in bufs]
    assert len({(r.pid, r.user_ips) for r in records}) == 1 and len({r.tid for r in records}) == 2

    resolver = StackResolver(tracker, None)
    profile = cpu_profile(0, 1, 99)
    window = Window(0, 1, wall_offset_ns=10)
    store = SampleStore.of(records)
    assert len(store) == 5 and len(store.records) == 2  # one entry per thread
    add_records(profile, store, resolver, tracker, window, lambda v, _t: [sum(v), sum(v) * profile.period],
                with_kernel=False)

    by_tid = {s.key.tid: s for s in profile.samples}
    assert set(by_tid) == {pid, pid + 1} and len(profile.samples) == 2
    # one resolution: each address once, and both samples hold the very same Locations
    assert resolver.stats.user_addresses == len(first.user_ips)
    assert by_tid[pid].key.stack is by_tid[pid + 1].key.stack
    assert all(a is b for a, b in zip(by_tid[pid].key.stack, resolver.stack(pid, (), first.user_ips), strict=True))
    assert by_tid[pid].values == [2 * first.value, 2 * first.value * profile.period]
    assert by_tid[pid + 1].values == [3 * first.value, 3 * first.value * profile.period]
    assert by_tid[pid].timestamps_ns == [1010, 3010] and by_tid[pid + 1].timestamps_ns == [2010, 4010, 5010]


def test_samples_split_by_trace_link_and_cpu_like_distinct_keys(recording, tmp_path):
    tracker = recording.tracker(str(tmp_path))
    base = recording.records[0]
    otel = struct.pack("<II16s8sB7x", 1, 40, b"\x01" * 16, b"\x02" * 8, 1)  # CtxKind.OTEL trailer
    records = [parse_record(base), parse_record(base + otel), parse_record(base + otel), parse_record(base)]
    profile = cpu_profile(0, 1, 99)
    add_records(profile, SampleStore.of(records), StackResolver(tracker, None), tracker, Window(0, 1, 0),
                lambda v, _t: [len(v), 0], with_kernel=False)
    assert sorted((s.key.link is not None, s.values[0]) for s in profile.samples) == [(False, 2), (True, 2)]
    [linked] = [s for s in profile.samples if s.key.link is not None]
    assert linked.key.link.span_id == b"\x02" * 8


def renamed(recording: Recording, suffix: str) -> Recording:
    """The same capture, its binaries' functions renamed: a process whose code changed (an exec, a reload)."""
    meta = copy.deepcopy(recording.meta)
    for f in meta["files"].values():
        for sym in f["symbols"]:
            sym[0] += suffix
    return Recording(recording.records, meta)


def test_a_process_whose_maps_changed_does_not_reuse_old_locations(recording, tmp_path):
    tracker: ProcessTracker = recording.tracker(str(tmp_path))
    pipeline = CapturePipeline(ProbeConfig(frequency_hz=199, with_kernel=False, unwind=UnwindMode.FP), ["cpu"],
                               tracker)
    pipeline.begin()
    buf = recording.records[0]
    rec = parse_record(buf)

    pipeline.deliver(rec)
    [before] = pipeline.build(pipeline.cut())
    # the process's maps are read again (tracker.refresh after an exec), now with other code at those addresses
    tracker.adopt(renamed(recording, "_v2").tracker(str(tmp_path)).get(rec.pid))
    pipeline.deliver(parse_record(rewritten(buf, ktime=rec.ktime_ns + 1)))
    [after] = pipeline.build(pipeline.cut())

    [old_stack] = folded(before)
    [new_stack] = folded(after)
    assert "hot" in old_stack.split(";") and "hot_v2" in new_stack.split(";")
    old = old_stack.split(";")
    assert new_stack.split(";") == [old[0]] + [n if "+0x" in n else n + "_v2" for n in old[1:]]  # unresolved: as was
    assert Counter(folded(after)) == Counter({new_stack: 1})
