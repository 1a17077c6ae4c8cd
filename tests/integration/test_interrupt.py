"""Ctrl-C (SIGINT) or SIGTERM stops a capture early and still writes the file."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from fixtures.builder import build_c
from gotool import gotool_total
from recording import BPFPROF, read_pprof


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_and_writes(tmp_path, sig):
    load = subprocess.Popen([str(build_c("callchain")), "30"])
    out = tmp_path / "interrupted.pb.gz"
    rec = subprocess.Popen([str(BPFPROF), "record", "--pid", str(load.pid), "-o", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = ""
        while not started.startswith("sampling") and rec.poll() is None:
            started = rec.stderr.readline()  # "sampling ... until Ctrl-C" once attached
        assert started.startswith("sampling pid"), started
        time.sleep(1.5)
        rec.send_signal(sig)
        stdout, stderr = rec.communicate(timeout=60)
    finally:
        load.kill()
        load.wait()
        if rec.poll() is None:
            rec.kill()
    assert rec.returncode == 0, stderr
    assert f"wrote {out}" in stdout
    prof = read_pprof(out)
    assert prof.total() > 0
    assert int(stdout.split(" samples", 1)[0]) == prof.total()
    assert gotool_total(tmp_path, out) == prof.total()
