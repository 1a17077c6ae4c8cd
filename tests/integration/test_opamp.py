"""`bpfprof agent` under an OpAMP server (tests/opamp_server.py, a process on loopback), end to end.

The agent starts from its local file (199 Hz, program burn_a selected, 2 s
intervals), connects, reports who it is, its health and its effective
config; the server offers a config that lowers the frequency to 49 Hz and
selects burn_b instead: it is APPLIED, and the intervals after it hold only
burn_b, sampled at 49 Hz (the pprof period and the samples' weights). Then
a config with a bad value is FAILED with the key and the reason while
burn_b is still profiled at 49 Hz; then the server answers garbage and
the agent counts it and goes on.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from opamp_server import OpampServer

from agent.probes.cpu import DITHER
from fixtures.builder import build_c
from integration.test_agent import Agent
from recording import read_pprof

pytestmark = pytest.mark.bpf


@pytest.fixture
def burners(tmp_path):
    """The same CPU-burning program under two names (selection by executable name tells them apart)."""
    procs = {}
    for name in ("burn_a", "burn_b"):
        exe = tmp_path / name
        shutil.copy(build_c("callchain"), exe)
        procs[name] = subprocess.Popen([str(exe), "120"])
    yield procs
    for p in procs.values():
        p.kill()
        p.wait()


def intervals_after(pprof_dir: Path, wall_ns: int) -> list:
    """CPU profiles of intervals that started at or after `wall_ns`, oldest first."""
    out = []
    for f in pprof_dir.glob("*.cpu.pb.gz"):
        prof = read_pprof(f)
        if prof.raw.time_nanos >= wall_ns:
            out.append(prof)
    return sorted(out, key=lambda p: p.raw.time_nanos)


def wait_intervals(agent: Agent, pprof_dir: Path, wall_ns: int, n: int, timeout_s: float = 30) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert agent.proc.poll() is None, agent.stderr()
        got = [p for p in intervals_after(pprof_dir, wall_ns) if p.samples]
        if len(got) >= n:
            return got
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} intervals with samples after the change: {agent.stderr()[-3000:]}")


def pids(prof) -> set[int]:  # noqa: ANN001
    return {s.num_labels.get("pid") for s in prof.samples}


def test_remote_config_applied_then_a_bad_one_failed_while_profiling_goes_on(tmp_path, burners):
    a, b = burners["burn_a"].pid, burners["burn_b"].pid
    pprof_dir = tmp_path / "pprof"
    with OpampServer() as server:
        agent = Agent(tmp_path, {
            "profiling": {"frequency_hz": 199},
            "selection": {"exe_names": ["burn_a"]},
            "export": {"interval_s": 2, "pprof_dir": {"path": str(pprof_dir)}},
            "opamp": {"endpoint": server.endpoint, "heartbeat_interval_s": 1,
                      "instance_uid_file": str(tmp_path / "instance_uid"),
                      "remote_config_file": str(tmp_path / "remote_config.json")}})
        try:
            agent.wait_ready()
            reported = server.wait_for(lambda s: s.get("health", {}).get("healthy") and "effective_config" in s)
            assert reported["identifying"]["service.name"] == "bpfprof"
            assert reported["identifying"]["service.instance.id"] == (tmp_path / "instance_uid").read_text().strip()
            assert "frequency_hz: 199" in reported["effective_config"][""]
            first = wait_intervals(agent, pprof_dir, 0, 1)[0]
            assert pids(first) == {a} and first.raw.period == 1_000_000_000 // 199

            good = server.offer("profiling:\n  frequency_hz: 49\nselection:\n  exe_names: [burn_b]\n")
            applied = server.wait_for(lambda s: s.get("remote_config_status", {}).get("hash") == good)
            assert applied["remote_config_status"]["status"] == "APPLIED", applied["remote_config_status"]
            after = time.time_ns()
            server.wait_for(lambda s: "frequency_hz: 49" in s.get("effective_config", {}).get("", ""))
            nxt = wait_intervals(agent, pprof_dir, after, 1)[0]
            assert pids(nxt) == {b}, "the remote selection: burn_b only"
            assert nxt.raw.period == 1_000_000_000 // 49
            # each sample weighs a period drawn around the new one (agent/probes/cpu.py DITHER), not 1e9/199
            lo, hi = 0.999e9 / (49 * (1 + DITHER)), 1.001e9 / (49 * (1 - DITHER))
            assert all(lo * s.values[0] <= s.values[1] <= hi * s.values[0] for s in nxt.samples)
            # ~49 Hz on one CPU's worth of burning, not 199: well apart even on a loaded machine
            rate = sum(s.values[0] for s in nxt.samples) / (nxt.raw.duration_nanos / 1e9)
            assert rate < 120, rate

            bad = server.offer("profiling:\n  frequency_hz: 0\n")
            failed = server.wait_for(lambda s: s.get("remote_config_status", {}).get("hash") == bad)
            status = failed["remote_config_status"]
            assert status["status"] == "FAILED"
            assert "profiling.frequency_hz: expected 1 to 20000, got 0" in status["error"], status
            t_bad = time.time_ns()
            on = wait_intervals(agent, pprof_dir, t_bad, 1)[0]
            assert pids(on) == {b} and on.raw.period == 1_000_000_000 // 49, "the running config stays"
            assert agent.metric('bpfprof_opamp_remote_configs_total{status="failed"}') == 1
            assert agent.metric('bpfprof_opamp_remote_configs_total{status="applied"}') == 1

            server.mode("garbage")
            agent.wait_metric('bpfprof_opamp_requests_total{outcome="bad_response"}', 1)
            t_garbage = time.time_ns()
            assert pids(wait_intervals(agent, pprof_dir, t_garbage, 1)[0]) == {b}, "profiling goes on"
            assert agent.metric("bpfprof_opamp_connected") == 0
        finally:
            code, err = agent.stop()
    assert code == 0, err
    assert "Traceback" not in err, err
