"""End to end, method 2 for Python: a service on the stock OpenTelemetry SDK (OTLP/HTTP span exporter) plus
the README's NativeThreadIds span processor, profiled by `bpfprof agent`, both sending to `bpfprof serve`:
the slow span's flame graph names the Python function that ran in it (#16).

The fixture (tests/fixtures/python/otel_spans.py) runs Worker.slow_work in the slow span "checkout",
fast_work in short "render" spans, outside_spans before and after them on the same thread, and
background_work on a second thread outside any span all along. The slow span's samples must be found
by its thread (its samples carry no link: the active span is not read from the interpreter's context
variables, see README) and show Worker.slow_work, never the same thread's work outside the span or the
other thread's work inside the window (which the process method would take). Then headless Chromium
opens the slowest span from the list and finds the function in its flame graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from browser import offline_chromium

from integration.test_serve_e2e import ARTIFACTS, _json, _start_agent, _start_serve, _stop, _wait

# Its fixtures run for a wall time and need the CPU they ask for (sample counts): no other test beside.
pytestmark = pytest.mark.alone

APP = Path(__file__).resolve().parents[1] / "fixtures" / "python" / "otel_spans.py"
SLOW_FN, FAST_FN = "Worker.slow_work", "fast_work"
OUTSIDE_FNS = {"outside_spans", "background_work"}
HZ = 199


def _functions(fg: dict) -> dict[str, float]:
    """Total value per function name in a flame graph reply: the value of the samples whose stack has it."""
    names, nodes = fg["flamegraph"]["names"], fg["flamegraph"]["nodes"]
    total = list(nodes["self"])
    for i in range(len(total) - 1, 0, -1):  # nodes come root first: a parent before its children
        total[nodes["parent"][i]] += total[i]
    above: list[frozenset[str]] = []
    out: dict[str, float] = {}
    for i, name_id in enumerate(nodes["name"]):
        parent, name = nodes["parent"][i], names[name_id]
        above.append(frozenset() if parent < 0 else above[parent] | {names[nodes["name"][parent]]})
        if name not in above[i]:  # a recursive function once per stack
            out[name] = out.get(name, 0) + total[i]
    return out


def test_python_span_flame_graph_names_its_function(tmp_path):
    truth_file = tmp_path / "spans.json"
    serve, http_port, ui = _start_serve(tmp_path)
    agent = app = None
    try:
        app = subprocess.Popen([sys.executable, str(APP), f"http://127.0.0.1:{http_port}/v1/traces",
                                str(truth_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdout.readline().strip() == "ready"
        agent = _start_agent(app.pid, http_port, "--frequency", str(HZ))
        app.stdin.write("go\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "done"
        assert app.wait(timeout=30) == 0
        _stop(agent)  # SIGTERM: the agent exports its last interval, then exits
        assert agent.returncode == 0
        truth = json.loads(truth_file.read_text())

        spans = _wait(lambda: _json(f"{ui}api/spans?service=py-spans")["spans"], 20, "the app's spans")
        slow = truth["slow"]
        assert (spans[0]["name"], spans[0]["span_id"]) == ("checkout", slow["span_id"]), spans[0]
        assert spans[0]["tid"] == truth["main_tid"], spans[0]

        fg = _json(f"{ui}api/trace/{slow['trace_id']}/span/{slow['span_id']}/flamegraph")
        assert fg["method"] == "thread", (fg["method"], fg["reason"])
        assert f"thread {truth['main_tid']} of process {app.pid}" in fg["reason"], fg["reason"]
        functions = _functions(fg)
        assert SLOW_FN in functions, sorted(functions)
        assert not OUTSIDE_FNS & set(functions), sorted(functions)
        # 1 s of CPU at 199 Hz: ~200 samples; allow a loaded machine
        assert fg["samples"] >= 50, fg["samples"]
        share = functions[SLOW_FN] / fg["flamegraph"]["total"]
        assert share >= 0.9, (share, functions)
        print(f"slow span: {fg['samples']} samples by {fg['method']}, {share:.1%} under {SLOW_FN}")

        fast_functions: set[str] = set()
        for s in truth["fast"]:
            f = _json(f"{ui}api/trace/{s['trace_id']}/span/{s['span_id']}/flamegraph")
            if f["samples"]:
                assert f["method"] == "thread", (f["method"], f["reason"])
                fast_functions |= set(_functions(f))
        assert FAST_FN in fast_functions, sorted(fast_functions)
        assert not ({SLOW_FN} | OUTSIDE_FNS) & fast_functions, sorted(fast_functions)

        _chromium_opens_the_slowest_span(tmp_path, ui, slow)
    finally:
        for p in (agent, app, serve):
            if p is not None:
                _stop(p)


def _chromium_opens_the_slowest_span(tmp_path: Path, ui: str, slow: dict) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with offline_chromium(str(tmp_path), loopback=True) as browser:
        browser.get(ui)
        wait = WebDriverWait(browser, 20)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#spans tr.span-row"))
        assert rows[0].get_attribute("data-span-id") == slow["span_id"]
        rows[0].find_element(By.CSS_SELECTOR, "a.span-link").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#flamegraph svg title"))
        browser.save_screenshot(str(ARTIFACTS / "python-span-flamegraph.png"))
        frames = {t.get_attribute("textContent").split(" (")[0]
                  for t in browser.find_elements(By.CSS_SELECTOR, "#flamegraph svg title")}
        assert SLOW_FN in frames, frames
        assert not OUTSIDE_FNS & frames, frames
        assert browser.find_element(By.ID, "method").get_attribute("data-method") == "thread"
