"""Running the real `bpfprof record` CLI and reading what it wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from exporters.pprof import decode_pprof

BPFPROF = Path(sys.executable).parent / "bpfprof"


# Process groups of agents a test started in their own session: a test that fails before it
# stops its agent must not leave it running (and loading the machine) for the tests after it.
_GROUPS: set[int] = set()


def track_group(pid: int) -> None:
    """Remember a child started with start_new_session=True, for kill_leftover_groups()."""
    _GROUPS.add(pid)


def kill_all(*procs: subprocess.Popen | None) -> None:
    """Kill and reap each process given (None: never started); one already gone is left as it is."""
    for p in procs:
        if p is not None:
            p.kill()
            p.wait()


def kill_leftover_groups() -> None:
    """SIGKILL the groups of tracked children still running (the integration conftest, after each test)."""
    for pid in list(_GROUPS):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _GROUPS.discard(pid)


def run_bpfprof(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed console script; assert exit 0 when `check`."""
    proc = subprocess.run([str(BPFPROF), *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"bpfprof {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return proc


@dataclass
class DecodedSample:
    """A pprof sample with names resolved: frames leaf first, one list per location."""

    locations: list[list[str]]  # per location: function names, innermost (inlined) first
    kinds: list[str]  # per location: mapping file name ("" if none)
    values: list[int]
    labels: dict[str, str]
    num_labels: dict[str, int]

    @property
    def functions(self) -> list[str]:
        return [f for loc in self.locations for f in loc]


@dataclass
class Decoded:
    samples: list[DecodedSample]
    sample_types: list[tuple[str, str]]
    inline_pairs: set[tuple[str, str]]  # (inlined function, function it was inlined into)
    raw: object

    def total(self, index: int = 0) -> int:
        return sum(s.values[index] for s in self.samples)

    def cum_share(self, function: str, index: int = 0, pid: int | None = None) -> float:
        """Share of the value whose stack contains `function` anywhere."""
        chosen = [s for s in self.samples if pid is None or s.num_labels.get("pid") == pid]
        total = sum(s.values[index] for s in chosen)
        hit = sum(s.values[index] for s in chosen if function in s.functions)
        return hit / total if total else 0.0


def read_pprof(path: Path) -> Decoded:
    """Decode a pprof file (ours or Go's) into names, with our protobuf classes."""
    p = decode_pprof(path.read_bytes())
    st = p.string_table
    fn = {f.id: st[f.name] for f in p.function}
    maps = {m.id: st[m.filename] for m in p.mapping}
    locs = {}
    pairs: set[tuple[str, str]] = set()
    for loc in p.location:
        names = [fn[line.function_id] for line in loc.line]
        locs[loc.id] = (names, maps.get(loc.mapping_id, ""))
        for inner, outer in zip(names, names[1:], strict=False):
            pairs.add((inner, outer))
    samples = []
    for s in p.sample:
        labels, nums = {}, {}
        for lab in s.label:
            if lab.str:
                labels[st[lab.key]] = st[lab.str]
            else:
                nums[st[lab.key]] = lab.num
        samples.append(DecodedSample(
            locations=[locs[i][0] for i in s.location_id], kinds=[locs[i][1] for i in s.location_id],
            values=list(s.value), labels=labels, num_labels=nums))
    types = [(st[t.type], st[t.unit]) for t in p.sample_type]
    return Decoded(samples, types, pairs, p)


def of_binary(prof: Decoded, binary_name: str) -> Decoded:
    """Only the samples of processes named after `binary_name` (the kernel's 15-character comm): a
    fixture's own, not the gate's exec or a shell's."""
    return Decoded([s for s in prof.samples if s.labels.get("process_name") == binary_name[:15]],
                   prof.sample_types, prof.inline_pairs, prof.raw)


def by_pid(decoded: Decoded) -> dict[int, list[DecodedSample]]:
    out: dict[int, list[DecodedSample]] = defaultdict(list)
    for s in decoded.samples:
        out[s.num_labels.get("pid", 0)].append(s)
    return out
