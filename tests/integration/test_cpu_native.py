"""Native and kernel stacks of C fixtures, and processes that exit mid-capture."""

from __future__ import annotations

import json
import shutil

import pytest

from fixtures.builder import build_c
from gotool import gotool_total
from recording import by_pid, of_binary, read_pprof, run_bpfprof

# Its fixtures run for a wall time and need the CPU they ask for (sample counts): no other test beside.
pytestmark = pytest.mark.alone

KERNEL = "[kernel.kallsyms]"


def test_c_stacks_reach_main(tmp_path):
    binary = build_c("callchain", flags=("-O2", "-g", "-fno-omit-frame-pointer"))
    out = tmp_path / "c.pb.gz"
    run_bpfprof("record", "--frequency", "199", "-o", str(out), "--", str(binary), "3")
    prof = read_pprof(out)
    assert prof.total() > 300
    assert prof.cum_share("main") >= 0.99
    assert prof.cum_share("spin") >= 0.5  # where the fixture burns its CPU
    assert gotool_total(tmp_path, out) == prof.total()


def test_a_loop_periodic_at_the_sampling_period_reads_its_split(tmp_path):
    """phase_locked spends the first 30 % of every 2 ms in in_a. A sampler with a fixed 2 ms period lands at
    one phase of that loop in every sample and reads 0 or 100 % (the product did, before it drew its periods:
    agent/probes/cpu.py DITHER); bpfprof must read the share and the CPU time of the fixture's own clock."""
    binary = build_c("phase_locked", flags=("-O2", "-g"))
    out = tmp_path / "phase.pb.gz"
    proc = run_bpfprof("record", "--frequency", "500", "--no-kernel", "-o", str(out), "--", str(binary), "2000", "30", "6")
    clock = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    prof = read_pprof(out)
    own = of_binary(prof, binary.name)
    assert own.total() > 2000, "too few samples to judge a share"  # ~3000: one sample's share is 0.8 points
    truth = clock["in_a"] / (clock["in_a"] + clock["in_b"])
    assert 0.25 < truth < 0.35, f"the fixture did not keep to its phases: {clock}"
    assert abs(own.cum_share("in_a") - truth) <= 0.03, f"in_a {own.cum_share('in_a'):.3f} vs its clock {truth:.3f}"
    cpu_s = sum(s.values[1] for s in own.samples) / 1e9
    assert abs(cpu_s / (clock["in_a"] + clock["in_b"]) - 1) <= 0.03, f"{cpu_s:.3f} s of CPU vs its clock's {clock}"


def test_process_that_exited_and_was_deleted_is_symbolized(tmp_path):
    """The fixture runs 1 s, exits and its binary is deleted; the capture goes on."""
    binary = tmp_path / "shortlived"
    shutil.copy(build_c("callchain"), binary)
    out = tmp_path / "exit.pb.gz"
    script = f'"{binary}" 1 & sleep 0.3; rm "{binary}"; wait; sleep 1.5'
    run_bpfprof("record", "--frequency", "199", "--no-kernel", "-o", str(out), "--", "/bin/sh", "-c", script)
    prof = read_pprof(out)
    fixture = [s for s in prof.samples if s.labels.get("process_name") == "shortlived"]
    count = sum(s.values[0] for s in fixture)
    assert count >= 100, f"only {count} samples of the fixture"
    own = [loc for s in fixture for loc, m in zip(s.locations, s.kinds, strict=True) if m.endswith("shortlived")]
    assert own, "no frames in the fixture's own binary"
    assert all(own), "a frame of the exited, deleted binary was left unresolved"
    assert sum(s.values[0] for s in fixture if {"spin", "main"} <= set(s.functions)) >= 0.9 * count


def test_kernel_frames_and_no_kernel(tmp_path):
    binary = build_c("readzero")
    with_k, without_k = tmp_path / "k.pb.gz", tmp_path / "nok.pb.gz"
    run_bpfprof("record", "--frequency", "199", "-o", str(with_k), "--", str(binary), "2")
    run_bpfprof("record", "--frequency", "199", "--no-kernel", "-o", str(without_k), "--", str(binary), "2")
    kallsyms = {line.split()[2] for line in open("/proc/kallsyms") if len(line.split()) >= 3}

    prof = read_pprof(with_k)
    in_kernel = [s for s in prof.samples if KERNEL in s.kinds]
    assert sum(s.values[0] for s in in_kernel) >= 0.8 * prof.total(), "a read() loop runs mostly in the kernel"
    kernel_names = [loc for s in in_kernel for loc, m in zip(s.locations, s.kinds, strict=True) if m == KERNEL]
    assert all(names and names[0].split()[0] in kallsyms for names in kernel_names)
    assert any("read" in names[0] for names in kernel_names)
    # user frames sit under the kernel ones, and reach the fixture's main
    assert prof.cum_share("main") >= 0.95

    prof = read_pprof(without_k)
    assert prof.total() > 100
    assert not any(KERNEL in s.kinds for s in prof.samples)
    assert prof.cum_share("main") >= 0.95
    for path, p in ((with_k, read_pprof(with_k)), (without_k, prof)):
        assert gotool_total(tmp_path, path) == p.total()


def test_folded_output(tmp_path):
    binary = build_c("callchain")
    out = tmp_path / "c.folded"
    proc = run_bpfprof("record", "--format", "folded", "-o", str(out), "--", str(binary), "1.5")
    lines = out.read_text().splitlines()
    counts = [int(line.rsplit(" ", 1)[1]) for line in lines]
    reported = int(proc.stdout.split(" samples", 1)[0])
    assert sum(counts) == reported
    assert all(line.split(";")[0].startswith(("c-callchain", "bpfprof-gate", "sh")) for line in lines)
    assert sum(c for line, c in zip(lines, counts, strict=True) if ";main;" in line) >= 0.95 * reported


def test_pid_target_records_only_that_process(tmp_path):
    import subprocess

    binary = build_c("callchain")
    child = subprocess.Popen([str(binary), "60"])  # killed below; outlives a cold BPF compile on a loaded machine
    try:
        out = tmp_path / "pid.pb.gz"
        run_bpfprof("record", "--pid", str(child.pid), "--duration", "1.5", "-o", str(out))
    finally:
        child.kill()
        child.wait()
    prof = read_pprof(out)
    assert prof.total() > 50
    assert set(by_pid(prof)) == {child.pid}
