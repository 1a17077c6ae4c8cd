"""An unexpected exception in the daemon's sampling loop (a cut, a governor step) is logged and counted,
and the loop goes on: a root agent on a fleet must not stop profiling, nor lose the intervals it holds,
over one bug. The collector is the stand-in of test_daemon_opamp, with a cut that fails once."""

from __future__ import annotations

import logging
import threading
import time

from agent.capture.pipeline import Interval
from agent.daemon.config import load_config
from agent.daemon.daemon import Daemon
from unit.test_daemon_opamp import FakeCollector


class FailingOnceCollector(FakeCollector):
    failed = 0

    def cut(self) -> Interval:
        if not FailingOnceCollector.failed:
            FailingOnceCollector.failed += 1
            raise RuntimeError("dictionary changed size during iteration")
        return super().cut()


def test_a_failed_cut_is_logged_counted_and_sampling_goes_on(tmp_path, caplog):
    path = tmp_path / "agent.yaml"
    path.write_text("export:\n  interval_s: 1\nmetrics:\n  listen: ''\n")
    cfg = load_config(str(path), environ={})
    daemon = Daemon(cfg, reload_config=lambda remote=None: cfg, collector_factory=FailingOnceCollector,
                    exporters_factory=lambda cfg, host: [], host_name="host-a")
    thread = threading.Thread(target=daemon.run, daemon=True)
    with caplog.at_level(logging.ERROR, logger="agent.daemon.daemon"):
        thread.start()
        assert daemon.started.wait(10)
        deadline = time.monotonic() + 20
        while daemon.stats.intervals < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        daemon.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert FailingOnceCollector.failed == 1 and daemon.stats.loop_errors == 1
    assert daemon.stats.intervals >= 2  # cut and built after the failure
    assert any("sampling loop error 1" in r.getMessage() and r.exc_info for r in caplog.records)
