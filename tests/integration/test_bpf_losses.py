"""What a probe family's BPF side loses (a full map) reaches the agent's lost-samples metric.

Real programs in the real kernel under `BpfCollector`, the daemon's BPF side;
the families' counter maps are set from user space to known per-CPU values
(filling a 262 144-entry map from a test would take minutes), then each cut
must report exactly their growth, once.
"""

from __future__ import annotations

import ctypes
import subprocess

from agent.bpfload import libbpf
from agent.daemon.config import AgentConfig, ProfilingConfig, SelectionConfig
from agent.daemon.daemon import BpfCollector
from agent.daemon.metrics import AgentStats
from agent.probes import offcpu
from agent.probes.heap import HEAP_STAT_LIVE_FULL, STATS_MAP
from agent.probes.lock import MAP_FULL, LockProbe
from agent.probes.offcpu import OffCpuProbe
from agent.processes.tracker import ProcessTracker


def _set_percpu(fd: int, key: int, per_cpu: int) -> int:
    """Every CPU's slot of `key` set to `per_cpu`; returns the sum the agent should read."""
    n = libbpf.possible_cpus()
    libbpf.map_update(fd, ctypes.c_uint32(key), (ctypes.c_uint64 * n)(*[per_cpu] * n))
    return per_cpu * n


def test_family_losses_become_lost_samples_once_per_growth():
    target = subprocess.Popen(["sleep", "120"])
    cfg = AgentConfig(profiling=ProfilingConfig(profiles=("heap", "lock", "goroutine")),
                      selection=SelectionConfig(pids=(target.pid,)))
    stats = AgentStats()
    collector = BpfCollector(cfg, ProcessTracker(max_processes=cfg.limits.max_processes), stats)
    try:
        collector.start()
        maps = collector.pipeline.objs.maps
        collector.cut()
        assert not {r for r in stats.lost_samples if r.endswith(("map_full", "no_layout"))}  # nothing lost yet
        heap = _set_percpu(maps[STATS_MAP], HEAP_STAT_LIVE_FULL, 3)
        lock = _set_percpu(maps[LockProbe.COUNTERS], MAP_FULL, 2)
        gor = _set_percpu(maps["gor_counts"], 0, 1)
        interval = collector.cut()
        assert stats.lost_samples["heap_live_map_full"] == heap
        assert stats.lost_samples["lock_wait_map_full"] == lock
        assert stats.lost_samples["goroutine_no_layout"] == gor
        assert {loss.reason: loss.count for loss in interval.losses}["heap_live_map_full"] == heap  # and its comments
        collector.cut()  # no growth: nothing more
        assert stats.lost_samples["heap_live_map_full"] == heap
        _set_percpu(maps[STATS_MAP], HEAP_STAT_LIVE_FULL, 5)
        collector.cut()
        assert stats.lost_samples["heap_live_map_full"] == 5 * libbpf.possible_cpus()
    finally:
        collector.close()
        target.kill()
        target.wait()


def test_off_cpu_blocks_lost_on_every_path_are_counted(monkeypatch):
    """Each way bpf/offcpu.bpf.c can leave a block unsent has a reason, and a stash entry the LRU evicted
    is counted from what was added, deleted at switch-in, and is left (counted at every cut here; the
    agent counts the entries left only every EVICTION_WALK_S while the stash is far from full)."""
    monkeypatch.setattr(offcpu, "EVICTION_WALK_S", 0.0)
    target = subprocess.Popen(["sleep", "120"])  # asleep the whole time: it adds nothing to the stash
    cfg = AgentConfig(profiling=ProfilingConfig(profiles=("offcpu",)), selection=SelectionConfig(pids=(target.pid,)))
    stats = AgentStats()
    collector = BpfCollector(cfg, ProcessTracker(max_processes=cfg.limits.max_processes), stats)
    try:
        collector.start()
        fd = collector.pipeline.objs.maps[OffCpuProbe.COUNTERS]
        collector.cut()
        assert not {r for r in stats.lost_samples if r.startswith("offcpu_")}  # nothing lost yet
        want = {"offcpu_too_big": _set_percpu(fd, offcpu.TOO_BIG, 1),
                "offcpu_unsent": _set_percpu(fd, offcpu.UNSENT, 2),
                "offcpu_switch_in_missed": _set_percpu(fd, offcpu.UNCONSUMED, 3),
                "offcpu_no_scratch": _set_percpu(fd, offcpu.NO_SCRATCH, 4),
                "offcpu_stash_evicted": _set_percpu(fd, offcpu.STASHED, 7) - _set_percpu(fd, offcpu.CONSUMED, 2)}
        interval = collector.cut()
        assert {r: stats.lost_samples[r] for r in want} == want
        assert {loss.reason: loss.count for loss in interval.losses if loss.reason in want} == want
        collector.cut()  # no growth: nothing more
        assert {r: stats.lost_samples[r] for r in want} == want
    finally:
        collector.close()
        target.kill()
        target.wait()
