"""Counts that must not lie: each interval's loss comments are that interval's, and failed snapshots leave the table.

No BPF and no root: a fake /proc tree (a directory per pid with the files
the tracker reads) and records handed to CapturePipeline.deliver, as the
replay tests do. Processes "gone before their maps were read" are pids with
no directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bpfload.records import RawRecord, RecordKind
from agent.capture.pipeline import CapturePipeline
from agent.probes.family import ProbeConfig
from agent.processes.stack_resolver import UnwindMode
from agent.processes.tracker import ProcessTracker
from symbolizer.errors import BpfprofError

GONE = "user stacks of processes gone before their maps were read or refused by the full process table"


def fake_process(root: Path, pid: int, start_ticks: int = 555, maps: bool = True) -> None:
    """/proc/PID as far as the tracker reads it: stat (start time), comm, maps (a stack, no file: a live
    process; one whose maps read empty is exiting, and a refresh keeps what the tracker held)."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} (fake) S " + " ".join(["0"] * 18 + [str(start_ticks)]) + "\n")
    (d / "comm").write_text("fake\n")
    if maps:
        (d / "maps").write_text("7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n")


def record(pid: int) -> RawRecord:
    """A CPU sample with a stack copy, so the agent unwinds it against the process's snapshot."""
    return RawRecord(kind=int(RecordKind.CPU), pid=pid, tid=pid, cpu=0, ktime_ns=1, value=1, aux=0, thread_name="fake",
                     kernel_ips=(), user_ips=(0x1000,), user_regs=(0x1000, 0x2000, 0x3000), user_stack=b"\0" * 64)


def pipeline(tracker: ProcessTracker) -> CapturePipeline:
    p = CapturePipeline(ProbeConfig(frequency_hz=99, with_kernel=False, unwind=UnwindMode.COPY), ["cpu"], tracker)
    p.begin()
    return p


def gone_comment(pipe: CapturePipeline, interval) -> int:  # noqa: ANN001
    """The count in this interval's 'gone before their maps were read' comment (0 if none)."""
    [profile] = pipe.build(interval)
    found = [c for c in profile.comments if c.endswith(GONE)]
    assert len(found) <= 1
    return int(found[0].split()[1]) if found else 0


def test_each_intervals_gone_comment_is_that_intervals_count(tmp_path):
    pipe = pipeline(ProcessTracker(proc_root=str(tmp_path)))
    pid = 1000
    for per_interval in (10, 3, 0, 7):
        for _ in range(per_interval):
            pid += 1
            pipe.deliver(record(pid))
        assert gone_comment(pipe, pipe.cut()) == per_interval


def test_a_loss_counter_unreadable_at_one_cut_is_not_reported_whole_at_the_next(tmp_path, monkeypatch):
    pipe = pipeline(ProcessTracker(proc_root=str(tmp_path)))
    [family] = pipe.families
    readable = family.losses

    def unreadable() -> list:
        raise BpfprofError("map read failed")

    counts = []
    for i, per_interval in enumerate((5, 4, 6)):
        for n in range(per_interval):
            pipe.deliver(record(2000 + 10 * i + n))
        monkeypatch.setattr(family, "losses", unreadable if i == 1 else readable)
        counts.append(gone_comment(pipe, pipe.cut()))
    assert counts == [5, 0, 4 + 6]  # the growth since the last reading, not the 15 since start
    assert sum(counts) == 15


def test_failed_snapshots_are_evicted_and_a_live_process_gets_another_try(tmp_path):
    tracker = ProcessTracker(proc_root=str(tmp_path), max_processes=100)
    fake_process(tmp_path, 42, maps=False)  # alive, but its maps could not be read (mid-exec, say)
    fake_process(tmp_path, 43)
    assert tracker.observe(41) is None  # gone before we looked
    assert tracker.observe(42) is None
    assert tracker.observe(43) is not None
    for pid in (41, 42, 43):
        tracker.seen(pid, 5)
    assert tracker.stats.snapshot_failures == 2
    # interval 5 still pending: the live, readable process stays; the failures hold nothing and go
    assert tracker.evict(safe_seq=5) == 2
    assert 41 not in tracker and 42 not in tracker and 43 in tracker
    (tmp_path / "42" / "maps").write_text("")
    assert tracker.note_record(42, 42, "fake") is not None  # tried again, and read this time
    assert tracker.stats.snapshot_failures == 2 and len(tracker) == 2


@pytest.mark.parametrize("reuse", [False, True])
def test_exited_processes_leave_once_no_interval_needs_them(tmp_path, reuse):
    tracker = ProcessTracker(proc_root=str(tmp_path), max_processes=100)
    fake_process(tmp_path, 50, start_ticks=1)
    assert tracker.observe(50) is not None
    tracker.seen(50, 3)
    if reuse:
        fake_process(tmp_path, 50, start_ticks=2)  # the pid now belongs to another process
    else:
        for f in (tmp_path / "50").iterdir():
            f.unlink()
        (tmp_path / "50").rmdir()
    assert tracker.evict(safe_seq=3) == 0  # interval 3 is still to be built
    assert tracker.evict(safe_seq=4) == 1 and 50 not in tracker


def test_a_new_thread_named_otherwise_shows_an_exec_before_the_main_thread_does(tmp_path):
    """Records are read one CPU after another: a thread of the exec'd program can come before the main
    thread's. Its first record, named as the new program, re-reads the process (once per thread)."""
    tracker = ProcessTracker(proc_root=str(tmp_path))
    fake_process(tmp_path, 42)
    before = tracker.note_record(42, 42, "fake")
    assert tracker.note_record(42, 43, "fake") is before  # a thread with the process's name: no re-read
    (tmp_path / "42" / "comm").write_text("newprog\n")
    after = tracker.note_record(42, 44, "newprog")
    assert after is not before and after.name == "newprog" and tracker.stats.refreshes == 1
    assert tracker.note_record(42, 44, "newprog") is after  # that thread is not looked at again
    assert tracker.stats.refreshes == 1
