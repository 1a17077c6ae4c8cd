"""How long `bpfprof view` takes with a large profile: reading the file, loading the store, each flame graph
request, and the profile page drawn in headless Chromium; the peer is the same profile's self-contained
page (`record --format html`), opened in the same browser.

The profile is bench/html_open.py's synthetic one, the size of a 10-minute
whole-machine capture at 99 Hz (`--cpus` x 99 x 600 samples, deep stacks),
written as a pprof file (no timestamps: one stored event per sample) and as
an OTLP file with a timestamp per event (as `record` and the agent write
them: one stored event per event). The page is opened as soon as `view`
would print its URL (its first flame graph is being built then); target:
drawn within 2 s. Then another type's flame graph, the first again (kept),
and the page opened again.

    .venv/bin/python bench/view_open.py                  # 2 CPUs (this machine) and 16
    .venv/bin/python bench/view_open.py --cpus 64 --runs 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # first: tests/viewer must not hide the viewer package

from browser import offline_chromium  # noqa: E402  (tests/ is not a package on the path)
from html_open import DURATION_S, synthetic_profile  # noqa: E402  (bench/ is the script's directory)

from exporters.otlp import encode_otlp_bytes  # noqa: E402
from exporters.pprof import encode_pprof  # noqa: E402
from exporters.profile_files import read_profiles  # noqa: E402
from viewer.report import encode_html  # noqa: E402
from viewer.server import FileViewer  # noqa: E402

TARGET_S = 2.0


def timed(profile):  # noqa: ANN001, ANN201  (exporters.profile.Profile)
    """The profile with one timestamp per sample event, spread over its duration."""
    rng = random.Random(2)
    for s in profile.samples:
        n = s.values[0]
        s.timestamps_ns = sorted(profile.start_time_ns + rng.randrange(DURATION_S * 10**9) for _ in range(n))
    return profile


def _page_drawn(driver, url: str, script: str) -> float:  # noqa: ANN001
    """Seconds from navigation start until `script` returns a number (the page's own drawn time, ms)."""
    driver.get("about:blank")
    driver.get(url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        drawn = driver.execute_script(script)
        if drawn is not None:
            return drawn / 1000
        time.sleep(0.05)
    raise SystemExit(f"{url} did not draw within 300 s")


def _get(url: str) -> tuple[float, int]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=600) as r:
        body = r.read()
    return time.monotonic() - t0, len(body)


def measure(cpus: int, runs: int) -> None:
    profile = synthetic_profile(cpus)
    tmp = Path(tempfile.mkdtemp(prefix="bpfprof-view-bench-"))
    files = {"pprof": tmp / "big.pb.gz", "otlp": tmp / "big.otlp.pb"}
    files["pprof"].write_bytes(encode_pprof(profile))
    html = tmp / "big.html"
    html.write_bytes(encode_html(profile))
    files["otlp"].write_bytes(encode_otlp_bytes([timed(profile)], "bench"))
    print(f"{cpus:3d} CPUs: {len(profile.samples):,} stacks, {profile.total(0):,} samples; "
          f"pprof {files['pprof'].stat().st_size / 2**20:.1f} MiB, OTLP {files['otlp'].stat().st_size / 2**20:.1f} MiB")
    with offline_chromium(str(tmp), loopback=True) as driver:
        peer = [_page_drawn(driver, html.as_uri(), "return window.bpfReport ? window.bpfReport.drawnMs : null")
                for _ in range(runs)]
        for fmt, path in files.items():
            t0 = time.monotonic()
            _, found = read_profiles(path)
            t1 = time.monotonic()
            viewer = FileViewer([(path.name, found[0])])
            t2 = time.monotonic()
            url = viewer.start("127.0.0.1", 0)
            try:
                pid = viewer.store.loaded_profiles()[0].id
                page = f"{url}profile/{pid}"
                drawn = "return window.bpfDrawn ? window.bpfDrawn.ms : null"
                first = _page_drawn(driver, page, drawn)  # opened as soon as the URL is printed
                api = f"{url}api/profile/{pid}/flamegraph"
                switch, size = _get(f"{api}?type=cpu/samples")
                again, size = _get(api)
                opened = [_page_drawn(driver, page, drawn) for _ in range(runs)]
            finally:
                viewer.stop()
            med, peer_med = statistics.median(opened), statistics.median(peer)
            print(f"  {fmt:5s}: read {t1 - t0:5.2f} s, load {t2 - t1:5.2f} s; page drawn {first:5.2f} s after the URL "
                  f"({first / peer_med:.1f}x the html file's {peer_med:.2f} s)  {'OK' if first < TARGET_S else 'MISS'} "
                  f"(target < {TARGET_S:g} s); another type's flame graph {switch:5.2f} s, the first again {again:5.2f} s "
                  f"({size / 2**20:.1f} MiB), page opened again {med:5.2f} s (median of {runs})")
    for path in (*files.values(), html):
        path.unlink()
    tmp.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=int, action="append", help="CPUs of the machine imitated (repeatable)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for cpus in args.cpus or [2, 16]:
        measure(cpus, args.runs)


if __name__ == "__main__":
    main()
