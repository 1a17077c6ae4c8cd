"""CPU profile: bpf/cpu.bpf.c on a cpu-clock perf event at N Hz on every CPU.

Samples carry the thread's trace context (Go labels, OTEP 4947 record) for
processes registered in `trace_procs` (agent/trace_context.py); the FS base
offset the BPF side needs comes from the kernel's BTF.
"""

from __future__ import annotations

import ctypes
import logging

from agent import btf, libbpf
from agent.bpf_compile import LoadedObjects, ProgType
from agent.probe import Probe, RawRecord, Window
from agent.process_tracker import ProcessTracker
from agent.profile_builder import add_records
from agent.records import ProcCtx, RecordKind
from agent.stack_resolver import StackResolver
from agent.trace_context import TraceContextRegistry
from exporters.profile import Profile, cpu_profile
from symbolizer.errors import BpfLoadError

log = logging.getLogger(__name__)
TRACE_PROCS_MAP = "trace_procs"


def fsbase_offset() -> int:
    """offsetof(task_struct, thread.fsbase) on this kernel, -1 when BTF cannot say."""
    try:
        return btf.task_fsbase_offset()
    except btf.BtfError as e:
        log.warning("no FS base offset from BTF (%s): Go labels only in user-mode samples, "
                    "no OpenTelemetry thread contexts", e)
        return -1


class CpuProbe(Probe):
    name = "cpu"
    source = "cpu.bpf.c"
    kinds = (RecordKind.CPU,)
    PROGRAM = "on_cpu_sample"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.events_per_cpu_s = config.frequency_hz
        self.records: list[RawRecord] = []
        self.trace_contexts: TraceContextRegistry | None = None

    def defines(self) -> dict[str, int]:
        return {"TASK_FSBASE_OFFSET": fsbase_offset()}

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

    def on_record(self, rec: RawRecord) -> None:
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
        return [profile]
