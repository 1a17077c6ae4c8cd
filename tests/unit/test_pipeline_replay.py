"""The capture pipeline without BPF or root: a recorded capture replayed through it.

tests/replay/data/unwind_split_fp.json holds the ring-buffer records and the
process snapshot of a real capture of tests/fixtures/c/unwind_split.c
(tests/replay/capture.py, run once as root). Here its records go through
parse_record, CapturePipeline.deliver (accept, routing, the CPU accumulator),
several cuts, and build (StackResolver over the recorded snapshot) into
profiles, which must equal what the live pipeline made of the same records
and hold the fixture's ground truth: hot() called 70/30 by caller_a and
caller_b, every stack under main. Nothing reads BPF, the fixture's binary or
another process's /proc: the tracker's proc root is an empty directory.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from itertools import pairwise

import pytest

from agent.bpfload.records import RawRecord, RecordKind, parse_record, repeat_key
from agent.capture.pipeline import CapturePipeline, Interval
from agent.daemon.config import AgentConfig, LimitsConfig, ProfilingConfig
from agent.daemon.daemon import BpfCollector
from agent.daemon.metrics import AgentStats
from agent.probes.family import ProbeConfig
from agent.processes.stack_resolver import UnwindMode
from agent.processes.tracker import ProcessTracker
from replay.recording import DATA, Recording, folded

RECORDING = DATA / "unwind_split_fp.json"
PROCESS = "c-unwind_split-"  # the fixture's comm (15 characters)
# The recording's exact figures: a fixed input gives fixed numbers.
RECORDS = 292
BY_CALLER = {"caller_a": 205, "caller_b": 87}


@pytest.fixture(scope="module")
def recording() -> Recording:
    return Recording.load(RECORDING)


@pytest.fixture
def tracker(recording, tmp_path) -> ProcessTracker:
    return recording.tracker(str(tmp_path))


def records_of(recording: Recording) -> list[RawRecord]:
    return [parse_record(buf) for buf in recording.records]


def chunks(items: list, n: int) -> list[list]:
    """`items` in `n` consecutive parts of (nearly) equal size."""
    size = -(-len(items) // n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def cpu_pipeline(tracker: ProcessTracker) -> CapturePipeline:
    """A pipeline configured as the recording was (capture.py), begun without BPF."""
    pipeline = CapturePipeline(ProbeConfig(frequency_hz=199, with_kernel=False, unwind=UnwindMode.FP), ["cpu"],
                               tracker)
    pipeline.begin()
    return pipeline


def stacks_of(pipeline: CapturePipeline, intervals: list[Interval]) -> Counter[str]:
    """Samples per folded stack over the CPU profiles of `intervals`."""
    total: Counter[str] = Counter()
    for interval in intervals:
        [profile] = pipeline.build(interval)
        assert profile.kind == "cpu"
        total.update(folded(profile))
    return total


def by_caller(stacks: Counter[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = stack.split(";")
        out[frames[frames.index("hot") - 1] if "hot" in frames else "other"] += n
    return out


def test_records_parse_as_the_fixtures_cpu_samples(recording):
    records = records_of(recording)
    assert len(records) == RECORDS == recording.meta["live"]["samples"]
    assert {r.kind for r in records} == {RecordKind.CPU}
    assert {r.thread_name for r in records} == {PROCESS}
    assert all(r.user_ips and not r.kernel_ips and r.user_regs is None for r in records)  # fp, no kernel


def test_replay_through_cuts_gives_the_live_profile_and_the_fixtures_split(recording, tracker):
    records = records_of(recording)
    pipeline = cpu_pipeline(tracker)
    intervals = []
    for part in [*chunks(records, 3), []]:  # the last interval is empty
        for rec in part:
            pipeline.deliver(rec)
        intervals.append(pipeline.cut())

    assert [i.seq for i in intervals] == [0, 1, 2, 3]
    assert [i.samples for i in intervals] == [98, 98, 96, 0]
    assert sum(i.samples for i in intervals) == pipeline.samples == RECORDS  # nothing lost across cuts
    assert all(not i.losses for i in intervals)  # no ring buffer: no ring-buffer drops
    assert all(a.window.end_ns == b.window.start_ns for a, b in pairwise(intervals))

    stacks = stacks_of(pipeline, intervals)
    assert stacks == Counter(recording.meta["live"]["stacks"])  # what the live run symbolized, exactly
    assert sum(stacks.values()) == RECORDS
    assert all(stack.startswith(PROCESS + ";") and ";main;" in stack for stack in stacks)  # every stack reaches main
    callers = by_caller(stacks)
    assert callers == BY_CALLER
    assert callers["caller_a"] / RECORDS == pytest.approx(0.7, abs=0.03)  # the fixture's 7:3 split of work
    assert pipeline.resolver_stats.user_unresolved == 0  # the empty last interval resolved nothing


def test_an_interval_profile_holds_only_its_own_records(recording, tracker):
    records = records_of(recording)
    pipeline = cpu_pipeline(tracker)
    parts = chunks(records, 2)
    intervals = []
    for part in parts:
        for rec in part:
            pipeline.deliver(rec)
        intervals.append(pipeline.cut())
    for part, interval in zip(parts, intervals, strict=True):
        [profile] = pipeline.build(interval)
        assert profile.total() == len(part)
        assert sorted(t for s in profile.samples for t in s.timestamps_ns) == sorted(
            r.ktime_ns + interval.window.wall_offset_ns for r in part)
        assert profile.processes[part[0].pid].name == PROCESS


def test_daemon_collector_caps_each_interval_and_counts_the_rest(recording, tmp_path):
    cap = 100
    cfg = AgentConfig(profiling=ProfilingConfig(profiles=("cpu",), frequency_hz=199, kernel_stacks=False,
                                                unwind="fp"),
                      limits=LimitsConfig(max_interval_samples=cap), host_proc=str(tmp_path))
    tracker = recording.tracker(str(tmp_path), cfg.limits.max_processes)  # as the daemon makes it
    stats = AgentStats()
    collector = BpfCollector(cfg, tracker, stats)
    collector.pipeline.begin()
    records = records_of(recording)
    parts = chunks(records, 2)  # 146 each: more than the cap
    intervals = []
    for part in parts:
        for rec in part:
            collector.pipeline.deliver(rec)
        intervals.append(collector.cut())

    assert [i.samples for i in intervals] == [cap, cap]
    assert stats.samples == 2 * cap
    assert stats.lost_samples == {"interval_full": len(records) - 2 * cap}  # kept + dropped == recorded
    assert stats.unselected_samples == 0

    # The cap keeps each interval's first records: the same stacks a plain pipeline makes of them.
    for part, interval in zip(parts, intervals, strict=True):
        profiles, pod_uids = collector.build(interval)
        assert pod_uids == {}
        plain = cpu_pipeline(recording.tracker(str(tmp_path)))
        for rec in part[:cap]:
            plain.deliver(rec)
        assert Counter(folded(profiles[0])) == stacks_of(plain, [plain.cut()])
    # libc's caller of main: looked up once, its stack kept for the second interval (StackResolver.begin_build)
    assert stats.user_addresses > 0 and stats.user_unresolved == 1


def test_a_frequency_change_mid_interval_weighs_each_sample_by_its_own_period(recording, tracker):
    """The overhead governor changes the frequency in place: samples before the change weigh 1/199 s,
    after it 1/50 s, so cpu/nanoseconds stay the CPU time that ran (agent/probes/cpu.py)."""
    pipeline = cpu_pipeline(tracker)
    [family] = pipeline.families
    assert pipeline.set_frequency(50)  # no perf events here: only the bookkeeping
    [(changed_ns, hz)] = family.frequency_changes
    assert hz == 50 and family.frequency_hz == 50
    records = records_of(recording)
    half = len(records) // 2
    for i, rec in enumerate(records):
        pipeline.deliver(dataclasses.replace(rec, ktime_ns=changed_ns - 1000 if i < half else changed_ns + 1000))
    [profile] = pipeline.build(pipeline.cut())
    counts = sum(s.values[0] for s in profile.samples)
    cpu_ns = sum(s.values[1] for s in profile.samples)
    assert counts == len(records)
    assert cpu_ns == half * (10**9 // 199) + (len(records) - half) * (10**9 // 50)
    assert profile.period == 10**9 // 50
    assert any("50 Hz from" in c for c in profile.comments)


def count_parses(monkeypatch) -> list[int]:
    """Counts the records the pipeline parses (a repeat it recognises by its bytes is not parsed)."""
    import agent.capture.pipeline as pipeline_module  # noqa: PLC0415

    calls = [0]
    real = pipeline_module.parse_record

    def counting(buf: bytes) -> RawRecord:
        calls[0] += 1
        return real(buf)

    monkeypatch.setattr(pipeline_module, "parse_record", counting)
    return calls


def test_records_taken_as_bytes_parse_each_distinct_sample_once_per_interval(recording, tracker, monkeypatch):
    """The probe set hands the pipeline each record's bytes (deliver_buf): a repeat of a sample already
    taken in the interval (same thread, CPU, stacks; another time) joins its entry unparsed. The
    profiles must be the live run's, every event's time kept, and only distinct samples parsed."""
    parses = count_parses(monkeypatch)
    pipeline = cpu_pipeline(tracker)
    parts = chunks(recording.records, 3)
    intervals = []
    for part in parts:
        for buf in part:
            pipeline.deliver_buf(buf)
        intervals.append(pipeline.cut())

    assert [i.samples for i in intervals] == [98, 98, 96] and pipeline.samples == RECORDS
    assert stacks_of(pipeline, intervals) == Counter(recording.meta["live"]["stacks"])
    distinct = sum(len({repeat_key(buf) for buf in part}) for part in parts)  # per interval: cuts forget
    assert parses[0] == distinct < RECORDS / 4
    for part, interval in zip(parts, intervals, strict=True):
        [profile] = pipeline.build(interval)
        assert sorted(t for s in profile.samples for t in s.timestamps_ns) == sorted(
            parse_record(buf).ktime_ns + interval.window.wall_offset_ns for buf in part)


def test_a_new_snapshot_of_the_process_ends_its_repeats(recording, tracker, monkeypatch):
    """An exec (or new code mapped) gives the pid a new snapshot; samples after it resolve in it, so a
    record equal to one taken before is parsed and delivered again, not added to the old image's entry."""
    parses = count_parses(monkeypatch)
    pipeline = cpu_pipeline(tracker)
    buf = recording.records[0]
    pid = parse_record(buf).pid
    pipeline.deliver_buf(buf)
    pipeline.deliver_buf(buf)
    assert parses[0] == 1
    old = tracker.get(pid)
    tracker._procs[pid] = dataclasses.replace(old)  # what refresh() does: another snapshot object
    pipeline.deliver_buf(buf)
    pipeline.deliver_buf(buf)
    assert parses[0] == 2
    [acc] = pipeline.cut().accumulators
    assert [len(t) for t in acc.samples.times] == [2, 2]  # one entry per image, two events each
    assert [r.image for r in acc.samples.records] == [old, tracker.get(pid)]


def test_daemon_caps_and_counts_repeats_as_it_does_parsed_records(recording, tmp_path):
    cap = 100
    cfg = AgentConfig(profiling=ProfilingConfig(profiles=("cpu",), frequency_hz=199, kernel_stacks=False,
                                                unwind="fp"),
                      limits=LimitsConfig(max_interval_samples=cap), host_proc=str(tmp_path))
    stats = AgentStats()
    collector = BpfCollector(cfg, recording.tracker(str(tmp_path), cfg.limits.max_processes), stats)
    collector.pipeline.begin()
    for buf in recording.records:
        collector.pipeline.deliver_buf(buf)
    [profile], _ = collector.build(collector.cut())
    assert profile.total() == stats.samples == cap
    assert stats.lost_samples == {"interval_full": RECORDS - cap}


def test_a_record_that_cannot_be_handled_costs_itself_not_its_batch(recording, tracker):
    """The ring buffer hands records over in batches (libbpf.BATCH); a record that fails (here: cut short)
    is logged and counted, and the records after it in the same batch are still taken, repeats included."""
    pipeline = cpu_pipeline(tracker)
    bad = recording.records[0][:12]
    batch = recording.records[:100] + [bad] + recording.records[100:]
    pipeline.deliver_bufs(batch)
    assert pipeline.record_errors == 1
    assert pipeline.take_repeat_counts() == (RECORDS - len({repeat_key(b) for b in recording.records}), 0)
    assert stacks_of(pipeline, [pipeline.cut()]) == Counter(recording.meta["live"]["stacks"])


def test_a_build_finds_the_stacks_the_last_build_resolved(recording, tracker):
    """The pipeline's resolver outlives a build: an interval sampling the stacks of the one before resolves
    none of them again (an address left unnamed in a mapping stays so: the recording has one), and builds
    the same profile a fresh resolver would."""
    pipeline = cpu_pipeline(tracker)
    for buf in recording.records:
        pipeline.deliver_buf(buf)
    first = pipeline.build(pipeline.cut())
    before = pipeline.resolver_stats
    assert before.user_addresses > 0 and before.user_unresolved == 1
    for buf in recording.records:
        pipeline.deliver_buf(buf)
    interval = pipeline.cut()
    [again] = pipeline.build(interval)
    after = pipeline.resolver_stats
    assert after.user_addresses == 0
    assert pipeline._resolver.stack_hits == sum(len(acc.samples.records) for acc in interval.accumulators)
    assert folded(again) == folded(first[0]) == Counter(recording.meta["live"]["stacks"])
    pipeline._resolver = None  # a fresh resolver: the same profile
    assert folded(pipeline.build(interval)[0]) == folded(again)


def test_a_stack_of_another_image_is_resolved_again(recording, tracker):
    """A pid that exec'd has other code at the same addresses: a kept stack is found again only under the
    snapshot it was resolved in."""
    pipeline = cpu_pipeline(tracker)
    buf = recording.records[0]
    pid = parse_record(buf).pid
    pipeline.deliver_buf(buf)
    pipeline.build(pipeline.cut())
    tracker._procs[pid] = dataclasses.replace(tracker.get(pid))  # what refresh() does: another snapshot
    pipeline.deliver_buf(buf)
    pipeline.build(pipeline.cut())
    assert pipeline._resolver.stack_hits == 0 and pipeline.resolver_stats.user_addresses > 0
