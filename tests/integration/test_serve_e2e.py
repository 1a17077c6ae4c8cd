"""End to end: an OpenTelemetry SDK app profiled by `bpfprof agent`, both sending to `bpfprof serve`,
and headless Chromium finding the slowest span and its flame graph.

The app (tests/viewer/app/traced_app.py) runs spin_outside_span, then a slow
span running spin_inside_span (spans carry thread.id = the kernel tid), then
spin_outside_span again, all on one thread. The flame graph of the slowest span
must show the first and not the second. Screenshots go to
build/test-artifacts/serve/ (gitignored) and stay after the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "viewer" / "app"
ARTIFACTS = ROOT / "build" / "test-artifacts" / "serve"
BPFPROF = Path(sys.executable).parent / "bpfprof"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


def _wait(predicate, timeout_s: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def _read_line(proc: subprocess.Popen, pattern: str, timeout_s: float = 30) -> re.Match:
    """The first stderr line of `proc` matching `pattern` (the process keeps running)."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r} from {proc.args}:\n{''.join(seen)}")


def _start_serve(tmp_path: Path) -> tuple[subprocess.Popen, str, str]:
    """`bpfprof serve` on ephemeral loopback ports: (process, its OTLP HTTP port, its web UI's URL)."""
    serve = subprocess.Popen([str(BPFPROF), "serve", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
                              "--ui", "127.0.0.1:0", "--db", str(tmp_path / "serve.sqlite")],
                             stderr=subprocess.PIPE, text=True)
    try:
        http_port = _read_line(serve, r"OTLP HTTP on 127\.0\.0\.1:(\d+)").group(1)
        ui = _read_line(serve, r"web UI at (http://\S+/)").group(1)
    except BaseException:
        serve.kill()
        serve.wait()
        raise
    return serve, http_port, ui


def _start_agent(pid: int, http_port: str, *extra: str) -> subprocess.Popen:
    """`bpfprof agent` on `pid`, a 1 s interval, sending to serve's OTLP HTTP port; returns once it samples."""
    agent = subprocess.Popen([str(BPFPROF), "--log-level", "info", "agent", "--pid", str(pid), "--interval", "1",
                              "--metrics-listen", "", *extra, "--viewer-endpoint", f"http://127.0.0.1:{http_port}"],
                             stderr=subprocess.PIPE, text=True)
    try:
        _read_line(agent, r"sampling cpu", timeout_s=60)
    except BaseException:
        agent.kill()
        agent.wait()
        raise
    return agent


def _json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromium-driver are not installed (packaging/setup.sh installs them)")
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def libspin(tmp_path) -> Path:
    out = tmp_path / "libspin.so"
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-shared", "-fPIC", "-o", str(out),
                    str(APP / "spin.c")], check=True, capture_output=True)
    return out


def test_slowest_span_flame_graph_in_chromium(tmp_path, libspin, browser):
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: PLC0415

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    serve, http_port, ui = _start_serve(tmp_path)
    agent = app = None
    try:
        app = subprocess.Popen([sys.executable, str(APP / "traced_app.py"), str(libspin),
                                f"http://127.0.0.1:{http_port}/v1/traces"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdout.readline().strip() == "ready"
        agent = _start_agent(app.pid, http_port)
        app.stdin.write("go\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "done"
        app.wait(timeout=30)
        _stop(agent)  # SIGTERM: the agent exports its last interval, then exits
        assert agent.returncode == 0

        spans = _wait(lambda: _json(f"{ui}api/spans?service=traced-app")["spans"], 20, "the app's spans")
        slowest = spans[0]
        assert slowest["name"] == "checkout" and slowest["tid"] == app.pid

        browser.get(ui)
        wait = WebDriverWait(browser, 20)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#spans tr.span-row"))
        browser.save_screenshot(str(ARTIFACTS / "1-spans.png"))
        durations = [float(r.find_element(By.CSS_SELECTOR, "td").text.split()[0]) for r in rows[:1]]
        assert durations and rows[0].get_attribute("data-span-id") == slowest["span_id"]
        rows[0].find_element(By.CSS_SELECTOR, "a.span-link").click()

        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#flamegraph svg title"))
        assert browser.current_url == f"{ui}trace/{slowest['trace_id']}/span/{slowest['span_id']}"
        browser.save_screenshot(str(ARTIFACTS / "2-span-flamegraph.png"))
        frames = {t.get_attribute("textContent").split(" (")[0]
                  for t in browser.find_elements(By.CSS_SELECTOR, "#flamegraph svg title")}
        assert "spin_inside_span" in frames, frames
        assert "spin_outside_span" not in frames, frames
        method = browser.find_element(By.ID, "method")
        assert method.get_attribute("data-method") == "thread", method.text
        top = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#top td.fn")]
        assert "spin_inside_span" in top and "spin_outside_span" not in top

        # search highlights and sums
        browser.find_element(By.ID, "search").send_keys("spin_inside")
        result = wait.until(lambda d: d.find_element(By.ID, "search-result").text)
        assert "match" in result and "%" in result
        browser.save_screenshot(str(ARTIFACTS / "3-search.png"))

        # profile-type switch and diff view redraw the graph
        Select(browser.find_element(By.ID, "type")).select_by_value("cpu/samples")
        wait.until(lambda d: d.find_element(By.ID, "method").get_attribute("data-type") == "cpu/samples")
        Select(browser.find_element(By.ID, "mode")).select_by_value("name")
        wait.until(lambda d: d.find_element(By.ID, "diff-legend").is_displayed())
        browser.save_screenshot(str(ARTIFACTS / "4-diff.png"))

        # the pprof download of what is shown
        with urllib.request.urlopen(browser.find_element(By.ID, "pprof").get_attribute("href"), timeout=10) as r:
            assert r.status == 200 and len(r.read()) > 0

        # deep link straight to the span
        browser.get(f"{ui}trace/{slowest['trace_id']}/span/{slowest['span_id']}")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#flamegraph svg title"))
        assert browser.find_element(By.ID, "span-name").text == "checkout"
    finally:
        for p in (agent, app, serve):
            if p is not None:
                _stop(p)
