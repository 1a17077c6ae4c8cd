"""Goroutine profile against ground truth: the goroutines fixture parks known numbers of
goroutines in known functions and writes its own runtime/pprof goroutine profile while they
are parked; ours must have the same counts per park function, labels and stacks."""

from __future__ import annotations

import subprocess
from collections import Counter

from agent.go.goroutines import go_binary
from fixtures.builder import build_go
from gotool import GO, go_env, gotool_total
from recording import Decoded, read_pprof, run_bpfprof
from symbolizer.elf import ElfFile

PARKS = {"main.parkA": 120, "main.parkB": 60, "main.parkC": 30}
CREATED_BY = {"main.parkA": "main.main", "main.parkB": "main.main.func2", "main.parkC": "main.main"}


def by_park(prof: Decoded) -> dict[str, Counter]:
    """Per park function: count by (stack, sorted pprof labels other than ours)."""
    out: dict[str, Counter] = {name: Counter() for name in PARKS}
    for s in prof.samples:
        park = next((f for f in s.functions if f in PARKS), None)
        if park is not None:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("process_name", "created_by")))
            out[park][(tuple(s.functions), labels)] += s.values[0]
    return out


def _comments(prof: Decoded) -> list[str]:
    st = prof.raw.string_table
    return [st[i] for i in prof.raw.comment]


def check_against_witness(tmp_path, out, witness) -> Decoded:
    prof, go = read_pprof(out), read_pprof(witness)
    assert prof.sample_types == [("goroutine", "count")]
    assert prof.raw.string_table[prof.raw.period_type.type] == "goroutine"
    ours, theirs = by_park(prof), by_park(go)
    for park, want in PARKS.items():
        assert sum(theirs[park].values()) == want, (park, theirs[park])  # the fixture did what it says
        got = sum(ours[park].values())
        assert abs(got - want) <= 0.02 * want, (park, got, want)
        assert ours[park] == theirs[park], park  # same stacks (runtime/pprof's frames) and labels
        assert {s.labels.get("created_by") for s in prof.samples if park in s.functions} == {CREATED_BY[park]}
    assert not [s for s in prof.samples if "main.parkD" in s.functions]  # the churn goroutines exited
    assert not [s for s in prof.samples if any(f.startswith("runtime.bg") for f in s.functions)]  # system ones
    assert gotool_total(tmp_path, out, "goroutine", "minimum") == prof.total(0)
    return prof


def test_goroutines_created_during_the_capture_match_runtime_pprof(tmp_path):
    binary = build_go("goroutines")
    out, witness = tmp_path / "goroutine.pb.gz", tmp_path / "witness.pb.gz"
    run_bpfprof("record", "--profile", "goroutine", "-o", str(out), "--", str(binary), str(witness), "1", "0.5")
    prof = check_against_witness(tmp_path, out, witness)
    events = int(_comments(prof)[0].split("goroutines: ", 1)[1].split()[0])
    assert events >= sum(PARKS.values()), _comments(prof)  # each was born under the probes (parks are read)
    # read while paused at runtime.exit: the exiting main goroutine where it is, not where it last parked
    exiting = [s.functions for s in prof.samples if "main.main" in s.functions and "os.Exit" in s.functions]
    assert len(exiting) == 1 and exiting[0][0].startswith("runtime.exit"), exiting


def test_stripped_binary_uses_the_version_table(tmp_path):
    binary = build_go("goroutines", stripped=True)
    out, witness = tmp_path / "goroutine.pb.gz", tmp_path / "witness.pb.gz"
    run_bpfprof("record", "--profile", "goroutine", "-o", str(out), "--", str(binary), str(witness), "1", "0.5")
    check_against_witness(tmp_path, out, witness)


def test_goroutines_parked_before_the_capture_are_read_from_memory(tmp_path):
    binary = build_go("goroutines")
    out, witness = tmp_path / "goroutine.pb.gz", tmp_path / "witness.pb.gz"
    fixture = subprocess.Popen([str(binary), str(witness), "0", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert fixture.stdout.readline().strip() == "parked"
        run_bpfprof("record", "--profile", "goroutine", "--pid", str(fixture.pid), "--duration", "1",
                    "-o", str(out))
        assert fixture.poll() is None  # the capture ended with the goroutines still parked
    finally:
        fixture.kill()
        fixture.wait()
    prof = check_against_witness(tmp_path, out, witness)
    seeded = int(_comments(prof)[0].split(", ")[1].split()[0])  # "N read at start from memory"
    assert seeded >= 1 + sum(PARKS.values()), _comments(prof)  # system goroutines are read too, then left out
    main = [s for s in prof.samples if "main.main" in s.functions and not any(p in s.functions for p in PARKS)]
    assert [s.functions[:3] for s in main] == [["runtime.gopark", "time.Sleep", "main.main"]]


def test_birth_and_death_probes_are_the_runtimes_own_calls(tmp_path):
    """The uprobes go on casgstatus's call sites in newproc1 and gdestroy, found by scanning their code:
    the same instructions as `go tool objdump` lists as CALL runtime.casgstatus there. Nothing else."""
    binary = build_go("goroutines")
    found = go_binary(str(binary))
    assert found is not None and found.reads_parks
    out = subprocess.run([str(GO), "tool", "objdump", "-s", r"^runtime\.(newproc1|gdestroy|goexit0)$", str(binary)],
                         env=go_env(tmp_path), capture_output=True, text=True, check=True).stdout
    calls = {int(line.split()[1], 16) for line in out.splitlines() if "CALL runtime.casgstatus(SB)" in line}
    assert len(calls) >= 2
    with ElfFile(str(binary)) as elf:
        assert {elf.offset_for_vaddr(a) for a in calls} == set(found.life_sites)
    assert [prog for prog, _ in found.uprobes()] == ["gor_casgstatus"] * len(calls)  # no gopark, no entry
