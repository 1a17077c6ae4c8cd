"""Records -> Profile: symbolize stacks and aggregate, for every probe family.

Trace context read in BPF becomes the sample's labels and link: Go pprof
labels are kept as labels (pprof labels; OTLP attributes), and a `trace_id` +
`span_id` pair among them (hex) becomes SampleKey.link; a lone `span_id` (the
Grafana otel-profiling-go convention) a link with a zero trace id. An OTEP
4947 record is the link itself, and wins over labels: the OTEP makes it
authoritative. Samples merge only when stack, labels and link are all equal.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable

from agent.bpfload.records import RawRecord
from agent.probes.family import Window
from agent.probes.sample_store import SampleStore
from agent.processes.stack_resolver import StackResolver
from agent.processes.tracker import ProcessTracker
from exporters.profile import Location, ProcessMeta, Profile, Sample, SampleKey, TraceLink
from exporters.profile_types import empty_profile

TRACE_ID_LABEL = "trace_id"
SPAN_ID_LABEL = "span_id"
ZERO_TRACE_ID = bytes(16)  # "only the span is known" (TraceLink docstring)


def _hex_id(value: str, size: int) -> bytes | None:
    """`size` bytes from a hex label value, None unless it is exactly that and not all zero."""
    if len(value) != 2 * size:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if any(raw) else None


def link_from_labels(labels: Iterable[tuple[str, str]]) -> TraceLink | None:
    """The link a label set names: trace_id + span_id, or a lone span_id with a zero trace id."""
    values = dict(labels)
    span_id = _hex_id(values.get(SPAN_ID_LABEL, ""), 8)
    if span_id is None:
        return None
    trace_id = _hex_id(values.get(TRACE_ID_LABEL, ""), 16)
    return TraceLink(trace_id or ZERO_TRACE_ID, span_id)


def trace_context(r: RawRecord) -> tuple[tuple[tuple[str, str], ...], TraceLink | None]:
    """(labels, link) of a record: its Go labels sorted by key, and the span it ran in."""
    labels = tuple(sorted(r.go_labels))
    if r.otel_link is not None and any(r.otel_link.span_id):
        return labels, r.otel_link
    return labels, link_from_labels(labels)


def add_records(profile: Profile, store: SampleStore, resolver: StackResolver, tracker: ProcessTracker,
                window: Window, weights: Callable[[array, array], list[int]], with_kernel: bool = True,
                labels: Callable[[RawRecord], tuple[tuple[str, str], ...]] | None = None,
                reshape: Callable[[RawRecord, tuple[Location, ...]],
                                  tuple[tuple[Location, ...], tuple[tuple[str, str], ...]] | None] | None = None
                ) -> None:
    """Add each event of `store` to `profile`, at its entry's symbolized stack.

    `weights(values, times)` gives the sample values an entry's events add
    up to (their record values and CLOCK_MONOTONIC times). `reshape(record,
    stack)`, when given, returns the stack to use and the entry's labels
    (instead of `labels`), or None to leave the entry out: for families that
    classify by what the symbolized stack holds.

    The store interned identical records as they arrived; here a stack (pid,
    image and raw addresses) is resolved once, and each distinct sample
    (stack, thread, cpu, trace context, labels) has its SampleKey built once,
    both kept by the resolver for the next interval's build.
    """
    samples: dict[tuple, Sample] = {}
    sample_keys = resolver.sample_keys
    wall_offset_ns = window.wall_offset_ns
    for r, times, values in store.entries():
        kernel_ips = r.kernel_ips if with_kernel else ()
        stack, complete = resolver.cached_stack(r.pid, kernel_ips, r.user_ips, r.image)
        if reshape is None:
            extra = labels(r) if labels is not None else ()
        else:
            reshaped = reshape(r, stack)
            if reshaped is None:
                continue
            stack, extra = reshaped
        # The resolver keeps the Locations alive as long as a key naming them by id: their ids name a
        # (reshaped) stack. The image names the process (its name is a label).
        key = (r.pid, tuple(map(id, stack)), r.tid, r.thread_name, r.cpu, r.go_labels, r.otel_link, extra,
               id(r.image))
        sample = samples.get(key)
        if sample is None:
            got = sample_keys.get(key)
            if got is None or got[1] is not r.image:
                got = (_sample_key(r, stack, extra, tracker), r.image, complete)
                sample_keys.put(key, got)
            sample = samples[key] = profile.sample(got[0])
        totals = sample.values
        for i, v in enumerate(weights(values, times)):
            totals[i] += v
        sample.timestamps_ns.extend(t + wall_offset_ns for t in times)


def count_and_sum(values: array, _times: array) -> list[int]:
    """Weights of wait events (off-CPU blocks, lock waits): how many, and their total (ns)."""
    return [len(values), sum(values)]


def _sample_key(r: RawRecord, stack: tuple[Location, ...], extra: tuple[tuple[str, str], ...],
                tracker: ProcessTracker) -> SampleKey:
    info = r.image or tracker.get(r.pid)
    go_labels, link = trace_context(r)
    # cpu kept per sample for OTLP's cpu.logical_number; pprof readers merge
    # samples that differ only in it
    return SampleKey(stack=stack, pid=r.pid, tid=r.tid, thread_name=r.thread_name,
                     labels=((("process_name", info.name),) if info else ()) + extra + go_labels, link=link, cpu=r.cpu)


def waits_profile(kind: str, store: SampleStore, resolver: StackResolver, tracker: ProcessTracker,
                  window: Window, with_kernel: bool = True, **how: Callable) -> Profile:
    """A profile of `kind` whose events are waits (off-CPU blocks, lock waits: value in ns), each one
    event of its duration; `how`: add_records' labels or reshape."""
    profile = empty_profile(kind, window.start_ns, window.duration_ns)
    add_records(profile, store, resolver, tracker, window, count_and_sum, with_kernel, **how)
    return profile


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
