"""How long a large profile's HTML page (`record --format html`) takes to open in headless Chromium.

The profile is synthetic, the size of a 10-minute whole-machine capture at
99 Hz: `--cpus` x 99 x 600 samples over processes with deep, varied stacks
(shared prefixes like real programs: a few entry paths, many leaves). The
page is opened from a file: URL with the network off; the figure is the time
from navigation start until the page has drawn its flame graph and top table
(window.bpfReport.drawnMs, set by viewer/static/report.js). Target: < 2 s.

    .venv/bin/python bench/html_open.py                  # 2 CPUs (this machine) and 16
    .venv/bin/python bench/html_open.py --cpus 64 --runs 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # first: tests/viewer must not hide the viewer package

from browser import offline_chromium  # noqa: E402  (tests/ is not a package on the path)

from exporters.profile import Location, ProcessMeta, SampleKey  # noqa: E402
from exporters.profile_types import cpu_profile  # noqa: E402
from symbolizer.frames import Frame, FrameKind  # noqa: E402
from viewer.report import encode_html  # noqa: E402

TARGET_S = 2.0
FREQUENCY_HZ = 99
DURATION_S = 600


def synthetic_profile(cpus: int, seed: int = 1, processes: int = 150, functions: int = 20_000):
    """A CPU profile of cpus*99*600 samples: per process a few hundred stacks of depth 8-60 from a shared pool."""
    rng = random.Random(seed)
    pool = [Location(0x400000 + 16 * i, None, (Frame(function=f"pkg{i % 97}.func{i}", kind=FrameKind.NATIVE),))
            for i in range(functions)]
    profile = cpu_profile(time.time_ns(), DURATION_S * 10**9, FREQUENCY_HZ)
    period = profile.period
    samples = cpus * FREQUENCY_HZ * DURATION_S
    stacks = []
    for pid in range(1, processes + 1):
        profile.processes[pid] = ProcessMeta(pid=pid, name=f"proc{pid}")
        trunk = [rng.choice(pool) for _ in range(rng.randint(3, 12))]  # main, runtime start...
        branches = [trunk + [rng.choice(pool) for _ in range(rng.randint(2, 20))] for _ in range(rng.randint(5, 40))]
        for _ in range(rng.randint(50, 800)):
            path = rng.choice(branches) + [rng.choice(pool) for _ in range(rng.randint(1, 30))]
            stacks.append((pid, tuple(reversed(path))))  # leaf first
    weights = [rng.paretovariate(1.2) for _ in stacks]
    for (pid, stack), n in zip(stacks, _split(samples, weights), strict=True):
        if n:
            profile.add(SampleKey(stack=stack, pid=pid, tid=pid, thread_name=f"proc{pid}"), [n, n * period])
    return profile


def _split(total: int, weights: list[float]) -> list[int]:
    s = sum(weights)
    out = [int(total * w / s) for w in weights]
    out[0] += total - sum(out)
    return out


def measure(cpus: int, runs: int, keep: bool) -> None:
    t0 = time.monotonic()
    profile = synthetic_profile(cpus)
    t1 = time.monotonic()
    page = encode_html(profile, [("command", f"synthetic: {cpus} CPUs x {FREQUENCY_HZ} Hz x {DURATION_S} s")])
    t2 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bpfprof-html-bench-"))
    path = tmp / f"synthetic-{cpus}cpu.html"
    path.write_bytes(page)
    opened = []
    with offline_chromium() as driver:
        for _ in range(runs):
            driver.get("about:blank")
            driver.get(path.as_uri())
            deadline = time.monotonic() + 120
            drawn = None
            while drawn is None and time.monotonic() < deadline:
                drawn = driver.execute_script("return window.bpfReport ? window.bpfReport.drawnMs : null")
                if drawn is None:
                    time.sleep(0.05)
            if drawn is None:
                raise SystemExit("the page did not draw within 120 s")
            opened.append(drawn / 1000)
            frames = driver.execute_script("return document.querySelectorAll('#flamegraph svg g').length")
    med = statistics.median(opened)
    print(f"{cpus:3d} CPUs: {len(profile.samples):7d} stacks, {profile.total(0):8d} samples, "
          f"page {len(page) / 2**20:5.1f} MiB (build {t1 - t0:.1f} s, encode {t2 - t1:.1f} s); "
          f"open in Chromium: median {med:.2f} s of {runs} ({', '.join(f'{x:.2f}' for x in opened)}), "
          f"{frames} frames drawn  {'OK' if med < TARGET_S else 'MISS'} (target < {TARGET_S:g} s)")
    if keep:
        print(f"  kept {path}")
    else:
        path.unlink()
        tmp.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=int, action="append", help="CPUs of the machine imitated (repeatable)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the HTML files")
    args = ap.parse_args()
    for cpus in args.cpus or [2, 16]:
        measure(cpus, args.runs, args.keep)


if __name__ == "__main__":
    main()
