"""UprobeCloser closes what it is handed on its own thread, and stop() hands back the rest (pipes stand in
for uprobe fds: closing is all it does to them)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from agent.bpfload import libbpf
from agent.probes.uprobes import UprobeCloser


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_submitted_fds_are_closed_off_the_callers_thread():
    closer = UprobeCloser("test")
    r, w = os.pipe()
    closer.submit([r, w])
    deadline = time.monotonic() + 5
    while closer.closed < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closer.closed == 2 and closer.backlog == 0 and not _is_open(r) and not _is_open(w)
    assert closer.stop() == []
    assert not any(t.name == "bpfprof-test-closer" for t in threading.enumerate())


def test_stop_hands_back_what_was_not_closed_and_a_later_submit_starts_again():
    closer = UprobeCloser("test")
    assert closer.stop() == []  # never started
    r, w = os.pipe()
    closer.submit([r])
    left = closer.stop()
    libbpf.close_all(left)
    closer.submit([w])
    deadline = time.monotonic() + 5
    while _is_open(w) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _is_open(r) and not _is_open(w)
    closer.stop()


@pytest.mark.parametrize("n", [0, 1, 3, libbpf.CLOSE_THREADS + 5])
def test_close_all_closes_every_fd_and_empties_the_list(n):
    fds = [fd for _ in range((n + 1) // 2) for fd in os.pipe()]
    given = list(fds)
    libbpf.close_all(fds)
    assert fds == [] and not any(_is_open(fd) for fd in given)
