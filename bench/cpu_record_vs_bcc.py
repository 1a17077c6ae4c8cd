"""`bpfprof record` against bcc's `profile` tool: CPU, memory, start-up, samples.

Run as root from the repository root:

    .venv/bin/python bench/cpu_record_vs_bcc.py [--repeat 3] [--duration 10]

Both CPUs (all of them) are kept busy by the cpusplit Go fixture for the whole
run. Under that load, `bpfprof record --all` and `profile-bpfcc -f` each
capture system-wide for `--duration` seconds, one after the other, `--repeat`
times, the order alternating per round so slow drift (thermal, page cache)
falls on both. One untimed warm-up run of each comes first so neither pays
for a cold page cache of libbcc/LLVM alone; bpfprof's warm-up also fills its
caches (compiled BPF programs, unwind tables; a directory of this run's own
unless BPFPROF_CACHE_DIR is set), so the measured runs start as an installed
agent does, without a compile (each run says whether it compiled).

Per run, from os.wait4 on the profiler process (children it reaped included):
CPU seconds (user + sys), peak RSS (ru_maxrss), wall time. Samples come from
bpfprof's summary line and from the sum of bcc's folded counts.

Start-up. bcc's profile prints nothing until it exits, so for BOTH tools the
script polls /proc/PID/fd every 5 ms and records, from the moment before the
fork: when the first `anon_inode:bpf-prog` fd appears (the program is
compiled and loaded) and when one `anon_inode:[perf_event]` fd per online CPU
is open (the sampling events are attached). With every CPU busy at 99 Hz the
first sample follows attach by about 10 ms, so "perf events attached" is the
like-for-like first-sample time. After that the script blocks in wait4, so it
does not itself show up in the captures. bpfprof also reports its own
first-sample time ("first after Ys"), measured from its process start
(/proc/self/stat start time against CLOCK_BOOTTIME).

Peak RSS from wait4 is the largest of the process and the children it reaped:
for a bpfprof run that compiled, that is the BPF compile child (clang/LLVM).

Other work on the host is sampled too (both tools record system-wide), and
bpfprof's end-of-capture symbolization cost depends on what was sampled:
run it on an otherwise quiet machine for comparable figures.

It prints figures, medians and ratios, and PASS/MISS against the targets; a
miss never makes the exit status non-zero (bench/ is not tests).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fixtures.builder import build_go  # noqa: E402  (tests/ is not a package on the path)

BCC_PROFILE_CANDIDATES = ("profile-bpfcc", "/usr/sbin/profile-bpfcc", "/usr/share/bcc/tools/profile")
SUMMARY_RE = re.compile(r"(\d+) samples of (\d+) processes in ([\d.]+)s(?:, first after ([\d.]+)s)?")
POLL_S = 0.005  # /proc/PID/fd poll period until the events are attached
# A run may take this long past --duration before it is killed: bpfprof
# symbolizes at the end, which takes tens of seconds when DWARF-rich
# binaries (a debug-info libpython) were sampled.
CHILD_GRACE_S = 240.0

TARGET_RSS_MB = 100.0
TARGET_FIRST_SAMPLE_S = 0.5
TARGET_CPU_RATIO = 0.5  # of bcc's profile
CACHE_HIT = "BPF programs loaded from the cache"


@dataclass(frozen=True)
class RunResult:
    """One profiler run. Times are seconds from just before the fork."""

    tool: str
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    wall_s: float
    samples: int
    prog_loaded_s: float | None
    perf_attached_s: float | None
    first_sample_reported_s: float | None  # bpfprof's own figure; None for bcc
    compiled: bool | None = None  # bpfprof: whether this run forked the BPF compiler (a cold cache)

    @property
    def samples_per_cpu_s(self) -> float:
        return self.samples / self.cpu_s if self.cpu_s else 0.0


class BenchError(Exception):
    """A set-up or run failure: printed as one line, exit status 2."""


def _fd_kinds(pid: int) -> tuple[int, int]:
    """(bpf-prog fds, perf_event fds) open in `pid` now; (0, 0) if it is gone."""
    progs = perfs = 0
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0, 0
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target == "anon_inode:bpf-prog":
            progs += 1
        elif target == "anon_inode:[perf_event]":
            perfs += 1
    return progs, perfs


def run_profiler(tool: str, argv: list[str], stdout_path: Path, stderr_path: Path,
                 timeout_s: float, cpus: int) -> tuple[RunResult, str]:
    """Run one capture; return its figures (samples filled in by the caller) and its stdout."""
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        return _watch(tool, argv, proc, t0, stdout_path, stderr_path, timeout_s, cpus)
    finally:
        if proc.returncode is None:  # interrupted: leave no profiler behind
            proc.kill()
            proc.wait()


def _watch(tool: str, argv: list[str], proc: subprocess.Popen, t0: float, stdout_path: Path,
           stderr_path: Path, timeout_s: float, cpus: int) -> tuple[RunResult, str]:
    """Poll the child's fds until it exits; reap it with wait4 for its resource usage."""
    pid = proc.pid
    deadline = t0 + timeout_s
    prog_loaded_s = None
    max_perfs, max_perfs_at_s = 0, None
    timed_out = threading.Event()
    reaped = None
    # Phase 1: poll fds every few ms until the program is loaded and the
    # events are attached on every CPU (or the child exits).
    while prog_loaded_s is None or max_perfs < cpus:
        now = time.monotonic()
        progs, perfs = _fd_kinds(pid)
        if progs and prog_loaded_s is None:
            prog_loaded_s = now - t0
        if perfs > max_perfs:
            max_perfs, max_perfs_at_s = perfs, now - t0
        reaped = os.wait4(pid, os.WNOHANG)
        if reaped[0]:
            break
        if now > deadline:
            timed_out.set()
            proc.kill()
            reaped = os.wait4(pid, 0)
            break
        time.sleep(POLL_S)
    # Phase 2: block until it exits, so this (Python) process is not on the
    # CPUs the profilers sample; a timer kills a child that overruns.
    if not reaped or not reaped[0]:
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: (timed_out.set(), proc.kill()))
        timer.daemon = True
        timer.start()
        try:
            reaped = os.wait4(pid, 0)
        finally:
            timer.cancel()
    _, status, usage = reaped
    wall_s = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: keep Popen from waiting again
    stdout = stdout_path.read_text(errors="replace")
    if timed_out.is_set() or proc.returncode != 0:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-8:]
        why = f"killed after {timeout_s:.0f}s" if timed_out.is_set() else f"exit status {proc.returncode}"
        raise BenchError(f"{tool} failed ({why}): {' '.join(argv)}\n  " + "\n  ".join(tail))
    result = RunResult(
        tool=tool, cpu_s=usage.ru_utime + usage.ru_stime, user_s=usage.ru_utime, sys_s=usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024, wall_s=wall_s, samples=0,
        prog_loaded_s=prog_loaded_s, perf_attached_s=max_perfs_at_s, first_sample_reported_s=None)
    return result, stdout


def run_bpfprof(bpfprof: Path, workdir: Path, n: int, duration_s: float, frequency_hz: int,
                cpus: int) -> RunResult:
    out = workdir / f"bpfprof-{n}.pb.gz"
    argv = [str(bpfprof), "--log-level", "info", "record", "--all", "--duration", f"{duration_s:g}",
            "--frequency", str(frequency_hz), "-o", str(out)]
    result, stdout = run_profiler("bpfprof", argv, workdir / f"bpfprof-{n}.stdout",
                                  workdir / f"bpfprof-{n}.stderr", duration_s + CHILD_GRACE_S, cpus)
    m = SUMMARY_RE.search(stdout)
    if not m:
        raise BenchError(f"bpfprof printed no summary line:\n{stdout[:500]}")
    first = float(m.group(4)) if m.group(4) else None
    compiled = CACHE_HIT not in (workdir / f"bpfprof-{n}.stderr").read_text(errors="replace")
    return replace(result, samples=int(m.group(1)), first_sample_reported_s=first, compiled=compiled)


def run_bcc(bcc_profile: str, workdir: Path, n: int, duration_s: float, frequency_hz: int,
            cpus: int) -> RunResult:
    argv = [bcc_profile, "-F", str(frequency_hz), "-f", f"{int(round(duration_s))}"]
    result, stdout = run_profiler("bcc", argv, workdir / f"bcc-{n}.folded", workdir / f"bcc-{n}.stderr",
                                  duration_s + CHILD_GRACE_S, cpus)
    samples = 0
    for line in stdout.splitlines():
        _, _, count = line.rpartition(" ")
        if count.isdigit():
            samples += int(count)
    return replace(result, samples=samples)


def online_cpus() -> int:
    """CPUs with a perf event each: /sys/devices/system/cpu/online, e.g. "0-3,6"."""
    try:
        spec = Path("/sys/devices/system/cpu/online").read_text().strip()
        count = 0
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
        return count
    except (OSError, ValueError):
        return os.cpu_count() or 1


def find_bcc_profile(explicit: str | None) -> str:
    for candidate in ((explicit,) if explicit else BCC_PROFILE_CANDIDATES):
        found = shutil.which(candidate)
        if found:
            return found
    raise BenchError("bcc's profile tool not found: apt-get install bpfcc-tools (or pass --bcc-profile PATH)")


def start_load(workers: int, seconds: int) -> subprocess.Popen:
    try:
        binary = build_go("cpusplit")
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        raise BenchError(f"could not build the cpusplit fixture: {e}") from e
    return subprocess.Popen([str(binary), "-workers", str(workers), "-duration", f"{seconds}s"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_load(load: subprocess.Popen | None) -> None:
    if load is None or load.poll() is not None:
        return
    load.kill()
    try:
        load.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"warning: load pid {load.pid} did not exit after SIGKILL", file=sys.stderr)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def print_run(r: RunResult) -> None:
    first = ""
    if r.first_sample_reported_s is not None:
        first = f"  first(reported) {r.first_sample_reported_s:.2f}s"
    if r.compiled is not None:
        first += "  (compiled)" if r.compiled else "  (BPF from the cache)"
    print(f"  {r.tool:8s} cpu {r.cpu_s:5.2f}s (user {r.user_s:.2f} sys {r.sys_s:.2f})  rss {r.peak_rss_mb:6.1f}MB"
          f"  wall {r.wall_s:5.2f}s  samples {r.samples:6d}  prog {_fmt(r.prog_loaded_s)}s"
          f"  attached {_fmt(r.perf_attached_s)}s{first}", flush=True)


def report(runs: list[RunResult], expected_samples: int) -> None:
    ours = [r for r in runs if r.tool == "bpfprof"]
    bcc = [r for r in runs if r.tool == "bcc"]

    def med(rs: list[RunResult], get) -> float | None:  # noqa: ANN001
        return _median([get(r) for r in rs])

    rows = [
        ("profiler CPU, user+sys (s)", lambda r: r.cpu_s, 2),
        ("  user (s)", lambda r: r.user_s, 2),
        ("  sys (s)", lambda r: r.sys_s, 2),
        ("peak RSS (MB)", lambda r: r.peak_rss_mb, 1),
        ("wall time (s)", lambda r: r.wall_s, 2),
        ("samples captured", lambda r: r.samples, 0),
        ("samples per CPU-second", lambda r: r.samples_per_cpu_s, 0),
        ("BPF program loaded at (s)", lambda r: r.prog_loaded_s, 2),
        ("perf events attached at (s) [1]", lambda r: r.perf_attached_s, 2),
        ("first sample, bpfprof's figure (s) [2]", lambda r: r.first_sample_reported_s, 2),
    ]
    name_w = max(len(n) for n, _, _ in rows)
    print()
    print(f"medians of {len(ours)} runs each ({expected_samples} samples expected per run at full load)")
    print(f"{'':{name_w}}  {'bpfprof':>9}  {'bcc':>9}  {'bpfprof/bcc':>11}")
    for name, get, digits in rows:
        a, b = med(ours, get), med(bcc, get)
        print(f"{name:{name_w}}  {_fmt(a, digits):>9}  {_fmt(b, digits):>9}  {_ratio(a, b):>11}")
    print("[1] time from fork until a perf_event fd is open per online CPU (/proc/PID/fd polled every 5 ms);")
    print("    the like-for-like first-sample time: bcc's profile prints nothing until it exits")
    print("[2] bpfprof's 'first after Ys', measured from its own process start")

    cpu_a, cpu_b = med(ours, lambda r: r.cpu_s), med(bcc, lambda r: r.cpu_s)
    rss_a = med(ours, lambda r: r.peak_rss_mb)
    first_a = med(ours, lambda r: r.first_sample_reported_s)
    print()
    print("targets")
    _check(f"CPU at most {TARGET_CPU_RATIO:g}x bcc's profile: {_fmt(cpu_a)}s vs {_fmt(cpu_b)}s",
           cpu_a is not None and cpu_b is not None and cpu_a <= TARGET_CPU_RATIO * cpu_b)
    _check(f"peak RSS at most {TARGET_RSS_MB:.0f} MB: {_fmt(rss_a, 1)} MB",
           rss_a is not None and rss_a <= TARGET_RSS_MB)
    compiled = sum(bool(r.compiled) for r in ours)
    print(f"  ({compiled} of {len(ours)} measured bpfprof runs compiled: the warm-up fills the BPF cache)")
    _check(f"first sample within {TARGET_FIRST_SAMPLE_S:g} s (bpfprof's own figure): {_fmt(first_a)}s",
           first_a is not None and first_a <= TARGET_FIRST_SAMPLE_S)


def _check(text: str, ok: bool) -> None:
    print(f"  {'PASS' if ok else 'MISS'}  {text}")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each profiler (default 3)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per capture (default 10)")
    ap.add_argument("--frequency", type=int, default=99, help="sampling Hz per CPU (default 99)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="CPU-burning goroutines of the load (default: one per CPU)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each")
    ap.add_argument("--bcc-profile", default=None, help="path of bcc's profile tool")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (the work directory is printed)")
    args = ap.parse_args()
    if args.repeat < 1 or args.duration <= 0 or args.frequency < 1 or args.workers < 1:
        ap.error("--repeat, --duration, --frequency and --workers must be positive")

    if os.geteuid() != 0:
        raise BenchError("run as root: both profilers load BPF programs (sudo .venv/bin/python bench/cpu_record_vs_bcc.py)")
    bpfprof = Path(sys.executable).parent / "bpfprof"
    if not bpfprof.exists():
        raise BenchError(f"{bpfprof} not found: run with the venv's python after packaging/setup.sh")
    bcc_profile = find_bcc_profile(args.bcc_profile)
    cpus = online_cpus()

    per_run_s = args.duration + CHILD_GRACE_S
    load_s = int((args.repeat + (0 if args.no_warmup else 1)) * 2 * per_run_s + 60)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cpu-record-"))
    # bpfprof's caches (compiled BPF, unwind tables) of this run only, filled by the warm-up run
    os.environ.setdefault("BPFPROF_CACHE_DIR", str(workdir / "cache"))
    load = None
    # SIGTERM ends the run like Ctrl-C does, so the finally below kills the load.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        load = start_load(args.workers, load_s)
        time.sleep(1.0)  # let the load reach full speed
        print(f"load: cpusplit -workers {args.workers} on {cpus} CPUs (pid {load.pid}); "
              f"bpfprof {bpfprof}; bcc {bcc_profile}; {args.duration:g}s at {args.frequency} Hz")
        runners = {
            "bpfprof": lambda n, d: run_bpfprof(bpfprof, workdir, n, d, args.frequency, cpus),
            "bcc": lambda n, d: run_bcc(bcc_profile, workdir, n, d, args.frequency, cpus),
        }
        if not args.no_warmup:
            print("warm-up (not counted)")
            for tool in ("bpfprof", "bcc"):
                print_run(runners[tool](0, 1.0))
        runs: list[RunResult] = []
        for i in range(1, args.repeat + 1):
            order = ("bpfprof", "bcc") if i % 2 else ("bcc", "bpfprof")
            print(f"round {i}: {' then '.join(order)}")
            for tool in order:
                if load.poll() is not None:
                    raise BenchError(f"the load exited early (status {load.returncode})")
                r = runners[tool](i, args.duration)
                print_run(r)
                runs.append(r)
        report(runs, int(args.duration * args.frequency * cpus))
    finally:
        stop_load(load)
        if args.keep:
            print(f"outputs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
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
