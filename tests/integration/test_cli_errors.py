"""Bad input: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess

import pytest

from recording import BPFPROF, run_bpfprof

NOBODY = 65534


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_pid():
    proc = run_bpfprof("record", "--pid", "999999999", "--duration", "1", check=False)
    assert_one_line_error(proc, "no process with pid 999999999")


@pytest.mark.parametrize("hz", ["0", "100000", "-5"])
def test_bad_frequency(hz, tmp_path):
    proc = run_bpfprof("record", "--frequency", hz, "--duration", "1", "-o", str(tmp_path / "x"), check=False)
    assert_one_line_error(proc, "--frequency", hz)


def test_output_in_missing_directory(tmp_path):
    proc = run_bpfprof("record", "--duration", "1", "-o", str(tmp_path / "no" / "such" / "x.pb.gz"), check=False)
    assert_one_line_error(proc, "cannot write", "does not exist")


def test_output_is_a_directory(tmp_path):
    proc = run_bpfprof("record", "--duration", "1", "-o", str(tmp_path), check=False)
    assert_one_line_error(proc)
    assert "directory" in proc.stderr


def test_two_targets():
    proc = run_bpfprof("record", "--all", "--pid", str(os.getpid()), "--duration", "1", check=False)
    assert_one_line_error(proc, "choose one target")


def test_command_not_found(tmp_path):
    proc = run_bpfprof("record", "-o", str(tmp_path / "x"), "--", "/no/such/program", check=False)
    assert_one_line_error(proc, "command not found")


def _as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           "--inh-caps=-all", str(BPFPROF), *args], capture_output=True, text=True, timeout=60)


def test_not_root():
    proc = _as_nobody("record", "--duration", "1", "-o", "/tmp/bpfprof-nobody-test.pb.gz")
    assert_one_line_error(proc, "root")


def test_unwritable_output_as_user():
    proc = _as_nobody("record", "--duration", "1", "-o", "/root/x.pb.gz")
    assert_one_line_error(proc, "cannot write", "permission denied")
