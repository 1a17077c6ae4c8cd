"""CPython frames in CPU profiles (#16): a fixture with a known 70/30 split between two Python
functions (tests/fixtures/python/split7030.py), under Debian's stripped, static /usr/bin/python3.11."""

from __future__ import annotations

from pathlib import Path

from recording import read_pprof, run_bpfprof

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "python" / "split7030.py"
PYTHON = "/usr/bin/python3.11"


def _shares(prof) -> tuple[float, float, float, int]:
    """(hot share, warm share, <module> share, samples) over the fixture's samples inside hot or warm."""
    fixture = [s for s in prof.samples if s.labels.get("process_name", "").startswith("python3")]
    total = sum(s.values[0] for s in fixture)
    hot = sum(s.values[0] for s in fixture if "hot" in s.functions)
    warm = sum(s.values[0] for s in fixture if "warm" in s.functions)
    module = sum(s.values[0] for s in fixture if "<module>" in s.functions)
    return hot / max(hot + warm, 1), warm / max(hot + warm, 1), module / max(total, 1), total


def test_python_split_matches_loop_counts(tmp_path):
    out = tmp_path / "py.pb.gz"
    run_bpfprof("record", "--frequency", "199", "--no-kernel", "-o", str(out), "--", PYTHON, str(FIXTURE), "6")
    prof = read_pprof(out)
    hot, warm, module, total = _shares(prof)
    assert total >= 400, f"only {total} samples of the fixture"
    assert abs(hot - 0.70) <= 0.02 and abs(warm - 0.30) <= 0.02, f"hot {hot:.3f} warm {warm:.3f}"
    # every sample of the interpreter reaches the module's top level through Python frames
    assert module == 1.0, f"{module:.3f} of the samples reach <module>"
    # the Python frames are in place of the interpreter loop, with native frames kept around them
    for s in prof.samples:
        if "spin" in s.functions:
            names = s.functions
            assert names.index("spin") < names.index("<module>")
            assert "_PyEval_EvalFrameDefault" not in names
            assert names[-1] in ("_start", "__libc_start_main", "main", "Py_BytesMain") or "main" in names[-1]
            break
    else:
        raise AssertionError("no sample in spin")
