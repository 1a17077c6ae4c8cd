"""The neutral Profile model: what every encoder reads.

It knows nothing of pprof or OTLP. A Location is one program counter in one
mapping with the frames that address resolves to, innermost (inlined) first,
exactly the order pprof's Location.line uses. A Sample's stack is leaf first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from symbolizer.frames import Frame, FrameKind, Mapping, hash_once

# The pseudo-path of kernel addresses' mapping, as perf names it.
KERNEL_MAPPING_PATH = "[kernel.kallsyms]"


@dataclass(frozen=True)
class ValueType:
    """A sample value's meaning, as pprof's ValueType: ('cpu', 'nanoseconds')."""

    type: str
    unit: str


@dataclass(frozen=True)
class Location:
    """One address. `frames` empty means unresolved: encoders keep the address.

    `address` is the runtime virtual address in the process (or kernel); the
    mapping, when known, lets readers compute the file offset.
    """

    address: int
    mapping: Mapping | None
    frames: tuple[Frame, ...] = ()

    __hash__ = hash_once

    @property
    def file_offset(self) -> int | None:
        """Offset of `address` in the mapped file (what addr2line, nm and readelf of that file, found by
        the mapping's build id, work with); None when no mapping is known."""
        if self.mapping is None:
            return None
        return self.address - self.mapping.start + self.mapping.file_offset


def unresolved_name(loc: Location) -> str:
    """How a frame the symbolizer could not resolve reads everywhere (pprof, OTLP, folded, viewer, top
    tables): the mapped file's name plus the file offset, `libz.so.1.2.13+0x5e03`, never the runtime
    address, which no tool can look up; `0xADDRESS` when no mapping is known."""
    offset = loc.file_offset
    if offset is None:
        return f"0x{loc.address:x}"
    return f"{loc.mapping.name}+0x{offset:x}"


def placeholder_frame(loc: Location) -> Frame:
    """The one function line an encoder gives an unresolved location, so readers that show functions
    (`go tool pprof`, OTLP backends) show unresolved_name(); the address and mapping (with its build id)
    stay, so a later symbolizer can still resolve it. Decoders drop it again: is_placeholder()."""
    kernel = loc.mapping is not None and loc.mapping.path == KERNEL_MAPPING_PATH
    return Frame(function=unresolved_name(loc), kind=FrameKind.KERNEL if kernel else FrameKind.NATIVE)


def is_placeholder(loc: Location) -> bool:
    """Whether a decoded location's only frame is the placeholder_frame() of its address: unresolved."""
    if len(loc.frames) != 1:
        return False
    f = loc.frames[0]
    return not f.file and not f.line and f.function == unresolved_name(loc)


@dataclass(frozen=True)
class TraceLink:
    """The trace and span that were running when a sample was taken.

    `trace_id` is 16 bytes, `span_id` 8; a zero trace id means only the span
    is known (the otel-profiling-go convention of a lone span_id label).
    """

    trace_id: bytes
    span_id: bytes


@dataclass(frozen=True)
class ProcessMeta:
    """What is known of a process, for resource attributes (OTLP) and labels."""

    pid: int
    name: str = ""  # comm
    executable_path: str = ""  # inside the process's mount namespace
    container_id: str = ""
    service_name: str = ""  # OTEL_SERVICE_NAME of the process, else its executable name


@dataclass(frozen=True)
class SampleKey:
    """What makes two samples the same sample: stack and every attribute, link included."""

    stack: tuple[Location, ...]
    pid: int
    tid: int
    thread_name: str
    labels: tuple[tuple[str, str], ...] = ()
    cpu: int = -1  # logical CPU, -1 when not kept (it splits samples that would merge)
    link: TraceLink | None = None

    __hash__ = hash_once


@dataclass
class Sample:
    """Aggregated events of one SampleKey: values add, timestamps are all kept."""

    key: SampleKey
    values: list[int]
    timestamps_ns: list[int] = field(default_factory=list)

    @property
    def stack(self) -> tuple[Location, ...]:
        return self.key.stack


@dataclass
class Profile:
    """A profile of one kind (cpu, heap...) over one time window.

    `start_time_ns` is wall-clock (Unix epoch) nanoseconds; per-sample
    timestamps are wall-clock too. `period` is in `period_type` units.
    `comments` carry things a reader should know (drops, truncations).
    """

    sample_types: list[ValueType]
    period_type: ValueType
    period: int
    start_time_ns: int
    duration_ns: int
    samples: list[Sample] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    default_sample_type: str = ""
    processes: dict[int, ProcessMeta] = field(default_factory=dict)
    kind: str = ""  # profile type name: "cpu", "offcpu", "heap", "lock", "goroutine"

    def add(self, key: SampleKey, values: list[int], timestamp_ns: int | None = None) -> None:
        """Add one event; merges with an existing sample of the same key."""
        sample = self.sample(key)
        for i, v in enumerate(values):
            sample.values[i] += v
        if timestamp_ns is not None:
            sample.timestamps_ns.append(timestamp_ns)

    def sample(self, key: SampleKey) -> Sample:
        """The sample of `key`, new with zero values if there was none. For builders that intern keys: they
        look a key up once (hashing a SampleKey hashes its whole stack) and add events to the Sample."""
        index = self._index()
        sample = index.get(key)
        if sample is None:
            sample = Sample(key=key, values=[0] * len(self.sample_types))
            self.samples.append(sample)
            index[key] = sample
        return sample

    def _index(self) -> dict[SampleKey, Sample]:
        idx = self.__dict__.get("_by_key")
        if idx is None or len(idx) != len(self.samples):
            idx = {s.key: s for s in self.samples}
            self.__dict__["_by_key"] = idx
        return idx

    def total(self, value_index: int = 0) -> int:
        """Sum of one value over all samples."""
        return sum(s.values[value_index] for s in self.samples)
