"""Heap profiles against ground truth: a C fixture's known bytes per site, and a
Go fixture's own runtime/pprof heap profile of the same run."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from fixtures.builder import build_c, build_go
from gotool import go_pprof
from recording import BPFPROF, Decoded, read_pprof, run_bpfprof

HEAP_TYPES = [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"),
              ("inuse_space", "bytes")]
ALLOC_SPACE, INUSE_SPACE = 1, 3
RATE = 512 * 1024
# Native: bytes are sampled at a mean interval of 512 KiB (exponential), so
# a site of fixed-size blocks is sampled ~Binomial(N, p = 1-exp(-size/R)).
# The relative spread of the scaled estimate is sqrt((1-p)/(N p)): site_a
# alloc 2.5 %, in use 3.6 %, site_b 4.3 %, site_c 4.5 % (1 s.d.), so 15 % is
# 3.3-6 sigma per check and well under 1 % flaky for the whole test.
TOLERANCE = 0.15
NATIVE_SITES = ("site_a", "site_b", "site_c")
GO_SITES = ("main.allocA", "main.allocB")


def site_value(prof: Decoded, function: str, index: int) -> int:
    return sum(s.values[index] for s in prof.samples if function in s.functions)


def gotool_bytes_total(home, path, sample_index: str) -> int:
    """`go tool pprof`'s total for one sample type, in bytes or objects (integers)."""
    unit = "B" if sample_index.endswith("space") else "minimum"
    out = go_pprof(home, "-top", "-nodecount=1", f"-unit={unit}", f"-sample_index={sample_index}", str(path))
    return int(re.search(r"of (\d+)B? total", out).group(1))


def assert_go_tool_agrees(home, path, prof: Decoded) -> None:
    for i, (name, _) in enumerate(HEAP_TYPES):
        assert gotool_bytes_total(home, path, name) == prof.total(i), name


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heap-native")
    binary = build_c("heapsites")
    out = tmp / "heap.pb.gz"
    proc = run_bpfprof("record", "--profile", "heap", "-o", str(out), "--", str(binary))
    truth = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^(\w+) alloc (\d+) inuse (\d+)$", proc.stdout, re.M)}
    assert set(truth) == set(NATIVE_SITES), proc.stdout
    return tmp, out, read_pprof(out), truth


def test_native_sites_within_tolerance(native_run):
    _, _, prof, truth = native_run
    for site, (alloc, inuse) in truth.items():
        got_alloc = site_value(prof, site, ALLOC_SPACE)
        assert abs(got_alloc - alloc) <= TOLERANCE * alloc, f"{site} alloc_space {got_alloc} vs {alloc}"
        got_inuse = site_value(prof, site, INUSE_SPACE)
        if inuse:
            assert abs(got_inuse - inuse) <= TOLERANCE * inuse, f"{site} inuse_space {got_inuse} vs {inuse}"
        else:
            assert got_inuse == 0, f"{site} freed everything, yet {got_inuse} bytes in use"


def await_sampling(rec: subprocess.Popen) -> None:
    """Read bpfprof's stderr up to its "sampling ..." line (warnings may come first)."""
    seen = []
    while not (line := rec.stderr.readline()).startswith("sampling"):
        assert line, "bpfprof ended before sampling: " + "".join(seen)
        seen.append(line)


def _comments(prof: Decoded) -> list[str]:
    return [prof.raw.string_table[i] for i in prof.raw.comment]


def test_a_command_bpfprof_starts_samples_in_process(native_run):
    """`-- COMMAND` preloads the sampler: no uprobe on every malloc, and its frames are not in the stacks."""
    _, _, prof, _ = native_run
    assert "heap: 1 of 1 native processes sampled in process by libbpfprof_heap.so, 0 through uprobes on malloc" \
        in _comments(prof)
    assert not [s for s in prof.samples if {"bpfprof_heap_alloc", "malloc", "calloc"} & set(s.functions)]
    # The leaf is the allocating function. Besides the sites, the program's other
    # allocations may be sampled too (stdio's buffer for its printf: 4 KiB, a
    # ~1 % chance at this rate), so those leaves are allowed but are bytes apart.
    site_bytes = sum(s.values[ALLOC_SPACE] for s in prof.samples
                     if s.functions[0] in {"site_a", "site_b", "site_b_seed", "site_c"})
    assert site_bytes >= 0.99 * prof.total(ALLOC_SPACE)


def test_native_profile_shape_and_go_tool_reads_it(native_run):
    tmp, path, prof, _ = native_run
    assert prof.sample_types == HEAP_TYPES
    raw = prof.raw
    st = raw.string_table
    assert (st[raw.period_type.type], st[raw.period_type.unit]) == ("space", "bytes")
    assert raw.period == RATE
    assert st[raw.default_sample_type] == "inuse_space"
    # every sampled byte was allocated from main's callees
    assert site_value(prof, "main", ALLOC_SPACE) >= 0.99 * prof.total(ALLOC_SPACE)
    assert_go_tool_agrees(tmp, path, prof)


@pytest.fixture(scope="module")
def go_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heap-go")
    binary = build_go("heapsites")
    ours, theirs = tmp / "bpfprof.pb.gz", tmp / "runtime-pprof.pb.gz"
    run_bpfprof("record", "--profile", "heap", "-o", str(ours), "--", str(binary), "-memprofile", str(theirs))
    return tmp, ours, read_pprof(ours), theirs, read_pprof(theirs)


def test_go_alloc_space_matches_runtime_pprof(go_run):
    """Both see the runtime's own samples, so they agree far better than 15 % (measured: < 1 %)."""
    _, _, ours, _, go = go_run
    for site in GO_SITES:
        theirs = site_value(go, site, ALLOC_SPACE)
        assert theirs > 100 * RATE, f"the fixture's own profile has too little of {site}"
        mine = site_value(ours, site, ALLOC_SPACE)
        assert abs(mine - theirs) <= TOLERANCE * theirs, f"{site}: bpfprof {mine} vs runtime/pprof {theirs}"
    # the fixture's 3:1 split, read off our profile
    ratio = site_value(ours, "main.allocA", ALLOC_SPACE) / site_value(ours, "main.allocB", ALLOC_SPACE)
    assert 2.5 < ratio < 3.6


def by_stack(prof: Decoded) -> dict[tuple[tuple[str, ...], ...], list[int]]:
    """Values summed per stack of locations (inline chains kept), the outermost runtime.goexit dropped:
    runtime/pprof leaves it out of its heap profile."""
    out: dict[tuple[tuple[str, ...], ...], list[int]] = {}
    for s in prof.samples:
        stack = tuple(tuple(loc) for loc in s.locations)
        if stack and stack[-1] == ("runtime.goexit",):
            stack = stack[:-1]
        acc = out.setdefault(stack, [0] * len(s.values))
        for i, v in enumerate(s.values):
            acc[i] += v
    return out


def assert_same_as_runtime_pprof(ours: Decoded, theirs: Decoded) -> None:
    """Every stack and its four values as Go's own profile has them; the scaled values may differ by
    rounding (Go scales the bucket's total bytes, we its object size times count)."""
    mine, go = by_stack(ours), by_stack(theirs)
    assert set(mine) == set(go), (set(mine) ^ set(go))
    for stack, values in go.items():
        for got, want in zip(mine[stack], values, strict=True):
            assert abs(got - want) <= 1 + want // 10**6, (stack, mine[stack], values)


def test_go_heap_is_the_runtimes_own_profile_read_at_exit(go_run):
    """The runtime's buckets, read while bpfprof holds the exiting command at runtime.exit: the same
    stacks and values as the fixture's own runtime/pprof heap profile, written just before (after a GC).
    runB is inlined into main: its own PC in the runtime's stacks is folded into main's location."""
    _, _, ours, _, go = go_run
    assert "heap: 1 of 1 Go processes read from the runtime's own profile buckets (as of their last GC), " \
        "0 through uprobes on its sampling path" in _comments(ours)
    assert_same_as_runtime_pprof(ours, go)
    assert ("main.runB", "main.main") in ours.inline_pairs


def test_go_stacks_hide_the_allocator_like_runtime_pprof(go_run):
    _, _, ours, _, _ = go_run
    leaves = {s.functions[0] for s in ours.samples if "main.allocA" in s.functions}
    assert leaves == {"main.allocA"}


def test_stripped_go_binary_is_found_by_its_pclntab(tmp_path):
    """No .symtab: the probe points come from .gopclntab; the rate is the runtime's default (the fixture keeps it)."""
    binary = build_go("heapsites", stripped=True)
    ours, theirs = tmp_path / "bpfprof.pb.gz", tmp_path / "runtime-pprof.pb.gz"
    run_bpfprof("record", "--profile", "heap", "-o", str(ours), "--", str(binary), "-memprofile", str(theirs),
                "-rounds", "1")
    prof, go = read_pprof(ours), read_pprof(theirs)
    for site in GO_SITES:
        want, got = site_value(go, site, ALLOC_SPACE), site_value(prof, site, ALLOC_SPACE)
        assert want > 50 * RATE and abs(got - want) <= TOLERANCE * want, (site, got, want)
    assert any("without runtime.MemProfileRate" in c for c in _comments(prof))
    # no symbols, so no buckets to read: the uprobes on the runtime's sampling path
    assert "heap: 0 of 1 Go processes read from the runtime's own profile buckets (as of their last GC), " \
        "1 through uprobes on its sampling path" in _comments(prof)


def test_go_files_load_in_go_tool_pprof(go_run):
    tmp, ours_path, ours, theirs_path, theirs = go_run
    assert ours.sample_types == theirs.sample_types == HEAP_TYPES
    assert_go_tool_agrees(tmp, ours_path, ours)
    assert_go_tool_agrees(tmp, theirs_path, theirs)


def test_pid_target_sees_a_running_process(tmp_path):
    """--pid: uprobes go into that process's own libc mapping (kept across its exec); nothing else traps.
    At a quarter of the default rate: BPF samples at the mean the agent writes into heap_sample_bytes and
    the agent scales by the same (were BPF left at 512 KiB, site_a would come out 4x short)."""
    binary = build_c("heapsites")
    go = tmp_path / "go"
    # the target waits until bpfprof is recording, however long BPF takes to compile under load
    script = f'while [ ! -e "{go}" ]; do sleep 0.05; done; exec "{binary}"'
    child = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.DEVNULL)
    out = tmp_path / "pid.pb.gz"
    rec = subprocess.Popen([str(BPFPROF), "record", "--profile", "heap", "--heap-sample-bytes", str(RATE // 4),
                            "--pid", str(child.pid), "-o", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await_sampling(rec)
        go.touch()
        child.wait(timeout=120)
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=120)
        assert rec.returncode == 0, err
    finally:
        for p in (child, rec):
            if p.poll() is None:
                p.kill()
                p.wait()
    prof = read_pprof(out)
    assert {s.num_labels.get("pid") for s in prof.samples} == {child.pid}
    alloc = site_value(prof, "site_a", ALLOC_SPACE)
    assert abs(alloc - 805306368) <= TOLERANCE * 805306368
    # a process bpfprof did not start has no sampler: its malloc is probed
    assert "heap: 0 of 1 native processes sampled in process by libbpfprof_heap.so, 1 through uprobes on malloc" \
        in _comments(prof)


def test_pid_target_go_process_reads_its_buckets(tmp_path):
    """--pid of a running Go process: alloc_* are what it allocated during the capture (its buckets read
    at the start and at the end), inuse_* as of its last GC: equal to its own profile of the same moment."""
    binary = build_go("heapsites")
    start, theirs, ours = tmp_path / "start", tmp_path / "runtime-pprof.pb.gz", tmp_path / "pid.pb.gz"
    child = subprocess.Popen([str(binary), "-start-file", str(start), "-memprofile", str(theirs), "-hold"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rec = subprocess.Popen([str(BPFPROF), "record", "--profile", "heap", "--pid", str(child.pid), "-o", str(ours)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await_sampling(rec)
        start.touch()
        # the fixture prints its figures, then writes its profile and holds until stdin closes
        assert "elapsed_s" in "".join(child.stdout.readline() for _ in range(3))
        for _ in range(1000):
            if theirs.exists() and theirs.stat().st_size:
                break
            time.sleep(0.01)
        time.sleep(0.2)  # the file is closed
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=120)
        assert rec.returncode == 0, err
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    prof, go = read_pprof(ours), read_pprof(theirs)
    assert {s.num_labels.get("pid") for s in prof.samples} == {child.pid}
    # the runtime's own start-up allocations came before the capture: only the sites' stacks have alloc_*
    for site in GO_SITES:
        want = site_value(go, site, ALLOC_SPACE)
        assert want > 100 * RATE and abs(site_value(prof, site, ALLOC_SPACE) - want) <= 1 + want // 10**6
    mine, theirs_by_stack = by_stack(prof), by_stack(go)
    inuse = {st: v[INUSE_SPACE] for st, v in theirs_by_stack.items() if v[INUSE_SPACE]}
    assert {st: v[INUSE_SPACE] for st, v in mine.items() if v[INUSE_SPACE]}.keys() == inuse.keys()
    for st, want in inuse.items():
        assert abs(mine[st][INUSE_SPACE] - want) <= 1 + want // 10**6, st
