"""Agent CPU per sample on the address-only record path, by stage, against an older tree of the code.

    PYTHONPATH=. .venv/bin/python bench/sample_path_speed.py [-n 20000] [--base DIR] [--profile STAGE]

No BPF, no root: the records are real frame-pointer records (a `record --unwind fp`
capture): tests/replay/data/unwind_split_fp.json's (one C process, 5-frame
user stacks, no kernel), or, with `--records FILE`, a whole-system capture
with kernel stacks taken by `--capture FILE` (root, BPF: 5 s at 99 Hz while
the cpusplit Go fixture, unwind_deep.cc and readzero.c (kernel stacks) keep both CPUs busy; keep FILE in /tmp). They are
rewritten into N
records over THREADS threads and both CPUs with increasing timestamps, every
other one carrying an OTEP 4947 trace-context trailer naming one of SPANS
spans, so links, tids and cpus split samples as they do in a daemon. They go
through the functions the agent runs:

  parse    the ring buffer callback's form (ctypes.string_at of the record)
           into the probe set's dispatch (agent/probes/probe_set.py), parse only:
           what every record cost before repeats were known by their bytes
  deliver  the same dispatch into the daemon's BpfCollector pipeline, what
           the agent runs per record: a repeat of a sample of the interval
           straight to its entry (CapturePipeline.deliver_bufs), else the parse,
           accept (selection, cap), counts, tracker.note_record, route, the
           CPU accumulator's on_record (the parse included, not added to it)
  build    cut + build: symbolization (StackResolver), SampleKeys, Profile.add
  encode   encode_pprof of the built profile (the exporter's share)

Each stage is timed over the N records (best of --repeat) and printed in us
per sample. `--base DIR` runs the same script against the tree in DIR (for
example `git archive 9c7906a | tar -x -C DIR`) in a child and prints both
side by side; the script uses only interfaces both trees have. `--profile
STAGE` prints cProfile's top functions of one stage instead.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import json
import os
import pstats
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
THREADS = 4
SPANS = 3
STAGES = ("parse", "deliver", "build", "encode")
HEADER = struct.Struct("<IIIIQQQHHhh16s")
OTEL_TRAILER = struct.Struct("<II16s8sB7x")
CTX_OTEL = 1  # CtxKind.OTEL
PERIOD_NS = 10_101_010  # 99 Hz


def make_records(raw: list[bytes], n: int) -> list[bytes]:
    """`n` records cycling through `raw`: thread, cpu and time rewritten; every other one with a trace context."""
    out = []
    t0 = HEADER.unpack_from(raw[0])[4]
    for i in range(n):
        buf = raw[i % len(raw)]
        f = list(HEADER.unpack_from(buf))
        pid = f[1]
        f[2] = pid + i % THREADS if f[2] == pid else f[2]  # tid: a main thread spread over THREADS
        f[3] = i % 2  # cpu
        f[4] = t0 + i * PERIOD_NS // 2  # two CPUs sampled
        kn, un = f[7], f[8]
        end = HEADER.size + 8 * (kn + un)
        rec = HEADER.pack(*f) + buf[HEADER.size:end]
        if i % 2:
            span = i // 2 % SPANS + 1
            rec += OTEL_TRAILER.pack(CTX_OTEL, OTEL_TRAILER.size, b"\x11" * 16, span.to_bytes(8, "big"), 1)
        out.append(rec)
    return out


def dispatcher(deliver, deliver_buf=None):
    """The probe set's ring-buffer callback, built by ProbeSet.start without BPF, behind a stand-in for the ring
    buffer's consume: [(address, size)] -> None."""
    from agent.probes import probe_set

    captured = {}

    class Ring:  # stands in for libbpf.RingBuffer: keeps the callback libbpf would call
        def __init__(self, _fd, callback):
            captured["cb"] = callback

    ps = probe_set.ProbeSet.__new__(probe_set.ProbeSet)
    ps.families, ps._follow, ps._events, ps.unwind_tables, ps.python, ps.received_bytes = [], False, [], None, None, 0
    ps.objs = SimpleNamespace(maps={"records": -1})
    real = probe_set.libbpf.RingBuffer
    probe_set.libbpf.RingBuffer = Ring
    try:
        ps.start(deliver, deliver_buf) if deliver_buf is not None else ps.start(deliver)
    finally:
        probe_set.libbpf.RingBuffer = real
    cb = captured["cb"]
    string_at = ctypes.string_at
    batch = getattr(probe_set.libbpf, "BATCH", None)  # trees whose ring buffer hands records over in batches

    def deliver_all(spans: list[tuple[int, int]]) -> None:  # libbpf.RingBuffer's consume: copy out, hand over
        if batch is None:
            for data, size in spans:
                cb(string_at(data, size))
            return
        for i in range(0, len(spans), batch):
            cb([string_at(data, size) for data, size in spans[i:i + batch]])

    return deliver_all


def capture(out: Path, seconds: float) -> None:
    """A whole-system `--unwind fp` capture with kernel stacks while cpusplit runs, as a recording (recording.py)."""
    import base64
    import threading

    sys.path.insert(0, str(HERE.parent / "tests"))
    from agent.bpfload.records import parse_record
    from agent.capture.session import RecordOptions, RecordSession
    from agent.probes import probe_set
    from agent.processes.stack_resolver import UnwindMode
    from agent.processes.tracker import ProcessTracker
    from fixtures.builder import build_c, build_go
    from replay.capture import snapshot
    from symbolizer.file_symbols import SymbolCache

    fp = ("-O2", "-fno-omit-frame-pointer")
    runs = [[str(build_go("cpusplit")), "-workers", "1", "-duration", f"{seconds + 5:g}s"],
            [str(build_c("unwind_deep", flags=fp)), f"{seconds + 5:g}"], [str(build_c("readzero", flags=fp)),
                                                                          f"{seconds + 5:g}"]]
    loads = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for argv in runs]
    raw: list[bytes] = []

    def tapped(buf: bytes):
        raw.append(bytes(buf))
        return parse_record(buf)

    try:
        time.sleep(1)
        probe_set.parse_record = tapped
        tracker = ProcessTracker(SymbolCache())
        session = RecordSession(RecordOptions(frequency_hz=99, duration_s=seconds, unwind=UnwindMode.FP), tracker)
        session.run(threading.Event())
        probe_set.parse_record = parse_record
        files, processes = snapshot(raw, tracker)
    finally:
        for load in loads:
            load.kill()
            load.wait()
    data = {"about": f"bench/sample_path_speed.py --capture: whole system, {seconds:g} s at 99 Hz, fp, kernel",
            "live": {}, "files": files, "processes": processes,
            "records": [base64.b64encode(b).decode() for b in raw]}
    out.write_text(json.dumps(data))
    print(f"{out}: {len(raw)} records of {len(processes)} processes")


def measure(n: int, repeat: int, profile_stage: str | None, records_path: Path | None) -> dict[str, float]:
    sys.path.insert(0, str(Path.cwd() / "tests"))
    from agent.daemon.config import AgentConfig, LimitsConfig, ProfilingConfig
    from agent.daemon.daemon import BpfCollector
    from agent.daemon.metrics import AgentStats
    from exporters.pprof import encode_pprof
    from replay.recording import DATA, Recording
    from symbolizer.kallsyms import KernelSymbols

    recording = Recording.load(records_path or DATA / "unwind_split_fp.json")
    with_kernel = records_path is not None
    kernel = KernelSymbols() if with_kernel else None  # loaded once, as a daemon does
    records = make_records(recording.records, n)
    blob = ctypes.create_string_buffer(b"".join(records))
    base = ctypes.addressof(blob)
    spans = []
    at = 0
    for r in records:
        spans.append((base + at, len(r)))
        at += len(r)
    proc = tempfile.mkdtemp(prefix="bench-proc-")
    best = dict.fromkeys(STAGES, float("inf"))
    prof = cProfile.Profile() if profile_stage else None

    def timed(stage, fn, *args):
        if prof is not None and stage == profile_stage:
            prof.enable()
        t = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t
        if prof is not None and stage == profile_stage:
            prof.disable()
        best[stage] = min(best[stage], dt)
        return out

    for _ in range(repeat):
        cfg = AgentConfig(profiling=ProfilingConfig(profiles=("cpu",), frequency_hz=99, kernel_stacks=with_kernel,
                                                    unwind="fp"),
                          limits=LimitsConfig(max_interval_samples=10 * n), host_proc=proc)
        collector = BpfCollector(cfg, recording.tracker(proc, cfg.limits.max_processes), AgentStats())
        pipeline = collector.pipeline
        pipeline._kernel = kernel
        pipeline.begin()
        parse_only = dispatcher(lambda rec: None)
        # older trees: deliver_buf (one record), or neither
        full = dispatcher(pipeline.deliver, getattr(pipeline, "deliver_bufs", getattr(pipeline, "deliver_buf", None)))

        def run(deliver_all):
            deliver_all(spans)

        timed("parse", run, parse_only)
        timed("deliver", run, full)
        profiles = timed("build", lambda c: c.build(c.cut())[0], collector)
        [profile] = profiles
        assert profile.total() == n, (profile.total(), n)
        timed("encode", encode_pprof, profile)
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    us = {s: best[s] / n * 1e6 for s in STAGES}
    us["samples"] = len(profile.samples)
    return us


def run_tree(tree: Path, n: int, repeat: int, records: Path | None) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    extra = ["--records", str(records.resolve())] if records else []
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "-n", str(n), "--repeat",
                          str(repeat), *extra], cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=20000, help="records per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--base", type=Path, help="an older tree to measure beside this one")
    parser.add_argument("--profile", choices=STAGES, help="cProfile one stage (this tree only)")
    parser.add_argument("--records", type=Path, help="a recording from --capture (default: the replay test's)")
    parser.add_argument("--capture", type=Path, metavar="FILE", help="record one (root, BPF) into FILE and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture:
        capture(args.capture, 5)
        return
    if args.child or args.profile:
        us = measure(args.n, args.repeat, args.profile, args.records)
        if args.child:
            print(json.dumps(us))
            return
    trees = {"this": HERE.parent}
    if args.base:
        trees = {"base": args.base.resolve(), **trees}
    results = {name: run_tree(tree, args.n, args.repeat, args.records) for name, tree in trees.items()}
    what = args.records or "replay capture"
    print(f"{args.n} fp records ({what}, {THREADS} threads, 2 cpus, half with a trace link); "
          f"us per sample, best of {args.repeat}")
    print(f"{'stage':10}" + "".join(f"{name:>10}" for name in results) + ("   ratio" if args.base else ""))
    for stage in (*STAGES, "total"):
        vals = [r[stage] if stage != "total" else sum(r[s] for s in STAGES if s != "parse") for r in results.values()]
        line = f"{stage:10}" + "".join(f"{v:10.2f}" for v in vals)
        if args.base:
            line += f"   {vals[0] / vals[1]:5.1f}x"
        print(line)
    print("distinct samples: " + ", ".join(f"{name} {int(r['samples'])}" for name, r in results.items()))


if __name__ == "__main__":
    main()
