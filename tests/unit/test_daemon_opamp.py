"""The daemon's side of OpAMP without BPF: remote configs go through the reload path on top of the local
file, the outcome is reported, SIGHUP keeps the remote keys, interval numbers go on across a probe restart.

The collector is a stand-in that records what the daemon asks of it; the
OpAMP server is the loopback process (tests/opamp_server.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from opamp_server import OpampServer

from agent.capture.pipeline import Interval
from agent.daemon.config import AgentConfig, load_config
from agent.daemon.daemon import Daemon
from agent.daemon.governor import Steered
from agent.daemon.metrics import AgentStats
from agent.daemon.selection import Selector
from agent.probes.family import Window
from agent.processes.tracker import ProcessTracker


class FakeCollector:
    """What the daemon drives (BpfCollector's surface), with no probes."""

    made: list[FakeCollector] = []

    def __init__(self, cfg: AgentConfig, tracker: ProcessTracker, stats: AgentStats) -> None:
        self.cfg = cfg
        self.seq = 0
        self.frequencies: list[int] = []
        self.selector = Selector(cfg.selection)
        self._wake = threading.Event()
        FakeCollector.made.append(self)

    def start(self) -> None:
        pass

    def poll(self, timeout_s: float) -> None:
        self._wake.wait(min(timeout_s, 0.05))
        self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def cut(self) -> Interval:
        now = time.time_ns()
        interval = Interval(self.seq, [], Window(now, now, 0), 0)
        self.seq += 1
        return interval

    def build(self, interval: Interval) -> tuple[list, dict]:
        return [], {}

    def set_selection(self, selector: Selector) -> None:
        self.selector = selector

    def steer(self, rates: Steered) -> list[str]:
        self.frequencies.append(rates.frequency_hz)
        return ["cpu"]

    def bpf_run_time_ns(self) -> dict[str, int]:
        return {}

    def family_records(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture
def running(tmp_path):
    """A daemon with a local file (199 Hz, burn_a), reporting to a loopback OpAMP server."""
    FakeCollector.made = []
    with OpampServer() as server:
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump({
            "profiling": {"frequency_hz": 199}, "selection": {"exe_names": ["burn_a"]},
            "export": {"interval_s": 1}, "metrics": {"listen": ""}, "log_level": "debug",
            "opamp": {"endpoint": server.endpoint, "heartbeat_interval_s": 1,
                      "instance_uid_file": str(tmp_path / "uid"),
                      "remote_config_file": str(tmp_path / "state" / "remote_config.json")}}))

        def load(remote: dict | None = None) -> AgentConfig:
            return load_config(str(path), environ={}, remote=remote)

        daemon = Daemon(load(), reload_config=load, collector_factory=FakeCollector,
                        exporters_factory=lambda cfg, host: [], host_name="host-a")
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        assert daemon.started.wait(10)
        try:
            yield daemon, server, path
        finally:
            daemon.stop()
            thread.join(30)
            assert not thread.is_alive()


def status_for(server: OpampServer, config_hash: str) -> dict:
    return server.wait_for(lambda a: a.get("remote_config_status", {}).get("hash") == config_hash)[
        "remote_config_status"]


def test_remote_config_applied_failed_and_kept_across_sighup(running):
    daemon, server, path = running
    server.wait_for(lambda a: a.get("health", {}).get("healthy") is True)
    good = server.offer("profiling:\n  frequency_hz: 49\nselection:\n  exe_names: [burn_b]\n")
    assert status_for(server, good) == {"hash": good, "status": "APPLIED", "error": ""}
    collector = FakeCollector.made[-1]
    assert len(FakeCollector.made) == 1, "a lower frequency and a new selection need no new probes"
    assert collector.frequencies[-1] == 49 and collector.selector.names == {"burn_b"}
    assert daemon.cfg.profiling.frequency_hz == 49
    server.wait_for(lambda a: "frequency_hz: 49" in a.get("effective_config", {}).get("", ""))

    bad = server.offer("profiling:\n  frequency_hz: 0\n")
    status = status_for(server, bad)
    assert status["status"] == "FAILED"
    assert status["error"].startswith("remote config: profiling.frequency_hz: expected 1 to 20000, got 0")
    assert daemon.cfg.profiling.frequency_hz == 49, "the running config stays"

    forbidden = server.offer("export:\n  otlp:\n    endpoint: http://elsewhere:4318\n")
    assert "export.otlp.endpoint: not allowed" in status_for(server, forbidden)["error"]
    assert daemon.opamp is not None and daemon.opamp.stats.remote_configs == {"applied": 1, "failed": 2}

    # SIGHUP: the local file changes, the remote keys stay on top of it
    path.write_text(path.read_text().replace("interval_s: 1", "interval_s: 2"))
    daemon.request_reload()
    deadline = time.monotonic() + 10
    while daemon.cfg.export.interval_s != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.cfg.export.interval_s == 2 and daemon.cfg.profiling.frequency_hz == 49
    assert daemon.cfg.selection.exe_names == ("burn_b",)


def test_the_applied_remote_config_is_kept_for_the_next_start(running, tmp_path, caplog):
    """The config a server applied is what the next start runs, before the server answers (here: never,
    it answers 503), still bounded by the local file, and only while the agent reports to that server; a
    kept file that is garbage or no longer allowed is dropped with a log line, and the local config runs."""
    daemon, server, path = running
    kept = tmp_path / "state" / "remote_config.json"
    good = server.offer("profiling:\n  frequency_hz: 49\n")
    assert status_for(server, good)["status"] == "APPLIED"
    bad = server.offer("profiling:\n  frequency_hz: 0\n")
    assert status_for(server, bad)["status"] == "FAILED"
    assert json.loads(kept.read_text())["config_hash"] == good, "a FAILED offer does not replace the kept one"
    assert kept.stat().st_mode & 0o777 == 0o600
    daemon.stop()
    server.mode("unavailable")  # the server is down when the agent starts again (503 to every message)
    local = path.read_text()

    def start() -> Daemon:
        path.write_text(local)

        def load(remote: dict | None = None) -> AgentConfig:
            return load_config(str(path), environ={}, remote=remote)
        return Daemon(load(), reload_config=load, collector_factory=FakeCollector,
                      exporters_factory=lambda cfg, host: [], host_name="host-a")

    again = start()
    assert again.cfg.profiling.frequency_hz == 49, "the kept remote config runs from the start"
    again._start_opamp()
    try:
        assert again.opamp is not None and again.opamp.stats.remote_configs["applied"] == 1
        assert again.opamp._seen_hash.hex() == good, "the same offer is not applied twice"
    finally:
        again.opamp.stop(0.1)

    local = local.replace(server.endpoint, "http://127.0.0.1:9/v1/opamp")
    assert start().cfg.profiling.frequency_hz == 199, "a config kept from another server is not applied"
    local = local.replace("http://127.0.0.1:9/v1/opamp", server.endpoint)
    assert kept.exists() and start().cfg.profiling.frequency_hz == 49, "...and kept for that server"

    tree = yaml.safe_load(local)
    tree["opamp"]["allow_remote"] = ["export"]
    local = yaml.safe_dump(tree)
    assert start().cfg.profiling.frequency_hz == 199, "no longer allowed by the local file: the local config"
    assert not kept.exists() and "not valid here" in caplog.text

    kept.write_text("{not json")
    assert start().cfg.profiling.frequency_hz == 199 and not kept.exists()
    assert "unreadable" in caplog.text


def test_an_empty_offer_ends_the_kept_remote_config(running, tmp_path):
    daemon, server, _ = running
    kept = tmp_path / "state" / "remote_config.json"
    assert status_for(server, server.offer("profiling:\n  frequency_hz: 49\n"))["status"] == "APPLIED"
    assert kept.exists()
    assert status_for(server, server.withdraw())["status"] == "APPLIED"
    assert not kept.exists()
    assert daemon.cfg.profiling.frequency_hz == 199, "the local file's again"


def test_probe_restart_keeps_interval_numbers_going(running):
    daemon, server, _ = running
    deadline = time.monotonic() + 10
    while FakeCollector.made[0].seq < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    h = server.offer("profiling:\n  profiles: [cpu, offcpu]\n")
    assert status_for(server, h)["status"] == "APPLIED"
    assert len(FakeCollector.made) == 2, "another family needs new probes"
    old, new = FakeCollector.made
    assert new.seq >= old.seq >= 2, "numbering goes on where the old probes stopped"


def test_health_names_what_is_wrong(running):
    daemon, server, _ = running
    daemon._last_losses = {"ring_buffer_full": 12}
    daemon._report_health()
    a = server.wait_for(lambda a: not a.get("health", {}).get("healthy", True))
    assert a["health"]["status"] == "degraded"
    assert a["health"]["last_error"] == "samples lost in the last interval: 12 ring_buffer_full"


def test_sighup_reload_of_the_local_file_alone(tmp_path):
    """Without OpAMP the reload path is as before (load() called with no remote config)."""
    path = Path(tmp_path / "a.yaml")
    path.write_text("metrics:\n  listen: ''\n")
    calls = []

    def load(remote: dict | None = None) -> AgentConfig:
        calls.append(remote)
        return load_config(str(path), environ={}, remote=remote)

    daemon = Daemon(load(), reload_config=load, collector_factory=FakeCollector,
                    exporters_factory=lambda cfg, host: [], host_name="h")
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    assert daemon.started.wait(10)
    path.write_text("metrics:\n  listen: ''\nlog_level: debug\n")
    daemon.request_reload()
    deadline = time.monotonic() + 10
    while daemon.cfg.log_level != "debug" and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.stop()
    thread.join(30)
    assert daemon.cfg.log_level == "debug" and calls == [None, None] and daemon.opamp is None
