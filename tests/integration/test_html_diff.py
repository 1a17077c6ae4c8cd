"""`record --format pprof,html`, `bpfprof diff` and `bpfprof view` on real captures of a known CPU split.

The Go fixture cpusplit runs spinA/spinB at 7/3 of its work (twice) and at
4/6 (once). Ground truth of the diff: the work split is set by loop counts,
so the base capture's shares give each loop's cost per tenth, and from it
the shares the 4/6 run must have; `diff` must name spinA and spinB first,
with the predicted signs and sizes within 3 points, and two runs of the same
split must give no significant change. The HTML page is opened from a file:
URL in headless Chromium with its network cut off, and what it draws (flame
graph frames, top table) is read back and compared with the pprof file
written by the same capture.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request

import pytest
from browser import offline_chromium

from fixtures.builder import build_go
from recording import BPFPROF, read_pprof, run_bpfprof

DURATION = "8s"
FREQUENCY_HZ = "499"
TOLERANCE_POINTS = 3.0


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """Three captures: base (7/3), same (7/3 again), new (4/6); each as pprof and html."""
    tmp = tmp_path_factory.mktemp("htmldiff")
    binary = build_go("cpusplit")
    out = {}
    for name, tenths in (("base", "7"), ("same", "7"), ("new", "4")):
        run_bpfprof("record", "--frequency", FREQUENCY_HZ, "--format", "pprof,html", "-o", str(tmp / f"{name}.pb.gz"),
                    "--", str(binary), "-duration", DURATION, "-a", tenths)
        out[name] = tmp / f"{name}.pb.gz"
        assert (tmp / f"{name}.html").is_file(), "pprof,html did not write the html file beside the pprof"
    return tmp, out


def _rows(stdout: str, measure: str) -> list[tuple[float, float, float, bool, str]]:
    """(base %, new %, change, significant, function) of one table of `bpfprof diff`'s output."""
    block = stdout.split(f"\n{measure}:", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in block.strip().splitlines()[1:]:
        m = re.match(r"\s*([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)\s+\S+\s+(\*?)(.+)$", line)
        assert m, line
        rows.append((float(m[1]), float(m[2]), float(m[3]), m[4] == "*", m[5]))
    return rows


def test_diff_names_the_shifted_functions_with_their_size(captures):
    tmp, f = captures
    base = read_pprof(f["base"])
    a, b = 100 * base.cum_share("main.spinA", 1), 100 * base.cum_share("main.spinB", 1)
    assert 60 < 100 * a / (a + b) < 80, f"the base run did not run its 70/30 split: {a:.1f} / {b:.1f}"
    cost_b_per_a = (7 * b) / (3 * a)  # cost of a tenth in spinB over one in spinA
    predicted_a = (a + b) * 4 / (4 + 6 * cost_b_per_a)
    predicted = {"main.spinA": predicted_a - a, "main.spinB": (a + b - predicted_a) - b}

    proc = run_bpfprof("diff", str(f["base"]), str(f["new"]), "--html", str(tmp / "diff.html"))
    rows = _rows(proc.stdout, "total")
    assert {r[4] for r in rows[:2]} == set(predicted), proc.stdout
    for _, _, change, significant, fn in rows[:2]:
        assert significant, proc.stdout
        assert abs(change - predicted[fn]) <= TOLERANCE_POINTS, f"{fn}: {change:+.2f} vs predicted {predicted[fn]:+.2f}"
    self_rows = _rows(proc.stdout, "self")
    assert self_rows[0][4] in ("main.spinA", "main.mix", "main.spinB") and self_rows[0][3], proc.stdout
    assert (tmp / "diff.html").read_bytes().startswith(b"<!doctype html>")


def test_diff_of_the_same_split_names_nothing(captures):
    _, f = captures
    proc = run_bpfprof("diff", str(f["base"]), str(f["same"]))
    assert "\n0 significant change(s)" in proc.stdout, proc.stdout


def _function_values(decoded, index: int) -> tuple[dict[str, int], dict[str, int]]:
    """Self (leaf function) and total (on the stack, once per stack) per function, from the pprof."""
    self_, total = {}, {}
    for s in decoded.samples:
        v = s.values[index]
        leaf = s.locations[0][0]
        self_[leaf] = self_.get(leaf, 0) + v
        for fn in set(s.functions):
            total[fn] = total.get(fn, 0) + v
    return self_, total


def test_html_page_offline_shows_the_pprof_totals(captures):
    tmp, f = captures
    decoded = read_pprof(f["base"])
    assert decoded.sample_types == [("samples", "count"), ("cpu", "nanoseconds")]
    page = (tmp / "base.html").resolve()
    with offline_chromium(str(tmp)) as driver:
        driver.get(page.as_uri())
        drawn = None
        for _ in range(600):
            drawn = driver.execute_script("return window.bpfReport || null")
            if drawn:
                break
            time.sleep(0.1)
        assert drawn, "the page did not draw"
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0

        def frames() -> list[tuple[str, float, int]]:
            return driver.execute_script(
                "return Array.from(document.querySelectorAll('#flamegraph svg g'))"
                ".filter((g) => g.__data__).map((g) => [g.__data__.data.name, g.__data__.value, g.__data__.depth])")

        def top() -> dict[str, tuple[int, int]]:
            rows = driver.execute_script(
                "return Array.from(document.querySelectorAll('#top tbody tr'))"
                ".map((r) => [r.querySelector('td.fn').textContent, +r.dataset.self, +r.dataset.total])")
            return {name: (s, t) for name, s, t in rows}

        for index, key in ((1, "cpu"), (0, "samples")):
            if key != "cpu":
                driver.execute_script(
                    "const s = document.getElementById('type'); s.value = arguments[0];"
                    "s.dispatchEvent(new Event('change'));", key)
            self_, total = _function_values(decoded, index)
            drawn_frames = frames()
            root = [v for name, v, depth in drawn_frames if depth == 0]
            assert root == [decoded.total(index)], (key, root)
            spin_a = sum(v for name, v, _ in drawn_frames if name == "main.spinA")
            assert spin_a == total["main.spinA"], key  # spinA is not recursive: its frames sum to its total
            table = top()
            assert len(table) >= 3
            for name in ("main.spinA", "main.spinB", "main.mix"):
                assert table[name] == (self_.get(name, 0), total[name]), (key, name)

        facts = driver.find_element("id", "facts").text
        for word in ("command", "duration", "frequency", FREQUENCY_HZ, "samples", "lost"):
            assert word in facts, facts
        driver.find_element("id", "search").send_keys("spinA")
        result = driver.find_element("id", "search-result").text
        assert result.startswith("1 frames of 1 functions match"), result


def test_view_serves_the_page_on_loopback(captures):
    _, f = captures
    proc = subprocess.Popen([str(BPFPROF), "view", str(f["base"])], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert m, line
        with urllib.request.urlopen(m[1], timeout=10) as r:
            body = r.read()
        assert b'id="report-data"' in body and b"main.spinA" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
