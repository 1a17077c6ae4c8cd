"""Encode a Profile as pprof (gzip'd profile.proto), the file `go tool pprof` reads.

Ids are dense from 1 in order of first appearance (leaf first, sample order),
so the same Profile always encodes to the same bytes. pprof has no per-sample
timestamps: they are dropped here (OTLP keeps them).
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Callable

from exporters.bounded_input import gunzip_limited
from exporters.profile import Location, Profile, Sample, placeholder_frame
from exporters.proto import profile_pb2
from symbolizer.frames import Frame, Mapping

# The gzip magic: pprof files are gzip'd by convention but readers accept both.
_GZIP_MAGIC = b"\x1f\x8b"
# Most bytes a pprof may inflate to when read back (convert, tests): far above a
# real profile (a busy host's minute is a few MiB), far below what a bomb would take.
MAX_PPROF_BYTES = 128 << 20

# Shared objects and pseudo-files ([vdso], [kernel.kallsyms]) are never the
# main executable; pprof labels mapping[0] as the binary in its report header.
_NOT_MAIN = re.compile(r"^\[.*\]$|\.so(\.[0-9.]+)?$")


class _Strings:
    """pprof's string table: index 0 is "", each string stored once."""

    def __init__(self) -> None:
        self.table: list[str] = [""]
        self._index: dict[str, int] = {"": 0}

    def __call__(self, s: str) -> int:
        i = self._index.get(s)
        if i is None:
            i = len(self.table)
            self.table.append(s)
            self._index[s] = i
        return i


def _main_mapping(profile: Profile) -> Mapping | None:
    """The executable most samples ran in: pprof shows mapping[0] as "the binary"."""
    weight: Counter[Mapping] = Counter()
    for sample in profile.samples:
        seen = {loc.mapping for loc in sample.stack if loc.mapping is not None}
        for m in seen:
            if not _NOT_MAIN.search(m.name):
                weight[m] += 1
    if not weight:
        return None
    # Ties go to first appearance: Counter keeps insertion order.
    return max(weight, key=lambda m: weight[m])


def _ordered_mappings(profile: Profile) -> list[Mapping]:
    order: dict[Mapping, None] = {}
    for sample in profile.samples:
        for loc in sample.stack:
            if loc.mapping is not None:
                order.setdefault(loc.mapping)
    mappings = list(order)
    main = _main_mapping(profile)
    if main is not None:
        mappings.remove(main)
        mappings.insert(0, main)
    return mappings


def encode_pprof(profile: Profile) -> bytes:
    """The profile as gzip'd pprof bytes. Pure: no I/O.

    Raises ValueError if a sample's value count differs from sample_types.
    """
    msg = profile_pb2.Profile()
    s = _Strings()

    for vt in profile.sample_types:
        msg.sample_type.add(type=s(vt.type), unit=s(vt.unit))
    msg.period_type.type = s(profile.period_type.type)
    msg.period_type.unit = s(profile.period_type.unit)
    msg.period = profile.period
    msg.time_nanos = profile.start_time_ns
    msg.duration_nanos = profile.duration_ns

    mapping_ids: dict[Mapping, int] = {}
    mapping_msgs: dict[Mapping, profile_pb2.Mapping] = {}
    for m in _ordered_mappings(profile):
        mapping_ids[m] = len(mapping_ids) + 1
        mapping_msgs[m] = msg.mapping.add(
            id=mapping_ids[m],
            memory_start=m.start,
            memory_limit=m.end,
            file_offset=m.file_offset,
            filename=s(m.path),
            build_id=s(m.build_id),
        )

    function_ids: dict[tuple[str, str, str, int], int] = {}

    def function_id(frame: Frame) -> int:
        # runtime/pprof sets system_name = name when there is no raw symbol.
        system_name = frame.system_name or frame.function
        key = (frame.function, system_name, frame.file, frame.start_line)
        fid = function_ids.get(key)
        if fid is None:
            fid = function_ids[key] = len(function_ids) + 1
            msg.function.add(
                id=fid,
                name=s(frame.function),
                system_name=s(system_name),
                filename=s(frame.file),
                start_line=frame.start_line,
            )
        return fid

    # Keyed by the whole Location, not only (mapping, address): two processes
    # without a known mapping may share an address and mean different code.
    location_ids: dict[Location, int] = {}

    def location_id(loc: Location) -> int:
        lid = location_ids.get(loc)
        if lid is not None:
            return lid
        lid = location_ids[loc] = len(location_ids) + 1
        mapping_id = mapping_ids[loc.mapping] if loc.mapping is not None else 0
        out = msg.location.add(id=lid, mapping_id=mapping_id, address=loc.address)
        # Innermost first, as pprof wants: the last line is the physical function. An unresolved
        # address gets a placeholder line (module+0xoffset) and leaves has_functions unset.
        for frame in loc.frames or (placeholder_frame(loc),):
            out.line.add(function_id=function_id(frame), line=frame.line)
        if loc.mapping is not None and loc.frames:
            m = mapping_msgs[loc.mapping]
            m.has_functions = True
            m.has_filenames |= any(f.file for f in loc.frames)
            m.has_line_numbers |= any(f.line for f in loc.frames)
            m.has_inline_frames |= len(loc.frames) > 1
        return lid

    n_values = len(profile.sample_types)
    for sample in profile.samples:
        if len(sample.values) != n_values:
            raise ValueError(f"sample has {len(sample.values)} values, profile has {n_values} sample types")
        _add_sample(msg, s, sample, location_id)

    for comment in profile.comments:
        msg.comment.append(s(comment))
    if profile.default_sample_type:
        msg.default_sample_type = s(profile.default_sample_type)

    msg.string_table.extend(s.table)
    # mtime=0: identical profiles give identical bytes.
    return gzip.compress(msg.SerializeToString(), compresslevel=6, mtime=0)


def _add_sample(
    msg: profile_pb2.Profile, s: _Strings, sample: Sample, location_id: Callable[[Location], int]
) -> None:
    # pid 0 (the idle task) reads back without a pid tag: pprof drops num 0 labels.
    key = sample.key
    out = msg.sample.add(location_id=[location_id(loc) for loc in key.stack], value=sample.values)
    out.label.add(key=s("pid"), num=key.pid)
    out.label.add(key=s("tid"), num=key.tid)
    if key.thread_name:
        out.label.add(key=s("thread_name"), str=s(key.thread_name))
    for name, value in key.labels:
        out.label.add(key=s(name), str=s(value))


def decode_pprof(data: bytes, max_bytes: int = MAX_PPROF_BYTES) -> profile_pb2.Profile:
    """Parse pprof bytes, gzip'd or not (for tests and format conversion).

    Raises google.protobuf.message.DecodeError on bytes that are not a
    profile, InputTooLarge when they inflate past `max_bytes`, ExportError on
    broken gzip.
    """
    if data[:2] == _GZIP_MAGIC:
        data = gunzip_limited(data, max_bytes, "pprof")
    msg = profile_pb2.Profile()
    msg.ParseFromString(data)
    return msg
