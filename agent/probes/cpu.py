"""CPU profile: bpf/cpu.bpf.c on a cpu-clock perf event at N Hz on every CPU.

Samples carry the thread's trace context (Go labels, OTEP 4947 record) for
processes registered in `trace_procs` (agent/tracectx/registry.py); the FS base
offset the BPF side needs comes from the kernel's BTF.

Unwinding (ProbeConfig.unwind): "cfi" has BPF send the user registers and a
copy of the stack top, and the agent walks it with each binary's CFI /
pclntab (agent/processes/stack_resolver.py UserStacks) as records arrive, so
a capture keeps addresses, not stack copies; "fp" keeps the frame-pointer
stack BPF walks.
"""

from __future__ import annotations

import ctypes
import logging

from agent.bpfload import btf, libbpf
from agent.bpfload.bpf_compile import LoadedObjects, ProgType
from agent.bpfload.records import ProcCtx, PyProc, RawRecord, RecordKind
from agent.errors import BpfLoadError
from agent.probes.family import Accumulator, ProbeConfig, ProbeFamily, Window
from agent.probes.profile_builder import add_records
from agent.processes.stack_resolver import StackResolver
from agent.processes.tracker import ProcessTracker
from agent.python.frames import PythonFrames
from agent.python.registry import PythonRegistry
from agent.tracectx.registry import TraceContextRegistry
from exporters.profile import Profile
from exporters.profile_types import cpu_profile

log = logging.getLogger(__name__)
TRACE_PROCS_MAP = "trace_procs"
PY_PROCS_MAP = "py_procs"



def fsbase_offset() -> int:
    """offsetof(task_struct, thread.fsbase) on this kernel, -1 when BTF cannot say."""
    try:
        return btf.task_fsbase_offset()
    except btf.BtfError as e:
        log.warning("no FS base offset from BTF (%s): Go labels only in user-mode samples, "
                    "no OpenTelemetry thread contexts", e)
        return -1


class CpuAccumulator(Accumulator):
    family: CpuProbe

    def __init__(self, family: CpuProbe) -> None:
        super().__init__(family)
        self.records: list[RawRecord] = []

    def on_record(self, rec: RawRecord) -> None:
        python = self.family.python
        if python is not None:
            # before complete(): a new process's first record may wait there for its unwind tables, and
            # its samples carry no Python frames until it is registered
            proc = python.observe(rec.pid, rec.thread_name)
            if rec.py_frames and proc is not None and proc.layout is not None:
                # now, while the process lives: a profile is built after short-lived ones exit
                self.family.python_frames.read_codes(rec.pid, rec.py_frames, proc.layout)
        self.records.append(self.family.complete(rec))
        if self.family.trace_contexts is not None:
            self.family.trace_contexts.observe(rec.pid, rec.thread_name)

    def record_count(self) -> int:
        return len(self.records)

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        config = self.family.config
        profile = cpu_profile(window.start_ns, window.duration_ns, config.frequency_hz)
        period = profile.period
        python = self.family.python
        reshape = None
        if python is not None and any(r.py_frames for r in self.records):
            frames = self.family.python_frames

            def reshape(r: RawRecord, stack: tuple) -> tuple:
                proc = python.processes.get(r.pid)
                if not r.py_frames or proc is None or proc.layout is None:
                    return stack, ()
                return frames.merge(r.pid, stack, r.py_frames, proc.layout), ()

        add_records(profile, self.records, resolver, tracker, window, lambda r: [r.value, r.value * period],
                    with_kernel=config.with_kernel, reshape=reshape)
        if python is not None:
            profile.comments.extend(python.unsupported())
        return [profile]


class CpuProbe(ProbeFamily):
    """Unwinding follows config.unwind: "cfi" has BPF send the user registers and a copy of the stack
    top, walked as records arrive; "fp" keeps the frame-pointer stack BPF walks."""

    name = "cpu"
    source = "cpu.bpf.c"
    kinds = (RecordKind.CPU,)
    accumulator = CpuAccumulator
    ustack_switch = "CPU_USTACK"
    bpf_unwind_switch = "CPU_BPF_UNWIND"
    bpf_unwind_prog = ProgType.PERF_EVENT
    PROGRAM = "on_cpu_sample"

    def __init__(self, config: ProbeConfig, tracker: ProcessTracker) -> None:
        super().__init__(config, tracker)
        self.events_per_cpu_s = config.frequency_hz
        self.trace_contexts: TraceContextRegistry | None = None
        self.python: PythonRegistry | None = None
        self.python_frames = PythonFrames()

    def defines(self) -> dict[str, int]:
        return {"TASK_FSBASE_OFFSET": fsbase_offset(), **super().defines()}

    def programs(self) -> dict[str, ProgType]:
        return {self.PROGRAM: ProgType.PERF_EVENT}

    def maps(self) -> list[str]:
        return [TRACE_PROCS_MAP, PY_PROCS_MAP]

    def attach(self, objs: LoadedObjects) -> list[int]:
        super().attach(objs)
        return libbpf.attach_cpu_clock(objs.programs[self.PROGRAM], self.config.frequency_hz)

    def on_start(self, objs: LoadedObjects, first: Accumulator) -> None:
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
        py_fd = objs.maps[PY_PROCS_MAP]

        def write_py(pid: int, value: PyProc | None) -> None:
            key = ctypes.c_uint32(pid)
            if value is None:
                libbpf.lib().bpf_map_delete_elem(py_fd, ctypes.byref(key))
                return
            try:
                libbpf.map_update(py_fd, key, value)
            except BpfLoadError as e:  # map full: this process keeps native frames only
                log.warning("pid %d: Python frames not registered: %s", pid, e)

        self.python = PythonRegistry(write_py)
        for pid in self.config.pids or ():  # known targets: registered before their first sample
            self.trace_contexts.observe(pid)
            self.python.observe(pid)
