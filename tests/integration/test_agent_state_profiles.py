"""`bpfprof agent` with the profile types whose state spans intervals: heap and goroutine.

Each interval's heap profile has the allocations made in it (alloc_*) and
the sampled objects live at its end (inuse_*); each interval's goroutine
profile has the goroutines live at its end. Judged against the same ground
truth as `bpfprof record` (tests/integration/test_heap.py, test_goroutine.py):
the fixture's known bytes per site, the fixture's own goroutine profile.
"""

from __future__ import annotations

import re
import subprocess
import time

from fixtures.builder import build_c, build_go
from integration.test_agent import Agent
from integration.test_goroutine import check_against_witness
from integration.test_heap import (
    ALLOC_SPACE,
    GO_SITES,
    INUSE_SPACE,
    TOLERANCE,
    assert_go_tool_agrees,
    by_stack,
    site_value,
)
from recording import read_pprof

INTERVAL_S = 2
LAG_NS = 1_000_000_000  # records reach the agent this much after the event, at most (it drains every 100 ms)


def _files(directory, kind: str) -> list:
    """(pprof, decoded) of each interval, oldest first."""
    return sorted(((p, read_pprof(p)) for p in directory.glob(f"*.{kind}.pb.gz")), key=lambda f: f[1].raw.time_nanos)


def _end(fixture: subprocess.Popen, agent: Agent) -> tuple[int, str]:
    """Let the fixture exit (its stdin closes), then stop the agent: its exit code and stderr."""
    fixture.stdin.close()
    fixture.wait(timeout=30)
    return agent.stop()


def _reap(fixture: subprocess.Popen) -> None:
    if fixture.poll() is None:
        fixture.kill()
        fixture.wait()


def test_heap_alloc_per_interval_and_inuse_carried_over(tmp_path):
    """Allocations land in the interval they happen in; what stays live is in use in every later one."""
    binary = build_c("heapsites")
    fixture = subprocess.Popen([str(binary), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pprof_dir = tmp_path / "pprof"
    agent = Agent(tmp_path, {"selection": {"pids": [fixture.pid]}, "profiling": {"profiles": ["heap"]},
                             "export": {"interval_s": INTERVAL_S, "pprof_dir": {"path": str(pprof_dir)}}})
    try:
        agent.wait_ready()
        fixture.stdin.write("go\n")
        fixture.stdin.flush()
        lines = [fixture.stdout.readline() for _ in range(3)]
        done_ns = time.time_ns()
        truth = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^(\w+) alloc (\d+) inuse (\d+)$",
                                                                   "".join(lines), re.M)}
        assert len(truth) == 3, lines
        # two whole intervals after the allocations (and their records, which may lag) with the process alive
        agent.wait_metric("bpfprof_intervals_total", agent.metric("bpfprof_intervals_total") + 4)
        exit_ns = time.time_ns()  # intervals starting later may follow the process's exit: nothing in use
        code, err = _end(fixture, agent)
    finally:
        _reap(fixture)
    assert code == 0, err
    files = _files(pprof_dir, "heap")
    for site, (alloc, _) in truth.items():  # each allocation counted once, whichever interval it fell in
        got = sum(site_value(prof, site, ALLOC_SPACE) for _, prof in files)
        assert abs(got - alloc) <= TOLERANCE * alloc, f"{site} alloc_space {got} vs {alloc}"
    after = [(p, prof) for p, prof in files if done_ns + LAG_NS < prof.raw.time_nanos < exit_ns]
    assert len(after) >= 2, [prof.raw.time_nanos for _, prof in files]
    for path, prof in after:
        assert prof.total(ALLOC_SPACE) == 0  # nothing allocated since
        for site, (_, inuse) in truth.items():
            got = site_value(prof, site, INUSE_SPACE)
            if inuse:
                assert abs(got - inuse) <= TOLERANCE * inuse, f"{path.name}: {site} inuse_space {got} vs {inuse}"
            else:
                assert got == 0, f"{path.name}: {site} freed everything, yet {got} bytes in use"
    assert_go_tool_agrees(tmp_path, after[0][0], after[0][1])


def test_go_heap_per_interval_from_the_runtimes_buckets(tmp_path):
    """A Go process read from its own buckets at every cut: the intervals' alloc_* add up to what its own
    runtime/pprof profile says it allocated, and every interval after it has its in-use heap, stack by stack."""
    binary = build_go("heapsites")
    start, witness = tmp_path / "start", tmp_path / "witness.pb.gz"
    fixture = subprocess.Popen([str(binary), "-start-file", str(start), "-memprofile", str(witness), "-hold"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pprof_dir = tmp_path / "pprof"
    agent = Agent(tmp_path, {"selection": {"pids": [fixture.pid]}, "profiling": {"profiles": ["heap"]},
                             "export": {"interval_s": INTERVAL_S, "pprof_dir": {"path": str(pprof_dir)}}})
    try:
        agent.wait_ready()
        start.touch()
        assert "elapsed_s" in "".join(fixture.stdout.readline() for _ in range(3))
        while not (witness.exists() and witness.stat().st_size):
            time.sleep(0.01)
        done_ns = time.time_ns()
        agent.wait_metric("bpfprof_intervals_total", agent.metric("bpfprof_intervals_total") + 3)
        exit_ns = time.time_ns()
        code, err = _end(fixture, agent)
    finally:
        _reap(fixture)
    assert code == 0, err
    files, go = _files(pprof_dir, "heap"), read_pprof(witness)
    for site in GO_SITES:  # scaled per interval, so each interval may round its share down by one
        want = site_value(go, site, ALLOC_SPACE)
        got = sum(site_value(prof, site, ALLOC_SPACE) for _, prof in files)
        assert abs(got - want) <= len(files) + want // 10**6, (site, got, want)
    after = [(p, prof) for p, prof in files if done_ns < prof.raw.time_nanos - INTERVAL_S * 10**9
             and prof.raw.time_nanos < exit_ns]
    assert len(after) >= 2, [prof.raw.time_nanos for _, prof in files]
    inuse = {st: v[INUSE_SPACE] for st, v in by_stack(go).items() if v[INUSE_SPACE]}
    for path, prof in after:
        assert prof.total(ALLOC_SPACE) == 0, path.name  # nothing allocated since
        mine = {st: v[INUSE_SPACE] for st, v in by_stack(prof).items() if v[INUSE_SPACE]}
        assert mine.keys() == inuse.keys(), path.name
        for st, want in inuse.items():
            assert abs(mine[st] - want) <= 1 + want // 10**6, (path.name, st)
    assert_go_tool_agrees(tmp_path, after[0][0], after[0][1])


def test_goroutines_every_interval_match_runtime_pprof(tmp_path):
    """A Go process parked before the agent started: every interval has its goroutines, as Go counts them."""
    binary = build_go("goroutines")
    witness = tmp_path / "witness.pb.gz"
    fixture = subprocess.Popen([str(binary), str(witness), "0", "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert fixture.stdout.readline().strip() == "parked"
        agent = Agent(tmp_path, {"selection": {"pids": [fixture.pid]}, "profiling": {"profiles": ["goroutine"]},
                                 "export": {"interval_s": INTERVAL_S, "pprof_dir": {"path": str(tmp_path / "pprof")}}})
        agent.wait_ready()
        agent.wait_metric("bpfprof_intervals_total", 3)
        code, err = agent.stop()
        assert fixture.poll() is None  # still parked: every interval saw the same goroutines
    finally:
        fixture.kill()
        fixture.wait()
    assert code == 0, err
    files = _files(tmp_path / "pprof", "goroutine")
    assert len(files) >= 3
    for path, _ in files:
        check_against_witness(tmp_path, path, witness)
