"""Heap profiles against ground truth: a C fixture's known bytes per site, and a
Go fixture's own runtime/pprof heap profile of the same run."""

from __future__ import annotations

import re
import signal
import subprocess

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


def test_go_files_load_in_go_tool_pprof(go_run):
    tmp, ours_path, ours, theirs_path, theirs = go_run
    assert ours.sample_types == theirs.sample_types == HEAP_TYPES
    assert_go_tool_agrees(tmp, ours_path, ours)
    assert_go_tool_agrees(tmp, theirs_path, theirs)


def test_pid_target_sees_a_running_process(tmp_path):
    """--pid: uprobes go into that process's own libc mapping (kept across its exec); nothing else traps."""
    binary = build_c("heapsites")
    go = tmp_path / "go"
    # the target waits until bpfprof is recording, however long BPF takes to compile under load
    script = f'while [ ! -e "{go}" ]; do sleep 0.05; done; exec "{binary}"'
    child = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.DEVNULL)
    out = tmp_path / "pid.pb.gz"
    rec = subprocess.Popen([str(BPFPROF), "record", "--profile", "heap", "--pid", str(child.pid), "-o", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = rec.stderr.readline()
        assert line.startswith("sampling"), line + rec.stderr.read()
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
