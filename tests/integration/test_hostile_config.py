"""Hostile configs sent to a running `bpfprof agent` by SIGHUP: the old config runs on.

Each bad file is counted (bpfprof_config_reload_failures_total) and logged in
one line; sampling and interval cuts go on (the file is read off the sampling
thread), /healthz stays 200 and SIGTERM ends the agent with exit 0.
"""

from __future__ import annotations

import signal

import yaml
from hostile_configs import HOSTILE, put

from integration.test_agent import Agent, load  # noqa: F401  (load is a fixture)


def test_sighup_with_hostile_configs_keeps_the_old_one(tmp_path, load):  # noqa: F811
    good = {"selection": {"pids": [load.pid]},
            "export": {"interval_s": 1, "pprof_dir": {"path": str(tmp_path / "pprof")}}}
    agent = Agent(tmp_path, good)
    try:
        agent.wait_ready()
        agent.wait_metric("bpfprof_intervals_total", 1)
        for failures, name in enumerate(sorted(HOSTILE), start=1):
            put(name, agent.config_path)
            samples = agent.metric("bpfprof_samples_total")
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_metric("bpfprof_config_reload_failures_total", failures)
            intervals = agent.metric("bpfprof_intervals_total")
            agent.wait_metric("bpfprof_intervals_total", intervals + 1)  # still cutting intervals
            agent.wait_metric("bpfprof_samples_total", samples + 1)  # still sampling
            assert agent.get("/healthz")[0] == 200
        agent.config_path.unlink()
        agent.config_path.write_text(yaml.safe_dump(good))
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_metric("bpfprof_config_reloads_total", 1)  # a good file after them is taken
        assert agent.metric("bpfprof_config_reload_failures_total") == len(HOSTILE)
        code, err = agent.stop()
    finally:
        if agent.proc.poll() is None:
            agent.stop()
    assert code == 0, err
    assert "Traceback" not in err
    rejected = [line for line in err.splitlines() if "reload rejected, keeping the running config" in line]
    assert len(rejected) == len(HOSTILE), rejected
    for line, name in zip(rejected, sorted(HOSTILE), strict=True):
        for w in HOSTILE[name][1]:
            assert w in line, (name, line)
    assert list((tmp_path / "pprof").glob("*.pb.gz"))
