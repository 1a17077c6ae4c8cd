"""agent/python/registry.py on live interpreters: the `py_procs` value points at _PyRuntime, whose
interpreter's thread list holds the process's main thread (read back through /proc/PID/mem)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.bpfload.records import PyProc
from agent.capture.readiness import check_python
from agent.processes.memory import ProcessMemory
from agent.python.layouts import LAYOUTS
from agent.python.registry import PythonRegistry, version_from_name

PYTHONS = [Path("/usr/bin/python3.11"), *sorted(p for v in LAYOUTS for p in Path("/root/.pyenv/versions").glob(
    f"{v[0]}.{v[1]}.*/bin/python{v[0]}.{v[1]}"))]
SCRIPT = "import sys, threading; print(threading.get_ident(), flush=True); sys.stdin.read()"


@pytest.mark.parametrize("python", PYTHONS, ids=str)
def test_registered_value_reaches_the_main_thread_state(python):
    proc = subprocess.Popen([str(python), "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ident = int(proc.stdout.readline())
        written: dict[int, PyProc | None] = {}
        reg = PythonRegistry(written.__setitem__)
        found = reg.observe(proc.pid, "python3")
        assert found is not None and found.version == version_from_name(str(python)) and found.layout is not None
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
        notes = reg.comments()
        assert notes == ([] if found.version >= (3, 11) else [f"CPython 3.{found.version[1]}: Python functions "
                                                           "named by co_name (no qualified names before 3.11: "
                                                           "`spin`, not `Worker.spin`)"])
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
        assert written == {} and reg.comments() == []
    finally:
        proc.kill()
        proc.wait()


def test_version_from_name():
    assert version_from_name("/root/.pyenv/versions/3.10.13/lib/libpython3.10.so.1.0") == (3, 10)
    assert version_from_name("/usr/bin/python3.9") == (3, 9)
    assert version_from_name("/usr/bin/python3") is None


def test_doctor_names_each_interpreter_with_its_version():
    check = check_python()
    good, _, bad = check.detail.partition("; native frames only for ")
    for python in PYTHONS:
        version = version_from_name(str(python))
        assert f"{python} (CPython {version[0]}.{version[1]})" in good
    for python in sorted(Path("/root/.pyenv/versions").glob("3.[78].*/bin/python3.[78]")):
        assert f"{python} (CPython 3.{python.name[-1]})" in bad
    assert check.ok


def test_a_313_build_without_usable_debug_offsets_keeps_native_frames(tmp_path):
    """A free-threaded 3.13 (other struct layouts than the GIL build's table) is named, not walked."""
    import shutil

    from agent.python.registry import data_symbol, examine_file
    from symbolizer.elf import ElfFile

    lib = sorted(Path("/root/.pyenv/versions").glob("3.13.*/lib/libpython3.13.so.1.0"))
    assert lib, "pyenv's CPython 3.13 is missing"
    copy = tmp_path / "libpython3.13.so.1.0"
    shutil.copy(lib[0], copy)
    with ElfFile(str(copy)) as elf:
        off = elf.offset_for_vaddr(data_symbol(elf, "_PyRuntime"))
    with open(copy, "r+b") as f:
        f.seek(off + 16)
        f.write((1).to_bytes(8, "little"))  # _Py_DebugOffsets.free_threaded
    found = examine_file(str(copy))
    assert found is not None and found.version == (3, 13) and found.layout is None
    assert found.reason.startswith("CPython 3.13 (a free-threaded build)") and "native frames kept" in found.reason


def test_comments_while_the_drain_thread_observes_and_forgets():
    """The build thread asks for comments while the drain thread observes and forgets pids: a CI run lost an
    interval to "dictionary changed size during iteration"."""
    reg = PythonRegistry(lambda pid, value: None, proc_root="/nonexistent")  # every pid: looked at, None
    stop = threading.Event()
    errors: list[BaseException] = []

    observed = [0]

    def drain() -> None:
        pid = 0
        while not stop.is_set():
            pid += 1
            reg.observe(pid, "t")
            observed[0] = pid
            if pid % 3 == 0:
                reg.forget(pid - 2)

    t = threading.Thread(target=drain)
    t.start()
    try:
        # until the drain thread has done enough to race with (a loaded machine slows it: a 2 s run once
        # saw 903 pids); the cap only bounds a stalled thread
        deadline = time.monotonic() + 60
        while observed[0] < 1800 and time.monotonic() < deadline:
            try:
                assert reg.comments() == []
            except RuntimeError as e:
                errors.append(e)
                break
    finally:
        stop.set()
        t.join()
    assert errors == [] and len(reg.processes) > 1000


def test_a_container_symlink_is_not_followed_to_a_host_interpreter(tmp_path):
    """A process in a container maps /usr/lib/libpython3.11.so.1.0, which in its root is an absolute
    symlink naming a host path: the registry must read the container's file (here: none), never follow
    the link out to the host's libpython (what joining /proc/PID/root and the path did)."""
    host_lib = Path("/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0")
    proc = tmp_path / "proc" / "42"
    (proc / "root" / "usr" / "lib").mkdir(parents=True)
    (proc / "root" / "usr" / "lib" / "libpython3.11.so.1.0").symlink_to(host_lib)  # resolved inside: nothing
    (proc / "root" / "usr" / "bin").mkdir()
    (proc / "exe").symlink_to("/usr/bin/app")
    ino = host_lib.stat().st_ino  # what the kernel's maps line would show if the link were followed
    (proc / "maps").write_text(f"7f0000000000-7f0000100000 r-xp 00000000 fd:01 {ino} /usr/lib/libpython3.11.so.1.0\n")
    reg = PythonRegistry(lambda pid, value: None, proc_root=str(tmp_path / "proc"))
    assert reg.observe(42, "app") is None
