"""agent/python/registry.py on live interpreters: the `py_procs` value points at _PyRuntime, whose
interpreter's thread list holds the process's main thread (read back through /proc/PID/mem)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from agent.bpfload.records import PyProc
from agent.processes.memory import ProcessMemory
from agent.python.registry import PythonRegistry

PYTHONS = [Path("/usr/bin/python3.11"), *sorted(Path("/root/.pyenv/versions").glob("3.11.*/bin/python3.11"))]
SCRIPT = "import sys, threading; print(threading.get_ident(), flush=True); sys.stdin.read()"


@pytest.mark.parametrize("python", PYTHONS, ids=str)
def test_registered_value_reaches_the_main_thread_state(python):
    proc = subprocess.Popen([str(python), "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ident = int(proc.stdout.readline())
        written: dict[int, PyProc | None] = {}
        reg = PythonRegistry(written.__setitem__)
        found = reg.observe(proc.pid, "python3")
        assert found is not None and found.version == (3, 11) and found.layout is not None
        value = written[proc.pid]
        with ProcessMemory(proc.pid) as mem:
            interp = mem.u64(value.interpreters_head)
            tstate = mem.u64(interp + value.interp_threads_head)
            ids = []
            for _ in range(8):
                if not tstate:
                    break
                ids.append(mem.u64(tstate + value.tstate_thread_id))
                tstate = mem.u64(tstate + value.tstate_next)
        assert ident in ids  # threading.get_ident() is pthread_self(), what BPF compares with the FS base
        assert reg.observe(proc.pid, "python3") is found and len(written) == 1  # looked at once
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_a_process_without_an_interpreter_is_none():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        written: dict = {}
        reg = PythonRegistry(written.__setitem__)
        assert reg.observe(proc.pid, "sleep") is None and reg.observe(proc.pid, "sleep") is None
        assert written == {} and reg.unsupported() == []
    finally:
        proc.kill()
        proc.wait()
