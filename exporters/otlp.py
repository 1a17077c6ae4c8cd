"""Encode Profiles as an OTLP ExportProfilesServiceRequest, decode it back, validate it.

Follows profiles/v1development exactly as the pinned `opentelemetry-proto`
package ships it (1.45: `ProfilesDictionary` with mapping/location/function/
link/string/attribute/stack tables, `KeyValueAndUnit.key_strindex`,
`Sample.stack_index` / `attribute_indices` / `link_index` / `values` /
`timestamps_unix_nano`, one `Profile.sample_type` per Profile).

Layout of one request (`encode_otlp`):

- One dictionary for the whole export; every table deduplicated by value and
  element 0 of every table the zero value, so index 0 means "none".
- One ResourceProfiles per process (pid), across all the Profiles exported:
  `host.name`, `process.pid`, `process.executable.name`/`.path`,
  `container.id` (when the process is in one, so backends can group by
  container), `service.name`. One ScopeProfiles (scope "bpfprof") in each.
- A neutral Profile with N sample types becomes N OTLP Profiles in each
  resource (the proto has one sample_type per Profile), the default sample
  type first, as viewers show `profiles[0]`; all share stacks and attributes.
- A Sample with timestamps gets one value per timestamp: its total split
  evenly (remainder on the last), exact for CPU where every event is
  (1, period); without timestamps, one aggregated value.
- The window [time_unix_nano, +duration_nano) is the Profile's, widened when
  needed so that every timestamp lies inside it (the agent maps ktime to wall
  clock with one offset, which can land a sample a hair outside).

Pure functions, no I/O: the sender is exporters/otlp_sender.py.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

from exporters.profile import (
    KERNEL_MAPPING_PATH,
    Location,
    ProcessMeta,
    Profile,
    Sample,
    SampleKey,
    TraceLink,
    ValueType,
    is_placeholder,
    placeholder_frame,
)
from exporters.profile_types import kind_of_sample_type
from symbolizer.errors import ExportError
from symbolizer.frames import BuildIdKind, Frame, FrameKind, Mapping

SCOPE_NAME = "bpfprof"

# Semantic-convention attribute names.
HOST_NAME = "host.name"
PROCESS_PID = "process.pid"
PROCESS_EXECUTABLE_NAME = "process.executable.name"
PROCESS_EXECUTABLE_PATH = "process.executable.path"
CONTAINER_ID = "container.id"
SERVICE_NAME = "service.name"
THREAD_ID = "thread.id"
THREAD_NAME = "thread.name"
CPU_LOGICAL_NUMBER = "cpu.logical_number"
FRAME_TYPE = "profile.frame.type"
BUILD_ID_PREFIX = "process.executable.build_id."  # + gnu / go / htlhash
LABEL_PREFIX = "process.context.label."  # + the pprof / Go label key


AttrValue = str | int


class _Table:
    """One dictionary table: index 0 is the zero value, each distinct key stored once."""

    def __init__(self, container) -> None:  # a repeated message field of the dictionary
        self.container = container
        container.add()  # the zero value
        self._index: dict[Hashable, int] = {}

    def get(self, key: Hashable, build) -> int:  # build(element) fills a new element
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.container)
            build(self.container.add())
        return i


class _Dictionary:
    """The ProfilesDictionary of one request, with value-deduplicating adders."""

    def __init__(self, d: pb.ProfilesDictionary) -> None:
        d.string_table.append("")
        self._d = d
        self._strings: dict[str, int] = {"": 0}
        self.mappings = _Table(d.mapping_table)
        self.locations = _Table(d.location_table)
        self.functions = _Table(d.function_table)
        self.links = _Table(d.link_table)
        self.attributes = _Table(d.attribute_table)
        self.stacks = _Table(d.stack_table)

    def string(self, s: str) -> int:
        i = self._strings.get(s)
        if i is None:
            i = self._strings[s] = len(self._d.string_table)
            self._d.string_table.append(s)
        return i

    def attribute(self, key: str, value: AttrValue) -> int:
        def build(kv: pb.KeyValueAndUnit) -> None:
            kv.key_strindex = self.string(key)
            _set_any(kv.value, value)

        return self.attributes.get((key, type(value), value), build)

    def value_type(self, vt: ValueType, out: pb.ValueType) -> None:
        out.type_strindex = self.string(vt.type)
        out.unit_strindex = self.string(vt.unit)

    def mapping(self, m: Mapping) -> int:
        def build(out: pb.Mapping) -> None:
            out.memory_start, out.memory_limit, out.file_offset = m.start, m.end, m.file_offset
            out.filename_strindex = self.string(m.path)
            if m.build_id and m.build_id_kind != BuildIdKind.NONE:
                out.attribute_indices.append(self.attribute(BUILD_ID_PREFIX + m.build_id_kind.value, m.build_id))

        return self.mappings.get(m, build)

    def function(self, f: Frame) -> int:
        key = (f.function, f.system_name, f.file, f.start_line)

        def build(out: pb.Function) -> None:
            out.name_strindex = self.string(f.function)
            out.system_name_strindex = self.string(f.system_name)
            out.filename_strindex = self.string(f.file)
            out.start_line = f.start_line

        return self.functions.get(key, build)

    def location(self, loc: Location) -> int:
        def build(out: pb.Location) -> None:
            out.mapping_index = self.mapping(loc.mapping) if loc.mapping is not None else 0
            out.address = loc.address
            # Innermost first, as OTLP's lines; an unresolved address reads as module+0xoffset.
            for frame in loc.frames or (placeholder_frame(loc),):
                out.lines.add(function_index=self.function(frame), line=frame.line)
            out.attribute_indices.append(self.attribute(FRAME_TYPE, _frame_type(loc)))

        # Keyed by the whole Location, as in pprof: an address without a known
        # mapping means different code in different processes.
        return self.locations.get(loc, build)

    def stack(self, stack: tuple[Location, ...]) -> int:
        if not stack:
            return 0
        indices = [self.location(loc) for loc in stack]
        return self.stacks.get(tuple(indices), lambda out: out.location_indices.extend(indices))

    def link(self, link: TraceLink | None) -> int:
        if link is None:
            return 0

        def build(out: pb.Link) -> None:
            out.trace_id, out.span_id = link.trace_id, link.span_id

        return self.links.get((link.trace_id, link.span_id), build)


def _set_any(out: AnyValue, value: AttrValue) -> None:
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    else:
        out.string_value = value


def _frame_type(loc: Location) -> str:
    """go / native / kernel; an unresolved address is kernel in the kernel mapping, else native."""
    if loc.frames:
        return loc.frames[-1].kind.value
    if loc.mapping is not None and loc.mapping.path == KERNEL_MAPPING_PATH:
        return FrameKind.KERNEL.value
    return FrameKind.NATIVE.value


def _resource_attributes(meta: ProcessMeta, host_name: str) -> list[tuple[str, AttrValue]]:
    exe_name = meta.executable_path.rsplit("/", 1)[-1] if meta.executable_path else meta.name
    attrs: list[tuple[str, AttrValue]] = [(HOST_NAME, host_name), (PROCESS_PID, meta.pid)]
    if exe_name:
        attrs.append((PROCESS_EXECUTABLE_NAME, exe_name))
    if meta.executable_path:
        attrs.append((PROCESS_EXECUTABLE_PATH, meta.executable_path))
    if meta.container_id:
        attrs.append((CONTAINER_ID, meta.container_id))
    service = meta.service_name or exe_name
    if service:
        attrs.append((SERVICE_NAME, service))
    return attrs


def _sample_attributes(key: SampleKey) -> list[tuple[str, AttrValue]]:
    attrs: list[tuple[str, AttrValue]] = [(THREAD_ID, key.tid)]
    if key.thread_name:
        attrs.append((THREAD_NAME, key.thread_name))
    if key.cpu >= 0:
        attrs.append((CPU_LOGICAL_NUMBER, key.cpu))
    seen = set()
    for name, value in key.labels:
        if name not in seen:  # attribute keys are unique per sample: the first label wins
            seen.add(name)
            attrs.append((LABEL_PREFIX + name, value))
    return attrs


def _split(total: int, n: int) -> list[int]:
    """`total` as n per-event values that add up to it: even shares, remainder on the last."""
    share, rest = divmod(total, n)
    values = [share] * n
    values[-1] += rest
    return values


def _window(profile: Profile) -> tuple[int, int]:
    """(time_unix_nano, duration_nano) covering the profile and every sample timestamp."""
    start, end = profile.start_time_ns, profile.start_time_ns + profile.duration_ns
    for s in profile.samples:
        if s.timestamps_ns:
            start = min(start, min(s.timestamps_ns))
            end = max(end, max(s.timestamps_ns) + 1)  # the window is half-open
    return start, end - start


def _type_order(profile: Profile) -> list[int]:
    """Indices of sample_types, the default first (viewers show profiles[0])."""
    order = list(range(len(profile.sample_types)))
    for i, vt in enumerate(profile.sample_types):
        if vt.type == profile.default_sample_type:
            order.remove(i)
            order.insert(0, i)
            break
    return order


def encode_otlp(profiles: list[Profile], host_name: str) -> ExportProfilesServiceRequest:
    """One ExportProfilesServiceRequest holding every profile. Pure: no I/O.

    Raises ValueError if a sample's value count differs from its profile's sample_types.
    """
    request = ExportProfilesServiceRequest()
    d = _Dictionary(request.dictionary)
    scopes: dict[int, pb.ScopeProfiles] = {}

    def scope_of(pid: int, profile: Profile) -> pb.ScopeProfiles:
        scope = scopes.get(pid)
        if scope is None:
            rp = request.resource_profiles.add()
            meta = profile.processes.get(pid) or ProcessMeta(pid=pid)
            for k, v in _resource_attributes(meta, host_name):
                _set_any(rp.resource.attributes.add(key=k).value, v)
            scope = scopes[pid] = rp.scope_profiles.add()
            scope.scope.name = SCOPE_NAME
        return scope

    for profile in profiles:
        n_values = len(profile.sample_types)
        time_ns, duration_ns = _window(profile)
        order = _type_order(profile)
        out_by_pid: dict[int, list[pb.Profile]] = {}
        for sample in profile.samples:
            if len(sample.values) != n_values:
                raise ValueError(f"sample has {len(sample.values)} values, profile has {n_values} sample types")
            key = sample.key
            outs = out_by_pid.get(key.pid)
            if outs is None:
                scope = scope_of(key.pid, profile)
                outs = out_by_pid[key.pid] = []
                for i in order:
                    out = scope.profiles.add(time_unix_nano=time_ns, duration_nano=duration_ns,
                                             period=profile.period)
                    d.value_type(profile.sample_types[i], out.sample_type)
                    d.value_type(profile.period_type, out.period_type)
                    outs.append(out)
            stack_index = d.stack(key.stack)
            attrs = [d.attribute(k, v) for k, v in _sample_attributes(key)]
            link_index = d.link(key.link)
            for out, i in zip(outs, order, strict=True):
                s = out.samples.add(stack_index=stack_index, attribute_indices=attrs, link_index=link_index)
                if sample.timestamps_ns:
                    s.values.extend(_split(sample.values[i], len(sample.timestamps_ns)))
                    s.timestamps_unix_nano.extend(sample.timestamps_ns)
                else:
                    s.values.append(sample.values[i])
    return request


def encode_otlp_bytes(profiles: list[Profile], host_name: str) -> bytes:
    """encode_otlp serialized: the body of a gRPC or HTTP export, and the `.otlp.pb` file."""
    return encode_otlp(profiles, host_name).SerializeToString()


def parse_otlp(data: bytes) -> ExportProfilesServiceRequest:
    """Parse serialized ExportProfilesServiceRequest bytes.

    Raises ExportError on bytes that are not one.
    """
    request = ExportProfilesServiceRequest()
    try:
        request.ParseFromString(data)
    except DecodeError as e:
        raise ExportError(f"not an OTLP profiles request: {e}") from None
    return request


# --- decoding -----------------------------------------------------------------


def _any_value(v: AnyValue) -> AttrValue:
    kind = v.WhichOneof("value")
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return int(v.bool_value)
    if kind == "string_value":
        return v.string_value
    if kind == "double_value":
        return str(v.double_value)
    return ""


@dataclass
class _Group:
    """OTLP Profiles that came from one neutral Profile: same window and period."""

    sample_types: list[ValueType] = field(default_factory=list)
    period_type: ValueType = ValueType("", "")
    period: int = 0
    time_ns: int = 0
    duration_ns: int = 0
    samples: dict[tuple, tuple[SampleKey, dict[int, int], list[int]]] = field(default_factory=dict)  # by _cheap_key
    processes: dict[int, ProcessMeta] = field(default_factory=dict)


class _Reader:
    """Turns dictionary indices back into neutral objects, caching each."""

    def __init__(self, d: pb.ProfilesDictionary) -> None:
        self.d = d
        self.st = d.string_table
        self._locations: dict[int, Location] = {}
        self._stacks: dict[int, tuple[Location, ...]] = {}
        # Equal locations and stacks are one object each, so a sample's stack is known by its id(): hashing
        # a SampleKey hashes every frame of its stack, and a large profile has millions of frames.
        self._equal_locations: dict[Location, Location] = {}
        self._equal_stacks: dict[tuple[int, ...], tuple[Location, ...]] = {}

    def attrs(self, indices: Iterable[int]) -> dict[str, AttrValue]:
        out = {}
        for i in indices:
            kv = self.d.attribute_table[i]
            out[self.st[kv.key_strindex]] = _any_value(kv.value)
        return out

    def mapping(self, i: int) -> Mapping | None:
        if i == 0:
            return None
        m = self.d.mapping_table[i]
        build_id, kind = "", BuildIdKind.NONE
        for key, value in self.attrs(m.attribute_indices).items():
            if key.startswith(BUILD_ID_PREFIX):
                try:
                    kind = BuildIdKind(key.removeprefix(BUILD_ID_PREFIX))
                except ValueError:
                    continue
                build_id = str(value)
        return Mapping(start=m.memory_start, end=m.memory_limit, file_offset=m.file_offset,
                       path=self.st[m.filename_strindex], build_id=build_id, build_id_kind=kind)

    def location(self, i: int) -> Location:
        loc = self._locations.get(i)
        if loc is None:
            msg = self.d.location_table[i]
            kind_name = str(self.attrs(msg.attribute_indices).get(FRAME_TYPE, FrameKind.NATIVE.value))
            try:
                kind = FrameKind(kind_name)
            except ValueError:
                kind = FrameKind.NATIVE
            frames = []
            for n, line in enumerate(msg.lines):
                f = self.d.function_table[line.function_index]
                frames.append(Frame(function=self.st[f.name_strindex], kind=kind, file=self.st[f.filename_strindex],
                                    line=line.line, system_name=self.st[f.system_name_strindex],
                                    inlined=n < len(msg.lines) - 1, start_line=f.start_line))
            loc = Location(address=msg.address, mapping=self.mapping(msg.mapping_index), frames=tuple(frames))
            if is_placeholder(loc):
                loc = Location(address=loc.address, mapping=loc.mapping)
            loc = self._locations[i] = self._equal_locations.setdefault(loc, loc)
        return loc

    def stack(self, i: int) -> tuple[Location, ...]:
        """The locations of stack `i`; equal stacks (whatever their index) are the same tuple."""
        stack = self._stacks.get(i)
        if stack is None:
            locations = tuple(self.location(j) for j in self.d.stack_table[i].location_indices)
            stack = self._equal_stacks.setdefault(tuple(map(id, locations)), locations)
            self._stacks[i] = stack
        return stack

    def value_type(self, vt: pb.ValueType) -> ValueType:
        return ValueType(self.st[vt.type_strindex], self.st[vt.unit_strindex])


def _process_meta(attrs: dict[str, AttrValue]) -> ProcessMeta:
    path = str(attrs.get(PROCESS_EXECUTABLE_PATH, ""))
    return ProcessMeta(pid=int(attrs.get(PROCESS_PID, 0)), name=str(attrs.get(PROCESS_EXECUTABLE_NAME, "")),
                       executable_path=path, container_id=str(attrs.get(CONTAINER_ID, "")),
                       service_name=str(attrs.get(SERVICE_NAME, "")))


def _sample_key(r: _Reader, pid: int, sample: pb.Sample) -> SampleKey:
    tid, thread_name, cpu, labels = 0, "", -1, []
    for key, value in r.attrs(sample.attribute_indices).items():
        if key == THREAD_ID:
            tid = int(value)
        elif key == THREAD_NAME:
            thread_name = str(value)
        elif key == CPU_LOGICAL_NUMBER:
            cpu = int(value)
        elif key.startswith(LABEL_PREFIX):
            labels.append((key.removeprefix(LABEL_PREFIX), str(value)))
    link = None
    if sample.link_index:
        msg = r.d.link_table[sample.link_index]
        link = TraceLink(trace_id=msg.trace_id, span_id=msg.span_id)
    return SampleKey(stack=r.stack(sample.stack_index), pid=pid, tid=tid, thread_name=thread_name,
                     labels=tuple(labels), cpu=cpu, link=link)


def _cheap_key(key: SampleKey) -> tuple:
    """A key equal for equal SampleKeys of one _Reader (its stacks are one object per content), hashed
    without walking the stack."""
    return (id(key.stack), key.pid, key.tid, key.thread_name, key.labels, key.cpu, key.link)


def decode_otlp(data: bytes | ExportProfilesServiceRequest) -> list[Profile]:
    """Neutral Profiles from an OTLP request (bytes or message), the inverse of encode_otlp.

    OTLP Profiles of all resources with the same window, period type and
    period are one neutral Profile; each distinct sample type becomes one of
    its sample_types (in order of first appearance, so the default first).
    A sample without values counts one per timestamp. Raises ExportError on
    bytes that do not parse; indices out of range raise ExportError too (run
    validate_otlp for the full list of problems).
    """
    request = parse_otlp(data) if isinstance(data, bytes) else data
    try:
        return _decode(request)
    except IndexError as e:
        raise ExportError(f"OTLP request has an index out of range ({e}); validate_otlp lists the problems") from None


def _decode(request: ExportProfilesServiceRequest) -> list[Profile]:
    r = _Reader(request.dictionary)
    groups: dict[tuple, _Group] = {}
    for rp in request.resource_profiles:
        meta = _process_meta({kv.key: _any_value(kv.value) for kv in rp.resource.attributes})
        for sp in rp.scope_profiles:
            for prof in sp.profiles:
                period_type = r.value_type(prof.period_type)
                gkey = (prof.time_unix_nano, prof.duration_nano, period_type, prof.period)
                g = groups.get(gkey)
                if g is None:
                    g = groups[gkey] = _Group(period_type=period_type, period=prof.period,
                                              time_ns=prof.time_unix_nano, duration_ns=prof.duration_nano)
                g.processes[meta.pid] = meta
                vt = r.value_type(prof.sample_type)
                if vt not in g.sample_types:
                    g.sample_types.append(vt)
                column = g.sample_types.index(vt)
                for s in prof.samples:
                    key = _sample_key(r, meta.pid, s)
                    _, values, timestamps = g.samples.setdefault(_cheap_key(key), (key, {}, []))
                    values[column] = values.get(column, 0) + (sum(s.values) if s.values
                                                              else len(s.timestamps_unix_nano))
                    if column == 0:  # every sample type repeats the same timestamps
                        timestamps.extend(s.timestamps_unix_nano)
    out = []
    for g in groups.values():
        default = g.sample_types[0].type if g.sample_types else ""
        p = Profile(sample_types=g.sample_types, period_type=g.period_type, period=g.period,
                    start_time_ns=g.time_ns, duration_ns=g.duration_ns, default_sample_type=default,
                    processes=g.processes, kind=kind_of_sample_type(default))  # OTLP has no kind
        for key, values, timestamps in g.samples.values():  # keys are unique: no Profile.add lookup
            p.samples.append(Sample(key=key, values=[values.get(i, 0) for i in range(len(g.sample_types))],
                                    timestamps_ns=timestamps))
        out.append(p)
    return out


# --- validation ---------------------------------------------------------------


def validate_otlp(request: ExportProfilesServiceRequest) -> list[str]:
    """The spec's rules this module can check; one message per violation, [] when valid.

    Checked: element 0 of every dictionary table is the zero value; every
    index (strings, mappings, locations, functions, stacks, links,
    attributes) is in range; no stack references location 0; attribute keys
    are unique per sample, location, mapping, profile and resource; a sample
    has values or timestamps, the same number when both; every timestamp lies
    in [time_unix_nano, time_unix_nano + duration_nano); link ids are 16 and
    8 bytes.
    """
    errors: list[str] = []
    d = request.dictionary
    n_strings = len(d.string_table)
    tables = {
        "mapping_table": (d.mapping_table, pb.Mapping),
        "location_table": (d.location_table, pb.Location),
        "function_table": (d.function_table, pb.Function),
        "link_table": (d.link_table, pb.Link),
        "attribute_table": (d.attribute_table, pb.KeyValueAndUnit),
        "stack_table": (d.stack_table, pb.Stack),
    }
    for name, (table, cls) in tables.items():
        if not table:
            errors.append(f"dictionary.{name} is empty: element 0 must be the zero value")
        elif table[0] != cls():
            errors.append(f"dictionary.{name}[0] is not the zero value")
    if not d.string_table or d.string_table[0] != "":
        errors.append('dictionary.string_table[0] must be ""')

    def index(where: str, what: str, i: int, size: int) -> bool:
        if not 0 <= i < size:
            errors.append(f"{where}: {what} {i} out of range (table has {size})")
            return False
        return True

    def attributes(where: str, indices: Iterable[int]) -> None:
        keys: set[str] = set()
        for i in indices:
            if not index(where, "attribute index", i, len(d.attribute_table)):
                continue
            kv = d.attribute_table[i]
            if not index(where, "attribute key_strindex", kv.key_strindex, n_strings):
                continue
            key = d.string_table[kv.key_strindex]
            if key in keys:
                errors.append(f"{where}: attribute key {key!r} repeated")
            keys.add(key)

    for i, kv in enumerate(d.attribute_table):
        index(f"attribute_table[{i}]", "key_strindex", kv.key_strindex, n_strings)
        index(f"attribute_table[{i}]", "unit_strindex", kv.unit_strindex, n_strings)
    for i, m in enumerate(d.mapping_table):
        index(f"mapping_table[{i}]", "filename_strindex", m.filename_strindex, n_strings)
        attributes(f"mapping_table[{i}]", m.attribute_indices)
    for i, f in enumerate(d.function_table):
        for what in ("name_strindex", "system_name_strindex", "filename_strindex"):
            index(f"function_table[{i}]", what, getattr(f, what), n_strings)
    for i, loc in enumerate(d.location_table):
        index(f"location_table[{i}]", "mapping_index", loc.mapping_index, len(d.mapping_table))
        for line in loc.lines:
            index(f"location_table[{i}]", "function_index", line.function_index, len(d.function_table))
        attributes(f"location_table[{i}]", loc.attribute_indices)
    for i, stack in enumerate(d.stack_table):
        for j in stack.location_indices:
            if index(f"stack_table[{i}]", "location index", j, len(d.location_table)) and j == 0:
                errors.append(f"stack_table[{i}]: references location 0 (the zero value)")
    for i, link in enumerate(d.link_table[1:], start=1):
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            errors.append(f"link_table[{i}]: trace_id must be 16 bytes and span_id 8, "
                          f"got {len(link.trace_id)} and {len(link.span_id)}")

    for ri, rp in enumerate(request.resource_profiles):
        keys = [kv.key for kv in rp.resource.attributes]
        for dup in sorted({k for k in keys if keys.count(k) > 1}):
            errors.append(f"resource_profiles[{ri}].resource: attribute key {dup!r} repeated")
        for si, sp in enumerate(rp.scope_profiles):
            for pi, prof in enumerate(sp.profiles):
                where = f"resource_profiles[{ri}].scope_profiles[{si}].profiles[{pi}]"
                for vt_name in ("sample_type", "period_type"):
                    vt = getattr(prof, vt_name)
                    index(f"{where}.{vt_name}", "type_strindex", vt.type_strindex, n_strings)
                    index(f"{where}.{vt_name}", "unit_strindex", vt.unit_strindex, n_strings)
                attributes(where, prof.attribute_indices)
                lo, hi = prof.time_unix_nano, prof.time_unix_nano + prof.duration_nano
                for k, s in enumerate(prof.samples):
                    sw = f"{where}.samples[{k}]"
                    index(sw, "stack_index", s.stack_index, len(d.stack_table))
                    index(sw, "link_index", s.link_index, len(d.link_table))
                    attributes(sw, s.attribute_indices)
                    if not s.values and not s.timestamps_unix_nano:
                        errors.append(f"{sw}: neither values nor timestamps")
                    elif s.values and s.timestamps_unix_nano and len(s.values) != len(s.timestamps_unix_nano):
                        errors.append(f"{sw}: {len(s.values)} values but {len(s.timestamps_unix_nano)} timestamps")
                    outside = [t for t in s.timestamps_unix_nano if not lo <= t < hi]
                    if outside:
                        errors.append(f"{sw}: timestamp {outside[0]} outside the profile window [{lo}, {hi})")
    return errors
