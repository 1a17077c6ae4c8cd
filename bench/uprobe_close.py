"""bench: what removing uprobes costs, and what it did to `record` of many short Go processes.

    sudo .venv/bin/python bench/uprobe_close.py                  # 60 children, 8 processes' uprobes closed
    sudo .venv/bin/python bench/uprobe_close.py --children 100 --skip-perf-record

Part 1, in this process: a trivial uprobe program is put into running Go
fixtures at the lock family's semaphore sites (a perf event per site, or
one uprobe_multi link per process), the fixtures are killed, and the
closes are timed: one after another, and all at once through
libbpf.close_all (parallel threads). Part 2: the wall time of
`sh -c 'for i in $(seq N); do cpusplit -duration 40ms -workers 1; done'`
alone, under `bpfprof record --profile lock` (links), and under it with
BPFPROF_UPROBE_PERF_EVENTS=1 (a perf event per site, as before links).
Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from agent.bpfload import libbpf  # noqa: E402
from agent.probes.lock import LockProbe, go_sema_sites  # noqa: E402
from fixtures.builder import build_go  # noqa: E402
from recording import BPFPROF  # noqa: E402

NOOP = struct.pack("<QQ", 0xB7, 0x95)  # r0 = 0; exit


def _fixtures(binary: str, n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([binary, "-duration", "60s", "-workers", "1"], stdout=subprocess.DEVNULL)
             for _ in range(n)]
    time.sleep(0.3)
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def close_costs(binary: str, processes: int) -> None:
    offsets = [off for _, off in LockProbe._sema_uprobes(go_sema_sites(binary))]
    print(f"per process: {len(offsets)} uprobe sites (the lock family's, {binary})")
    perf_prog = libbpf.prog_load(libbpf.BPF_PROG_TYPE_KPROBE, "bench_perf", "GPL", NOOP)
    try:
        procs = _fixtures(binary, processes)
        fds = [fd for p in procs for off in offsets for fd in libbpf.attach_uprobe(perf_prog, binary, off, p.pid)]
        _kill(procs)
        t0 = time.monotonic()
        for fd in fds:
            os.close(fd)
        dt = time.monotonic() - t0
        print(f"perf events: {len(fds)} closed one after another in {dt:.2f} s = {dt / len(fds) * 1e3:.0f} ms each, "
              f"{dt / processes * 1e3:.0f} ms a process")
        procs = _fixtures(binary, processes)
        fds = [fd for p in procs for off in offsets for fd in libbpf.attach_uprobe(perf_prog, binary, off, p.pid)]
        _kill(procs)
        t0 = time.monotonic()
        libbpf.close_all(fds)
        dt = time.monotonic() - t0
        print(f"perf events: the same through close_all (parallel threads) in {dt:.2f} s")
    finally:
        os.close(perf_prog)
    if not libbpf.uprobe_links():
        print("uprobe_multi links: not on this kernel")
        return
    link_prog = libbpf.prog_load(libbpf.BPF_PROG_TYPE_KPROBE, "bench_link", "GPL", NOOP,
                                 expected_attach_type=libbpf.BPF_TRACE_UPROBE_MULTI)
    try:
        for parallel in (False, True):
            procs = _fixtures(binary, processes)
            fds = [fd for p in procs for fd in libbpf.attach_uprobes(link_prog, binary, offsets, p.pid)]
            _kill(procs)
            t0 = time.monotonic()
            if parallel:
                libbpf.close_all(fds)
            else:
                for fd in fds:
                    os.close(fd)
            dt = time.monotonic() - t0
            how = "all at once through close_all" if parallel else "one after another"
            print(f"links ({len(offsets)} sites each): {processes} closed {how} in {dt:.2f} s = "
                  f"{dt / processes * 1e3:.0f} ms a process")
    finally:
        os.close(link_prog)


def record_walls(binary: str, children: int, perf: bool) -> None:
    script = f"for i in $(seq {children}); do {binary} -duration 40ms -workers 1 > /dev/null; done"
    t0 = time.monotonic()
    subprocess.run(["sh", "-c", script], check=True)
    print(f"{children} Go children (40 ms each) alone: {time.monotonic() - t0:.1f} s")
    runs = [("links", {})] + ([("perf events", {libbpf.UPROBE_PERF_EVENTS_ENV: "1"})] if perf else [])
    for name, env in runs:
        # warm the compiled-BPF cache of this selection first: a compile is not what is measured
        subprocess.run([str(BPFPROF), "record", "--profile", "lock", "-o", os.devnull, "--", "true"],
                       env={**os.environ, **env}, check=True, capture_output=True)
        t0 = time.monotonic()
        subprocess.run([str(BPFPROF), "record", "--profile", "lock", "-o", os.devnull, "--", "sh", "-c", script],
                       env={**os.environ, **env}, check=True, capture_output=True)
        print(f"{children} Go children under record --profile lock ({name}): {time.monotonic() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--children", type=int, default=60)
    ap.add_argument("--processes", type=int, default=8, help="processes whose uprobes are closed in part 1")
    ap.add_argument("--skip-perf-record", action="store_true", help="no record with perf events (slow)")
    args = ap.parse_args()
    binary = str(build_go("cpusplit"))
    close_costs(binary, args.processes)
    record_walls(binary, args.children, not args.skip_perf_record)


if __name__ == "__main__":
    main()
