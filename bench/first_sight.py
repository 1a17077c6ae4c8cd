"""A capture's first sight of a large library: `bpfprof record --all` beside bcc's `profile`.

Run as root from the repository root:

    .venv/bin/python bench/first_sight.py [--duration 10] [--repeat 2]

The load is BCC compiling a small BPF program again and again (Debian's
python3-bpfcc: clang and LLVM, libLLVM-14 alone 95k FDEs), so most samples
are deep C++ stacks in files bpfprof has never seen. Each bpfprof run starts
with an empty unwind cache (the compiled BPF is copied in: no compile), as on
a host where such a process starts after the agent: until the BPF walker's
tables are built, samples take the stack-copy path and are walked in Python.
Printed per run and as medians: wall time (fork to exit; the capture is
--duration long), profiler CPU, peak RSS, samples kept, samples lost to a full
ring buffer (the drain fell behind), and the fallback walks. bcc's profile
(kernel-side aggregation, frame pointers) runs on the same load as the peer.
Figures only; the exit status is non-zero only when the bench cannot run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_record_vs_bcc import (  # noqa: E402  (bench/ is not a package)
    BenchError,
    RunResult,
    find_bcc_profile,
    online_cpus,
    run_bcc,
    run_bpfprof,
)

REPO = Path(__file__).resolve().parent.parent
LOSS_RE = re.compile(r"dropped: (\d+) samples lost \(ring buffer full\)")
FALLBACK_RE = re.compile(r"(\d+) by the fallback")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, where python3-bpfcc lives
LOAD = """
import time
from bcc import BPF
end = time.time() + {seconds}
while time.time() < end:
    BPF(text="int f(void *c) {{ return 0; }}").cleanup()
"""


def start_load(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([SYSTEM_PYTHON, "-c", LOAD.format(seconds=seconds)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fresh_cache(root: Path, warm: Path) -> Path:
    """A cache root holding only the compiled BPF of `warm` (no unwind tables)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o700, parents=True)
    if (warm / "bpf").is_dir():
        shutil.copytree(warm / "bpf", root / "bpf")
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--frequency", type=int, default=99)
    ap.add_argument("--bpfprof", default=str(REPO / ".venv" / "bin" / "bpfprof"))
    ap.add_argument("--bcc-profile", default=None)
    ap.add_argument("--warm-cache", default="/var/cache/bpfprof", help="where the compiled BPF comes from")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("first_sight: run as root", file=sys.stderr)
        return 2
    try:
        bcc = find_bcc_profile(args.bcc_profile)
    except BenchError as e:
        print(f"first_sight: {e}", file=sys.stderr)
        return 2
    cpus = online_cpus()
    work = Path(tempfile.mkdtemp(prefix="bpfprof-first-sight-"))
    rows: list[tuple[RunResult, int, int]] = []
    peers: list[RunResult] = []
    try:
        for n in range(args.repeat):
            load = start_load(args.duration * 3 + 30)
            try:
                os.environ["BPFPROF_CACHE_DIR"] = str(fresh_cache(work / "cache", Path(args.warm_cache)))
                r = run_bpfprof(Path(args.bpfprof), work, n, args.duration, args.frequency, cpus)
                text = (work / f"bpfprof-{n}.stdout").read_text(errors="replace")
                lost = sum(int(m) for m in LOSS_RE.findall(text))
                fallback = sum(int(m) for m in FALLBACK_RE.findall(text))
                rows.append((r, lost, fallback))
                peers.append(run_bcc(bcc, work, n, args.duration, args.frequency, cpus))
            finally:
                load.kill()
                load.wait()
            r, lost, fallback = rows[-1]
            p = peers[-1]
            print(f"run {n}: bpfprof wall {r.wall_s:5.1f}s cpu {r.cpu_s:5.2f}s rss {r.peak_rss_mb:5.1f}MB "
                  f"samples {r.samples:5d} lost {lost:5d} fallback walks {fallback:5d}{' (compiled)' if r.compiled else ''}"
                  f" | bcc wall {p.wall_s:5.1f}s cpu {p.cpu_s:5.2f}s samples {p.samples:5d}")
    except BenchError as e:
        print(f"first_sight: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    b_wall, b_cpu = med([r.wall_s for r, _, _ in rows]), med([r.cpu_s for r, _, _ in rows])
    c_wall, c_cpu = med([p.wall_s for p in peers]), med([p.cpu_s for p in peers])
    b_samples, c_samples = med([r.samples for r, _, _ in rows]), med([p.samples for p in peers])
    print(f"\nmedians of {len(rows)} runs, {args.duration:g} s captures at {args.frequency} Hz, unwind cache empty")
    print(f"{'':28}{'bpfprof':>10}{'bcc':>10}{'ratio':>8}")
    print(f"{'wall time (s)':28}{b_wall:10.1f}{c_wall:10.1f}{b_wall / c_wall:8.2f}")
    print(f"{'profiler CPU (s)':28}{b_cpu:10.2f}{c_cpu:10.2f}{b_cpu / c_cpu:8.2f}")
    print(f"{'samples':28}{b_samples:10.0f}{c_samples:10.0f}{b_samples / max(c_samples, 1):8.2f}")
    print(f"{'lost (ring buffer full)':28}{med([lost for _, lost, _ in rows]):10.0f}")
    print(f"{'fallback walks':28}{med([fb for _, _, fb in rows]):10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
