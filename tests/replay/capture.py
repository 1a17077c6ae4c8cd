"""Record the capture that tests/unit/test_pipeline_replay.py replays. Run by hand, as root:

    cd <checkout> && sudo PYTHONPATH=. .venv/bin/python tests/replay/capture.py [-o FILE]

It builds tests/fixtures/c/unwind_split.c (hot() called by caller_a and caller_b
in a 70/30 split of work) at -O0 without -g, so that every function, the leaf
hot() included, sets up a frame and a frame-pointer walk from any sample sees
its caller; runs it for a couple of seconds under a real `record` capture
(the capture pipeline and its probe set, frame pointers, no kernel stacks);
and writes tests/replay/data/unwind_split_fp.json (format: recording.py):
every ring-buffer record exactly as parse_record got it (the probe set's
parse_record is wrapped for this run only), the tracker's snapshot of each
recorded process with, per mapped file, its build id, PT_LOAD segments and
only the symbols the records' addresses fall in (no binary is kept), and what
the live pipeline made of it all.

Re-record after a change to the record layout (agent/bpfload/records.py) or
to what the snapshot needs; the replay test's exact counts then change too.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from agent.bpfload.records import parse_record  # noqa: E402
from agent.capture.session import RecordOptions, RecordSession  # noqa: E402
from agent.probes import probe_set  # noqa: E402
from agent.processes.stack_resolver import UnwindMode  # noqa: E402
from agent.processes.tracker import ProcessTracker  # noqa: E402
from fixtures.builder import build_c  # noqa: E402
from replay.recording import DATA, folded  # noqa: E402
from symbolizer.file_symbols import SymbolCache  # noqa: E402

FIXTURE = "unwind_split"
FLAGS = ("-O0", "-fno-omit-frame-pointer")
SECONDS = "2"
FREQUENCY_HZ = 199


def snapshot(raw: list[bytes], tracker: ProcessTracker) -> tuple[dict[str, dict], list[dict]]:
    """The recording's `files` and `processes` (recording.py) of the records `raw` and the tracker that saw them."""
    files: dict[str, dict] = {}
    processes = []
    records = [parse_record(b) for b in raw]
    for pid in sorted({r.pid for r in records}):
        info = tracker.get(pid)
        if info is None:
            continue
        mappings = []
        for mf in info.symbols.mappings:
            m, fs = mf.mapping, mf.symbols
            mappings.append([m.start, m.end, m.file_offset, m.path, m.build_id if fs is not None else ""])
            if fs is not None and m.build_id not in files:
                files[m.build_id] = {"kind": fs.id.kind.value, "path": m.path,
                                     "segments": [list(s) for s in fs.load_segments], "symbols": {}}
        # The symbols covering each address (and address - 1, where return addresses are looked up).
        for r in records:
            if r.pid != pid:
                continue
            for ip in r.user_ips:
                for addr in (ip, ip - 1):
                    mf = info.symbols.mapping_at(addr)
                    if mf is None or mf.symbols is None or mf.symbols.symbols is None:
                        continue
                    vaddr = mf.symbols.translate(addr, mf.mapping.start, mf.mapping.file_offset)
                    sym = mf.symbols.symbols.lookup(vaddr) if vaddr is not None else None
                    if sym is not None:
                        files[mf.mapping.build_id]["symbols"][sym.start] = [sym.name, sym.start, sym.size]
        processes.append({"pid": pid, "name": info.name, "exe": info.exe, "mappings": mappings})
    for f in files.values():
        f["symbols"] = sorted(f["symbols"].values(), key=lambda s: s[1])

    return files, processes


def record(out: Path) -> None:
    binary = build_c(FIXTURE, flags=FLAGS)
    raw: list[bytes] = []

    def tapped(buf: bytes):
        raw.append(bytes(buf))
        return parse_record(buf)

    probe_set.parse_record = tapped  # the probe set's dispatch looks it up at each record
    tracker = ProcessTracker(SymbolCache())
    options = RecordOptions(frequency_hz=FREQUENCY_HZ, command=(str(binary), SECONDS), with_kernel=False,
                            unwind=UnwindMode.FP)
    session = RecordSession(options, tracker)
    stats = session.run(threading.Event())
    probe_set.parse_record = parse_record
    [profile] = session.build_profiles()
    if stats.command_exit != 0:
        raise SystemExit(f"the fixture exited {stats.command_exit}")

    files, processes = snapshot(raw, tracker)
    data = {
        "about": f"tests/replay/capture.py: {FIXTURE}.c {' '.join(FLAGS)}, {SECONDS} s at {FREQUENCY_HZ} Hz, "
                 f"frame pointers, no kernel stacks; kernel {platform.release()}, "
                 f"{time.strftime('%Y-%m-%d', time.gmtime())}",
        "fixture": {"source": f"tests/fixtures/c/{FIXTURE}.c", "flags": list(FLAGS), "argv": [SECONDS]},
        "capture": {"frequency_hz": FREQUENCY_HZ, "unwind": "fp", "with_kernel": False},
        "live": {"samples": stats.samples, "losses": {loss.reason: loss.count for loss in stats.losses},
                 "stacks": dict(sorted(folded(profile).items()))},
        "files": files,
        "processes": processes,
        "records": [base64.b64encode(b).decode() for b in raw],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=0, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, out)
    print(f"{out}: {len(raw)} records, {stats.samples} samples, {len(processes)} processes, {len(files)} files, "
          f"{out.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-o", "--output", type=Path, default=DATA / f"{FIXTURE}_fp.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the capture loads BPF programs")
    logging.basicConfig(level=logging.INFO)
    record(args.output)


if __name__ == "__main__":
    main()
