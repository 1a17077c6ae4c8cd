"""The types the symbolizer hands out: mappings and frames.

These are the only symbolizer names `exporters` may import.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter


def hash_once(obj: object) -> int:
    """A frozen dataclass's hash, computed at its first use and kept (as str keeps its own).

    Locations, their mappings and samples' keys are hashed at every lookup of
    the builder's and the encoders' tables, and the generated __hash__ hashes
    every field again each time, a whole stack for a SampleKey (a third of an
    interval's build and most of its pprof encode before). Frozen: the fields
    never change, so neither does the hash. Not for objects that cross
    processes (str hashes are salted per process): none of these do.

    Most objects are hashed once (each build makes its own), so the first hash
    is the cost: the fields are read by one attrgetter per class, and the kept
    hash is looked up in the instance dict (a missing attribute's exception
    cost as much as the hash itself).
    """
    d = obj.__dict__
    h = d.get("_hash")
    if h is None:
        fields_of = _FIELDS_OF.get(type(obj))
        if fields_of is None:
            names = [f.name for f in fields(obj)]
            get = attrgetter(*names)
            fields_of = _FIELDS_OF[type(obj)] = get if len(names) > 1 else lambda o: (get(o),)
        h = d["_hash"] = hash(fields_of(obj))
    return h


_FIELDS_OF: dict[type, Callable[[object], tuple]] = {}


class FrameKind(enum.StrEnum):
    """Where a frame's code comes from (OTel `profile.frame.type` values)."""

    GO = "go"
    NATIVE = "native"
    KERNEL = "kernel"
    CPYTHON = "cpython"  # a Python function run by CPython's interpreter (agent/python/frames.py)


class BuildIdKind(enum.StrEnum):
    """Which identity a mapping's build id is (OTel `process.executable.build_id.*`)."""

    GNU = "gnu"  # .note.gnu.build-id, hex
    GO = "go"  # Go's own build id (.note.go.buildid), as printed by `go tool buildid`
    HASH = "htlhash"  # no build id in the file: a hash of its head and tail
    NONE = ""  # file not readable (e.g. [vdso] before it was dumped, anonymous code)


@dataclass(frozen=True)
class Mapping:
    """One executable mapping of a process, as /proc/PID/maps shows it.

    `path` is the path inside the process's mount namespace; files are read
    through /proc/PID/root. `build_id` is the cache key of the file's symbols.
    """

    start: int
    end: int
    file_offset: int
    path: str
    build_id: str = ""
    build_id_kind: BuildIdKind = BuildIdKind.NONE

    __hash__ = hash_once

    @property
    def name(self) -> str:
        """Basename for display: 'libc.so.6', '[vdso]', '[kernel.kallsyms]'."""
        return self.path.rsplit("/", 1)[-1] if self.path else "[unknown]"


MAX_LINE = (1 << 31) - 1  # the largest source line kept; larger or negative means unknown (0)


@dataclass(frozen=True)
class Frame:
    """One function activation at one source position.

    `function` is for display (demangled); `system_name` is the raw symbol.
    `line` 0 and `file` "" mean unknown. `inlined` is true when this frame was
    inlined into the next (outer) frame of the same address.
    """

    function: str
    kind: FrameKind
    file: str = ""
    line: int = 0
    system_name: str = ""
    inlined: bool = False
    start_line: int = 0

    def __post_init__(self) -> None:
        # Lines come from files and process memory others control (a torn read of a Python code
        # object's line table decoded to -2e37 once): out of pprof's int64/OTLP's range means unknown,
        # never an encoder's ValueError that loses the whole capture.
        if not 0 <= self.line <= MAX_LINE:
            object.__setattr__(self, "line", 0)
        if not 0 <= self.start_line <= MAX_LINE:
            object.__setattr__(self, "start_line", 0)


# A frame for an address no symbol covers. The agent still keeps the address
# and its mapping, so `go tool pprof` shows `module+0xoffset`.
UNKNOWN_FUNCTION = ""
