"""CPython frames (#16): shares of the 70/30 fixture by bpfprof and by py-spy, and the BPF time per
CPU sample with the Python walk (3.11) beside the same program under an interpreter it skips (3.12).

Run as root under the heavy lock:
    flock /tmp/work/heavy.lock .venv/bin/python bench/python_frames.py [--py-spy PATH]
Prints figures; asserts nothing. py-spy: a PyPI package (pip install py-spy into any venv).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
FIXTURE = ROOT / "tests" / "fixtures" / "python" / "split7030.py"
PY311 = "/usr/bin/python3.11"
PY312 = next(iter(sorted(Path("/root/.pyenv/versions").glob("3.12.*/bin/python3.12"))), None)


def bpfprof_shares(python: str, seconds: int, hz: int) -> tuple[float, int, float]:
    """(hot share of hot+warm, samples, mean BPF ns per run of on_cpu_sample)."""
    from recording import read_pprof

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.pb.gz"
        proc = subprocess.Popen([sys.executable, "-m", "agent", "record", "--frequency", str(hz), "--no-kernel",
                                 "-o", str(out), "--", python, str(FIXTURE), str(seconds)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ns = 0.0
        deadline = time.monotonic() + seconds + 120
        while proc.poll() is None and time.monotonic() < deadline:  # the last reading before the agent exits
            time.sleep(1)
            try:
                progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                                  text=True, timeout=30).stdout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                continue
            for p in progs:
                if p.get("name", "").startswith("on_cpu_sample") and p.get("run_cnt"):
                    ns = p["run_time_ns"] / p["run_cnt"]
        proc.wait(timeout=seconds + 120)
        prof = read_pprof(out)
    hot = sum(s.values[0] for s in prof.samples if "hot" in s.functions)
    warm = sum(s.values[0] for s in prof.samples if "warm" in s.functions)
    return hot / max(hot + warm, 1), hot + warm, ns


def pyspy_shares(pyspy: str, python: str, seconds: int, hz: int) -> tuple[float, int, float]:
    """(hot share, samples, py-spy's CPU seconds) from py-spy's raw (folded) output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spy.txt"
        r = subprocess.run([pyspy, "record", "--format", "raw", "--rate", str(hz), "-o", str(out), "--",
                            python, str(FIXTURE), str(seconds)], capture_output=True, text=True,
                           timeout=seconds + 60)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        counts: Counter[str] = Counter()
        for line in out.read_text().splitlines() if out.exists() else ():
            stack, _, n = line.rpartition(" ")
            if " (" in stack:
                for fn in ("hot", "warm"):
                    if f";{fn} (" in ";" + stack:
                        counts[fn] += int(n)
        if r.returncode != 0 and not counts:
            print("py-spy failed:", r.stderr.strip()[-300:])
    total = counts["hot"] + counts["warm"]
    return counts["hot"] / max(total, 1), total, cpu.ru_utime + cpu.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--hz", type=int, default=99)
    ap.add_argument("--py-spy", default="")
    a = ap.parse_args()
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text().strip()
    stats.write_text("1")
    try:
        run(a)
    finally:
        stats.write_text(before)


def run(a: argparse.Namespace) -> None:
    share, n, ns311 = bpfprof_shares(PY311, a.seconds, a.hz)
    print(f"bpfprof  {PY311}: hot {share:.3f} (truth 0.700) over {n} samples; on_cpu_sample {ns311:.0f} ns/run")
    if PY312 is not None:
        _, _, ns312 = bpfprof_shares(str(PY312), a.seconds, a.hz)
        added = f"the walk adds ~{ns311 - ns312:.0f} ns per sample" if ns311 and ns312 else "not measured"
        print(f"bpfprof  {PY312} (no Python walk): on_cpu_sample {ns312:.0f} ns/run; {added}")
    if a.py_spy:
        share, n, cpu = pyspy_shares(a.py_spy, PY311, a.seconds, a.hz)
        print(f"py-spy   {PY311}: hot {share:.3f} over {n} samples; py-spy + fixture CPU {cpu:.1f} s")


if __name__ == "__main__":
    main()
