"""Slowdown of allocation- and lock-heavy programs under `bpfprof record --profile heap|lock`, with a peer.

Run as root from the repository root (about 2 minutes with the defaults):

    .venv/bin/python bench/overhead.py [--repeat 3] [--c-allocs 3000000] [--go-rounds 4] [--locks 2000000]

Programs, each timing its own loop (so no profiler's start-up or BPF compile
is counted):

  C mallocloop   N malloc+free pairs of 16..1039 bytes (glibc)
  Go heapsites   R x 1 GiB in 16 KiB and 4 KiB objects
  C lockloop     1 and 2 threads x N lock/unlock of one pthread mutex around a
                 short critical section, some work outside: with 1 thread no
                 call is contended; with 2 most are not, some are
  Go switchloop  N channel round trips between two goroutines (each parks and
                 readies both), and N one-byte reads (each a syscall through
                 the scheduler), under --profile goroutine

Each is run bare, under bpfprof (heap for the first two, lock for the
third) and under a peer doing the same job the same way, alternating the
order each round, `--repeat` times. Medians are printed of two figures: the
wall-clock slowdown of the loop, which on a 2-CPU machine includes the
profiler competing with the program for CPUs (bpfprof symbolizes and unwinds
while the program runs), and the program's own CPU time (getrusage, printed
by the program), which is what the probes add inside it; and each tool's CPU
(user+sys from wait4, BPF compile and symbolization included). Peers: bcc's memleak (uprobes on
malloc/free of the process, like bpfprof's native heap path) for the C
heap; `perf record` of the futex syscall tracepoints with DWARF call graphs
(what bpfprof's lock path does: a stack copy per sleep, unwound off-line)
for the lock program. The Go heap path has no peer tool here; its baseline
is the bare run, and its second row is the same program stripped, which
bpfprof can only profile with uprobes (no symbols to find the buckets by).

What costs it. Native heap: every malloc and free of the probed process
traps into the kernel for its uprobe, and every allocating call returns
through the uretprobe trampoline, sampled or not; the sampling decision in
BPF is cheap, the traps are not (microseconds on this VM, against tens of
nanoseconds for a glibc fast-path malloc+free). Go heap: nothing runs in
the program; the runtime samples its allocations whether profiled or not,
and bpfprof reads its buckets from /proc/PID/mem, pausing it once at
runtime.exit for the last read. Stripped, only the runtime's own sampled
allocations (one per 512 KiB) and the sweeper's frees of them trap. Lock: nothing runs on an uncontended lock call; each futex sleep costs
two tracepoint programs and an 8 KiB stack copy, and each futex wake one map
update.

Prints figures only; there is no pass/fail (bench/ is not tests).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fixtures.builder import build_c, build_go  # noqa: E402  (tests/ is not a package on the path)

BPFPROF = Path(sys.executable).parent / "bpfprof"
MEMLEAK = "/usr/sbin/memleak-bpfcc"
TARGETS = {"heap": 0.05, "lock": 0.03, "goroutine": 0.05}
PEER_SETTLE_S = 3.0  # after the peer says it is attached (or starts), before the program is let go


def _elapsed(stdout: str) -> tuple[float, float]:
    """The program's own (wall seconds, CPU seconds) of its loop, as it printed them."""
    m = re.search(r"elapsed_s ([\d.]+) cpu_s ([\d.]+)", stdout)
    if m is None:
        raise RuntimeError(f"no elapsed_s/cpu_s in the program's output:\n{stdout}")
    return float(m.group(1)), float(m.group(2))


def run_bare(argv: list[str]) -> tuple[float, float]:
    return _elapsed(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def run_bpfprof(profile: str, argv: list[str], out: Path) -> tuple[tuple[float, float], float]:
    """((program's wall, CPU seconds), bpfprof CPU seconds) of one capture."""
    proc = subprocess.Popen([str(BPFPROF), "record", "--profile", profile, "-o", str(out), "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bpfprof failed:\n{stderr}")
    return _elapsed(stdout), usage.ru_utime + usage.ru_stime


def run_peer(peer_argv: Callable[[int], list[str]], ready: str | None,
             argv: list[str]) -> tuple[tuple[float, float], float]:
    """((program's wall, CPU seconds), peer CPU seconds): the program waits behind a shell gate until the peer is attached.

    `ready`: a line the peer prints once attached; None (perf prints none): PEER_SETTLE_S after its start.
    """
    gate = subprocess.Popen(["/bin/sh", "-c", f"read _; exec {shlex.join(argv)}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    peer = subprocess.Popen(peer_argv(gate.pid), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in peer.stdout if ready is not None else ():
            if ready in line:
                break
        else:
            if peer.poll() is not None:
                raise RuntimeError(f"peer {peer_argv(gate.pid)[0]} exited before attaching")
        time.sleep(PEER_SETTLE_S)
        gate.stdin.write("\n")
        gate.stdin.close()
        out = gate.stdout.read()
        gate.wait()
    finally:
        peer.send_signal(2)  # SIGINT: both peers write what they have and exit
    threading.Thread(target=peer.stdout.read, daemon=True).start()  # its last words must not block it
    _, _, usage = os.wait4(peer.pid, 0)
    return _elapsed(out), usage.ru_utime + usage.ru_stime


Run = Callable[[], tuple[tuple[float, float], float]]


def measure(runs: dict[str, Run], repeat: int) -> dict[str, tuple[float, float, float]]:
    """Median (program wall s, program CPU s, tool CPU s) per way of running, the order rotated each round."""
    got: dict[str, list[tuple[tuple[float, float], float]]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(repeat):
        for name in names[i % len(names):] + names[:i % len(names)]:
            got[name].append(runs[name]())
    return {k: (statistics.median(p[0] for p, _ in v), statistics.median(p[1] for p, _ in v),
                statistics.median(c for _, c in v)) for k, v in got.items()}


def report(title: str, kind: str, r: dict[str, tuple[float, float, float]], calls: int = 0,
           call_what: str = "") -> None:
    """Wall slowdown (the program, next to a profiler that also needs CPU on this machine) and the
    program's own CPU increase (what the probes add inside it), for bpfprof and its peer."""
    bare, bare_cpu = r["bare"][0], r["bare"][1]
    target = TARGETS[kind]
    for who in r:
        if who == "bare":
            continue
        wall, cpu, tool = r[who]
        slow, extra = wall / bare - 1, cpu / bare_cpu - 1
        verdict = f" (target < {100 * target:.0f} %: {'PASS' if slow < target else 'MISS'})" \
            if who.startswith("bpfprof") else ""
        print(f"{title}, {who}: wall {bare:.3f} -> {wall:.3f} s: slowdown {100 * slow:.1f} %{verdict}; program CPU "
              f"{bare_cpu:.3f} -> {cpu:.3f} s: {100 * extra:+.1f} %; {who.split()[0]} CPU {tool:.2f} s")
    if calls:
        print(f"  {(r['bpfprof'][0] - bare) / calls * 1e9:.0f} ns of wall time added per {call_what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--c-allocs", type=int, default=3_000_000, help="malloc+free pairs of the C program")
    ap.add_argument("--go-rounds", type=int, default=4, help="GiB the Go program allocates")
    ap.add_argument("--locks", type=int, default=2_000_000, help="lock/unlock pairs per thread of the lock program")
    ap.add_argument("--switches", type=int, default=200_000, help="round trips and reads of the goroutine program")
    ap.add_argument("--only", choices=["c-heap", "go-heap", "lock", "goroutine"], action="append",
                    help="run only these parts (repeatable; default: all)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it loads BPF programs")
    perf = shutil.which("perf")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        malloc = [str(build_c("mallocloop")), str(args.c_allocs)]
        heapgo = [str(build_go("heapsites")), "-rounds", str(args.go_rounds)]
        heapgo_stripped = [str(build_go("heapsites", stripped=True)), *heapgo[1:]]
        lock = [str(build_c("lockloop")), str(args.locks), "2"]
        for argv in (malloc, heapgo, lock):
            run_bare(argv)  # warm-up: page cache, first-touch of the binary

        only = set(args.only or ["c-heap", "go-heap", "lock", "goroutine"])
        if "goroutine" in only:
            # the stripped binary has no runtime.allgs: bpfprof traces every status change and park there
            for mode in ("pingpong", "syscall"):
                argv = [str(build_go("switchloop")), "-mode", mode, "-n", str(args.switches)]
                stripped = [str(build_go("switchloop", stripped=True)), *argv[1:]]
                runs = {"bare": lambda argv=argv: (run_bare(argv), 0.0),
                        "bpfprof": lambda argv=argv: run_bpfprof("goroutine", argv, tmp / "g.pb.gz"),
                        "bpfprof stripped (traced)": lambda argv=stripped: run_bpfprof("goroutine", argv,
                                                                                        tmp / "gs.pb.gz")}
                report(f"Go switchloop {mode}, goroutine", "goroutine", measure(runs, args.repeat), args.switches,
                       "round trip" if mode == "pingpong" else "read")
        if "c-heap" in only:
            runs = {"bare": lambda: (run_bare(malloc), 0.0),
                    "bpfprof": lambda: run_bpfprof("heap", malloc, tmp / "malloc.pb.gz")}
            if os.path.exists(MEMLEAK):
                runs["peer"] = lambda: run_peer(lambda pid: [MEMLEAK, "-p", str(pid), "--combined-only", "600"],
                                                "Attaching to pid", malloc)
            report("C mallocloop, heap", "heap", measure(runs, args.repeat), 2 * args.c_allocs,
                   "malloc or free (bpfprof's preloaded sampler)")
        if "go-heap" in only:
            r = measure({"bare": lambda: (run_bare(heapgo), 0.0),
                         "bpfprof": lambda: run_bpfprof("heap", heapgo, tmp / "go.pb.gz"),
                         "bpfprof stripped (uprobes)": lambda: run_bpfprof("heap", heapgo_stripped,
                                                                           tmp / "go-stripped.pb.gz")},
                        args.repeat)
            report("Go heapsites, heap", "heap", r)
        if "lock" not in only:
            return
        # 1 thread: every call uncontended, the common case of a lock-heavy program (nothing should run);
        # 2 threads on 2 CPUs: contended, and the contention itself moves with whatever else takes a CPU.
        for threads in (1, 2):
            argv = [*lock[:-1], str(threads)]
            runs = {"bare": lambda argv=argv: (run_bare(argv), 0.0),
                    "bpfprof": lambda argv=argv: run_bpfprof("lock", argv, tmp / "lock.pb.gz")}
            if perf:
                runs["peer"] = lambda argv=argv: run_peer(
                    lambda pid: [perf, "record", "-q", "-o", str(tmp / "perf.data"), "-e",
                                 "syscalls:sys_enter_futex", "-e", "syscalls:sys_exit_futex", "--call-graph",
                                 "dwarf,8192", "-p", str(pid)], None, argv)
            report(f"C lockloop, {threads} thread{'s' if threads > 1 else ''}, lock", "lock",
                   measure(runs, args.repeat), threads * args.locks, "lock call")


if __name__ == "__main__":
    main()
