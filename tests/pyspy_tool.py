"""py-spy (a PyPI package, the test extra) as the second reference for CPython frames: the tests and
bench/python_frames.py run it on the program the agent samples, in the same window and at the same rate."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"
START_TIMEOUT_S = 30.0


def start_py_spy(pid: int, out: Path, hz: int, py_spy: Path = PY_SPY) -> subprocess.Popen:
    """py-spy recording `pid` at `hz` without pausing it (--nonblocking: the agent's samples are not taken
    of a stopped process), raw folded stacks into `out`; returned once it says it is sampling. It ends
    with the process it watches; communicate() then reads the rest of what it said."""
    spy = subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--rate", str(hz), "--nonblocking",
                            "--format", "raw", "-o", str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    sampling = threading.Event()

    def watch() -> None:  # its first lines only ("py-spy> Sampling process ...", on stdout)
        for line in spy.stdout:
            seen.append(line)
            if "Sampling process" in line:
                sampling.set()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if not sampling.wait(timeout=START_TIMEOUT_S):
        spy.kill()
        raise AssertionError(f"py-spy did not start sampling {pid}: {''.join(seen)}")
    watcher.join()
    return spy


def py_spy_counts(path: Path, said: str = "") -> Counter[str]:
    """Samples per Python function in py-spy's raw output (`frame;frame;... count`, a frame being
    `function (file:line)`), each function counted once per stack; "" holds the total."""
    assert path.exists(), f"py-spy wrote nothing: {said}"
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[""] += int(n)
        for fn in {frame.split(" (", 1)[0] for frame in stack.split(";")}:
            counts[fn] += int(n)
    return counts
