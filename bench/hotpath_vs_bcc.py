"""The sampling hot path of `bpfprof agent --profile cpu`, beside bcc's `profile` in the same run.

Run as root from the repository root:

    .venv/bin/python bench/hotpath_vs_bcc.py --duration 120 --unwind cfi   # the issue #12 figures
    .venv/bin/python bench/hotpath_vs_bcc.py --interval 5 --duration 60 --unwind cfi  # short intervals

Every CPU is kept busy by the cpusplit Go fixture. Part 1, steady state: the
agent (exporting a pprof directory every --interval s, default 60 as the
agent's own) and profile-bpfcc run at the same time at --frequency Hz. After
--warmup s (start-up, the first interval's build and the BPF compile left
out) the script takes a mark right after the agent completes an interval,
and another --duration s (rounded to whole intervals) later, again right
after one: the window holds whole intervals, their builds and exports each
counted once. Every figure is a difference between the marks:

- agent CPU in user space (and system) per sample: utime/stime of
  /proc/PID/stat, over the samples the agent accepted (bpfprof_samples_total);
  bcc's profile: its own /proc/PID/stat over its program's run count.
- BPF time per sample: run_time_ns / run_cnt (BPF_OBJ_GET_INFO_BY_FD, what
  `bpftool prog show` prints) with kernel.bpf_stats_enabled=1 (set for the run, restored after), for the
  programs each process holds (prog_id in /proc/PID/fdinfo); for the agent also all its
  programs' time over its accepted samples.
- ring-buffer bytes per sample: bpfprof_ring_buffer_bytes_total over the
  samples (bcc's profile sends none: it counts stacks in a kernel map).

Part 2, highest loss-free rate: one agent alone, --frequency raised step by
step (--rates), each step --step-duration s after a warm-up; a step loses
when bpfprof_lost_samples_total{reason="ringbuf_full"} grows between its
marks, or when no interval was cut between them (the agent never got out
of draining the ring buffer, so drops went uncounted). Samples/s is measured: about Hz x busy CPUs, less the CPU the agent
itself takes from the load (its own process is never sampled); steps above
kernel.perf_event_max_sample_rate are skipped (perf refuses them), and the
kernel lowers that limit by itself when perf interrupts run long.

Figures, never pass/fail on time: a missed issue target prints MISS and the
exit status stays 0 (non-zero only when the benchmark cannot run).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH.parent / "tests")]

from cpu_record_vs_bcc import BenchError, find_bcc_profile, online_cpus, start_load, stop_load  # noqa: E402
from otlp_collector import closed_port  # noqa: E402

from agent.bpfload import libbpf  # noqa: E402
from recording import BPFPROF  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
MAX_SAMPLE_RATE = Path("/proc/sys/kernel/perf_event_max_sample_rate")
READY_TIMEOUT_S = 120.0
LOSS_REASON = "ringbuf_full"
# Part 2's export interval: a step must see cuts (losses are read at cuts; none means a stalled loop).
RATE_INTERVAL_S = 5.0

# Issue #12's targets.
TARGET_AGENT_US = 10.0
TARGET_BPF_US = 10.0
TARGET_RATE = 20_000


@dataclass
class Mark:
    """What one process had used and counted at one moment."""

    t: float
    utime_s: float
    stime_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    progs: dict[int, tuple[str, str, int, int]] = field(default_factory=dict)  # id -> (type, name, ns, cnt)


def cpu_times(pid: int) -> tuple[float, float]:
    """utime, stime of `pid` in seconds (fields 14 and 15 of /proc/PID/stat, after the comm)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def scrape(port: int) -> dict[str, float]:
    """The agent's /metrics as name{labels} -> value ({} if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


SETTLE_LIMIT_S = 120.0  # the longest wait for the agent's start-up backlog before the first mark
SETTLE_QUIET_S = 6.0  # ... which is over once nothing was built for this long
SETTLE_BUILD_S = 0.5  # an interval build longer than this is still backlog (steady ones take ~0.02 s here)


def prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs whose fds `pid` holds (prog_id in /proc/PID/fdinfo; this bpftool lists no pids)."""
    ids = set()
    fd_dir = Path(f"/proc/{pid}/fdinfo")
    for fd in os.listdir(fd_dir):
        try:
            m = re.search(r"^prog_id:\s*(\d+)", (fd_dir / fd).read_text(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


# bpf_prog_type numbers (uapi/linux/bpf.h) of the programs the agent and bcc's profile load.
PROG_TYPES = {2: "kprobe", 5: "tracepoint", 7: "perf_event", 17: "raw_tracepoint", 26: "tracing"}


def programs_of(pid: int) -> dict[int, tuple[str, str, int, int]]:
    """BPF programs `pid` holds: id -> (type, name, run_time_ns, run_cnt). Read by syscall, not by running
    bpftool: the agent profiles the whole machine, so a bpftool child at each mark would be a new process
    it symbolizes (its files' CFI parsed) between the marks, a cost of this script, not of the sample path."""
    out = {}
    for prog_id in prog_ids(pid):
        info = libbpf.prog_run_info(prog_id)
        if info is not None:
            out[prog_id] = (PROG_TYPES.get(info.type, str(info.type)), info.name.decode(errors="replace"),
                            int(info.run_time_ns), int(info.run_cnt))
    return out


def mark(pid: int, port: int | None = None) -> Mark:
    u, s = cpu_times(pid)
    return Mark(time.monotonic(), u, s, scrape(port) if port else {}, programs_of(pid))


def bpf_delta(a: Mark, b: Mark, prog_type: str | None = None) -> tuple[int, int]:
    """(run_time_ns, run_cnt) grown between the marks, over the programs held at both (of one type)."""
    ns = cnt = 0
    for pid, (typ, _, ns_b, cnt_b) in b.progs.items():
        if pid in a.progs and (prog_type is None or typ == prog_type):
            ns += ns_b - a.progs[pid][2]
            cnt += cnt_b - a.progs[pid][3]
    return ns, cnt


def lost(m: dict[str, float], reason: str | None = None) -> float:
    return sum(v for k, v in m.items() if k.startswith("bpfprof_lost_samples_total")
               and (reason is None or f'reason="{reason}"' in k))


def lost_reasons(a: dict[str, float], b: dict[str, float]) -> str:
    """' (reason n, ...)' of the losses grown between two scrapes, or ''."""
    grown = {re.sub(r'.*reason="([^"]*)".*', r"\1", k): b[k] - a.get(k, 0) for k in b
             if k.startswith("bpfprof_lost_samples_total") and b[k] > a.get(k, 0)}
    return f" ({', '.join(f'{r} {n:.0f}' for r, n in sorted(grown.items()))})" if grown else ""


class AgentRun:
    """A `bpfprof agent --profile cpu` child with its own config and metrics port."""

    def __init__(self, work: Path, frequency: int, unwind: str, interval_s: float, tag: str) -> None:
        self.port = closed_port()
        self.dir = work / tag
        self.dir.mkdir()
        cfg = self.dir / "agent.yaml"
        # The governor off: this measures the sample path at the asked rate, not the budget it holds.
        cfg.write_text(f"profiling:\n  unwind: {unwind}\nlimits:\n  cpu_percent: 0\n")
        self.log = open(self.dir / "agent.log", "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [str(BPFPROF), "agent", "--config", str(cfg), "--profile", "cpu", "--frequency", str(frequency),
             "--interval", f"{interval_s:g}", "--pprof-dir", str(self.dir / "pprof"),
             "--metrics-listen", f"127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while scrape(self.port).get("bpfprof_ready") != 1.0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.dir / "agent.log").read_text().strip().splitlines()[-8:]
                raise BenchError("agent did not become ready:\n  " + "\n  ".join(tail))
            time.sleep(0.2)

    def wait_settled(self, limit_s: float = SETTLE_LIMIT_S) -> float:
        """Until the agent has no start-up backlog left: no unwind rows built and no slow interval build over
        SETTLE_QUIET_S (bcc's profile compiles in-process at the same time, and the agent, which profiles
        the whole machine, then builds tables for and symbolizes libLLVM and libclang). Seconds waited."""
        t0 = time.monotonic()
        last, quiet_since = None, t0
        while time.monotonic() - t0 < limit_s:
            m = scrape(self.port)
            built = m.get("bpfprof_unwind_table_build_seconds_total")
            if built != last or m.get("bpfprof_interval_build_seconds", 0.0) > SETTLE_BUILD_S:
                last, quiet_since = built, time.monotonic()
            elif time.monotonic() - quiet_since >= SETTLE_QUIET_S:
                break
            time.sleep(1.0)
        return time.monotonic() - t0

    def mark(self) -> Mark:
        return mark(self.proc.pid, self.port)

    def mark_after_interval(self, limit_s: float) -> Mark:
        """A mark taken as soon as the agent has exported another interval (a new file in its pprof
        directory): between two such marks lie whole intervals, each build and export counted once,
        whatever the interval's length. The directory is watched, not the agent's /metrics: a scrape
        costs the agent milliseconds, and ten a second were most of its CPU at 60 s intervals."""
        deadline = time.monotonic() + limit_s
        before = self.exported()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.exported() != before:
                return self.mark()
        raise BenchError(f"the agent exported no interval in {limit_s:.0f} s")

    def exported(self) -> int:
        try:
            return sum(1 for _ in os.scandir(self.dir / "pprof"))
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_programs(pid: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until `pid` holds a perf_event program (bcc's profile has compiled and attached)."""
    deadline = time.monotonic() + timeout_s
    while not any(t == "perf_event" for t, *_ in programs_of(pid).values()):
        if time.monotonic() > deadline:
            raise BenchError(f"pid {pid} loaded no perf_event program in {timeout_s:.0f}s")
        time.sleep(0.5)


def _us(num: float, den: float) -> float | None:
    return num / den * 1e6 if den else None


def _fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.1f}x"


def _check(text: str, ok: bool) -> None:
    print(f"  {'PASS' if ok else 'MISS'}  {text}")


def steady_state(args: argparse.Namespace, unwind: str, work: Path, bcc_profile: str | None) -> None:
    """Part 1: agent and bcc's profile side by side; figures between two marks."""
    agent = AgentRun(work, args.frequency, unwind, args.interval, f"steady-{unwind}")
    bcc = bcc_out = None
    try:
        if bcc_profile:
            bcc_out = open(work / f"bcc-{unwind}.folded", "w")  # noqa: SIM115
            seconds = int(args.warmup + args.duration + READY_TIMEOUT_S + SETTLE_LIMIT_S)
            bcc = subprocess.Popen([bcc_profile, "-F", str(args.frequency), "-f", str(seconds)],
                                   stdin=subprocess.DEVNULL, stdout=bcc_out, stderr=subprocess.DEVNULL)
        agent.wait_ready()
        if bcc:
            wait_programs(bcc.pid)
        time.sleep(args.warmup)
        settled = agent.wait_settled()
        print(f"  (the agent's start-up backlog settled {settled:.0f} s after the warm-up)")
        limit = args.interval + READY_TIMEOUT_S
        a0 = agent.mark_after_interval(limit)
        b0 = mark(bcc.pid) if bcc else None
        for _ in range(max(1, round(args.duration / args.interval)) - 1):
            agent.mark_after_interval(limit)
        a1 = agent.mark_after_interval(limit)
        b1 = mark(bcc.pid) if bcc else None
    finally:
        agent.stop()
        if bcc:
            bcc.kill()
            bcc.wait()
            bcc_out.close()
    dt = a1.t - a0.t
    samples = a1.metrics.get("bpfprof_samples_total", 0) - a0.metrics.get("bpfprof_samples_total", 0)
    ring = (a1.metrics.get("bpfprof_ring_buffer_bytes_total", 0)
            - a0.metrics.get("bpfprof_ring_buffer_bytes_total", 0))
    ns_all, _ = bpf_delta(a0, a1)
    ns_pe, cnt_pe = bpf_delta(a0, a1, "perf_event")
    ours = {
        "user": _us(a1.utime_s - a0.utime_s, samples), "sys": _us(a1.stime_s - a0.stime_s, samples),
        "bpf": ns_pe / cnt_pe / 1e3 if cnt_pe else None, "bpf_all": ns_all / samples / 1e3 if samples else None,
        "ring": ring / samples if samples else None,
    }
    theirs: dict[str, float | None] = dict.fromkeys(ours)
    bcc_runs = 0
    if b0 and b1:
        bns, bcc_runs = bpf_delta(b0, b1, "perf_event")
        theirs.update(user=_us(b1.utime_s - b0.utime_s, bcc_runs), sys=_us(b1.stime_s - b0.stime_s, bcc_runs),
                      bpf=bns / bcc_runs / 1e3 if bcc_runs else None, ring=0.0)
    lost_all = lost(a1.metrics) - lost(a0.metrics)
    reasons = lost_reasons(a0.metrics, a1.metrics)
    print(f"\nsteady state, --unwind {unwind}, {args.frequency} Hz, {dt:.1f}s between the marks: agent "
          f"{samples:.0f} samples ({samples / dt:.0f}/s), {lost_all:.0f} lost{reasons}; bcc's program ran {bcc_runs} times")
    print(f"  {'per sample':38s} {'bpfprof':>10} {'bcc':>10} {'bpfprof/bcc':>11}")
    rows = [("agent CPU, user space (us)", "user"), ("agent CPU, system (us)", "sys"),
            ("BPF, perf_event program (us/run)", "bpf"), ("BPF, all agent programs (us/sample)", "bpf_all"),
            ("ring-buffer bytes", "ring")]
    for label, key in rows:
        print(f"  {label:38s} {_fmt(ours[key], 2):>10} {_fmt(theirs[key], 2):>10} {_ratio(ours[key], theirs[key]):>11}")
    busy = (a1.utime_s + a1.stime_s - a0.utime_s - a0.stime_s) / dt
    print(f"  agent CPU in all: {100 * busy:.1f} % of one CPU; RSS "
          f"{a1.metrics.get('process_resident_memory_bytes', 0) / 2**20:.0f} MB")
    for pid, (typ, name, ns, cnt) in sorted(a1.progs.items()):
        if pid in a0.progs and cnt > a0.progs[pid][3]:
            d_ns, d_cnt = ns - a0.progs[pid][2], cnt - a0.progs[pid][3]
            print(f"    agent prog {pid} {typ}/{name}: {d_cnt} runs, {d_ns / d_cnt / 1e3:.2f} us/run")
    print(f"targets (issue #12), --unwind {unwind}")
    _check(f"agent user-space CPU <= {TARGET_AGENT_US:g} us/sample: {_fmt(ours['user'])} us",
           ours["user"] is not None and ours["user"] <= TARGET_AGENT_US)
    _check(f"BPF time <= {TARGET_BPF_US:g} us/sample: {_fmt(ours['bpf_all'], 2)} us",
           ours["bpf_all"] is not None and ours["bpf_all"] <= TARGET_BPF_US)


def max_rate(args: argparse.Namespace, unwind: str, work: Path, cpus: int) -> None:
    """Part 2: raise --frequency until the ring buffer overflows."""
    cap = int(MAX_SAMPLE_RATE.read_text())
    print(f"\nhighest loss-free rate, --unwind {unwind} ({cpus} busy CPUs; perf_event_max_sample_rate {cap} Hz):")
    print(f"  {'Hz':>6} {'samples/s':>10} {'agent CPU %':>11} {'CPU us/smp':>10} {'B/sample':>9} {LOSS_REASON:>12}"
          f" {'other lost':>10}")
    best = None
    for hz in args.rates:
        if hz > cap:
            print(f"  {hz:>6} skipped: above perf_event_max_sample_rate")
            continue
        agent = AgentRun(work, hz, unwind, RATE_INTERVAL_S, f"rate-{unwind}-{hz}")
        try:
            agent.wait_ready()
            time.sleep(args.step_warmup)
            m0 = agent.mark()
            time.sleep(args.step_duration)
            m1 = agent.mark()
        finally:
            agent.stop()
        dt = m1.t - m0.t
        n = m1.metrics.get("bpfprof_samples_total", 0) - m0.metrics.get("bpfprof_samples_total", 0)
        cpu = m1.utime_s + m1.stime_s - m0.utime_s - m0.stime_s
        ring = (m1.metrics.get("bpfprof_ring_buffer_bytes_total", 0)
                - m0.metrics.get("bpfprof_ring_buffer_bytes_total", 0))
        full = lost(m1.metrics, LOSS_REASON) - lost(m0.metrics, LOSS_REASON)
        other = lost(m1.metrics) - lost(m0.metrics) - full
        print(f"  {hz:>6} {n / dt:>10,.0f} {100 * cpu / dt:>11.1f} {_fmt(_us(cpu, n)):>10} "
              f"{_fmt(ring / n if n else None, 0):>9} {full:>12.0f} {other:>10.0f}{lost_reasons(m0.metrics, m1.metrics)}",
              flush=True)
        cuts = m1.metrics.get("bpfprof_intervals_total", 0) - m0.metrics.get("bpfprof_intervals_total", 0)
        if not cuts:  # the loop never came back from the ring buffer: drops are read at cuts, so none was counted
            print(f"  {hz:>6} stalled: no interval cut in {dt:.0f}s (the agent never drained the ring buffer);"
                  " losses went uncounted")
        if full or not cuts:
            break
        best = n / dt
    target = min(TARGET_RATE, cap)
    _check(f"highest loss-free rate >= {target:,} samples/s: {_fmt(best, 0)}", best is not None and best >= target)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0,
                    help="steady-state seconds between the marks, rounded to whole intervals (default 120)")
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds from ready to the first mark (default 8: more"
                                                              " than one interval, so its build is left out)")
    ap.add_argument("--interval", type=float, default=60.0,
                    help="the agent's export interval (default 60, the agent's own); the marks fall right after "
                         "completed intervals, --duration rounded to whole ones")
    ap.add_argument("--frequency", type=int, default=99, help="Hz per CPU of the steady state (default 99)")
    ap.add_argument("--unwind", default="cfi,fp", help="comma-separated unwind modes to run (default cfi,fp)")
    ap.add_argument("--rates", default="99,499,999,2000,5000,10000,20000", help="Hz steps of part 2")
    ap.add_argument("--step-duration", type=float, default=10.0, help="seconds between a step's marks (default 10)")
    ap.add_argument("--step-warmup", type=float, default=6.0, help="seconds from ready to a step's first mark")
    ap.add_argument("--no-max-rate", action="store_true", help="skip part 2")
    ap.add_argument("--no-steady", action="store_true", help="skip part 1")
    ap.add_argument("--no-bcc", action="store_true", help="run the agent alone in part 1")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU-burning goroutines (default: CPUs)")
    ap.add_argument("--bcc-profile", default=None, help="path of bcc's profile tool")
    ap.add_argument("--keep", action="store_true", help="keep the agents' logs and pprof files")
    args = ap.parse_args()
    args.rates = [int(r) for r in args.rates.split(",")]
    unwinds = [u for u in args.unwind.split(",") if u]
    if os.geteuid() != 0:
        raise BenchError("run as root: the agent loads BPF programs and the script sets kernel.bpf_stats_enabled")
    if not BPFPROF.exists():
        raise BenchError(f"needs {BPFPROF} (packaging/setup.sh)")
    bcc_profile = None if args.no_bcc else find_bcc_profile(args.bcc_profile)
    cpus = online_cpus()
    work = Path(tempfile.mkdtemp(prefix="bench-hotpath-"))
    stats_before = BPF_STATS.read_text().strip()
    load = None
    signal.signal(signal.SIGTERM, _interrupt)  # ends the run like Ctrl-C: the finally below cleans up
    try:
        BPF_STATS.write_text("1")
        load = start_load(args.workers, 24 * 3600)
        time.sleep(1.0)
        print(f"load: cpusplit -workers {args.workers} on {cpus} CPUs; bpfprof {BPFPROF}; bcc {bcc_profile}; "
              f"kernel.bpf_stats_enabled=1 for the run (was {stats_before})")
        for unwind in unwinds:
            if load.poll() is not None:
                raise BenchError(f"the load exited early (status {load.returncode})")
            if not args.no_steady:
                steady_state(args, unwind, work, bcc_profile)
            if not args.no_max_rate:
                max_rate(args, unwind, work, cpus)
    finally:
        stop_load(load)
        BPF_STATS.write_text(stats_before)
        if args.keep:
            print(f"outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
