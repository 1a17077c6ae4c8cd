"""bench: `bpfprof agent` under process churn, next to bcc's profile tool.

    sudo .venv/bin/python bench/agent_churn.py                       # issue figure: 1000/min for 2 min
    sudo .venv/bin/python bench/agent_churn.py --rate 600 --minutes 10 --peer   # the 10-minute CPU/RSS ratio

Starts `--rate` short-lived processes a minute (each burns CPU in burn()
for `--life-ms`, then exits) for `--minutes`, with `bpfprof agent`
profiling the whole machine at 99 Hz, exporting to a pprof directory every
`--interval` s. Prints the agent's CPU seconds and an RSS curve (sampled
every 5 s), its process-table and eviction metrics, the share of samples
of churn processes that were symbolized (their stack names burn), and the
cost of a new process to the BPF unwinder: its mappings registered, the
unwind rows built and loaded (CPU, bytes, per file and per process), and the
agent's whole CPU over the processes started. With
`--peer`, runs bcc's profile-bpfcc (-F 99, folded) over the same load after
it and prints the CPU ratio. Figures, never pass/fail on time: a missed
target prints MISS and the exit status stays 0.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from recording import BPFPROF, read_pprof  # noqa: E402

CHURN_C = r"""
#include <stdlib.h>
#include <time.h>
static volatile unsigned long sink;
__attribute__((noinline)) void burn(long ms) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        for (int i = 0; i < 100000; i++) sink = sink * 6364136223846793005UL + 1;
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < ms);
}
int main(int argc, char **argv) { burn(argc > 1 ? atol(argv[1]) : 250); return 0; }
"""


def build_churn(out_dir: Path) -> Path:
    src = out_dir / "churn.c"
    src.write_text(CHURN_C)
    exe = out_dir / "bpfprof-churn"
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(exe), str(src)], check=True)
    return exe


class Churn:
    """Starts `rate_per_min` processes a minute until stop(); reaps them as they exit. `cpu_s`: the CPU they
    used (user + sys, from the rusage of reaped children: start no other child meanwhile)."""

    def __init__(self, exe: Path, rate_per_min: float, life_ms: int) -> None:
        self.exe, self.period_s, self.life_ms = exe, 60.0 / rate_per_min, life_ms
        self.started = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        live: list[subprocess.Popen] = []
        next_t = time.monotonic()
        while not self._stop.is_set():
            live.append(subprocess.Popen([str(self.exe), str(self.life_ms)]))
            self.started += 1
            live = [p for p in live if p.poll() is None]
            next_t += self.period_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))
        for p in live:
            p.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"VmRSS:\s+(\d+)", text)
    return int(m.group(1)) / 1024 if m else 0.0


def metrics(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def symbolized_share(pprof_dir: Path, exe_name: str) -> tuple[int, float]:
    """(samples of churn processes, share whose stack names burn)."""
    total = hit = 0
    for f in pprof_dir.glob("*.cpu.pb.gz"):
        for s in read_pprof(f).samples:
            if s.labels.get("process_name") != exe_name:
                continue
            n = s.values[0]
            total += n
            hit += n if "burn" in s.functions else 0
    return total, (hit / total if total else 0.0)


def run_agent(args: argparse.Namespace, exe: Path, work: Path) -> dict[str, object]:
    port = 19464 + os.getpid() % 1000
    pprof_dir = work / "pprof"
    agent = subprocess.Popen([str(BPFPROF), "agent", "--interval", str(args.interval), "--pprof-dir", str(pprof_dir),
                              "--metrics-listen", f"127.0.0.1:{port}", "--max-processes", str(args.max_processes),
                              "--config", "/dev/null"], stderr=open(work / "agent.log", "w"))  # noqa: SIM115
    while metrics(port).get("bpfprof_ready") != 1.0:
        if agent.poll() is not None:
            sys.exit(f"agent exited: {(work / 'agent.log').read_text()}")
        time.sleep(0.2)
    curve = []
    t0 = time.monotonic()
    with Churn(exe, args.rate, args.life_ms) as churn:
        while time.monotonic() - t0 < args.minutes * 60:
            curve.append((round(time.monotonic() - t0), round(rss_mb(agent.pid), 1)))
            time.sleep(5)
    final = metrics(port)
    agent.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(agent.pid, 0)
    agent.returncode = os.waitstatus_to_exitcode(status)
    samples, share = symbolized_share(pprof_dir, exe.name[:15])
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mb": usage.ru_maxrss / 1024, "curve": curve,
            "exit": agent.returncode, "started": churn.started, "metrics": final,
            "churn_samples": samples, "symbolized": share}


def run_peer(args: argparse.Namespace, exe: Path, work: Path) -> dict[str, float]:
    seconds = int(args.minutes * 60)
    with Churn(exe, args.rate, args.life_ms), open(work / "bcc.folded", "w") as out:
        peer = subprocess.Popen([args.bcc_profile, "-F", "99", "-f", str(seconds)], stdout=out,
                                stderr=subprocess.DEVNULL)
        _, _, usage = os.wait4(peer.pid, 0)
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mb": usage.ru_maxrss / 1024}


def _new_process_cost(r: dict[str, object], m: dict[str, float]) -> None:
    """What a new process costs the BPF unwinder (its tables) and the agent as a whole."""
    registered = m.get("bpfprof_unwind_processes_registered_total", 0)
    files = m.get("bpfprof_unwind_table_files_loaded_total", 0)
    table_bytes = m.get("bpfprof_unwind_table_bytes_loaded_total", 0)
    build_s = m.get("bpfprof_unwind_table_build_seconds_total", 0)
    started = max(int(r["started"]), 1)
    print(f"unwind tables: {registered:g} processes registered, {files:g} files loaded "
          f"({table_bytes / 1e6:.1f} MB, {table_bytes / max(files, 1) / 1e3:.0f} kB per file), "
          f"rows built in {build_s * 1e3:.0f} ms of CPU ({build_s * 1e3 / max(files, 1):.1f} ms per file)")
    print(f"per new process: {r['cpu_s'] / started * 1e3:.1f} ms of agent CPU in all, "
          f"{table_bytes / started / 1e3:.1f} kB of rows loaded, {build_s / started * 1e3:.2f} ms building rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000, help="processes started per minute")
    ap.add_argument("--minutes", type=float, default=2)
    ap.add_argument("--life-ms", type=int, default=250)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--max-processes", type=int, default=1024)
    ap.add_argument("--peer", action="store_true", help="also run bcc's profile tool over the same load")
    ap.add_argument("--bcc-profile", default="/usr/sbin/profile-bpfcc")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bpfprof-churn-") as tmp:
        work = Path(tmp)
        exe = build_churn(work)
        r = run_agent(args, exe, work)
        m = r["metrics"]
        print(f"agent: {r['started']} processes started over {args.minutes:g} min; exit {r['exit']}")
        print(f"agent CPU {r['cpu_s']:.1f}s, peak RSS {r['max_rss_mb']:.0f} MB")
        print("RSS curve (s, MB): " + " ".join(f"{t}:{mb}" for t, mb in r["curve"]))
        for k in ("bpfprof_samples_total", "bpfprof_processes_tracked", "bpfprof_process_evictions_total",
                  "bpfprof_symbolizer_cache_files", 'bpfprof_export_dropped_batches_total{exporter="pprof_dir",reason="queue_full"}'):
            print(f"  {k} {m.get(k, 0):g}")
        ok = r["symbolized"] >= 0.95
        print(f"churn samples {r['churn_samples']}, symbolized {100 * r['symbolized']:.1f}% "
              f"(target >= 95%): {'PASS' if ok else 'MISS'}")
        _new_process_cost(r, m)
        tracked_ok = m.get("bpfprof_processes_tracked", 0) <= args.max_processes
        print(f"process table within --max-processes {args.max_processes}: {'PASS' if tracked_ok else 'MISS'}")
        if args.peer:
            p = run_peer(args, exe, work)
            print(f"bcc profile: CPU {p['cpu_s']:.1f}s, peak RSS {p['max_rss_mb']:.0f} MB")
            print(f"ratio agent/bcc CPU {r['cpu_s'] / max(p['cpu_s'], 1e-9):.2f}, "
                  f"RSS {r['max_rss_mb'] / max(p['max_rss_mb'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
