"""A capture recorded once (tests/replay/capture.py) and replayed without BPF, root or the binaries.

A recording (JSON) holds:
  records    every ring-buffer record as BPF wrote it (base64 of the bytes parse_record got)
  processes  the tracker's snapshot of each recorded pid: name, exe, executable mappings
  files      per mapped file (by build id): its PT_LOAD segments and the function symbols
             covering the addresses the records hit; FileSymbols.from_symbols() rebuilds it
  live       what the real pipeline made of the same records in the live run: samples,
             per-stack counts (folded), losses
Frames come back as symbol names only (no DWARF lines, Go tables or CFI rows are kept),
which is why the fixture is built without -g and captured with frame pointers.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from agent.processes.tracker import ProcessInfo, ProcessTracker
from exporters.profile import Location, Profile
from symbolizer.elf import LoadSegment
from symbolizer.elf_symbols import Symbol
from symbolizer.file_symbols import FileId, FileSymbols, SymbolCache
from symbolizer.frames import BuildIdKind, Mapping
from symbolizer.process_symbols import MappedFile, ProcessSymbols

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class Recording:
    """A recording as loaded: the raw records and the JSON of everything else."""

    records: list[bytes]
    meta: dict

    @classmethod
    def load(cls, path: Path) -> Recording:
        meta = json.loads(path.read_text())
        return cls([base64.b64decode(r) for r in meta.pop("records")], meta)

    def tracker(self, proc_root: str, max_processes: int | None = None) -> ProcessTracker:
        """A tracker holding the recorded snapshots. `proc_root` should be an empty directory: a pid it
        does not know, or a refresh, then finds no process instead of reading this machine's /proc."""
        tracker = ProcessTracker(SymbolCache(), proc_root=proc_root, max_processes=max_processes)
        files: dict[str, FileSymbols] = {}
        for build_id, f in self.meta["files"].items():
            files[build_id] = FileSymbols.from_symbols(
                FileId(build_id, BuildIdKind(f["kind"])), f["path"],
                [LoadSegment(*s) for s in f["segments"]], [Symbol(*s) for s in f["symbols"]])
        for p in self.meta["processes"]:
            mapped = []
            for start, end, offset, path, build_id in p["mappings"]:
                fs = files.get(build_id)
                mapping = Mapping(start, end, offset, path, build_id, fs.id.kind if fs else BuildIdKind.NONE)
                mapped.append(MappedFile(mapping, fs))
            tracker.adopt(ProcessInfo(pid=p["pid"], name=p["name"], exe=p["exe"], symbols=ProcessSymbols(mapped)))
        return tracker


def frame_names(loc: Location) -> list[str]:
    """A location's function names, innermost first; `file+0xoffset` when no symbol covers it."""
    if loc.frames:
        return [f.function for f in loc.frames]
    m = loc.mapping
    return [f"{m.name}+{loc.address - m.start + m.file_offset:#x}" if m else f"?{loc.address:#x}"]


def folded(profile: Profile) -> Counter[str]:
    """Samples per stack, 'process;root;...;leaf' (function names), over the first value."""
    out: Counter[str] = Counter()
    for s in profile.samples:
        names = [n for loc in reversed(s.key.stack) for n in reversed(frame_names(loc))]
        process = profile.processes[s.key.pid].name if s.key.pid in profile.processes else str(s.key.pid)
        out[";".join([process, *names])] += s.values[0]
    return out
