"""Lock probe pieces that need no kernel: aux decoding, profile shape, program set."""

from __future__ import annotations

from agent import lock_probe
from agent.lock_probe import LockProbe, LockSource, decode_aux, lock_profile
from agent.probe import ProbeConfig
from exporters.pprof import decode_pprof, encode_pprof
from exporters.profile import SampleKey


def test_aux_carries_source_and_address():
    assert decode_aux(0x7F00_1234_5678) == (LockSource.FUTEX, 0x7F00_1234_5678)
    assert decode_aux((1 << 60) | 0x5555_0000_1000) == (LockSource.PTHREAD_MUTEX, 0x5555_0000_1000)
    assert decode_aux((3 << 60) | 0xC000_0100_00) == (LockSource.GO, 0xC000_0100_00)
    # kernel addresses have the top nibble set: kept whole
    assert decode_aux(0xFFFF_8881_0433_5A00) == (LockSource.KERNEL, 0xFFFF_8881_0433_5A00)
    assert decode_aux(0xE << 60)[0] == LockSource.EXEC


def test_profile_types_follow_runtime_pprof():
    p = lock_profile(1, 2)
    p.add(SampleKey(stack=(), pid=1, tid=1, thread_name="t"), [1, 2500])
    msg = decode_pprof(encode_pprof(p))
    st = msg.string_table
    assert [(st[t.type], st[t.unit]) for t in msg.sample_type] == [("contentions", "count"), ("delay", "nanoseconds")]
    assert (st[msg.period_type.type], st[msg.period_type.unit]) == ("contentions", "count")
    assert st[msg.default_sample_type] == "delay"


def test_kernel_lock_programs_only_when_the_tracepoints_exist(monkeypatch):
    monkeypatch.setattr(lock_probe, "kernel_lock_tracepoints", lambda: False)
    probe = LockProbe(ProbeConfig())
    assert probe.defines()["LOCK_KERNEL"] == 0
    assert not set(LockProbe.KERNEL_TRACEPOINTS) & set(probe.programs())
    monkeypatch.setattr(lock_probe, "kernel_lock_tracepoints", lambda: True)
    probe = LockProbe(ProbeConfig())
    assert probe.defines()["LOCK_KERNEL"] == 1
    assert set(LockProbe.KERNEL_TRACEPOINTS) <= set(probe.programs())
