"""Complete stacks against ground truth: leaf callers, code without frame
pointers, libc without frame pointers, Go frameless leaves (real BPF, real
fixtures, `record --unwind cfi`, the default).

Tolerances hold on a loaded 2-CPU machine: shares are of samples, not of
time, and each fixture runs long enough for a few thousand samples (a
binomial spread of ~1 pp on a 70/30 split at 2000 samples).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.bpfload import libbpf
from agent.processes.tracker import ProcessTracker
from agent.unwind.tables import UnwindProc, UnwindTables
from fixtures.builder import build_c, build_go
from recording import Decoded, of_binary, read_pprof, run_bpfprof
from symbolizer.elf import ElfFile
from symbolizer.file_symbols import SymbolCache

BPF_MAP_TYPE_HASH, BPF_F_NO_PREALLOC = 1, 1

# Its fixtures run for a wall time and need the CPU they ask for (sample counts): no other test beside.
pytestmark = pytest.mark.alone

FREQUENCY_HZ = "499"
TOLERANCE = 0.03  # percentage points, as a fraction


def _record(tmp_path, name: str, *command: str, unwind: str | None = None) -> Decoded:
    return _record_with_output(tmp_path, name, *command, unwind=unwind)[0]


def _record_with_output(tmp_path, name: str, *command: str, unwind: str | None = None) -> tuple[Decoded, str]:
    """The profile, and the command's stdout (fixtures that measure their own truth print it)."""
    out = tmp_path / f"{name}.pb.gz"
    args = ["record", "--frequency", FREQUENCY_HZ, "--no-kernel", "-o", str(out)]
    if unwind is not None:
        args += ["--unwind", unwind]
    proc = run_bpfprof(*args, "--", *command)
    return read_pprof(out), proc.stdout


@pytest.mark.parametrize("flags", [("-O2", "-fno-omit-frame-pointer"), ("-O2", "-fomit-frame-pointer")],
                         ids=["frame-pointers", "omit-frame-pointer"])
def test_leaf_callers_in_known_split(tmp_path, flags):
    binary = build_c("unwind_split", flags=flags)
    prof = of_binary(_record(tmp_path, "split", str(binary), "6"), binary.name)
    assert prof.total() > 1000
    assert prof.cum_share("main") >= 0.99
    assert abs(prof.cum_share("caller_a") - 0.7) <= TOLERANCE, prof.cum_share("caller_a")
    assert abs(prof.cum_share("caller_b") - 0.3) <= TOLERANCE, prof.cum_share("caller_b")


def test_frame_pointer_mode_still_loses_the_leaf_caller(tmp_path):
    """The baseline the issue is about: `--unwind fp` keeps bpf_get_stack's walk."""
    binary = build_c("unwind_split", flags=("-O2", "-fno-omit-frame-pointer"))
    prof = of_binary(_record(tmp_path, "split-fp", str(binary), "2", unwind="fp"), binary.name)
    assert prof.total() > 300
    assert prof.cum_share("caller_a") + prof.cum_share("caller_b") < 0.2


def test_cpp_templates_without_frame_pointers(tmp_path):
    binary = build_c("unwind_deep", flags=("-O2", "-g", "-fomit-frame-pointer"))
    prof = of_binary(_record(tmp_path, "deep", str(binary), "4"), binary.name)
    chain = ["deep::Level<0>::run(unsigned long)", *(f"deep::Level<{n}>::run(unsigned long)" for n in range(1, 6)),
             "deep::through_function(std::function<unsigned long (unsigned long)> const&, unsigned long)", "main"]
    hot = [s for s in prof.samples if s.functions and s.functions[0] == chain[0]]
    total = sum(s.values[0] for s in hot)
    assert total >= 0.9 * prof.total() and total > 500
    complete = sum(s.values[0] for s in hot if _in_order(s.functions, chain))
    assert complete >= 0.99 * total, f"{complete} of {total} samples in Level<0> have the whole chain"


def _in_order(functions: list[str], chain: list[str]) -> bool:
    """`chain` (leaf first) appears in `functions` in that order, other frames (inlined, std::) between."""
    it = iter(functions)
    return all(any(f == want for f in it) for want in chain)


def test_caller_above_libc_without_frame_pointers(tmp_path):
    binary = build_c("unwind_qsort")
    prof = of_binary(_record(tmp_path, "qsort", str(binary), "4"), binary.name)
    assert prof.total() > 1000
    # qsort_r by the alias perf picks from libc6-dbg's .symtab (__GI___qsort_r), or .dynsym's without it
    in_sort = [s for s in prof.samples if "compare" in s.functions
               or any(f.removeprefix("__GI_").lstrip("_") == "qsort_r" for f in s.functions)]
    assert sum(s.values[0] for s in in_sort) >= 0.5 * prof.total(), "the fixture did not sort"
    # libc's static merge sort is named from its separate debug info, as perf report names it
    msort = sum(s.values[0] for s in prof.samples if "msort_with_tmp.part.0" in s.functions)
    assert msort >= 0.3 * prof.total(), (msort, prof.total())
    anonymous = sum(s.values[0] for s in prof.samples if any(f.startswith("libc.so.6+0x") for f in s.functions))
    assert anonymous <= 0.01 * prof.total(), (anonymous, prof.total())
    assert prof.cum_share("sort_round") >= 0.95
    assert prof.cum_share("main") >= 0.95


def test_go_frameless_leaf_matches_runtime_pprof(tmp_path):
    binary = build_go("frameless", stripped=True)
    theirs = tmp_path / "runtime-pprof.pb.gz"
    ours = _record(tmp_path, "frameless", str(binary), "-duration", "15s", "-hz", "500",
                   "-cpuprofile", str(theirs))
    go = read_pprof(theirs)
    assert go.total() > 2000, "the fixture's own profile is too small to compare with"
    assert 0.4 < go.cum_share("main.callerA") < 0.6, "the fixture did not run its 50/30/20 split"
    for fn in ("main.callerA", "main.callerB", "main.callerC"):
        assert abs(ours.cum_share(fn) - go.cum_share(fn)) <= TOLERANCE, (
            f"{fn}: bpfprof {ours.cum_share(fn):.3f} vs runtime/pprof {go.cum_share(fn):.3f}")
    assert ours.cum_share("main.worker") >= 0.95


RECURSION_DEPTH = 120  # tests/fixtures/c/unwind_recursion.c DEPTH


def test_recursion_deeper_than_a_stack_copy(tmp_path):
    """120 frames of ~100 bytes without frame pointers (~12 KiB of stack): every stack reaches `main`,
    the two callers split as the fixture's own CPU clock around each says (equal work, ~50/50), and a
    stack from the leaf has every frame."""
    binary = build_c("unwind_recursion", flags=("-O2", "-fomit-frame-pointer"))
    recorded, stdout = _record_with_output(tmp_path, "recursion", str(binary), "8")
    prof = of_binary(recorded, binary.name)
    truth = {fields[0]: int(fields[1]) for fields in (line.split() for line in stdout.splitlines())
             if len(fields) == 2 and fields[0] in ("caller_a", "caller_b")}
    truth_a = truth["caller_a"] / (truth["caller_a"] + truth["caller_b"])
    assert abs(truth_a - 0.5) <= 0.1, f"the fixture's equal work took {truth_a:.3f} / {1 - truth_a:.3f} of its CPU"
    assert prof.total() > 2000
    assert prof.cum_share("main") >= 0.99, prof.cum_share("main")
    assert abs(prof.cum_share("caller_a") - truth_a) <= 0.02, (prof.cum_share("caller_a"), truth_a)
    assert abs(prof.cum_share("caller_b") - (1 - truth_a)) <= 0.02, (prof.cum_share("caller_b"), 1 - truth_a)
    in_leaf = [s for s in prof.samples if s.functions and s.functions[0] == "burn"]
    leaf_total = sum(s.values[0] for s in in_leaf)
    assert leaf_total >= 0.9 * prof.total(), "the fixture did not burn in its leaf"
    full = sum(s.values[0] for s in in_leaf if _full_recursion(s.functions))
    assert full >= 0.99 * leaf_total, f"{full} of {leaf_total} samples in burn have all {RECURSION_DEPTH} frames"


def _full_recursion(functions: list[str]) -> bool:
    """burn, recurse x RECURSION_DEPTH, one caller, main: leaf first, nothing between."""
    head = ["burn", *["recurse"] * RECURSION_DEPTH]
    rest = functions[len(head):len(head) + 2]
    return functions[:len(head)] == head and rest in (["caller_a", "main"], ["caller_b", "main"])


EXEC_EVERY_MS = 200
EXEC_FILES = 50  # 10 s of execs


def _fresh_copies(binary: Path, where: Path, n: int) -> list[Path]:
    """`n` copies under new paths; every odd one with its build id changed (first byte of the note's
    descriptor), so neither a path nor, for half of them, a build id was ever seen before."""
    with ElfFile(binary) as elf:
        note = elf.headers.section(".note.gnu.build-id")
        build_id = elf.gnu_build_id
    assert note is not None and build_id, "the fixture needs a GNU build id"
    desc = note.offset + 16  # namesz, descsz, type (4 bytes each), then "GNU\0"
    copies = []
    for i in range(n):
        path = where / f"fresh-{i:03d}"
        shutil.copyfile(binary, path)
        if i % 2:
            with open(path, "r+b") as f:
                f.seek(desc)
                first = f.read(1)[0]
                f.seek(desc)
                f.write(bytes([first ^ 0xFF]))
        path.chmod(0o755)
        copies.append(path)
    with ElfFile(copies[1]) as elf:
        assert elf.gnu_build_id != build_id
    return copies


def test_fresh_binary_every_200ms_complete_from_the_first_sample(tmp_path, record_property):
    """One process execs a never-seen file every 200 ms (of CPU) for 10 s: every file's samples are
    symbolized and reach `main` through the fixture's frames, the first file's as much as the last one's.

    The pid stays; each sample is resolved in the image it ran in, so its process name is that file's
    name and the mapping of its leaf that file. The expected CPU time per file is the total over the
    number of files."""
    binary = build_c("exec_chain", flags=("-O2", "-fomit-frame-pointer"))
    copies = _fresh_copies(binary, tmp_path, EXEC_FILES)
    out = tmp_path / "fresh.pb.gz"
    proc = run_bpfprof("record", "--frequency", FREQUENCY_HZ, "--no-kernel", "-o", str(out), "--",
                       str(copies[0]), str(EXEC_EVERY_MS), *map(str, copies[1:]))
    summary = [line for line in proc.stdout.splitlines()
               if "samples of" in line or line.startswith(("dropped", "unwind"))]
    record_property("record_summary", " | ".join(summary))
    prof = read_pprof(out)
    names = {p.name for p in copies}
    chain = [s for s in prof.samples if s.labels.get("process_name") in names]
    total = sum(s.values[0] for s in chain)
    assert total > 0.5 * EXEC_FILES * EXEC_EVERY_MS / 1000 * int(FREQUENCY_HZ), f"too few samples: {summary}"
    # CPU time, not sample counts: the sampling rate is drawn anew every 40-120 ms (agent/probes/cpu.py
    # DITHER), so a 200 ms file's count varies with its draws, while each sample weighs its own period.
    total_ms = sum(s.values[1] for s in chain) / 1e6
    complete: dict[str, float] = dict.fromkeys((str(p) for p in copies), 0.0)
    for s in chain:
        if s.functions[:3] == ["burn", "work", "main"] and s.kinds[0] in complete:
            assert Path(s.kinds[0]).name == s.labels["process_name"], "a sample resolved in another image"
            complete[s.kinds[0]] += s.values[1] / 1e6
    assert sum(complete.values()) >= 0.95 * total_ms, f"{sum(complete.values())} of {total_ms} ms complete; {summary}"
    short = {Path(f).name: round(ms) for f, ms in complete.items() if ms < 0.8 * total_ms / EXEC_FILES}
    assert not short, f"files with less complete CPU time than 80 % of {total_ms / EXEC_FILES:.0f} ms: {short}"


def test_a_table_registered_after_its_process_exited_is_deleted_from_bpf():
    """BPF deletes a process's table at its exit; one the worker wrote after that (a snapshot registered
    moments too late, as under churn) stayed until the pid was reused and, in numbers, filled the table.
    A real BPF hash map, as unwind_procs is (root, as the BPF tests)."""
    procs_fd = libbpf.map_create(BPF_MAP_TYPE_HASH, "unwind_procs", 4, ctypes.sizeof(UnwindProc), 64,
                                 flags=BPF_F_NO_PREALLOC)
    try:
        tracker = ProcessTracker(cache=SymbolCache(), max_processes=64)
        tables = UnwindTables({"unwind_rows": -1, "unwind_procs": procs_fd, "unwind_stats": -1}, tracker, 1024)
        tables._file_rows = lambda fs: None  # every mapping walked by frame pointers: no rows map needed
        live = subprocess.Popen(["sleep", "60"])
        late = subprocess.Popen(["sleep", "60"])
        try:
            for child in (live, late):
                info = tracker.observe(child.pid)
                assert info is not None and tables.register(info)
        finally:
            late.kill()
            late.wait()  # gone; BPF's exit hook is not loaded here, as if it had run before the write
        try:
            tables.forget_dead(lambda pid: os.path.exists(f"/proc/{pid}"))
            assert libbpf.map_keys_u32(procs_fd) == [live.pid]
            assert tables.stats.stale_deleted == 1
        finally:
            live.kill()
            live.wait()
    finally:
        os.close(procs_fd)
