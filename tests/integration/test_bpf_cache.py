"""The compiled-BPF cache on the real kernel: a warm start forks no compiler and samples as a cold one.

Each test has a cache directory of its own, so the first load compiles (the
compile path runs here whatever the rest of the suite left in its cache).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import subprocess
import sys

import pytest

from agent.bpfload import bpf_cache, bpf_compile, libbpf, preload
from agent.probes.family import ProbeConfig
from agent.probes.lock import go_sema_sites
from agent.probes.probe_set import MIN_RINGBUF_PAGES, PAGE_SIZE, ProbeSet, compile_plan
from agent.probes.registry import PROBES
from agent.processes.tracker import ProcessTracker
from fixtures.builder import build_go
from recording import read_pprof, run_bpfprof

# As tests/integration/test_cpu_go.py, whose statistics these are: 3 pp is 4 sigma at 20 s.
TOLERANCE = 0.03
FUNCTIONS = ("main.spinA", "main.spinB", "main.mix")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BPFPROF_CACHE_DIR", str(tmp_path))
    return tmp_path / "bpf"


@pytest.fixture(scope="module")
def cpu_entry(tmp_path_factory) -> tuple[str, bytes]:
    """The cache entry of the "cpu" family, compiled once for the tests that start from a warm cache."""
    where = tmp_path_factory.mktemp("cpu-entry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BPFPROF_CACHE_DIR", str(where))
        with ProbeSet(families("cpu")):
            pass
        path = entry_file(where / "bpf")
    return path.name, path.read_bytes()


@pytest.fixture
def warm_cpu(cache_dir, cpu_entry) -> os.PathLike:
    """`cache_dir` holding the "cpu" entry, as a start before this one left it."""
    name, data = cpu_entry
    cache_dir.mkdir(mode=0o700)
    path = cache_dir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def families(*names: str) -> list:
    tracker = ProcessTracker()
    return [PROBES[n](ProbeConfig(), tracker) for n in names]


def entry_file(cache_dir) -> os.PathLike:
    files = list(cache_dir.glob("*.bpfc"))
    assert len(files) == 1, files
    return files[0]


def describe_loaded(objs) -> dict[str, tuple[int, bytes, int]]:
    """What the kernel says of each program: type, name, verified instruction count."""
    out = {}
    for name, fd in objs.programs.items():
        info = libbpf.prog_info(fd)
        out[name] = (info.type, info.name, info.xlated_prog_len)
    return out


def assert_uprobes_attach(objs) -> None:
    """A uprobe program, however loaded, attaches the way this kernel attaches uprobes (a uprobe_multi
    link needs the program loaded with its expected_attach_type, which the kernel does not report)."""
    binary = str(build_go("cpusplit"))
    sites = go_sema_sites(binary)
    libbpf.close_all(libbpf.attach_uprobes(objs.programs["lock_go_sema_enter"], binary, [sites.entry], os.getpid()))


def no_fork(*_a, **_k):
    raise AssertionError("the compile child was forked although the cache is warm")


def test_second_load_forks_no_compiler_and_loads_the_same_programs(cache_dir, monkeypatch):
    names = ("offcpu", "lock")  # (cpu with either fails to load on main too: see the report)
    before = bpf_compile.compiles
    with ProbeSet(families(*names)) as first:
        cold = describe_loaded(first.objs)
        assert_uprobes_attach(first.objs)
        cold_maps = {n: libbpf.map_info(fd) for n, fd in first.objs.maps.items()}
    assert bpf_compile.compiles == before + 1
    path = entry_file(cache_dir)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setattr(os, "fork", no_fork)
    with ProbeSet(families(*names)) as second:
        assert describe_loaded(second.objs) == cold
        assert_uprobes_attach(second.objs)
        for n, fd in second.objs.maps.items():
            info = libbpf.map_info(fd)
            want = cold_maps[n]
            assert (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags, info.name) == (
                want.type, want.key_size, want.value_size, want.max_entries, want.map_flags, want.name), n
        # the tail-call slots and the agent's own pid were written into the new maps
        assert libbpf.map_keys_u32(second.objs.maps["agent_tgid"]) == [0]
    assert bpf_compile.compiles == before + 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "foreign"])
def test_a_damaged_entry_is_rebuilt_with_a_log_line(cache_dir, warm_cpu, monkeypatch, caplog, damage):
    path = entry_file(cache_dir)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        for i in range(len(data) // 2, len(data), 997):
            data[i] ^= 0xFF
    elif damage == "truncate":
        del data[len(data) // 3:]
    elif damage == "version":
        struct.pack_into("<H", data, 8, bpf_cache.FORMAT_VERSION + 1)
    else:
        data[:8] = b"ELF\0\0\0\0\0"
    path.write_bytes(bytes(data))
    before = bpf_compile.compiles
    with caplog.at_level(logging.WARNING, logger="agent.bpfload"):
        with ProbeSet(families("cpu")) as rebuilt:
            assert "on_cpu_sample" in rebuilt.objs.programs
    assert bpf_compile.compiles == before + 1
    lines = [r.getMessage() for r in caplog.records if "BPF cache" in r.getMessage()]
    assert len(lines) == 1 and "discarded" in lines[0], lines
    assert entry_file(cache_dir).read_bytes() != bytes(data)  # rebuilt, and loads warm again
    monkeypatch.setattr(os, "fork", no_fork)
    with ProbeSet(families("cpu")):
        pass


def test_an_entry_the_verifier_refuses_is_rebuilt(cache_dir, warm_cpu, caplog):
    """Intact on disk but wrong for the kernel (the checksum is right): discarded at load, compiled again."""
    path = entry_file(cache_dir)
    key = path.read_bytes()[16:48].hex()
    entry = bpf_cache.decode(key, path.read_bytes())
    bad = [p if p.name != "on_cpu_sample" else bpf_cache.ProgDef(
        p.name, p.kernel_name, p.type, p.license, p.kern_version, p.insns[:-8], p.relocs)  # no exit: refused
        for p in entry.programs]
    path.write_bytes(bpf_cache.encode(key, bpf_cache.Entry(entry.maps, tuple(bad))))
    before = bpf_compile.compiles
    with caplog.at_level(logging.WARNING, logger="agent.bpfload"):
        with ProbeSet(families("cpu")):
            pass
    assert bpf_compile.compiles == before + 1
    assert any("does not load" in r.getMessage() for r in caplog.records)


def test_ring_size_is_set_at_load_time_from_one_entry(cache_dir, warm_cpu, monkeypatch):
    """The ring buffer's size and the wake-up threshold differ per drain interval; the compile does not."""
    monkeypatch.setattr(os, "fork", no_fork)
    sizes = {}
    for interval_s in (0.1, 4.0):  # 64 pages (the compiled size), then a bigger ring made at load
        plan = compile_plan(families("cpu"), filter_pids=False, drain_interval_s=interval_s)
        with ProbeSet(families("cpu"), drain_interval_s=interval_s) as s:
            sizes[interval_s] = libbpf.map_info(s.objs.maps["records"]).max_entries
            assert sizes[interval_s] == plan.ring_pages * PAGE_SIZE
            value = ctypes.c_uint32()
            assert libbpf.lib().bpf_map_lookup_elem(s.objs.maps["rb_wake_bytes"], ctypes.byref(ctypes.c_uint32(0)),
                                                    ctypes.byref(value)) == 0
            assert value.value == plan.wake_bytes > 1
    assert sizes[4.0] > sizes[0.1]


def test_a_compile_for_a_bigger_ring_makes_it_at_that_size(cache_dir):
    """A cold start whose ring is not the compiled size gets the size it asked for."""
    plan = compile_plan(families("cpu"), filter_pids=False, drain_interval_s=4.0)
    assert plan.ring_pages > MIN_RINGBUF_PAGES
    with ProbeSet(families("cpu"), drain_interval_s=4.0) as s:
        assert libbpf.map_info(s.objs.maps["records"]).max_entries == plan.ring_pages * PAGE_SIZE


def test_doctor_plan_sees_the_entry(cache_dir):
    plan = compile_plan(families("cpu"), filter_pids=False)
    assert not plan.is_cached()
    plan.load().close()
    assert plan.is_cached()


@pytest.mark.alone  # a 2-thread fixture for a wall time, its own runtime/pprof samples counted
def test_warm_capture_samples_the_fixture_as_its_own_profile(cache_dir, tmp_path):
    binary = build_go("cpusplit")
    # the same options (the frequency only sizes the ring buffer, set at load time, but the test needs no other)
    cold = run_bpfprof("--log-level", "info", "record", "--frequency", "499", "-o", str(tmp_path / "cold.pb.gz"), "--",
                       str(binary), "-duration", "2s")
    assert "compiled BPF programs cached" in cold.stderr, cold.stderr
    ours, theirs = tmp_path / "warm.pb.gz", tmp_path / "go.pb.gz"
    warm = run_bpfprof("--log-level", "info", "record", "--frequency", "499", "-o", str(ours), "--",
                       str(binary), "-duration", "20s", "-hz", "500", "-cpuprofile", str(theirs))
    # the last start's hint: loaded by a thread of the CLI while the agent's modules were imported
    assert "loaded from the cache ahead of the start" in warm.stderr and "compiled BPF" not in warm.stderr, warm.stderr
    mine, go = read_pprof(ours), read_pprof(theirs)
    assert go.total() > 2500, "the fixture's own profile is too small to compare with"
    for fn in FUNCTIONS:
        assert abs(mine.cum_share(fn) - go.cum_share(fn)) <= TOLERANCE, (
            f"{fn}: bpfprof {mine.cum_share(fn):.3f} vs runtime/pprof {go.cum_share(fn):.3f}")


@pytest.fixture
def spinner():
    """A process that burns a CPU: ~50 samples in each half-second capture of it."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield spin
    spin.kill()
    spin.wait()


def test_a_stale_start_hint_is_closed_and_the_start_loads_its_own(cache_dir, tmp_path, spinner):
    """A hint naming another selection's entry: that load is closed, the start loads its own and fixes the hint."""
    def record(*opts: str) -> subprocess.CompletedProcess:
        return run_bpfprof("--log-level", "info", "record", *opts, "--duration", "0.5", "--pid", str(spinner.pid),
                           "-o", str(tmp_path / "out.pb.gz"))

    record("--no-kernel")
    record()  # a second entry, and its hint
    hints = {p.name: p for p in cache_dir.glob("*.start")}
    assert len(hints) == 2, hints
    ours = cache_dir / (preload.hint_name("record", ["--duration", "0.5", "--pid", "1", "-o", "x"]) + ".start")
    other = next(p for p in hints.values() if p != ours)
    right = ours.read_bytes()
    ours.write_bytes(other.read_bytes())  # the no-kernel start's key under this start's name
    stale = record()
    assert "stale start hint" in stale.stderr and "loaded from the cache in" in stale.stderr, stale.stderr
    assert "compiled BPF" not in stale.stderr, stale.stderr
    assert read_pprof(tmp_path / "out.pb.gz").total() > 0
    assert ours.read_bytes() == right  # rewritten: the next start loads ahead again
    assert "ahead of the start" in record().stderr
