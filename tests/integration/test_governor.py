"""The overhead governor on the real agent: driven far over its budget, it settles near it.

`bpfprof agent` starts at 2000 Hz with limits.cpu_percent 1 (only the load selected) while the Go
fixture cpusplit burns its 70/30 split on both CPUs and short-lived
processes come and go (bench/governor_settling.py runs the same thing and
prints the curve). Cost is measured from outside: the agent's CPU time in
/proc/PID/stat plus its BPF programs' run time (kernel.bpf_stats_enabled is
on for the run). Judged over generous windows only: the mean cost from 45 s
to the end (>= 40 s) is within the budget +-20 %; the fixture's shares are
runtime/pprof's within the CPU tests' tolerance, and the CPU time the
profiles give the fixture across the frequency changes is its rusage within 15 %.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from governor_settling import fixture_figures, run  # noqa: E402

from fixtures.builder import build_c  # noqa: E402
from integration.test_agent import Agent  # noqa: E402
from recording import read_pprof  # noqa: E402

# The agent's cost is judged against a budget of the machine's CPU: no other test's agents and processes beside.
pytestmark = pytest.mark.alone

BUDGET_PERCENT = 1.0
SHARE_TOLERANCE = 0.05  # shares of a 40-90 s run sampled partly at a few tens of Hz


def test_settles_within_budget_and_keeps_rates_and_shares(tmp_path):
    # 200 short-lived processes a minute, not 600: at 600 the agent's cost per new process alone is
    # 1.5-1.7 % at the 19 Hz floor (measured on a quiet machine), past the budget before any sampling,
    # so the test judged the floor, not the governor. At 200 it settles above the floor (95-156 Hz).
    s = run(tmp_path, seconds=90, frequency_hz=2000, budget_percent=BUDGET_PERCENT, floor_hz=19, rate=200)
    curve = "; ".join(f"{t:.0f}s {hz}Hz {c:.2f}%" for t, hz, c in s.curve)
    assert "Traceback" not in s.log, s.log[-3000:]
    assert "overhead governor: cost" in s.log, curve
    late = s.mean_cost_after(45.0)
    assert abs(late / BUDGET_PERCENT - 1) <= 0.2, f"mean cost after 45 s {late:.2f}% vs {BUDGET_PERCENT}%: {curve}"
    assert s.curve[-1][1] < 2000, curve
    ours, go, cpu_s, rusage_s = fixture_figures(s)
    assert 0.6 < go < 0.8, "the fixture did not run its 70/30 split"
    assert abs(ours - go) <= SHARE_TOLERANCE, (ours, go)
    assert abs(cpu_s / rusage_s - 1) <= 0.15, (cpu_s, rusage_s)


def test_heap_rate_and_offcpu_threshold_follow_the_frequency(tmp_path):
    """Far over a tiny budget with cpu, offcpu and heap selected: every family costs more than the budget,
    so the first step lowers the CPU frequency, widens the heap sample rate and raises the off-CPU threshold,
    each by its own factor; each is logged with the cost by family, in the metrics, and in the profiles
    of the intervals after it (period, comments)."""
    prog = subprocess.Popen([str(build_c("mallocloop")), "100000000000"], stdout=subprocess.DEVNULL)
    # mallocloop's own off-CPU time is preemption, mostly shorter than the raised threshold (~2.5 ms at the
    # floor) on a quiet machine: a CI run saw no off-CPU sample in 30 s. 50 ms sleeps are over any threshold.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)"])
    agent = Agent(tmp_path, {"profiling": {"profiles": ["cpu", "offcpu", "heap"], "frequency_hz": 499},
                             "selection": {"pids": [prog.pid, sleeper.pid]},
                             "limits": {"cpu_percent": 0.01, "min_frequency_hz": 19},
                             "export": {"interval_s": 2, "pprof_dir": {"path": str(tmp_path / "pprof")}}})
    try:
        agent.wait_ready()
        agent.wait_metric("bpfprof_governor_changes_total", 1)
        changed_ns = time.time_ns()
        heap_bytes = agent.metric("bpfprof_heap_sample_bytes")
        assert heap_bytes > 512 * 1024, heap_bytes
        assert agent.metric("bpfprof_offcpu_min_block_seconds") > 0
        assert agent.metric("bpfprof_sampling_frequency_hz") < 499
        deadline = time.monotonic() + 30
        later: dict[str, list] = {}
        while time.monotonic() < deadline and len(later) < 3:
            for f in (tmp_path / "pprof").glob("*.pb.gz"):
                kind = f.name.split(".")[-3]
                prof = read_pprof(f)
                if prof.raw.time_nanos >= changed_ns and prof.samples:
                    later.setdefault(kind, []).append(prof)
            time.sleep(0.5)
        assert set(later) == {"cpu", "offcpu", "heap"}, (sorted(later), agent.stderr()[-2000:])
        code, err = agent.stop()
    finally:
        for p in (prog, sleeper):
            p.kill()
            p.wait()
        if agent.proc.poll() is None:
            agent.stop()
    assert code == 0, err
    step = re.search(r"\(budget 0.01%; ([^)]*)\): sampling frequency 499 -> (\d+) Hz, heap sample rate "
                     r"524288 -> (\d+) bytes, off-CPU threshold 0 -> (\d+) us", err)
    assert step, err[-3000:]
    shares = dict(part.rsplit(" ", 1) for part in step.group(1).split(", "))
    assert {"cpu", "heap", "offcpu"} <= set(shares), shares
    hz, heap_rate, offcpu_us = (int(g) for g in step.groups()[1:])
    assert hz < 499 and heap_rate > 524288 and offcpu_us > 0
    assert all(p.raw.period > 1_000_000_000 // 499 for p in later["cpu"])
    assert all(p.raw.period >= heap_rate for p in later["heap"])
    comments = [p.raw.string_table[c] for p in later["offcpu"] for c in p.raw.comment]
    assert any(c.startswith("off-CPU blocks shorter than") and not c.startswith("off-CPU blocks shorter than 0 ")
               for c in comments), comments
