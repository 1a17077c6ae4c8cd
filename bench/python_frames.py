"""CPython frames (#16): what reading them costs, beside py-spy on the same program at the same rate.

For each interpreter (pyenv's 3.9-3.13, Debian's 3.11) the 70/30 fixture (tests/fixtures/python/
split7030.py, which measures its own functions' CPU) runs until it has used --cpu-seconds of CPU, once
under `bpfprof record --pid` and once under `py-spy record --pid` (both attach to the running process,
at --hz). Printed per interpreter:
- bpfprof: hot share vs. the fixture's own clock, samples, mean BPF ns per run of on_cpu_sample
  (kernel.bpf_stats_enabled), the added BPF ns per sample against the same program under an interpreter
  it does not walk (pyenv's 3.8: native frames only), and the agent's CPU per sample (its whole run,
  start-up included, from wait4's rusage);
- py-spy: hot share, samples, its CPU (wait4's rusage) and the ratio of the two tools' CPU.

Run as root under the heavy lock:
    flock /tmp/work/heavy.lock .venv/bin/python bench/python_frames.py
py-spy: a PyPI package, in the test extra (the venv's is the default; --py-spy PATH for another).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
FIXTURE = ROOT / "tests" / "fixtures" / "python" / "split7030.py"
PYENV = Path("/root/.pyenv/versions")


@dataclass
class Result:
    hot_share: float
    samples: int
    truth: float  # the fixture's own hot share
    tool_cpu_s: float  # the profiler's CPU (user + system)
    bpf_ns: float = 0.0  # mean run time of on_cpu_sample (bpfprof only)


def interpreters() -> list[str]:
    from agent.python.layouts import LAYOUTS

    found = ["/usr/bin/python3.11"] if Path("/usr/bin/python3.11").exists() else []
    for v in sorted(LAYOUTS):
        found += [str(p) for p in sorted(PYENV.glob(f"3.{v[1]}.*/bin/python3.{v[1]}"))]
    return found


def cpu_of(pid: int) -> float:
    """Wait for child `pid`; its user + system CPU seconds."""
    _, _, ru = os.wait4(pid, 0)
    return ru.ru_utime + ru.ru_stime


def start_fixture(python: str, cpu_seconds: float) -> subprocess.Popen:
    fx = subprocess.Popen([python, str(FIXTURE), str(cpu_seconds), "wait"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    assert fx.stdout.readline().strip() == "ready"
    return fx


def release(fx: subprocess.Popen) -> float:
    """Let the fixture run; its own hot share once it is done."""
    fx.stdin.write("go\n")
    fx.stdin.flush()
    rows = json.loads(fx.stdout.read().strip().splitlines()[-1])["cpu"]
    cpu = Counter()
    for _, name, s in rows:
        cpu[name] += s
    cpu_of(fx.pid)
    fx.returncode = 0
    return cpu["hot"] / (cpu["hot"] + cpu["warm"])


class BpfStats:
    """Polls bpftool for on_cpu_sample's run_time_ns / run_cnt while a capture runs (the last reading)."""

    def __init__(self) -> None:
        self.ns = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                                  text=True, timeout=30).stdout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                continue
            for p in progs:
                if p.get("name", "").startswith("on_cpu_sample") and p.get("run_cnt"):
                    self.ns = p["run_time_ns"] / p["run_cnt"]

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.ns


def bpfprof_run(python: str, cpu_seconds: float, hz: int) -> Result:
    from recording import read_pprof

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.pb.gz"
        fx = start_fixture(python, cpu_seconds)
        agent = subprocess.Popen([sys.executable, "-m", "agent", "record", "--pid", str(fx.pid), "--frequency",
                                  str(hz), "--no-kernel", "-o", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        for line in agent.stderr:
            if line.startswith("sampling"):
                break
        stats = BpfStats()
        truth = release(fx)
        ns = stats.stop()
        agent.send_signal(signal.SIGINT)
        agent.stderr.read()
        agent_cpu = cpu_of(agent.pid)
        agent.returncode = 0
        prof = read_pprof(out)
    hot = sum(s.values[0] for s in prof.samples if "hot" in s.functions)
    warm = sum(s.values[0] for s in prof.samples if "warm" in s.functions)
    total = sum(s.values[0] for s in prof.samples)
    return Result(hot / max(hot + warm, 1), total, truth, agent_cpu, ns)


def pyspy_run(pyspy: str, python: str, cpu_seconds: float, hz: int) -> Result:
    from pyspy_tool import py_spy_counts, start_py_spy

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spy.txt"
        fx = start_fixture(python, cpu_seconds)
        spy = start_py_spy(fx.pid, out, hz, Path(pyspy))
        truth = release(fx)
        said = spy.stdout.read()  # to its end: py-spy exits with the fixture
        spy_cpu = cpu_of(spy.pid)  # wait4's rusage, so not Popen.wait
        spy.returncode = 0
        counts = py_spy_counts(out, said)
    return Result(counts["hot"] / max(counts["hot"] + counts["warm"], 1), counts[""], truth, spy_cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-seconds", type=float, default=5.0)
    ap.add_argument("--hz", type=int, default=997)
    venv_spy = Path(sys.executable).parent / "py-spy"  # the test extra installs it
    ap.add_argument("--py-spy", default=str(venv_spy) if venv_spy.exists() else "",
                    help="path of a py-spy binary (default: the venv's; none: bpfprof only)")
    a = ap.parse_args()
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text().strip()
    stats.write_text("1")
    try:
        run(a)
    finally:
        stats.write_text(before)


def run(a: argparse.Namespace) -> None:
    base = sorted(PYENV.glob("3.8.*/bin/python3.8"))
    base_ns = 0.0
    if base:
        r = bpfprof_run(str(base[0]), a.cpu_seconds, a.hz)
        base_ns = r.bpf_ns
        print(f"baseline {base[0]} (no Python walk): on_cpu_sample {r.bpf_ns:.0f} ns/run; agent "
              f"{r.tool_cpu_s:.2f} s CPU for {r.samples} samples ({1e6 * r.tool_cpu_s / max(r.samples, 1):.0f} us each)")
    print(f"{a.cpu_seconds} s of fixture CPU per run at {a.hz} Hz")
    for python in interpreters():
        b = bpfprof_run(python, a.cpu_seconds, a.hz)
        added = f"{b.bpf_ns - base_ns:+.0f} ns vs 3.8" if base_ns and b.bpf_ns else "no baseline"
        print(f"{python}\n  bpfprof: hot {b.hot_share:.4f} (fixture {b.truth:.4f}, error "
              f"{100 * abs(b.hot_share - b.truth):.2f} points) of {b.samples} samples; on_cpu_sample "
              f"{b.bpf_ns:.0f} ns/run ({added}); agent {b.tool_cpu_s:.2f} s CPU, "
              f"{1e6 * b.tool_cpu_s / max(b.samples, 1):.0f} us per sample")
        if a.py_spy:
            s = pyspy_run(a.py_spy, python, a.cpu_seconds, a.hz)
            print(f"  py-spy:  hot {s.hot_share:.4f} (fixture {s.truth:.4f}, error "
                  f"{100 * abs(s.hot_share - s.truth):.2f} points) of {s.samples} samples; py-spy "
                  f"{s.tool_cpu_s:.2f} s CPU, {1e6 * s.tool_cpu_s / max(s.samples, 1):.0f} us per sample; "
                  f"bpfprof/py-spy CPU {b.tool_cpu_s / max(s.tool_cpu_s, 1e-9):.2f}")


if __name__ == "__main__":
    main()
