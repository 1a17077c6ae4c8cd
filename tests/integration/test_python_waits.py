"""CPython frames in off-CPU and lock profiles (#16), for every supported interpreter here.

Two fixtures (tests/fixtures/python/) run at once under one `record --pid --profile offcpu,lock`, each
measuring the wall time its blocking calls took: naps.py sleeps 7 ms in `long_nap` and 3 ms in
`short_nap` per round in two threads; lock_contend.py has three threads contend one threading.Lock in
`contend`, each holding it 4 ms in `hold`. The off-CPU profile's split between the two nap functions is
compared with the fixture's, and its nap samples reach the module's top level or the thread's bootstrap;
the lock profile names `contend` as the waiter (lock `python`), its delay near the fixture's measure, and
leaves out the main thread's Thread.join (a lock acquired to wait for an event). Both files are read by
`go tool pprof` too."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from gotool import gotool_total
from recording import BPFPROF, Decoded, DecodedSample, kill_all, read_pprof, track_group
from tests.integration.test_python_frames import FIXTURES, PYTHONS, THREAD_TOP, TOP_LEVEL, python_names

NAPS, CONTEND = FIXTURES / "naps.py", FIXTURES / "lock_contend.py"
WALL_S = 1.5  # each fixture blocks for this long: ~150 naps a thread, ~350 contended acquisitions
SHARE_TOLERANCE = 0.02  # share points, as for CPU
DELAY_TOLERANCE = 0.15  # of the measured wait, as tests/integration/test_lock.py's pthread check


@dataclass
class Run:
    """One recording of both fixtures under one interpreter."""

    python: str
    offcpu: Decoded
    lock: Decoded
    pids: dict[Path, int]
    blocked: dict[Path, dict[str, float]]  # per fixture: function -> seconds blocked (all threads)

    def samples(self, prof: Decoded, fixture: Path) -> list[DecodedSample]:
        return [s for s in prof.samples if s.num_labels.get("pid") == self.pids[fixture]]


@pytest.fixture(scope="module", params=PYTHONS)
def run(request, tmp_path_factory) -> Run:
    """Fixtures started first and waiting, the agent attached to them, then released to warm up (short
    blocks), then to block for the measure once the agent has their unwind tables (its debug log says so):
    a process is taken in at its first record, and until its tables are loaded an off-CPU stack is walked
    with frame pointers, which Debian's libc does not keep, stopping short of the interpreter frames the
    Python ones replace."""
    python = request.param
    tmp = tmp_path_factory.mktemp("pywait")
    out = tmp / "waits.pb.gz"
    procs = {f: subprocess.Popen([python, str(f), str(WALL_S), "wait"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for f in (NAPS, CONTEND)}
    agent = None
    try:
        for f, p in procs.items():
            assert p.stdout.readline().strip() == "ready", f"{f.name} under {python} did not start"
        pid_flags = [a for p in procs.values() for a in ("--pid", str(p.pid))]
        agent = subprocess.Popen([str(BPFPROF), "--log-level", "debug", "record", *pid_flags, "--profile",
                                  "offcpu,lock", "--no-kernel", "-o", str(out)], stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        track_group(agent.pid)
        err: list[str] = []
        started, tables = threading.Event(), threading.Event()

        def read_log() -> None:  # all of it: a full pipe would stall the agent
            for line in agent.stderr:
                err.append(line)
                if line.startswith("sampling"):
                    started.set()
                if all(any(f"pid {p.pid}: unwind table of" in e for e in err) for p in procs.values()):
                    tables.set()

        reader = threading.Thread(target=read_log, daemon=True)
        reader.start()
        assert started.wait(120), "agent did not start: " + "".join(err[-20:])
        for p in procs.values():
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "warming"
        assert tables.wait(120), "no unwind tables: " + "".join(err[-20:])
        for p in procs.values():
            p.stdin.write("measure\n")
            p.stdin.flush()
        blocked = {}
        for f, p in procs.items():
            rows = json.loads(p.stdout.read().strip().splitlines()[-1])["blocked"]
            blocked[f] = {}
            for _tid, name, s in rows:
                blocked[f][name] = blocked[f].get(name, 0.0) + float(s)
            assert p.wait(timeout=60) == 0
        agent.send_signal(signal.SIGINT)
        code = agent.wait(timeout=120)
        reader.join(timeout=10)
        assert code == 0, "".join(err[-50:])
    finally:
        kill_all(*procs.values(), agent)
    offcpu_out, lock_out = tmp / "waits.offcpu.pb.gz", tmp / "waits.lock.pb.gz"
    for path, index in ((offcpu_out, "off_cpu"), (lock_out, "delay")):
        prof = read_pprof(path)
        assert gotool_total(tmp, path, index, "ns") == prof.total(1), path.name
    return Run(python, read_pprof(offcpu_out), read_pprof(lock_out), {f: p.pid for f, p in procs.items()}, blocked)


def ns_in(samples: list[DecodedSample], function: str) -> int:
    """Wait ns of the samples whose Python frames hold `function`."""
    return sum(s.values[1] for s in samples if function in python_names(s))


def test_off_cpu_split_by_python_function_matches_measured(run):
    samples = run.samples(run.offcpu, NAPS)
    long_ns, short_ns = ns_in(samples, "long_nap"), ns_in(samples, "short_nap")
    truth = run.blocked[NAPS]
    got = long_ns / max(long_ns + short_ns, 1)
    want = truth["long_nap"] / (truth["long_nap"] + truth["short_nap"])
    print(f"{Path(run.python).name} long_nap: {got:.4f} of {(long_ns + short_ns) / 1e9:.3f} s off CPU, "
          f"measured {want:.4f} of {sum(truth.values()):.3f} s")
    # most of the time the fixture measured blocked is in the profile, under the nap functions' frames
    assert long_ns + short_ns >= 0.9e9 * sum(truth.values()), (long_ns, short_ns, truth)
    assert abs(got - want) <= SHARE_TOLERANCE, (got, want)
    naps = [s for s in samples if {"long_nap", "short_nap"} & set(python_names(s))]
    top = [s for s in naps if python_names(s)[-1] in TOP_LEVEL | THREAD_TOP]
    assert sum(s.values[1] for s in top) == sum(s.values[1] for s in naps), [s.functions for s in naps
                                                                              if s not in top][:3]
    # both threads: the main one's naps under the module, the worker's under its bootstrap
    assert {python_names(s)[-1] for s in top} & TOP_LEVEL and {python_names(s)[-1] for s in top} & THREAD_TOP
    comments = [run.offcpu.raw.string_table[i] for i in run.offcpu.raw.comment]
    assert not [c for c in comments if "Python frames (evicted" in c], comments  # offcpu_python_lost


def test_lock_profile_names_the_python_waiter(run):
    samples = run.samples(run.lock, CONTEND)
    # The Python lock's waits. Another lock a thread met inside `contend` is a lock wait of its own,
    # recorded as such, and rare: CI runs had a kernel spinlock on the futex path (lock "kernel") and
    # a pthread mutex (lock "pthread_mutex"; the GIL is guarded by one, taken back after the wait).
    in_contend = [s for s in samples if "contend" in python_names(s)]
    waited = [s for s in in_contend if s.labels.get("lock") == "python"]
    others = sum(s.values[1] for s in in_contend if s.labels.get("lock") != "python")
    ns = sum(s.values[1] for s in waited)
    assert {s.labels.get("lock") for s in in_contend} <= {"python", "kernel", "pthread_mutex"}, in_contend
    assert others <= 0.05 * ns, (others, ns)
    want = run.blocked[CONTEND]["contend"] * 1e9
    print(f"{Path(run.python).name} contend: {ns / 1e9:.3f} s waited, measured {want / 1e9:.3f} s")
    assert want > 1e9, want  # the fixture really contended
    assert waited
    assert abs(ns - want) <= DELAY_TOLERANCE * want, (ns, want)
    # CPython's lock function is the leaf, the Python caller above it: acquire is a C method, no frame
    assert {s.functions[0] for s in waited} <= {"PyThread_acquire_lock_timed", "PyMutex_Lock", "_PyMutex_LockTimed"}
    # the main thread's Thread.join acquires the thread's lock to wait for its end: not a lock wait
    assert not [s.functions for s in samples if "join" in " ".join(python_names(s))][:3]
    assert sum(s.values[1] for s in waited) >= 0.95 * sum(s.values[1] for s in samples)
    top = [s for s in waited if python_names(s)[-1] in THREAD_TOP]
    assert top == waited, [s.functions for s in waited if s not in top][:3]
