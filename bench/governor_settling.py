"""bench: the overhead governor's settling curve, with the agent driven over its budget.

    flock /tmp/work/heavy.lock .venv/bin/python bench/governor_settling.py
    flock /tmp/work/heavy.lock .venv/bin/python bench/governor_settling.py --frequency 4000 --budget 3 --seconds 120
    flock /tmp/work/heavy.lock .venv/bin/python bench/governor_settling.py --profiles cpu,offcpu

`bpfprof agent` profiles the whole machine at `--frequency` Hz with
`limits.cpu_percent: --budget` while the Go fixture cpusplit burns its 70/30
split on both CPUs and `--rate` short-lived processes a minute come and go.
Every export interval (10 s: each point holds one interval's build) it prints
the agent's cost over it, measured from outside
(its /proc/PID/stat CPU time, every thread, plus its BPF run time from the
kernel: kernel.bpf_stats_enabled is switched on for the run and restored),
next to the frequency the governor set (and, with `--profiles cpu,offcpu`,
the off-CPU threshold it steers too) and the cost by family the agent
measured itself at its last decision (what it sheds first). At the end: when the cost entered
budget +-20 % for good, the mean cost after that, and the fixture's shares
and CPU time in our profiles against its own runtime/pprof and its rusage.
Figures, never pass/fail on time.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import yaml  # noqa: E402
from agent_churn import Churn, build_churn  # noqa: E402

from fixtures.builder import build_go  # noqa: E402
from recording import BPFPROF, read_pprof  # noqa: E402

STEP_S = 10.0  # the export interval run() configures: every point holds one build
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of every thread of `pid` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def scrape(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@dataclass
class Settling:
    budget_percent: float
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (s since start, Hz, cost % of CPUs)
    offcpu_us: list[float] = field(default_factory=list)  # the off-CPU threshold at each point of the curve
    bpf_percent: list[float] = field(default_factory=list)  # the BPF programs' part of each point's cost
    family_percent: list[dict[str, float]] = field(default_factory=list)  # the agent's own cost by family
    pprof_dir: Path | None = None
    fixture_pid: int = 0
    fixture_cpu_s: float = 0.0
    witness: Path | None = None
    log: str = ""

    def settled_at(self, tolerance: float = 0.2) -> float | None:
        """Start of the first step from which every later step's cost is within budget +-tolerance."""
        lo, hi = self.budget_percent * (1 - tolerance), self.budget_percent * (1 + tolerance)
        at = None
        for t, _hz, cost in self.curve:
            if lo <= cost <= hi:
                at = t - STEP_S if at is None else at
            else:
                at = None
        return at

    def mean_cost_after(self, t0: float) -> float:
        costs = [c for t, _hz, c in self.curve if t - STEP_S >= t0]
        return sum(costs) / len(costs) if costs else 0.0


def run(work: Path, seconds: float, frequency_hz: int, budget_percent: float, floor_hz: int, rate: float,
        interval_s: float = 10.0, profiles: tuple[str, ...] = ("cpu",)) -> Settling:
    """One run; cpusplit lives for `seconds`, the agent a little longer on both sides."""
    churn_exe = build_churn(work)
    split_exe = build_go("cpusplit")
    port_sock = __import__("socket").socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    pprof_dir = work / "pprof"
    # Only the load's processes: on a shared machine others' processes would be part of the cost.
    config = {"profiling": {"profiles": list(profiles), "frequency_hz": frequency_hz},
              "selection": {"exe_names": [churn_exe.name, split_exe.name]},
              "limits": {"cpu_percent": budget_percent, "min_frequency_hz": floor_hz},
              "export": {"interval_s": interval_s, "pprof_dir": {"path": str(pprof_dir)}},
              "metrics": {"listen": f"127.0.0.1:{port}"}}
    (work / "agent.yaml").write_text(yaml.safe_dump(config))
    stats_before = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1\n")
    out = Settling(budget_percent, pprof_dir=pprof_dir, witness=work / "witness.pb.gz")
    log_path = work / "agent.log"
    agent = subprocess.Popen([str(BPFPROF), "agent", "--config", str(work / "agent.yaml")],
                             stderr=open(log_path, "w"), start_new_session=True)  # noqa: SIM115
    try:
        deadline = time.monotonic() + 90
        while scrape(port).get("bpfprof_ready") != 1.0:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {log_path.read_text()}")
            time.sleep(0.2)
        cpus = os.cpu_count() or 1
        split = subprocess.Popen([str(split_exe), "-duration", f"{seconds}s", "-cpuprofile", str(out.witness)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.fixture_pid = split.pid
        t0 = time.monotonic()
        with Churn(churn_exe, rate, 100):
            prev_t, prev_cpu, prev_bpf = t0, proc_cpu_s(agent.pid), scrape(port).get("bpfprof_bpf_run_seconds_total", 0)
            while True:
                done, status, usage = os.wait4(split.pid, os.WNOHANG)
                if done:
                    break
                time.sleep(max(0.0, prev_t + STEP_S - time.monotonic()))
                now, cpu, m = time.monotonic(), proc_cpu_s(agent.pid), scrape(port)
                bpf = m.get("bpfprof_bpf_run_seconds_total", prev_bpf)
                cost = ((cpu - prev_cpu) + (bpf - prev_bpf)) / (now - prev_t) / cpus * 100
                out.curve.append((round(now - t0, 1), int(m.get("bpfprof_sampling_frequency_hz", 0)), cost))
                out.offcpu_us.append(m.get("bpfprof_offcpu_min_block_seconds", 0.0) * 1e6)
                out.bpf_percent.append((bpf - prev_bpf) / (now - prev_t) / cpus * 100)
                out.family_percent.append({k.split('"')[1]: v for k, v in m.items()
                                           if k.startswith("bpfprof_family_cost_cpu_percent{")})
                prev_t, prev_cpu, prev_bpf = now, cpu, bpf
        split.returncode = os.waitstatus_to_exitcode(status)
        out.fixture_cpu_s = usage.ru_utime + usage.ru_stime
        time.sleep(1)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        BPF_STATS.write_text(stats_before + "\n")
    out.log = log_path.read_text()
    return out


def fixture_figures(s: Settling) -> tuple[float, float, float, float]:
    """(our spinA share, runtime/pprof's, our cpu/nanoseconds of the fixture in s, its rusage CPU s)."""
    hit = total = cpu_ns = 0
    for f in sorted(s.pprof_dir.glob("*.cpu.pb.gz")):
        for smp in read_pprof(f).samples:
            if smp.num_labels.get("pid") != s.fixture_pid:
                continue
            total += smp.values[1]
            cpu_ns += smp.values[1]
            hit += smp.values[1] if "main.spinA" in smp.functions else 0
    go = read_pprof(s.witness)
    return (hit / total if total else 0.0), go.cum_share("main.spinA"), cpu_ns / 1e9, s.fixture_cpu_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--frequency", type=int, default=2000)
    ap.add_argument("--budget", type=float, default=1.0, help="limits.cpu_percent")
    ap.add_argument("--floor", type=int, default=19)
    ap.add_argument("--rate", type=float, default=600, help="short-lived processes a minute")
    ap.add_argument("--profiles", default="cpu", help="profiling.profiles (cpu, or cpu,offcpu)")
    args = ap.parse_args()
    profiles = tuple(args.profiles.split(","))
    with tempfile.TemporaryDirectory(prefix="bpfprof-governor-") as tmp:
        s = run(Path(tmp), args.seconds, args.frequency, args.budget, args.floor, args.rate, profiles=profiles)
        print(f"budget {args.budget}% of {os.cpu_count()} CPUs; start {args.frequency} Hz, floor {args.floor} Hz; "
              f"{args.rate:g} processes/min; {','.join(profiles)}")
        offcpu = "offcpu" in profiles
        print("   t(s)      Hz   cost(% of CPUs)  of it BPF" + ("   off-CPU threshold (us)" if offcpu else "")
              + "   the agent's cost by family at its last decision (%)")
        for (t, hz, cost), bpf, us, fam in zip(s.curve, s.bpf_percent, s.offcpu_us, s.family_percent, strict=True):
            by_family = " ".join(f"{name} {pct:.2f}" for name, pct in sorted(fam.items(), key=lambda kv: -kv[1]))
            print(f"  {t:5.0f}  {hz:6d}   {cost:6.2f}           {bpf:6.2f}" + (f"   {us:8.0f}" if offcpu else "")
                  + f"   {by_family}")
        at = s.settled_at()
        if at is None:
            print("never settled within budget +-20%")
        else:
            print(f"settled within budget +-20% from t={at:.0f}s; mean cost after: {s.mean_cost_after(at):.2f}%")
        ours, go, cpu_s, rusage_s = fixture_figures(s)
        print(f"fixture: main.spinA share {ours:.3f} (runtime/pprof {go:.3f}); CPU in profiles {cpu_s:.1f}s "
              f"vs rusage {rusage_s:.1f}s")
        print("governor log, warnings:")
        for line in s.log.splitlines():
            if "governor" in line or "level=warning" in line or "level=error" in line:
                print("  " + line[:220])


if __name__ == "__main__":
    main()
