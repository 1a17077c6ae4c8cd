"""CPU profile: bpf/cpu.bpf.c on a cpu-clock perf event at N Hz on every CPU."""

from __future__ import annotations

from agent import libbpf
from agent.bpf_compile import LoadedObjects, ProgType
from agent.probe import Probe, RawRecord, Window
from agent.process_tracker import ProcessTracker
from agent.profile_builder import add_records
from agent.records import RecordKind
from agent.stack_resolver import StackResolver
from exporters.profile import Profile, cpu_profile


class CpuProbe(Probe):
    name = "cpu"
    source = "cpu.bpf.c"
    kinds = (RecordKind.CPU,)
    PROGRAM = "on_cpu_sample"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.events_per_cpu_s = config.frequency_hz
        self.records: list[RawRecord] = []

    def programs(self) -> dict[str, ProgType]:
        return {self.PROGRAM: ProgType.PERF_EVENT}

    def attach(self, objs: LoadedObjects) -> list[int]:
        return libbpf.attach_cpu_clock(objs.programs[self.PROGRAM], self.config.frequency_hz)

    def on_record(self, rec: RawRecord) -> None:
        self.records.append(rec)

    def record_count(self) -> int:
        return len(self.records)

    def profiles(self, resolver: StackResolver, tracker: ProcessTracker, window: Window) -> list[Profile]:
        profile = cpu_profile(window.start_ns, max(0, window.end_ns - window.start_ns), self.config.frequency_hz)
        period = profile.period
        add_records(profile, self.records, resolver, tracker, window, lambda r: [r.value, r.value * period],
                    with_kernel=self.config.with_kernel)
        return [profile]
