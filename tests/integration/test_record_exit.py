"""`record -- COMMAND` exits as the command did, so it can stand in for the command in scripts."""

from __future__ import annotations

import pytest

from recording import run_bpfprof


@pytest.mark.parametrize(("script", "status"), [
    ("exit 0", 0),
    ("exit 3", 3),
    ("kill -TERM $$", 128 + 15),   # ended by a signal: 128+N, as a shell reports it
    ("kill -KILL $$", 128 + 9),
])
def test_record_exits_with_the_command_status(tmp_path, script, status):
    out = tmp_path / "x.pb.gz"
    proc = run_bpfprof("record", "-o", str(out), "--", "/bin/sh", "-c", script, check=False)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.exists(), "the profile is written whatever the command's status"


def test_help_says_so():
    proc = run_bpfprof("record", "--help")
    assert "exit status" in proc.stdout and "128+N" in proc.stdout
