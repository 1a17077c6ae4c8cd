"""Lock-contention profile against ground truth: a C fixture that measures its
own waits, and a Go fixture whose runtime block profile (rate 1) is the witness."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time

from agent.bpfload import libbpf
from agent.probes.lock import LockProbe, go_sema_sites, libc_name
from agent.probes.uprobes import SWEEP_AT
from fixtures.builder import build_c, build_go
from gotool import gotool_total
from recording import BPFPROF, read_pprof, run_bpfprof, track_group


def _delay(prof, function: str, lock: str | None = None) -> tuple[int, int]:
    """(contentions, delay ns) of samples whose stack holds `function` (and of one lock source)."""
    chosen = [s for s in prof.samples if function in s.functions and (lock is None or s.labels.get("lock") == lock)]
    return sum(s.values[0] for s in chosen), sum(s.values[1] for s in chosen)


def _check_gotool(tmp_path, out, prof):
    assert gotool_total(tmp_path, out, "contentions", "minimum") == prof.total(0)
    assert gotool_total(tmp_path, out, "delay", "ns") == prof.total(1)


def test_pthread_contention_per_call_site_matches_the_fixture(tmp_path):
    binary = build_c("lock_contend")
    out = tmp_path / "lock.pb.gz"
    proc = run_bpfprof("record", "--profile", "lock", "-o", str(out), "--", str(binary), "0.3")
    truth = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^(\w+) (\d+) (\d+)$", proc.stdout, re.M)}
    prof = read_pprof(out)
    assert prof.sample_types == [("contentions", "count"), ("delay", "nanoseconds")]
    assert prof.raw.string_table[prof.raw.default_sample_type] == "delay"
    sites = {"contend_mutex": ("pthread_mutex", "pthread_mutex_lock"),
             "contend_rwlock": ("pthread_rwlock", "pthread_rwlock_wrlock"),
             "read_side": ("pthread_rwlock", "pthread_rwlock_rdlock")}
    for site, (lock, func) in sites.items():
        want_ns, want_n = truth[site]
        assert want_ns > 0.03e9 and want_n >= 10, (site, truth)  # the fixture really contended (readers: least)
        n, ns = _delay(prof, site, lock)
        assert abs(ns - want_ns) <= 0.15 * want_ns, (site, ns, want_ns)
        assert abs(n - want_n) <= 0.15 * want_n, (site, n, want_n)
        # the call site, although libc has no frame pointers: lock function, then its caller
        stacks = {(libc_name(s.functions[0]), s.functions[1]) for s in prof.samples
                  if s.labels.get("lock") == lock and site in s.functions}
        assert stacks == {(func, site)}, stacks
    # main's pthread_join sleeps on a futex, but joins no lock: left out
    assert not [s for s in prof.samples if any("pthread_join" in f for f in s.functions)], "pthread_join as a lock"
    _check_gotool(tmp_path, out, prof)


def test_go_mutex_contention_matches_its_block_profile(tmp_path):
    binary = build_go("lockcontend")
    out, witness = tmp_path / "lock.pb.gz", tmp_path / "block.pb.gz"
    # 1 s before contending: uprobes go in when the program execs, after the agent sees it
    run_bpfprof("record", "--profile", "lock", "-o", str(out), "--", str(binary), str(witness), "1")
    prof, go = read_pprof(out), read_pprof(witness)
    # main.main waits on a WaitGroup (the block profile has it): not a lock, left out
    _, main_ns = _delay(prof, "main.main")
    assert main_ns <= 0.01 * _delay(go, "main.main")[1], main_ns
    for site in ("main.contendMutex", "main.contendRWMutex"):
        go_n, go_ns = _delay(go, site)
        n, ns = _delay(prof, site, "go")
        assert go_ns > 0.3e9, (site, go_ns)
        assert abs(ns - go_ns) <= 0.15 * go_ns, (site, ns, go_ns)
        assert abs(n - go_n) <= 0.15 * go_n, (site, n, go_n)
    mutex = [s for s in prof.samples if "main.contendMutex" in s.functions and s.labels.get("lock") == "go"]
    assert all(s.functions[:2] == ["runtime.semacquire1", "internal/sync.runtime_SemacquireMutex"] for s in mutex)
    _check_gotool(tmp_path, out, prof)


def test_semacquire1_sites_agree_with_objdump():
    binary = build_go("lockcontend")
    sites = go_sema_sites(str(binary))
    assert sites is not None
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    body = text.split("<runtime.semacquire1>:\n", 1)[1].split("\n\n", 1)[0]
    start = int(text.split(" <runtime.semacquire1>:")[0].rsplit("\n", 1)[1], 16)
    rows = [(int(a, 16), ins.strip()) for a, ins in (line.split(":", 1) for line in body.splitlines())]
    rets = [a for a, ins in rows if ins == "ret"]
    after_park = [rows[i + 1][0] for i, (_, ins) in enumerate(rows) if ins.startswith("call") and
                  ins.endswith("<runtime.gopark>")]
    # non-PIE Go binary: file offset = address - (start - entry offset)
    delta = start - sites.entry
    assert [r - delta for r in rets] == list(sites.returns)
    assert [r - delta for r in after_park] == list(sites.resumes)


def test_go_lock_profile_is_contention_only(tmp_path):
    """Four goroutines on one sync.Mutex and nothing else: the contended Lock call is (almost) the whole
    lock profile, although the Go runtime parks idle Ms on futexes and main waits on a WaitGroup; and the
    total agrees with Go's own mutex profile (every event) of the same run."""
    binary = build_go("mutexonly")
    out, witness = tmp_path / "lock.pb.gz", tmp_path / "mutex.pb.gz"
    run_bpfprof("record", "--profile", "lock", "-o", str(out), "--", str(binary), str(witness), "1")
    prof, go = read_pprof(out), read_pprof(witness)
    total = prof.total(1)
    _, contended = _delay(prof, "main.contend")
    go_total = go.total(1)
    print(f"lock delay {total / 1e6:.1f} ms, in main.contend's Lock {contended / 1e6:.1f} ms, "
          f"Go mutex profile {go_total / 1e6:.1f} ms")
    by_stack = {}
    for s in prof.samples:
        key = (s.labels.get("lock"), tuple(s.functions[:6]))
        by_stack[key] = by_stack.get(key, 0) + s.values[1]
    for key, ns in sorted(by_stack.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {ns / 1e6:9.1f} ms {key}")
    assert go_total > 0.3e9, go_total
    lock_call = [s for s in prof.samples if "main.contend" in s.functions]
    assert all("sync.(*Mutex).Lock" in s.functions for s in lock_call)
    # Idle Ms sleep on futexes until the exit, when the process's maps already read empty: their
    # stacks resolve in the snapshot held (tracker.refresh keeps it), so runtime.futex is left out.
    assert contended >= 0.95 * total, (contended, total)
    assert abs(total - go_total) <= 0.10 * go_total, (total, go_total)
    assert abs(contended - go_total) <= 0.10 * go_total, (contended, go_total)
    # what was left out is said: main's WaitGroup wait at least
    left = [m for c in prof.raw.comment
            if (m := re.match(r"lock: (\d+) futex waits \(([\d.]+) ms\) left out", prof.raw.string_table[c]))]
    assert len(left) == 1 and int(left[0][1]) >= 1 and float(left[0][2]) > 0, [prof.raw.string_table[c] for c in prof.raw.comment]


def _uprobe_handles(pid: int) -> tuple[int, int]:
    """(open fds, BPF links) of process `pid` now; (0, 0) once it is gone."""
    fds = links = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            fds += 1
            with contextlib.suppress(OSError):
                links += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf_link"
    return fds, links


def test_uprobes_of_exited_go_processes_are_closed(tmp_path):
    """`record -- go test ./...` runs hundreds of Go binaries, each given semaphore uprobes at its exec.
    Those of exited ones are closed as new ones come, off the drain thread, so the capture's fds and
    kernel uprobes stay bounded instead of growing with every child, and removing them (an RCU grace
    period each) neither holds up the capture nor its end: the command takes about as long under
    `record` as without it (with a perf event per probe point, 60 children took 31 s, not 3)."""
    binary = build_go("cpusplit")
    per_file = LockProbe._sema_uprobes(go_sema_sites(str(binary)))
    per_process = len({program for program, _ in per_file}) if libbpf.uprobe_links() else len(per_file)
    children = 240
    # each lives 40 ms: long enough for the agent to place its uprobes after its exec
    script = f"for i in $(seq {children}); do {binary} -duration 40ms -workers 1 > /dev/null; done"
    t0 = time.monotonic()
    subprocess.run(["sh", "-c", script], check=True)
    alone_s = time.monotonic() - t0
    out = tmp_path / "lock.pb.gz"
    t0 = time.monotonic()
    proc = subprocess.Popen([str(BPFPROF), "--log-level", "info", "record", "--profile", "lock", "-o", str(out), "--", "sh", "-c", script],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    track_group(proc.pid)
    counts = []
    while proc.poll() is None:
        counts.append(_uprobe_handles(proc.pid))
        time.sleep(0.02)
    recorded_s = time.monotonic() - t0
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    closed = re.search(r"lock: uprobes of (\d+) exited processes closed", err)
    assert closed and int(closed[1]) >= children // 2, err[-2000:]
    fds, links = [c[0] for c in counts if c[0]], [c[1] for c in counts]
    # every child held per_process fds while it ran: without the sweep the peak is children x per_process more
    # than the start; with it, at most what two sweeps' worth of processes hold (and the closer's backlog)
    assert max(fds) - min(fds) < 2 * SWEEP_AT * per_process < children * per_process, (fds[:5], max(fds))
    if libbpf.uprobe_links():
        assert 0 < max(links) < 2 * SWEEP_AT * per_process, max(links)
    # each child's run is 40 ms; the bound holds on a loaded 2-CPU machine, a close per probe point does not
    assert recorded_s < children * 0.040 * 3 + 10, (recorded_s, alone_s)
    read_pprof(out)
