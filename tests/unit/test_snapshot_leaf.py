"""A snapshot taken before a process had all its code (mid-exec, before the dynamic loader mapped libc)
is read again at the first record whose leaf lies outside it.

`record -- COMMAND` snapshots the command at its first record. A CPU sample of ld.so wakes the agent at
once (a fallback record), so that first snapshot can come before libc is mapped, under the program's own
name: no name change ever asks for a re-read, and every later off-CPU block (its leaf in libc's syscall
wrapper) stayed unresolved, its BPF table stopping at that leaf (tests/integration/test_offcpu.py lost
all 30 naps of wait_in_nanosleep this way). No BPF: a fake /proc tree and records handed to
CapturePipeline.deliver.
"""

from __future__ import annotations

from pathlib import Path

from agent.bpfload.records import RawRecord, RecordKind
from agent.capture.pipeline import CapturePipeline
from agent.probes.family import ProbeConfig
from agent.processes import tracker as tracker_mod
from agent.processes.tracker import ProcessTracker

BINARY = "555555554000-555555556000 r-xp 00001000 08:01 1001                       /usr/bin/prog\n"
LIBC = "7ffff7dc0000-7ffff7f15000 r-xp 00028000 08:01 1002                       /usr/lib/libc.so.6\n"
STACK = "7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0                          [stack]\n"
IN_BINARY, IN_LIBC = 0x555555555123, 0x7FFFF7E9A1B0


def fake_process(root: Path, pid: int, maps: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} (prog) S " + " ".join(["0"] * 18 + ["555"]) + "\n")
    (d / "comm").write_text("prog\n")
    (d / "maps").write_text(maps)


def offcpu_block(pid: int, user_ips: tuple[int, ...]) -> RawRecord:
    return RawRecord(kind=int(RecordKind.OFFCPU), pid=pid, tid=pid, cpu=0, ktime_ns=1, value=20_000_000, aux=1,
                     thread_name="prog", kernel_ips=(), user_ips=user_ips)


def test_a_block_in_code_mapped_after_the_snapshot_has_the_process_read_again(tmp_path):
    fake_process(tmp_path, 42, BINARY + STACK)  # just exec'd: ld.so has not mapped libc yet
    pipe = CapturePipeline(ProbeConfig(with_kernel=False), ["offcpu"], ProcessTracker(proc_root=str(tmp_path)))
    pipe.begin()
    pipe.deliver(offcpu_block(42, (IN_BINARY,)))
    early = pipe.tracker.get(42)
    assert early.symbols.mapping_at(IN_LIBC) is None
    fake_process(tmp_path, 42, BINARY + LIBC + STACK)  # libc mapped, name unchanged
    pipe.deliver(offcpu_block(42, (IN_LIBC, IN_BINARY)))
    [acc] = pipe._current.values()
    later = acc.samples.records[-1].image
    assert later is not early and later is pipe.tracker.get(42)
    assert later.symbols.mapping_at(IN_LIBC) is not None
    assert pipe.tracker.stats.leaf_refreshes == 1


def test_a_leaf_never_in_any_snapshot_rereads_at_most_every_quarter_second(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(tracker_mod.time, "monotonic", lambda: clock[0])
    fake_process(tmp_path, 42, BINARY + STACK)
    tracker = ProcessTracker(proc_root=str(tmp_path))
    for _ in range(50):  # freed JIT code, say: in no snapshot however often it is read
        tracker.note_record(42, 42, "prog", IN_LIBC)
    assert tracker.stats.leaf_refreshes == 1
    clock[0] += tracker_mod.LEAF_REFRESH_S
    tracker.note_record(42, 42, "prog", IN_LIBC)
    assert tracker.stats.leaf_refreshes == 2
    tracker.note_record(42, 42, "prog", 0xFFFFFFFFFF600000)  # [vsyscall]: above user space, never read for
    tracker.note_record(42, 42, "prog", IN_BINARY)
    assert tracker.stats.leaf_refreshes == 2
