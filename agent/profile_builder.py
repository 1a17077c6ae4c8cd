"""Records -> Profile: symbolize stacks and aggregate, for every probe family."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from agent.probe import RawRecord, Window
from agent.process_tracker import ProcessTracker
from agent.stack_resolver import StackResolver
from exporters.profile import ProcessMeta, Profile, SampleKey


def add_records(profile: Profile, records: Iterable[RawRecord], resolver: StackResolver, tracker: ProcessTracker,
                window: Window, values: Callable[[RawRecord], list[int]], with_kernel: bool = True,
                labels: Callable[[RawRecord], tuple[tuple[str, str], ...]] | None = None) -> None:
    """Add each record as one event of `profile`, at its symbolized stack."""
    for r in records:
        stack = resolver.stack(r.pid, r.kernel_ips if with_kernel else (), r.user_ips)
        info = tracker.get(r.pid)
        extra = labels(r) if labels is not None else ()
        key = SampleKey(stack=stack, pid=r.pid, tid=r.tid, thread_name=r.thread_name,
                        labels=((("process_name", info.name),) if info else ()) + extra)
        profile.add(key, values(r), r.ktime_ns + window.wall_offset_ns)


def add_process_meta(profile: Profile, tracker: ProcessTracker) -> None:
    """Resource metadata of every process that has samples in `profile`."""
    pids = {s.key.pid for s in profile.samples}
    for pid in pids:
        info = tracker.get(pid)
        if info is None:
            profile.processes[pid] = ProcessMeta(pid=pid)
            continue
        profile.processes[pid] = ProcessMeta(
            pid=pid, name=info.name, executable_path=info.exe, container_id=info.container.container_id,
            service_name=info.service_name or info.exe.rsplit("/", 1)[-1] or info.name)
