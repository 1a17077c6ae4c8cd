"""Read a pprof profile back into the neutral Profile (for `bpfprof convert`).

The inverse of encode_pprof as far as pprof carries it: labels `pid` and
`tid` (numeric) and `thread_name` become SampleKey fields, other string
labels stay labels; per-sample timestamps, cpu and trace links are not in
pprof and come back empty. pprof has no build-id kind: a build id with a
'/' is Go's, 32 hex digits our file hash (htlhash), anything else GNU.
Frame kinds: locations in `[kernel.kallsyms]` are kernel, functions named
like Go (`runtime.`, `pkg.Func`) in a mapping with a Go build id are go,
everything else native.
"""

from __future__ import annotations

import re

from google.protobuf.message import DecodeError

from exporters.pprof import decode_pprof
from exporters.profile import (
    KERNEL_MAPPING_PATH,
    Location,
    ProcessMeta,
    Profile,
    Sample,
    SampleKey,
    ValueType,
    is_placeholder,
)
from exporters.profile_types import kind_of_sample_type
from exporters.proto import profile_pb2
from symbolizer.errors import ExportError
from symbolizer.frames import BuildIdKind, Frame, FrameKind, Mapping

_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def _build_id_kind(build_id: str) -> BuildIdKind:
    if not build_id:
        return BuildIdKind.NONE
    if "/" in build_id:
        return BuildIdKind.GO
    if _HEX32.match(build_id):
        return BuildIdKind.HASH
    return BuildIdKind.GNU


def _frame_kind(mapping: Mapping | None) -> FrameKind:
    if mapping is not None and mapping.path == KERNEL_MAPPING_PATH:
        return FrameKind.KERNEL
    if mapping is not None and mapping.build_id_kind == BuildIdKind.GO:
        return FrameKind.GO
    return FrameKind.NATIVE


class _Checked:
    """One table of a pprof message, indexed: ExportError naming the table for an index it lacks."""

    def __init__(self, table: object, what: str) -> None:
        self._table = table
        self._what = what

    def __getitem__(self, i: int) -> object:
        try:
            return self._table[i]  # type: ignore[index]
        except (IndexError, KeyError):
            n = len(self._table)  # type: ignore[arg-type]
            raise ExportError(f"malformed pprof: {self._what} {i} is not in its table ({n} entries)") from None


def profile_from_pprof(data: bytes | profile_pb2.Profile) -> Profile:
    """A neutral Profile from pprof bytes (gzip'd or not) or a parsed message.

    Raises ExportError on bytes that are not a profile (InputTooLarge when
    they inflate past MAX_PPROF_BYTES) and on references to strings,
    functions or locations the profile lacks.
    """
    if isinstance(data, bytes):
        try:
            msg = decode_pprof(data)
        except DecodeError as e:
            raise ExportError(f"not a pprof profile: {e}") from None
    else:
        msg = data
    st = _Checked(msg.string_table, "string index")

    def vt(v: profile_pb2.ValueType) -> ValueType:
        return ValueType(st[v.type], st[v.unit])

    mappings: dict[int, Mapping] = {}
    for m in msg.mapping:
        build_id = st[m.build_id]
        mappings[m.id] = Mapping(start=m.memory_start, end=m.memory_limit, file_offset=m.file_offset,
                                 path=st[m.filename], build_id=build_id, build_id_kind=_build_id_kind(build_id))
    functions = _Checked({f.id: f for f in msg.function}, "function id")
    locations: dict[int, Location] = {}
    # Equal locations, and then equal stacks, are one object each: samples are grouped by their stack's id()
    # instead of hashing a SampleKey, which hashes every frame of its stack.
    equal: dict[Location, Location] = {}
    for loc in msg.location:
        mapping = mappings.get(loc.mapping_id)
        kind = _frame_kind(mapping)
        frames = []
        for n, line in enumerate(loc.line):
            f = functions[line.function_id]
            name, system_name = st[f.name], st[f.system_name]
            frames.append(Frame(function=name, kind=kind, file=st[f.filename], line=line.line,
                                system_name="" if system_name == name else system_name,
                                inlined=n < len(loc.line) - 1, start_line=f.start_line))
        location = Location(address=loc.address, mapping=mapping, frames=tuple(frames))
        if is_placeholder(location):  # our encoder's module+0xoffset line: unresolved
            location = Location(address=loc.address, mapping=mapping)
        locations[loc.id] = equal.setdefault(location, location)

    checked_locations = _Checked(locations, "location id")
    profile = Profile(sample_types=[vt(t) for t in msg.sample_type], period_type=vt(msg.period_type),
                      period=msg.period, start_time_ns=msg.time_nanos, duration_ns=msg.duration_nanos,
                      comments=[st[c] for c in msg.comment], default_sample_type=st[msg.default_sample_type])
    # Without a default sample type pprof shows the last one (what Go's runtime/pprof relies on).
    profile.kind = kind_of_sample_type(profile.default_sample_type or (profile.sample_types[-1].type
                                                                        if profile.sample_types else ""))
    stacks: dict[tuple[int, ...], tuple[Location, ...]] = {}
    samples: dict[tuple, Sample] = {}
    for n, s in enumerate(msg.sample):
        if len(s.value) != len(msg.sample_type):
            raise ExportError(f"malformed pprof: sample {n} has {len(s.value)} values for "
                              f"{len(msg.sample_type)} sample types")
        pid, tid, thread_name, labels = 0, 0, "", []
        for label in s.label:
            key = st[label.key]
            if key == "pid" and not label.str:
                pid = label.num
            elif key == "tid" and not label.str:
                tid = label.num
            elif key == "thread_name":
                thread_name = st[label.str]
            elif label.str:
                labels.append((key, st[label.str]))
        stack = tuple(checked_locations[i] for i in s.location_id)
        stack = stacks.setdefault(tuple(map(id, stack)), stack)
        cheap = (id(stack), pid, tid, thread_name, tuple(labels))
        sample = samples.get(cheap)
        if sample is None:
            key = SampleKey(stack=stack, pid=pid, tid=tid, thread_name=thread_name, labels=cheap[4])
            sample = samples[cheap] = Sample(key=key, values=list(s.value))
            profile.samples.append(sample)
        else:  # the same key twice: one sample, values added (as Profile.add)
            sample.values = [a + b for a, b in zip(sample.values, s.value, strict=True)]
        if pid not in profile.processes:
            name = dict(labels).get("process_name", "")
            profile.processes[pid] = ProcessMeta(pid=pid, name=name, service_name=name)
    return profile
