"""Slowdown of allocation-heavy programs under `bpfprof record --profile heap` at the default rate.

Run as root from the repository root:

    .venv/bin/python bench/heap_overhead.py [--repeat 3] [--c-allocs 300000] [--go-rounds 4]

Two programs, each timing its own allocation loop (so bpfprof's start-up and
BPF compile are not counted): the C fixture mallocloop (N malloc+free pairs
of 16..1039 bytes, glibc) and the Go fixture heapsites (-rounds R x 1 GiB in
16 KiB and 4 KiB objects). Each is run bare and under bpfprof, alternating,
`--repeat` times; medians are printed with the slowdown, and bpfprof's own
CPU (user+sys from wait4, compile child included).

What costs it. Native: every malloc, free (and calloc, realloc...) call
traps into the kernel for its uprobe, and every allocating call returns
through the uretprobe trampoline, sampled or not: the sampling decision in
BPF is cheap, the two traps are not (microseconds on this VM, against tens
of nanoseconds for a glibc fast-path malloc+free). Go: only the runtime's
own sampled allocations (one per 512 KiB) and the sweeper's frees of them
trap, so the cost is ~2000 traps per GB allocated.

Prints figures only; there is no pass/fail (bench/ is not tests).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fixtures.builder import build_c, build_go  # noqa: E402  (tests/ is not a package on the path)

BPFPROF = Path(sys.executable).parent / "bpfprof"
TARGET_SLOWDOWN = 0.05


def _elapsed(stdout: str) -> float:
    m = re.search(r"elapsed_s ([\d.]+)", stdout)
    if m is None:
        raise RuntimeError(f"no elapsed_s in the program's output:\n{stdout}")
    return float(m.group(1))


def run_bare(argv: list[str]) -> float:
    return _elapsed(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def run_profiled(argv: list[str], out: Path) -> tuple[float, float, int]:
    """(program's own seconds, bpfprof CPU seconds, sampled records) of one capture."""
    proc = subprocess.Popen([str(BPFPROF), "record", "--profile", "heap", "-o", str(out), "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bpfprof failed:\n{stderr}")
    samples = int(re.search(r"(\d+) samples", stdout).group(1))
    return _elapsed(stdout), usage.ru_utime + usage.ru_stime, samples


def measure(name: str, argv: list[str], repeat: int, tmp: Path) -> dict[str, float]:
    bare, prof, cpu, samples = [], [], [], []
    run_bare(argv)  # warm-up: page cache, first-touch of the binary
    for i in range(repeat):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                bare.append(run_bare(argv))
            else:
                t, c, n = run_profiled(argv, tmp / f"{name}-{i}.pb.gz")
                prof.append(t)
                cpu.append(c)
                samples.append(n)
    b, p = statistics.median(bare), statistics.median(prof)
    return {"bare_s": b, "profiled_s": p, "slowdown": p / b - 1, "agent_cpu_s": statistics.median(cpu),
            "records": statistics.median(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--c-allocs", type=int, default=300_000, help="malloc+free pairs of the C program")
    ap.add_argument("--go-rounds", type=int, default=4, help="GiB the Go program allocates")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it loads BPF programs")
    programs = {
        "C mallocloop": ([str(build_c("mallocloop")), str(args.c_allocs)], args.c_allocs * 2),
        "Go heapsites": ([str(build_go("heapsites")), "-rounds", str(args.go_rounds)], 0),
    }
    with tempfile.TemporaryDirectory() as d:
        for name, (argv, calls) in programs.items():
            r = measure(name.split()[-1], argv, args.repeat, Path(d))
            print(f"{name}: bare {r['bare_s']:.3f} s, under heap profiling {r['profiled_s']:.3f} s, "
                  f"slowdown {100 * r['slowdown']:.1f} % (target < {100 * TARGET_SLOWDOWN:.0f} %), "
                  f"{r['records']:.0f} records, bpfprof CPU {r['agent_cpu_s']:.2f} s")
            if calls:
                per_call_us = (r["profiled_s"] - r["bare_s"]) / calls * 1e6
                print(f"  {per_call_us:.2f} us added per probed libc call "
                      f"(malloc: entry uprobe + uretprobe; free: entry uprobe)")


if __name__ == "__main__":
    main()
