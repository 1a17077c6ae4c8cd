"""Raw addresses -> Locations (mapping + frames), once per distinct address;
and CPU samples' user stacks completed by unwinding their stack copy.

User addresses resolve through the process's snapshot (ProcessTracker),
kernel addresses through /proc/kallsyms. Each (pid, address) is resolved once
per resolver; a process whose address falls outside its snapshot gets its
maps re-read once (it mapped new code after first sight).

Where to unwind. Since #12 the default (`cfi`) walks user stacks in BPF
(bpf/unwind.bpf.h) from per-file rows (agent/unwind/tables.py): the records
carry addresses only. This module's UserStacks walks the stack copies that
remain: every sample with `--unwind copy` (the agent-side walker, kept as a
reference and for kernels or programs the BPF walker cannot serve), and with
`cfi` the few samples of a process whose tables are not loaded yet, or that
met code mapped since (the walk continues where BPF stopped). Measured
before #12 (bench/unwind_vs_perf.py, bench/hotpath_vs_bcc.py): the copy path
cost ~8 KiB of ring buffer and ~65-105 us of agent CPU per sample.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from agent.bpfload.records import USTACK_CONTINUE, USTACK_RBP_UNKNOWN, USTACK_RIP_RETURN, Loss, RawRecord
from agent.processes.tracker import ProcessInfo, ProcessTracker
from exporters.profile import Location
from symbolizer.elf import NT_GNU_BUILD_ID, parse_notes
from symbolizer.errors import ElfParseError
from symbolizer.frames import BuildIdKind, Frame, FrameKind, Mapping
from symbolizer.kallsyms import KernelSymbols
from symbolizer.unwinder import FrameSource, StopReason, Unwinder

# Stack copied per sample that takes the copy path (all of them with --unwind
# copy; with cfi only those whose process has no tables yet, a few per new
# process). 16 KiB holds every complete chain of the fixtures (280 B to
# 3.4 KiB, bench/unwind_speed.py; 11.5 KiB for the 120-deep recursion of
# unwind_recursion.c), deeper ones continue with the frame-pointer stack. The
# per-CPU output buffer (common.bpf.h ustack_out: record + copy + one page of
# verifier slack) must stay under the kernel's 32 KiB per-CPU value limit.
DEFAULT_USTACK_BYTES = 16384
# Kernel locations a resolver keeps across builds before it starts over (a few MB).
MAX_KERNEL_LOCATIONS = 200_000
# Every this many builds a resolver starts over: what is kept is at most this many intervals old.
REFRESH_BUILDS = 10
MAX_USTACK_BYTES = 24576


class UnwindMode(StrEnum):
    """How user stacks (CPU samples, futex waits) are walked (`record --unwind`)."""

    CFI = "cfi"  # CFI/pclntab rows walked in BPF (bpf/unwind.bpf.h); a stack copy where it has no table yet
    COPY = "copy"  # registers + stack copy from BPF, CFI/pclntab walk in the agent for every sample
    FP = "fp"  # frame pointers, walked by bpf_get_stack


# Chosen by bench/unwind_vs_perf.py: see the figures above.
DEFAULT_UNWIND = UnwindMode.CFI


log = logging.getLogger(__name__)

KERNEL_NOTES = Path("/sys/kernel/notes")


def kernel_build_id(notes_path: Path = KERNEL_NOTES) -> str:
    """The running kernel's GNU build id from /sys/kernel/notes (a bare stream of ELF notes in the
    kernel's byte order), "" if unreadable."""
    try:
        data = notes_path.read_bytes()
        for name, ntype, desc in parse_notes(data, endian="<" if sys.byteorder == "little" else ">"):
            if name == b"GNU" and ntype == NT_GNU_BUILD_ID:
                return desc.hex()
    except (OSError, ElfParseError):
        pass
    return ""


@dataclass
class ResolverStats:
    user_addresses: int = 0
    user_unresolved: int = 0
    kernel_addresses: int = 0
    kernel_unresolved: int = 0


class KeptAcrossBuilds:
    """A build's lookups kept for the next build: what the last build used lives on, the rest goes.

    A steady host samples the same stacks interval after interval; each
    build finds last build's entries here instead of resolving and keying
    them again, and memory holds about one interval's working set.
    next_build() keeps only the entries `keep` accepts (a stack with an
    address outside its process's snapshot is resolved again: new maps may
    place it), and every REFRESH_BUILDS builds none (a debug file found
    since may name what was left unnamed).
    """

    __slots__ = ("_cur", "_prev")

    def __init__(self) -> None:
        self._cur: dict = {}
        self._prev: dict = {}

    def get(self, key: object) -> Any:
        got = self._cur.get(key)
        if got is None:
            got = self._prev.pop(key, None)
            if got is not None:
                self._cur[key] = got
        return got

    def put(self, key: object, value: object) -> None:
        self._cur[key] = value

    def next_build(self, keep: Callable[[Any], bool]) -> None:
        self._prev = {k: v for k, v in self._cur.items() if keep(v)}
        self._cur = {}

    def clear(self) -> None:
        self._prev, self._cur = {}, {}

    def __len__(self) -> int:
        return len(self._cur) + len(self._prev)


class StackResolver:
    """Turns a sample's kernel and user addresses into a leaf-first Location stack.

    One lives as long as its pipeline: begin_build() starts each interval's
    build with fresh per-address lookups and counts, and keeps the stacks
    (and the builders' SampleKeys, `sample_keys`) the last build used whose
    every address lies in a mapping.
    """

    def __init__(self, tracker: ProcessTracker, kernel: KernelSymbols | None) -> None:
        self.tracker = tracker
        self.kernel = kernel
        self._user: dict[tuple[int, int, bool, int], Location] = {}
        self._kernel: dict[tuple[int, bool], Location] = {}
        self._refreshed: set[int] = set()
        self.kernel_mapping = Mapping(start=0, end=0, file_offset=0, path="[kernel.kallsyms]",
                                      build_id=kernel_build_id(),
                                      build_id_kind=BuildIdKind.GNU)
        self.stats = ResolverStats()
        # (pid, kernel ips, user ips, exact, id(image)) -> (stack, image, every address placed in a mapping)
        self._stacks = KeptAcrossBuilds()
        self.sample_keys = KeptAcrossBuilds()  # the builders': (key, image, stack placed) by what they key
        self.stack_hits = 0  # stack lookups of this build answered from what was resolved before
        self.builds = 0

    def begin_build(self) -> None:
        """Start another interval's build: user addresses are looked up afresh (a process's maps may have
        changed), kernel ones are kept (kallsyms is read once), and so are last build's placed stacks."""
        self.stats = ResolverStats()
        self.stack_hits = 0
        self._user = {}
        self._refreshed = set()
        self.builds += 1
        if len(self._kernel) > MAX_KERNEL_LOCATIONS or self.builds % REFRESH_BUILDS == 0:
            self._kernel = {}
            self._stacks.clear()
            self.sample_keys.clear()
        else:
            self._stacks.next_build(lambda got: got[2])
            self.sample_keys.next_build(lambda got: got[2])

    def cached_stack(self, pid: int, kernel_ips: tuple[int, ...], user_ips: tuple[int, ...],
                     image: ProcessInfo | None) -> tuple[tuple[Location, ...], bool]:
        """stack() of a record's addresses, once per build and across builds: (stack, every address placed in
        a mapping: what a new snapshot cannot change).
        The image is part of the key, by identity (a pid that exec'd has other code at the same addresses),
        and held by the entry so that its id is not reused while it is."""
        where = (pid, kernel_ips, user_ips, getattr(user_ips, "exact", None), id(image))
        got = self._stacks.get(where)
        if got is not None and got[1] is image:
            if got[2]:
                self.stack_hits += 1
            return got[0], got[2]
        stack = self.stack(pid, kernel_ips, user_ips, image)
        complete = all(loc.mapping is not None for loc in stack)
        self._stacks.put(where, (stack, image, complete))
        return stack, complete

    def stack(self, pid: int, kernel_ips: tuple[int, ...], user_ips: tuple[int, ...],
              image: ProcessInfo | None = None) -> tuple[Location, ...]:
        """Leaf-first locations: kernel frames (if any) above the user frames.

        Every user address but the leaf is a return address, looked up at
        addr-1, unless `user_ips` is an UnwoundStack, which says which are exact.
        `image`: the snapshot the record was delivered under (RawRecord.image);
        default the tracker's current one for `pid`.
        """
        locs = [self._kernel_location(ip, i > 0) for i, ip in enumerate(kernel_ips)]
        exact = getattr(user_ips, "exact", None)
        if exact is None:
            # The first user address is the interrupted instruction only when the
            # sample hit user mode; under a kernel stack it is the syscall's return.
            exact = frozenset() if kernel_ips else frozenset((0,))
        for i, ip in enumerate(user_ips):
            locs.append(self._user_location(pid, ip, i not in exact, image))
        return tuple(locs)

    def _kernel_location(self, ip: int, return_address: bool) -> Location:
        key = (ip, return_address)
        loc = self._kernel.get(key)
        if loc is None:
            self.stats.kernel_addresses += 1
            frames: tuple[Frame, ...] = ()
            sym = self.kernel.lookup(ip - 1 if return_address else ip) if self.kernel else None
            if sym is not None:
                frames = (Frame(function=sym.name, kind=FrameKind.KERNEL, system_name=sym.name),)
            else:
                self.stats.kernel_unresolved += 1
            loc = Location(address=ip, mapping=self.kernel_mapping, frames=frames)
            self._kernel[key] = loc
        return loc

    def _user_location(self, pid: int, ip: int, return_address: bool, image: ProcessInfo | None) -> Location:
        current = self.tracker.get(pid)
        info = image if image is not None else current
        # Keyed by the snapshot too: a pid that exec'd resolves each image's samples in that image.
        key = (pid, ip, return_address, id(info.symbols) if info is not None else 0)
        loc = self._user.get(key)
        if loc is not None:
            return loc
        self.stats.user_addresses += 1
        mapping, frames = (None, ())
        if info is not None:
            if info.symbols.mapping_at(ip) is None and info is current and pid not in self._refreshed:
                self._refreshed.add(pid)
                info = self.tracker.refresh(pid) or info
            mapping, frames = info.symbols.resolve(ip, return_address)
        if not frames:
            self.stats.user_unresolved += 1
        loc = Location(address=ip, mapping=mapping, frames=frames)
        self._user[key] = loc
        return loc


class UnwoundStack(tuple):
    """User addresses (leaf first) from the unwinder: a tuple that also says which are exact PCs.

    `exact` holds the indices to look up as they are: the leaf of a
    user-mode sample and the interrupted PC above each signal frame. It
    travels inside RawRecord.user_ips, so every consumer of records keeps
    working and StackResolver.stack() reads it.
    """

    exact: frozenset[int]

    def __new__(cls, ips: list[int] | tuple[int, ...], exact: frozenset[int]) -> UnwoundStack:
        self = super().__new__(cls, ips)
        self.exact = exact
        return self


# Outcome names counted per sample (UserStacks.outcomes).
COMPLETE = "complete"  # the walk reached the outermost frame
FP_CONTINUED = "fp_continued"  # the walk stopped; the frame-pointer stack continued it from a frame both saw
NO_COPY = "no_copy"  # no registers/stack copy: the frame-pointer stack as BPF sent it
NO_PROCESS = "no_process"  # the process was gone before its maps were read, or the full table refused it


class FallbackSink(Protocol):
    """What UserStacks tells the BPF walker's tables (agent/unwind/tables.py UnwindTables)."""

    def want(self, pid: int, refresh: bool = False) -> None: ...

    def lost_table(self, pid: int, ktime_ns: int) -> bool: ...


class UserStacks:
    """Completes CPU records' user stacks from their registers and stack copy.

    The walk (symbolizer/unwinder.py) knows leaf callers and code without
    frame pointers; where it stops early (copy too short, no rule for a PC)
    the frame-pointer stack BPF sent continues it, from the deepest frame
    both have, and only then. Outcomes are counted per sample in `outcomes`:
    "complete", "fp_continued:<reason>", "truncated:<reason>", "no_copy".
    """

    def __init__(self, tracker: ProcessTracker) -> None:
        self.tracker = tracker
        self.unwinder = Unwinder()
        self.outcomes: Counter[str] = Counter()
        self._refreshed: set[int] = set()  # pids re-read once for a PC outside their snapshot
        # Dropped with the process: a set of every pid ever re-read grew under churn, and a process that
        # reused a pid in it was never re-read (its dlopen'ed code stayed unmapped).
        tracker.on_evict(self.forget)
        # The BPF walker's tables (agent/unwind/tables.py), told of every copy a BPF walk sent instead of
        # walking: the process wants its tables. None: no BPF walker.
        self.tables: FallbackSink | None = None

    def forget(self, pid: int) -> None:
        """The process table evicted `pid` (ProcessTracker.on_evict)."""
        self._refreshed.discard(pid)

    def complete(self, rec: RawRecord) -> RawRecord:
        """`rec` with user_ips unwound and the stack copy dropped (a record without a copy as it is).

        A copy sent where the BPF walker stopped (USTACK_CONTINUE) continues the frames it walked.
        """
        if rec.user_regs is None:
            if rec.image is None and self.tracker.get(rec.pid) is None:
                # No copy and no process: one exiting (its memory gone) or refused by the full table.
                # The sample stays, unnamed, and is counted as such.
                self.outcomes[NO_PROCESS] += 1
            elif rec.user_ips and self.tables is None:  # walked in BPF: no copy is the normal case
                self.outcomes[NO_COPY] += 1
            return rec
        flags = rec.ustack_flags
        continued = bool(flags & USTACK_CONTINUE)
        info = rec.image or self.tracker.get(rec.pid) or self.tracker.observe(rec.pid)
        if self.tables is not None:
            if not continued and self.tables.lost_table(rec.pid, rec.ktime_ns):
                # BPF found no table for a process it had one for: it exec'd (the exec hook deleted it).
                # Re-read it now, so that this and later samples resolve in the new image.
                info = self.tracker.refresh(rec.pid) or info
            self.tables.want(rec.pid, continued)
        if info is None:
            self.outcomes[NO_PROCESS] += 1
            return replace(rec, user_regs=None, user_stack=b"")
        rip, rsp, rbp = rec.user_regs
        if info.symbols.mapping_at(rip) is None and rec.pid not in self._refreshed:
            self._refreshed.add(rec.pid)  # new code mapped since the snapshot (dlopen, JIT)
            info = self.tracker.refresh(rec.pid) or info
        res = self.unwinder.unwind((rip, rsp, None if flags & USTACK_RBP_UNKNOWN else rbp), rec.user_stack,
                                   info.symbols, rip_is_return=bool(flags & USTACK_RIP_RETURN))
        pcs = res.pcs
        exact = {i for i, src in enumerate(res.sources) if src == FrameSource.SIGNAL}
        if continued and rec.user_ips:
            # the BPF walk's frames end at RIP; it sent signal frames' exact PCs as PC + 1
            prefix = list(rec.user_ips[:-1])
            exact = {i + len(prefix) for i in exact}
            pcs = prefix + pcs
        if rec.user_mode:
            exact.add(0)
        if res.stop == StopReason.OUTERMOST:
            self.outcomes[COMPLETE] += 1
        elif continued:
            self.outcomes[f"truncated:{res.stop}"] += 1
        else:
            tail = continue_with_fp(pcs, rec.user_ips)
            if tail is None:
                self.outcomes[f"truncated:{res.stop}"] += 1
            else:
                self.outcomes[f"{FP_CONTINUED}:{res.stop}"] += 1
                pcs = pcs + list(tail)
        return replace(rec, user_ips=UnwoundStack(pcs, frozenset(exact)), user_regs=None, user_stack=b"", image=info)

    def losses(self) -> list[Loss]:
        """How many user stacks came out short so far, by way (running totals)."""
        out = []
        for outcome, n in sorted(self.outcomes.items()):
            if outcome.startswith("truncated:"):
                why = outcome.split(":", 1)[1]
                out.append(Loss(f"unwind_truncated_{why}", n, f"user stacks cut short by the unwinder ({why})"))
            elif outcome == NO_COPY:
                out.append(Loss("unwind_no_copy", n, "user stacks from frame pointers only (no stack copy)"))
            elif outcome == NO_PROCESS:
                out.append(Loss("unwind_no_process", n, "user stacks of processes gone before their maps were read "
                                                        "or refused by the full process table"))
        return out


def continue_with_fp(unwound: list[int], fp_ips: tuple[int, ...]) -> tuple[int, ...] | None:
    """The part of the frame-pointer stack above the unwound one, None if they share no frame.

    A frame-pointer walk only ever loses frames relative to a CFI walk, so
    the last unwound address is looked for at an index no deeper than its
    own; the deepest such match wins (in recursion the same return address
    repeats, and the nearest is the likeliest same frame).
    """
    if not fp_ips or not unwound:
        return None
    last = unwound[-1]
    for j in range(min(len(unwound), len(fp_ips)) - 1, -1, -1):
        if fp_ips[j] == last:
            return fp_ips[j + 1:]
    return None
