"""CPython frames in CPU profiles (#16): a fixture with a known 70/30 split between two Python
functions (tests/fixtures/python/split7030.py), under Debian's stripped, static /usr/bin/python3.11."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from recording import BPFPROF, read_pprof, run_bpfprof

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "python" / "split7030.py"
PYTHON = "/usr/bin/python3.11"  # static libpython, not PIE, stripped
PYENV = Path("/root/.pyenv/versions")
PYENV_311 = sorted(PYENV.glob("3.11.*/bin/python3.11"))  # shared libpython, PIE
PYENV_312 = sorted(PYENV.glob("3.12.*/bin/python3.12"))  # no layout table yet


def _interpreter_samples(prof) -> list:
    """Samples of the fixture's interpreter that ran Python code (its frames, or the native loop)."""
    return [s for s in prof.samples if s.labels.get("process_name", "").startswith("python3")
            and ("<module>" in s.functions or "_PyEval_EvalFrameDefault" in s.functions)]


def record_running(tmp_path: Path, python: str, seconds: float) -> Path:
    """Profile the fixture as a process started before the agent (`record --pid`), released once the
    agent samples: every sample of it is taken with its interpreter registered."""
    out = tmp_path / "py.pb.gz"
    fixture = subprocess.Popen([python, str(FIXTURE), str(seconds + 3), "wait"], stdin=subprocess.PIPE, text=True)
    agent = subprocess.Popen([str(BPFPROF), "record", "--pid", str(fixture.pid), "--frequency",
                              "199", "--no-kernel", "--duration", str(seconds), "-o", str(out)],
                             stderr=subprocess.PIPE, text=True)
    try:
        err = []
        for line in agent.stderr:
            err.append(line)
            if line.startswith("sampling"):
                break
        else:
            raise AssertionError("agent did not start: " + "".join(err))
        fixture.stdin.write("go\n")
        fixture.stdin.flush()
        rest = agent.stderr.read()
        assert agent.wait(timeout=120) == 0, "".join(err) + rest
    finally:
        fixture.kill()
        fixture.wait()
        agent.kill()
        agent.wait()
    return out


@pytest.mark.parametrize("python", [PYTHON, *map(str, PYENV_311[:1])])
def test_python_split_matches_loop_counts(tmp_path, python):
    prof = read_pprof(record_running(tmp_path, python, 5))
    samples = _interpreter_samples(prof)
    total = sum(s.values[0] for s in samples)
    assert total >= 400, f"only {total} samples of the fixture"
    with_python = [s for s in samples if "_PyEval_EvalFrameDefault" not in s.functions]
    walked = sum(s.values[0] for s in with_python)
    assert walked == total, f"{walked} of {total} samples with Python frames"
    # every sample with Python frames reaches the module's top level, through the two functions
    assert all(s.functions.count("<module>") == 1 for s in with_python)
    hot = sum(s.values[0] for s in with_python if "hot" in s.functions)
    warm = sum(s.values[0] for s in with_python if "warm" in s.functions)
    hot_share = hot / (hot + warm)
    assert abs(hot_share - 0.70) <= 0.02, f"hot {hot_share:.3f} of {hot + warm}"
    # frames in place of the interpreter loop, native frames kept below (the C entry) and above (leaves)
    spin = [s.functions for s in with_python if "spin" in s.functions]
    assert spin, "no sample in spin"
    for names in spin:
        assert names.index("spin") < names.index("<module>") < names.index("PyEval_EvalCode") < names.index(
            "Py_RunMain")
    # spin's frames name its loop's lines (from the code object's location table), in the fixture's file
    raw = prof.raw
    spin_ids = {f.id for f in raw.function if raw.string_table[f.name] == "spin"}
    files = {raw.string_table[f.filename] for f in raw.function if f.id in spin_ids}
    lines = {ln.line for loc in raw.location for ln in loc.line if ln.function_id in spin_ids}
    assert files == {str(FIXTURE)}
    assert lines and lines <= set(SPIN_LOOP_LINES), lines


SPIN_LOOP_LINES = [i + 1 for i, text in enumerate(FIXTURE.read_text().splitlines())
                   if text.strip() in ("for i in range(n):", "total += i * i")]


def test_unsupported_version_keeps_native_frames_and_is_named(tmp_path):
    assert PYENV_312, "pyenv's CPython 3.12 is missing (packaging/setup.sh installs it)"
    out = tmp_path / "py312.pb.gz"
    run_bpfprof("record", "--frequency", "99", "--no-kernel", "-o", str(out), "--", str(PYENV_312[0]),
                str(FIXTURE), "2")
    prof = read_pprof(out)
    samples = [s for s in prof.samples if "_PyEval_EvalFrameDefault" in s.functions]
    assert sum(s.values[0] for s in samples) >= 100
    assert not any("<module>" in s.functions for s in prof.samples)
    comments = [prof.raw.string_table[i] for i in prof.raw.comment]
    assert any("CPython 3.12" in c and "not supported" in c for c in comments), comments
