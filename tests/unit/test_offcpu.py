"""Off-CPU probe pieces that need no kernel: state labels, profile shape, defines."""

from __future__ import annotations

from agent.probes import family
from agent.probes.family import ProbeConfig
from agent.probes.offcpu import MAX_PYTHON_THREADS, OffCpuProbe, state_label
from agent.probes.probe_set import compile_plan
from agent.probes.python_stacks import PY_PROCS_MAP
from agent.processes.tracker import ProcessTracker
from exporters.pprof import decode_pprof, encode_pprof
from exporters.profile import SampleKey
from exporters.profile_types import empty_profile


def test_state_labels_follow_sched_switch_prev_state():
    assert state_label(1) == "sleeping"
    assert state_label(2) == "disk"
    assert state_label(0x100) == "preempted"
    assert state_label(0x101) == "preempted"
    assert state_label(0x40) == "state_0x40"


def test_profile_types_and_default():
    p = empty_profile("offcpu", 1, 2)
    p.add(SampleKey(stack=(), pid=1, tid=1, thread_name="t"), [1, 500])
    msg = decode_pprof(encode_pprof(p))
    st = msg.string_table
    assert [(st[t.type], st[t.unit]) for t in msg.sample_type] == [("samples", "count"), ("off_cpu", "nanoseconds")]
    assert (st[msg.period_type.type], st[msg.period_type.unit]) == ("off_cpu", "nanoseconds")
    assert st[msg.default_sample_type] == "off_cpu"


def test_threshold_is_not_compiled_in():
    """Written into offcpu_min_ns after the load (tests/integration/test_offcpu.py checks it holds): two
    thresholds share one compiled BPF cache entry."""
    one, other = (OffCpuProbe(ProbeConfig(offcpu_min_ns=ns), ProcessTracker()) for ns in (0, 5_000_000))
    assert one.defines() == other.defines()
    assert "offcpu_min_ns" in one.maps()


def test_python_frames_need_no_cpu_family(monkeypatch):
    """`record --profile offcpu` alone reads Python frames: the compile has `py_procs` and the FS base offset
    a thread's PyThreadState is found by."""
    monkeypatch.setattr(family, "fsbase_offset", lambda: 2600)
    probe = OffCpuProbe(ProbeConfig(), ProcessTracker())
    plan = compile_plan([probe], filter_pids=True)
    assert PY_PROCS_MAP in plan.maps and plan.defines["TASK_FSBASE_OFFSET"] == 2600
    assert plan.defines["OFFCPU_PY_THREADS"] == MAX_PYTHON_THREADS
