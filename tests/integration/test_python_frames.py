"""CPython frames in CPU profiles (#16), for every supported interpreter here: pyenv's 3.9-3.13 (shared
libpython, PIE) and Debian's stripped, static /usr/bin/python3.11.

Three fixtures (tests/fixtures/python/) run at once under one `record --pid` at 997 Hz, each measuring
the CPU its functions took (time.thread_time, per thread): a 70/30 split between two functions, two
threads with their own functions, and a C extension (zlib.compress) called from Python. Each share the
profile gives is compared with the fixture's own measure, and every sample that ran Python code has
Python frames up to the module's top level (or, in a thread, the thread's bootstrap). py-spy (a PyPI
package, the test extra) samples the 70/30 fixture, run alone, in the same window and at the same rate
as the agent: the two tools' shares agree within the same bound."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.python.layouts import LAYOUTS
from pyspy_tool import py_spy_counts, start_py_spy
from recording import BPFPROF, Decoded, DecodedSample, kill_all, read_pprof, run_bpfprof, track_group

# Shares within 2 points of two threads that trade the GIL every few ms: beside other tests, preemption
# spreads which thread each tick lands on toward a binomial one (1 point per ~2400 samples), and a CI
# run with 3 workers saw 2.26 points. Alone, 0.01-0.25.
pytestmark = pytest.mark.alone

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "python"
SPLIT, THREADS, ZLIB, MANY = (FIXTURES / f"{name}.py" for name in ("split7030", "threads", "zlib_calls",
                                                                     "many_threads"))
PYENV = Path("/root/.pyenv/versions")
PYTHONS = ["/usr/bin/python3.11", *(str(p) for v in sorted(LAYOUTS)
                                    for p in sorted(PYENV.glob(f"3.{v[1]}.*/bin/python3.{v[1]}")))]
CPU_SECONDS = 2.5  # each fixture runs until it has used this much CPU: ~2500 samples, loaded machine or not
HZ = 997
TOLERANCE = 0.02  # share points: the bound; errors measured here are a fraction of it
EVAL_FRAME = "_PyEval_EvalFrameDefault"
TOP_LEVEL = {"<module>"}
THREAD_TOP = {"Thread._bootstrap", "_bootstrap"}  # co_qualname (3.11+), co_name (3.9, 3.10)


@dataclass
class Run:
    """One recording of the three fixtures under one interpreter."""

    python: str
    prof: Decoded
    pids: dict[Path, int]
    truth: dict[Path, list[tuple[int, str, float]]]  # per fixture: (thread id, function, CPU seconds)
    spy: Counter[str] = field(default_factory=Counter)  # py-spy's samples of the watched fixture, by function

    def samples(self, fixture: Path) -> list[DecodedSample]:
        return [s for s in self.prof.samples if s.num_labels.get("pid") == self.pids[fixture]]

    def cpu(self, fixture: Path, function: str) -> float:
        return sum(s for _, name, s in self.truth[fixture] if name == function)


def python_names(s: DecodedSample) -> list[str]:
    """The sample's Python frames, leaf first: locations without a mapping (no native file) that are not
    native addresses the unwinder found in no mapping (named 0x...)."""
    return [f for loc, kind in zip(s.locations, s.kinds, strict=True) if not kind for f in loc
            if not f.startswith("0x")]


def ran_python(s: DecodedSample) -> bool:
    return bool(python_names(s)) or EVAL_FRAME in s.functions


def record_fixtures(python: str, fixtures: list[Path], out: Path, spy_on: Path | None = None,
                    cpu_seconds: float = CPU_SECONDS) -> Run:
    """Fixtures started first and waiting ("ready"), the agent attached to them (`record --pid`, so every
    sample is taken with the interpreter registered: a process started before the agent), then released.
    `spy_on`: py-spy records that fixture too, attached before the release, at the same rate."""
    procs = {f: subprocess.Popen([python, str(f), str(cpu_seconds), "wait"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for f in fixtures}
    agent = spy = None
    try:
        for f, p in procs.items():
            assert p.stdout.readline().strip() == "ready", f"{f.name} under {python} did not start"
        pid_flags = [a for p in procs.values() for a in ("--pid", str(p.pid))]
        agent = subprocess.Popen([str(BPFPROF), "record", *pid_flags, "--frequency", str(HZ), "--no-kernel",
                                  "-o", str(out)], stderr=subprocess.PIPE, text=True, start_new_session=True)
        track_group(agent.pid)
        err = []
        for line in agent.stderr:
            err.append(line)
            if line.startswith("sampling"):
                break
        else:
            raise AssertionError("agent did not start: " + "".join(err))
        if spy_on is not None:
            spy = start_py_spy(procs[spy_on].pid, out.with_suffix(".spy"), HZ)
        for p in procs.values():
            p.stdin.write("go\n")
            p.stdin.flush()
        truth = {}
        for f, p in procs.items():
            rows = json.loads(p.stdout.read().strip().splitlines()[-1])["cpu"]
            truth[f] = [(int(tid), name, float(s)) for tid, name, s in rows]
            assert p.wait(timeout=90) == 0
        agent.send_signal(signal.SIGINT)  # all done: stop, write the profile
        rest = agent.stderr.read()
        assert agent.wait(timeout=120) == 0, "".join(err) + rest
        counts = Counter()
        if spy is not None:  # it ends with the process it watched, writing its file
            said = spy.communicate(timeout=60)[0]
            counts = py_spy_counts(out.with_suffix(".spy"), said)
    finally:
        kill_all(*procs.values(), agent, spy)
    return Run(python, read_pprof(out), {f: p.pid for f, p in procs.items()}, truth, counts)


@pytest.fixture(scope="module", params=PYTHONS)
def run(request, tmp_path_factory) -> Run:
    """The three fixtures under one interpreter, in one recording."""
    return record_fixtures(request.param, [SPLIT, THREADS, ZLIB], tmp_path_factory.mktemp("py") / "py.pb.gz")


def share_in_profile(samples: list[DecodedSample], a: str, b: str) -> tuple[float, int]:
    na = sum(s.values[0] for s in samples if a in python_names(s))
    nb = sum(s.values[0] for s in samples if b in python_names(s))
    return na / max(na + nb, 1), na + nb


def assert_share(run: Run, fixture: Path, a: str, b: str, at_least: int) -> None:
    got, n = share_in_profile(run.samples(fixture), a, b)
    truth = run.cpu(fixture, a) / (run.cpu(fixture, a) + run.cpu(fixture, b))
    print(f"{Path(run.python).name} {a}: {got:.4f} of {n} samples, measured {truth:.4f}")
    assert n >= at_least, f"only {n} samples in {a} and {b}"
    assert abs(got - truth) <= TOLERANCE, f"{a}: {got:.4f} of {n} samples, measured {truth:.4f}"


def assert_all_reach(samples: list[DecodedSample], tops: set[str]) -> None:
    python = [s for s in samples if ran_python(s)]
    reached = [s for s in python if python_names(s) and python_names(s)[-1] in tops]
    n, total = sum(s.values[0] for s in reached), sum(s.values[0] for s in python)
    missing = [s.functions for s in python if s not in reached][:3]
    # At most one sample in a thousand may miss. Fixed: outer Python frames dropped when the native walk
    # ended in unnamed addresses (python3.11+0x184b24) below the outer interpreter frames (they now follow
    # the walk's last frame, PythonFrames.merge); samples of 3.11/3.12 between an eval call's cframe link
    # and its frame link (thread_run -> ... type_call -> slot_tp_init -> _PyEval_EvalFrameDefault with no
    # Python frame: 1 in 1274 thread samples in a CI run; test_an_eval_call_sampled_before_its_frame_is_
    # linked_keeps_its_callers). Left: samples at interpreter start-up and finalization, where the thread
    # state is not (or no longer) in the interpreter's list.
    assert total - n <= total // 1000, f"{n} of {total} samples reach {tops}; e.g. {missing}"


def test_split_matches_measured_cpu(run):
    samples = run.samples(SPLIT)
    assert_share(run, SPLIT, "hot", "warm", at_least=1500)
    assert_all_reach(samples, TOP_LEVEL)
    # Python frames in place of the interpreter loop, native frames kept below (the C entry) and above
    spin = [s for s in samples if "spin" in s.functions]
    assert spin, "no sample in spin"
    for names in (s.functions for s in spin if "Py_RunMain" in s.functions):
        assert names.index("spin") < names.index("<module>") < names.index("Py_RunMain")
    # but where the native walk stopped short of the interpreter (a stack read that failed), its Python
    # frames follow where it stopped. Such walks are rare: a leaf sampled in its epilogue, after `pop %rbp`,
    # once lost its caller in the agent's walk of a stack copy (24-28 of ~2500 in a loaded CI run); none in
    # 6 loaded runs since
    short = [s for s in spin if "Py_RunMain" not in s.functions]
    n_spin, n_short = (sum(s.values[0] for s in group) for group in (spin, short))
    assert n_short <= n_spin // 1000, (n_short, n_spin, short[:3])
    assert all(s.functions.index("spin") < s.functions.index("<module>") for s in short)
    # spin's frames name its loop's lines (from the code object's line table), in the fixture's file
    raw = run.prof.raw
    spin_ids = {f.id for f in raw.function if raw.string_table[f.name] == "spin"}
    files = {raw.string_table[f.filename] for f in raw.function if f.id in spin_ids}
    lines = {ln.line for loc in raw.location for ln in loc.line if ln.function_id in spin_ids}
    assert files == {str(SPLIT), str(THREADS)}
    assert lines and lines <= set(loop_lines(SPLIT)) | set(loop_lines(THREADS)), lines


@pytest.mark.parametrize("python", [PYTHONS[0], PYTHONS[-1]])  # Debian's stripped static build, the newest
def test_split_matches_py_spy(python, tmp_path):
    """The same program in the same window at the same rate: py-spy's share of `hot` and ours agree within
    the bound, and py-spy's agrees with the fixture's own measure (the reference is right).

    The 70/30 fixture runs alone, for 8 s of CPU: py-spy samples by wall clock, and with the three
    fixtures contending for two CPUs its shares were 0.3-1.9 points off the CPU each function took (ours
    0-0.5); alone, its timer's jitter still spreads its share like random sampling (up to 2.4 points off
    in 2,600 samples), which 8,000 samples bring under a point or so."""
    run = record_fixtures(python, [SPLIT], tmp_path / "split.pb.gz", spy_on=SPLIT, cpu_seconds=8)
    got, n = share_in_profile(run.samples(SPLIT), "hot", "warm")
    spy_n = run.spy["hot"] + run.spy["warm"]
    spy = run.spy["hot"] / max(spy_n, 1)
    truth = run.cpu(SPLIT, "hot") / (run.cpu(SPLIT, "hot") + run.cpu(SPLIT, "warm"))
    print(f"{Path(python).name} hot: bpfprof {got:.4f} of {n}, py-spy {spy:.4f} of {spy_n} ({run.spy['']} in all), "
          f"measured {truth:.4f}")
    assert n >= 1500 and spy_n >= 1500, (n, run.spy)
    assert abs(got - truth) <= TOLERANCE, (got, truth)
    assert abs(spy - truth) <= TOLERANCE, (spy, truth)
    assert abs(got - spy) <= TOLERANCE, (got, spy)
    assert_all_reach(run.samples(SPLIT), TOP_LEVEL)


def loop_lines(path: Path) -> list[int]:
    """spin's lines, `def` (a frame at its first instruction, RESUME in 3.11+) to `return` (a CI run caught
    3.13 once on the return of a call: rare, but a line of spin all the same)."""
    return [i + 1 for i, text in enumerate(path.read_text().splitlines())
            if text.strip() in ("def spin(n):", "total = 0", "for i in range(n):", "total += i * i",
                                "return total")]


def test_threads_have_their_own_frames(run):
    samples = run.samples(THREADS)
    assert_share(run, THREADS, "alpha", "beta", at_least=1500)
    tid = {name: t for t, name, _ in run.truth[THREADS]}
    for own, other in (("alpha", "beta"), ("beta", "alpha")):
        mine = [s for s in samples if s.num_labels.get("tid") == tid[own] and ran_python(s)]
        assert mine and all(other not in s.functions for s in mine)
        assert sum(s.values[0] for s in mine if own in s.functions) >= 0.95 * sum(s.values[0] for s in mine)
        assert_all_reach(mine, THREAD_TOP)


def test_c_extension_between_python_frames(run):
    samples = run.samples(ZLIB)
    assert_share(run, ZLIB, "compress_block", "pure_python", at_least=1500)
    assert_all_reach(samples, TOP_LEVEL)
    # app function -> zlib.compress (native) -> deflate: libz's frames above the Python caller
    deflating = [s for s in samples if "deflate" in s.functions]
    assert sum(s.values[0] for s in deflating) >= 200
    for s in deflating:
        names = s.functions
        assert names.index("deflate") < names.index("compress_block") < names.index("<module>")
        between = names[names.index("deflate") + 1:names.index("compress_block")]
        assert between and not set(between) & set(python_names(s)), names


def test_unsupported_version_keeps_native_frames_and_is_named(tmp_path):
    py38 = sorted(PYENV.glob("3.8.*/bin/python3.8"))
    assert py38, "pyenv's CPython 3.8 is missing (an interpreter older than the supported ones)"
    out = tmp_path / "py38.pb.gz"
    run_bpfprof("record", "--frequency", "99", "--no-kernel", "-o", str(out), "--", str(py38[0]),
                str(SPLIT), "2")
    prof = read_pprof(out)
    samples = [s for s in prof.samples if EVAL_FRAME in s.functions]
    assert sum(s.values[0] for s in samples) >= 100
    assert not any("<module>" in s.functions for s in prof.samples)
    comments = [prof.raw.string_table[i] for i in prof.raw.comment]
    assert any("CPython 3.8" in c and "not supported" in c for c in comments), comments


# pyenv's builds keep their static functions' names (slot_tp_init), which the test looks for
CFRAME_PYTHONS = [p for p in PYTHONS if re.search(r"python3\.1[12]$", p) and str(PYENV) in p]


@pytest.mark.parametrize("python", CFRAME_PYTHONS)
def test_an_eval_call_sampled_before_its_frame_is_linked_keeps_its_callers(python, tmp_path):
    """3.11 and 3.12 link an eval call's _PyCFrame before they set its current frame: a sample there found
    a stale or unreadable frame, and 1-3 % of this fixture's calls (A() -> slot_tp_init -> A.__init__) had
    no Python frame at all (counted as unreadable). Now they read the caller's frames; the call, not yet
    running, stays a native frame."""
    out = tmp_path / "inits.pb.gz"
    run_bpfprof("record", "--frequency", str(HZ), "--no-kernel", "-o", str(out), "--",
                python, str(FIXTURES / "class_inits.py"), "4")
    prof = read_pprof(out)
    calls = [s for s in prof.samples if "slot_tp_init" in s.functions]
    n = sum(s.values[0] for s in calls)
    assert n > 300, n
    # the window itself was sampled: the innermost eval call left native, under slot_tp_init, its callers' frames
    unlinked = [s for s in calls if EVAL_FRAME in s.functions[:s.functions.index("slot_tp_init")] and python_names(s)]
    assert unlinked and all(python_names(s)[-2:] == ["make", "<module>"] for s in unlinked), unlinked[:3]
    # Left without any: calls made at start-up, sampled before the agent registered the new process's
    # interpreter (at its first record), which the profile counts. (Up to 8 of 1167 were left before these
    # were counted and before a sample whose native walk stopped below every interpreter frame kept its
    # Python frames after the cut.)
    bare = sum(s.values[0] for s in calls if not python_names(s))
    comments = [prof.raw.string_table[i] for i in prof.raw.comment]
    early = [int(c.split()[2]) for c in comments if c.startswith("Python frames:") and "registered" in c]
    assert bare <= sum(early) + n // 1000, (f"{bare} of {n} calls without a Python frame", comments)


@pytest.mark.parametrize("python", [PYTHONS[0], PYTHONS[-1]])  # Debian's 3.11, the newest pyenv build
def test_the_main_thread_behind_many_threads_has_its_python_frames(python, tmp_path):
    """The main thread's state is the last of the interpreter's list: behind 80 idle threads, more than
    BPF reads in one sample. It was never reached, and its samples had no Python frame and no count. Now
    the look goes on where it stopped at the thread's next samples, each counted until it is found, and
    the thread's state is kept: every later sample reaches `<module>`."""
    run = record_fixtures(python, [MANY], tmp_path / "many.pb.gz")
    main = [s for s in run.samples(MANY) if s.num_labels.get("tid") == run.pids[MANY]]
    working = [s for s in main if "main_work" in s.functions]
    n = sum(s.values[0] for s in working)
    assert n >= 1000, f"only {n} samples of the main thread in main_work"
    reached = sum(s.values[0] for s in working if python_names(s) and python_names(s)[-1] in TOP_LEVEL)
    assert n - reached <= 5, f"{reached} of {n} main_work samples have Python frames up to <module>"
    # Counted: the main thread's first looks (81 states, 32 a look: 2), and those of idle threads sampled as
    # they end (each at most 2 looks before its own is found).
    others = sum(s.values[0] for s in run.samples(MANY) if s.num_labels.get("tid") != run.pids[MANY])
    comments = [run.prof.raw.string_table[i] for i in run.prof.raw.comment]
    unseen = [c for c in comments if "not reached yet" in c]  # "dropped: N samples of a Python thread ..."
    assert unseen and 1 <= int(unseen[0].split()[1]) <= 2 + 2 * others, (others, comments)
