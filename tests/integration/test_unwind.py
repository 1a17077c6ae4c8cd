"""Complete stacks against ground truth: leaf callers, code without frame
pointers, libc without frame pointers, Go frameless leaves (real BPF, real
fixtures, `record --unwind cfi`, the default).

Tolerances hold on a loaded 2-CPU machine: shares are of samples, not of
time, and each fixture runs long enough for a few thousand samples (a
binomial spread of ~1 pp on a 70/30 split at 2000 samples).
"""

from __future__ import annotations

import pytest

from fixtures.builder import build_c, build_go
from recording import Decoded, read_pprof, run_bpfprof

FREQUENCY_HZ = "499"
TOLERANCE = 0.03  # percentage points, as a fraction


def _record(tmp_path, name: str, *command: str, unwind: str | None = None) -> Decoded:
    out = tmp_path / f"{name}.pb.gz"
    args = ["record", "--frequency", FREQUENCY_HZ, "--no-kernel", "-o", str(out)]
    if unwind is not None:
        args += ["--unwind", unwind]
    run_bpfprof(*args, "--", *command)
    return read_pprof(out)


def _of_binary(prof: Decoded, binary_name: str) -> Decoded:
    """Only the fixture's own samples (not the gate's exec or a shell)."""
    return Decoded([s for s in prof.samples if s.labels.get("process_name") == binary_name[:15]],
                   prof.sample_types, prof.inline_pairs, prof.raw)


@pytest.mark.parametrize("flags", [("-O2", "-fno-omit-frame-pointer"), ("-O2", "-fomit-frame-pointer")],
                         ids=["frame-pointers", "omit-frame-pointer"])
def test_leaf_callers_in_known_split(tmp_path, flags):
    binary = build_c("unwind_split", flags=flags)
    prof = _of_binary(_record(tmp_path, "split", str(binary), "6"), binary.name)
    assert prof.total() > 1000
    assert prof.cum_share("main") >= 0.99
    assert abs(prof.cum_share("caller_a") - 0.7) <= TOLERANCE, prof.cum_share("caller_a")
    assert abs(prof.cum_share("caller_b") - 0.3) <= TOLERANCE, prof.cum_share("caller_b")


def test_frame_pointer_mode_still_loses_the_leaf_caller(tmp_path):
    """The baseline the issue is about: `--unwind fp` keeps bpf_get_stack's walk."""
    binary = build_c("unwind_split", flags=("-O2", "-fno-omit-frame-pointer"))
    prof = _of_binary(_record(tmp_path, "split-fp", str(binary), "2", unwind="fp"), binary.name)
    assert prof.total() > 300
    assert prof.cum_share("caller_a") + prof.cum_share("caller_b") < 0.2


def test_cpp_templates_without_frame_pointers(tmp_path):
    binary = build_c("unwind_deep", flags=("-O2", "-g", "-fomit-frame-pointer"))
    prof = _of_binary(_record(tmp_path, "deep", str(binary), "4"), binary.name)
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
    prof = _of_binary(_record(tmp_path, "qsort", str(binary), "4"), binary.name)
    assert prof.total() > 1000
    in_sort = [s for s in prof.samples if "qsort_r" in s.functions or "compare" in s.functions]
    assert sum(s.values[0] for s in in_sort) >= 0.5 * prof.total(), "the fixture did not sort"
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
