"""CPU profile: bpf/cpu.bpf.c on a cpu-clock perf event at N Hz on every CPU.

Samples carry the thread's trace context (Go labels, OTEP 4947 record) for
processes registered in `trace_procs` (agent/tracectx/registry.py); the FS base
offset the BPF side needs comes from the kernel's BTF.

Unwinding (`unwind`): "cfi" has BPF send the user registers and a copy of
the stack top, and the agent walks it with each binary's CFI / pclntab
(agent/processes/stack_resolver.py UserStacks) as records arrive, so a capture keeps
addresses, not stack copies; "fp" keeps the frame-pointer stack BPF walks.
"cfi" needs a ProcessTracker (use_tracker()); without one the probe uses "fp".
"""

from __future__ import annotations

import ctypes
import logging

from agent.bpfload import btf, libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import ProcCtx, RawRecord, RecordKind
from agent.errors import BpfLoadError
from agent.probes.family import StackCopyProbe, Window
from agent.probes.profile_builder import add_records
from agent.processes.stack_resolver import (
    DEFAULT_UNWIND,
    DEFAULT_USTACK_BYTES,
    MAX_USTACK_BYTES,
    StackResolver,
    UnwindMode,
    UserStacks,
)
from agent.processes.tracker import ProcessTracker
from agent.tracectx.registry import TraceContextRegistry
from exporters.profile import Profile
from exporters.profile_types import cpu_profile

log = logging.getLogger(__name__)
TRACE_PROCS_MAP = "trace_procs"

# Stack copied per sample. 8 KiB held every complete chain of the fixtures
# (280 B to 3.4 KiB, bench/unwind_speed.py) with room for big frames; deeper
# stacks continue with the frame-pointer stack. The per-CPU output buffer
# (bpf/cpu.bpf.c: record + copy + one page of verifier slack) must stay
# under the kernel's 32 KiB per-CPU value limit.
def fsbase_offset() -> int:
    """offsetof(task_struct, thread.fsbase) on this kernel, -1 when BTF cannot say."""
    try:
        return btf.task_fsbase_offset()
    except btf.BtfError as e:
        log.warning("no FS base offset from BTF (%s): Go labels only in user-mode samples, "
                    "no OpenTelemetry thread contexts", e)
        return -1


class CpuProbe(StackCopyProbe):
    name = "cpu"
    source = "cpu.bpf.c"
    kinds = (RecordKind.CPU,)
    PROGRAM = "on_cpu_sample"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.events_per_cpu_s = config.frequency_hz
        self.records: list[RawRecord] = []
        self.trace_contexts: TraceContextRegistry | None = None
        self.unwind = UnwindMode.FP
        self.ustack_bytes = 0
        self.user_stacks: UserStacks | None = None

    def use_tracker(self, tracker: ProcessTracker, unwind: UnwindMode = DEFAULT_UNWIND,
                    ustack_bytes: int = DEFAULT_USTACK_BYTES) -> None:
        """Unwind with `unwind`; records are completed against `tracker`'s snapshots as they arrive.

        Call before the probe set is built (the copy size is compiled in).
        """
        if not 0 < ustack_bytes <= MAX_USTACK_BYTES:
            raise ValueError(f"stack copy of {ustack_bytes} bytes: choose 1 to {MAX_USTACK_BYTES}")
        self.unwind = UnwindMode(unwind)
        self.ustack_bytes = ((ustack_bytes + 7) & ~7) if self.unwind == UnwindMode.CFI else 0
        self.user_stacks = UserStacks(tracker) if self.unwind == UnwindMode.CFI else None

    def defines(self) -> dict[str, int]:
        return {"TASK_FSBASE_OFFSET": fsbase_offset(), **self.ustack_defines("CPU_USTACK")}

    def programs(self) -> dict[str, ProgType]:
        return {self.PROGRAM: ProgType.PERF_EVENT}

    def maps(self) -> list[str]:
        return [TRACE_PROCS_MAP]

    def attach(self, objs: LoadedObjects) -> list[int]:
        return libbpf.attach_cpu_clock(objs.programs[self.PROGRAM], self.config.frequency_hz)

    def on_start(self, objs: LoadedObjects) -> None:
        fd = objs.maps[TRACE_PROCS_MAP]

        def write(pid: int, value: ProcCtx | None) -> None:
            key = ctypes.c_uint32(pid)
            if value is None:
                libbpf.lib().bpf_map_delete_elem(fd, ctypes.byref(key))
            else:
                try:
                    libbpf.map_update(fd, key, value)
                except BpfLoadError as e:  # map full: this process goes without trace context
                    log.warning("pid %d: trace context not registered: %s", pid, e)

        self.trace_contexts = TraceContextRegistry(write)
        for pid in self.config.pids or ():  # known targets: registered before their first sample
            self.trace_contexts.observe(pid)

    def new_accumulator(self) -> CpuProbe:
        """Shares the unwinder and the trace-context registry set up in this instance."""
        acc = CpuProbe(self.config)
        acc.unwind, acc.trace_contexts = self.unwind, self.trace_contexts
        self.share_unwinder(acc)
        return acc

    def on_record(self, rec: RawRecord) -> None:
        rec = self.complete(rec)
        self.records.append(rec)
        if self.trace_contexts is not None:
            self.trace_contexts.observe(rec.pid, rec.thread_name)

    def record_count(self) -> int:
        return len(self.records)

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        profile = cpu_profile(window.start_ns, max(0, window.end_ns - window.start_ns), self.config.frequency_hz)
        period = profile.period
        add_records(profile, self.records, resolver, tracker, window, lambda r: [r.value, r.value * period],
                    with_kernel=self.config.with_kernel)
        profile.comments.extend(f"dropped: {line}" for line in self.unwind_lines())
        return [profile]

    def unwind_lines(self) -> list[str]:
        """How many user stacks came out short, by reason (empty with frame-pointer unwinding)."""
        return self.user_stacks.drop_lines() if self.user_stacks is not None else []
