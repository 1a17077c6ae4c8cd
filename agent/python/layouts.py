"""CPython struct offsets per version, from CPython's own headers.

Each table was printed by compiling `offsetof(...)` against the version's
installed headers (Include/ and Include/internal/, with Py_BUILD_CORE);
tests/unit/test_python_layouts.py compiles the same program against every
interpreter present on the machine and compares. 3.13 also describes itself:
`_PyRuntime` starts with `_Py_DebugOffsets` (for out-of-process readers), and
`from_debug_offsets` takes the offsets from there (the table is its fallback
and the test's witness). Versions without a table are named by
`unsupported_reason` (their samples keep native frames only).

How the versions differ for the walk in BPF (bpf/python.bpf.h):
- 3.9, 3.10: tstate->frame is a PyFrameObject chain (f_back); each frame is run
  by its own _PyEval_EvalFrameDefault call; f_lasti is an int, in bytes (3.9)
  or code units (3.10); code objects have co_name only (no co_qualname).
- 3.11: tstate->cframe->current_frame, _PyInterpreterFrame chain; `is_entry`
  marks the frame an eval call started at; prev_instr points at the code unit.
- 3.12: as 3.11, but an eval call pushes a shim frame owned by the C stack
  (owner == FRAME_OWNED_BY_CSTACK) under the frame it starts at.
- 3.13: tstate->current_frame (no cframe), f_executable, instr_ptr; shims as 3.12.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class PyLayout:
    """Offsets the BPF walk (bpf/python.bpf.h) and the code object reader need."""

    version: tuple[int, int]
    runtime_interpreters_head: int  # _PyRuntimeState.interpreters.head
    interp_threads_head: int  # PyInterpreterState.threads.head (tstate_head before 3.11)
    tstate_next: int
    tstate_thread_id: int  # pthread_self(): the thread's FS base on x86-64 glibc
    tstate_frame: int  # ->frame (3.9, 3.10), ->cframe (3.11, 3.12), ->current_frame (3.13)
    cframe_current_frame: int  # _PyCFrame.current_frame; NO_CFRAME when tstate_frame is the frame itself
    frame_code: int  # f_code (f_executable in 3.13)
    frame_previous: int  # previous (f_back before 3.11)
    frame_instr: int  # prev_instr (3.11, 3.12), instr_ptr (3.13), f_lasti (3.9, 3.10)
    frame_entry: int  # is_entry (3.11), owner (3.12+); unused before 3.11
    entry_kind: int  # ENTRY_*
    instr_kind: int  # INSTR_*
    owner_cstack: int  # FRAME_OWNED_BY_CSTACK (3.12+): the shim frame under each eval call's first frame
    code_filename: int
    code_qualname: int  # co_qualname; co_name before 3.11 (which has no qualified name)
    code_linetable: int  # co_linetable; co_lnotab in 3.9
    code_firstlineno: int
    code_adaptive: int  # co_code_adaptive (3.11+): the first code unit; unused before
    line_table: str  # LINE_* : the format of code_linetable
    bytes_size: int  # PyVarObject.ob_size
    bytes_sval: int
    unicode_length: int
    unicode_state: int
    ascii_data: int  # sizeof(PyASCIIObject): a compact ASCII string's characters
    compact_data: int  # sizeof(PyCompactUnicodeObject): other compact strings' characters
    # _PyCFrame.previous (3.11, 3.12): the caller's cframe, read when an eval call's own cframe is linked but
    # its current_frame not yet set (bpf/python.bpf.h); 0 without a cframe
    cframe_previous: int = 0


# Mirrors of bpf/bpfprof.h's BPFPROF_PY_ENTRY_* and BPFPROF_PY_INSTR_*.
ENTRY_BOOL = 1  # 3.11: the frame's is_entry byte
ENTRY_OWNER = 2  # 3.12+: a frame whose owner byte is owner_cstack is a shim; the frame before it was the entry
ENTRY_ALL = 3  # 3.9, 3.10: every frame is an eval call of its own
INSTR_POINTER = 0  # a pointer to the code unit; code_adaptive gives the first
INSTR_LASTI_UNITS = 1  # int f_lasti in code units (3.10)
INSTR_LASTI_BYTES = 2  # int f_lasti in bytes (3.9)
NO_CFRAME = 0xFFFF  # cframe_current_frame of versions without _PyCFrame

LINE_LNOTAB = "lnotab"  # 3.9: (byte delta, signed line delta) pairs
LINE_TABLE_310 = "linetable310"  # 3.10: (byte length, signed line delta or -128) pairs
LINE_LOCATIONS = "locations"  # 3.11+: the location table (Objects/locations.md)

_STRINGS_OLD = dict(bytes_size=16, bytes_sval=32, unicode_length=16, unicode_state=32, ascii_data=48,
                    compact_data=72)  # PyASCIIObject with wstr (until 3.11)
_STRINGS_NEW = dict(bytes_size=16, bytes_sval=32, unicode_length=16, unicode_state=32, ascii_data=40,
                    compact_data=56)  # 3.12 dropped wstr

LAYOUTS: dict[tuple[int, int], PyLayout] = {
    (3, 9): PyLayout(
        version=(3, 9), runtime_interpreters_head=32, interp_threads_head=8, tstate_next=8, tstate_thread_id=176,
        tstate_frame=24, cframe_current_frame=NO_CFRAME, frame_code=32, frame_previous=24, frame_instr=104,
        frame_entry=0, entry_kind=ENTRY_ALL, instr_kind=INSTR_LASTI_BYTES, owner_cstack=0, code_filename=104,
        code_qualname=112, code_linetable=120, code_firstlineno=40, code_adaptive=0, line_table=LINE_LNOTAB,
        **_STRINGS_OLD),
    (3, 10): PyLayout(
        version=(3, 10), runtime_interpreters_head=32, interp_threads_head=8, tstate_next=8, tstate_thread_id=176,
        tstate_frame=24, cframe_current_frame=NO_CFRAME, frame_code=32, frame_previous=24, frame_instr=96,
        frame_entry=0, entry_kind=ENTRY_ALL, instr_kind=INSTR_LASTI_UNITS, owner_cstack=0, code_filename=104,
        code_qualname=112, code_linetable=120, code_firstlineno=40, code_adaptive=0, line_table=LINE_TABLE_310,
        **_STRINGS_OLD),
    (3, 11): PyLayout(
        version=(3, 11), runtime_interpreters_head=40, interp_threads_head=16, tstate_next=8, tstate_thread_id=152,
        tstate_frame=56, cframe_current_frame=8, cframe_previous=16, frame_code=32, frame_previous=48,
        frame_instr=56, frame_entry=68,
        entry_kind=ENTRY_BOOL, instr_kind=INSTR_POINTER, owner_cstack=0, code_filename=112, code_qualname=128,
        code_linetable=136, code_firstlineno=72, code_adaptive=184, line_table=LINE_LOCATIONS, **_STRINGS_OLD),
    (3, 12): PyLayout(
        version=(3, 12), runtime_interpreters_head=40, interp_threads_head=72, tstate_next=8, tstate_thread_id=136,
        tstate_frame=56, cframe_current_frame=0, cframe_previous=8, frame_code=0, frame_previous=8,
        frame_instr=56, frame_entry=70,
        entry_kind=ENTRY_OWNER, instr_kind=INSTR_POINTER, owner_cstack=3, code_filename=112, code_qualname=128,
        code_linetable=136, code_firstlineno=68, code_adaptive=192, line_table=LINE_LOCATIONS, **_STRINGS_NEW),
    (3, 13): PyLayout(
        version=(3, 13), runtime_interpreters_head=632, interp_threads_head=7344, tstate_next=8,
        tstate_thread_id=152, tstate_frame=72, cframe_current_frame=NO_CFRAME, frame_code=0, frame_previous=8,
        frame_instr=56, frame_entry=70, entry_kind=ENTRY_OWNER, instr_kind=INSTR_POINTER, owner_cstack=3,
        code_filename=112, code_qualname=128, code_linetable=136, code_firstlineno=68, code_adaptive=200,
        line_table=LINE_LOCATIONS, **_STRINGS_NEW),
}

# 3.13's _Py_DebugOffsets (Include/internal/pycore_runtime.h): its sections in order, each a size then the
# named offsets (u64 each). The struct changes between minor versions, so this reads 3.13's only.
DEBUG_COOKIE = b"xdebugpy"
_DEBUG_SECTIONS_313: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("runtime_state", ("finalizing", "interpreters_head")),
    ("interpreter_state", ("id", "next", "threads_head", "gc", "imports_modules", "sysdict", "builtins",
                           "ceval_gil", "gil_runtime_state", "gil_runtime_state_enabled",
                           "gil_runtime_state_locked", "gil_runtime_state_holder")),
    ("thread_state", ("prev", "next", "interp", "current_frame", "thread_id", "native_thread_id",
                      "datastack_chunk", "status")),
    ("interpreter_frame", ("previous", "executable", "instr_ptr", "localsplus", "owner")),
    ("code_object", ("filename", "name", "qualname", "linetable", "firstlineno", "argcount", "localsplusnames",
                     "localspluskinds", "co_code_adaptive")),
    ("pyobject", ("ob_type",)),
    ("type_object", ("tp_name", "tp_repr", "tp_flags")),
    ("tuple_object", ("ob_item", "ob_size")),
    ("list_object", ("ob_item", "ob_size")),
    ("dict_object", ("ma_keys", "ma_values")),
    ("float_object", ("ob_fval",)),
    ("long_object", ("lv_tag", "ob_digit")),
    ("bytes_object", ("ob_size", "ob_sval")),
    ("unicode_object", ("state", "length", "asciiobject_size")),
)
DEBUG_OFFSETS_313_BYTES = 24 + 8 * sum(1 + len(names) for _, names in _DEBUG_SECTIONS_313)
_DEBUG_FIELDS = {  # PyLayout field -> (section, name)
    "runtime_interpreters_head": ("runtime_state", "interpreters_head"),
    "interp_threads_head": ("interpreter_state", "threads_head"),
    "tstate_next": ("thread_state", "next"),
    "tstate_thread_id": ("thread_state", "thread_id"),
    "tstate_frame": ("thread_state", "current_frame"),
    "frame_code": ("interpreter_frame", "executable"),
    "frame_previous": ("interpreter_frame", "previous"),
    "frame_instr": ("interpreter_frame", "instr_ptr"),
    "frame_entry": ("interpreter_frame", "owner"),
    "code_filename": ("code_object", "filename"),
    "code_qualname": ("code_object", "qualname"),
    "code_linetable": ("code_object", "linetable"),
    "code_firstlineno": ("code_object", "firstlineno"),
    "code_adaptive": ("code_object", "co_code_adaptive"),
    "bytes_size": ("bytes_object", "ob_size"),
    "bytes_sval": ("bytes_object", "ob_sval"),
    "unicode_length": ("unicode_object", "length"),
    "unicode_state": ("unicode_object", "state"),
    "ascii_data": ("unicode_object", "asciiobject_size"),
}
MAX_OFFSET = 0xFFFE  # the BPF side keeps offsets in u16 (0xFFFF is NO_CFRAME)


class DebugOffsetsError(ValueError):
    """Bytes that are not a 3.13 _Py_DebugOffsets of a default (GIL) build."""


def from_debug_offsets(raw: bytes) -> PyLayout:
    """The 3.13 layout from the `_Py_DebugOffsets` at the start of `_PyRuntime` (its initialised bytes in
    the ELF file). Constants the struct does not carry (the shim owner value, how frames enter) come from
    the 3.13 table. DebugOffsetsError for another version, a free-threaded build or an offset out of range."""
    if len(raw) < DEBUG_OFFSETS_313_BYTES or raw[:8] != DEBUG_COOKIE:
        raise DebugOffsetsError("no _Py_DebugOffsets cookie")
    version, free_threaded = struct.unpack_from("<QQ", raw, 8)
    if version_of(version) != (3, 13):
        raise DebugOffsetsError(f"_Py_DebugOffsets of version {version:#x}, not 3.13")
    if free_threaded:
        raise DebugOffsetsError("a free-threaded build")
    values: dict[tuple[str, str], int] = {}
    pos = 24
    for section, names in _DEBUG_SECTIONS_313:
        pos += 8  # the section's struct size
        for name in names:
            values[(section, name)] = struct.unpack_from("<Q", raw, pos)[0]
            pos += 8
    fields = {field: values[key] for field, key in _DEBUG_FIELDS.items()}
    # PyCompactUnicodeObject is PyASCIIObject, utf8_length and utf8
    fields["compact_data"] = fields["ascii_data"] + 16
    bad = [k for k, v in fields.items() if v > MAX_OFFSET]
    if bad:
        raise DebugOffsetsError("offsets out of range: " + ", ".join(bad))
    return dataclasses.replace(LAYOUTS[(3, 13)], **fields)


def version_of(hexversion: int) -> tuple[int, int]:
    """(major, minor) of a PY_VERSION_HEX value (Py_Version)."""
    return (hexversion >> 24) & 0xFF, (hexversion >> 16) & 0xFF


def name_note(version: tuple[int, int]) -> str | None:
    """The profile comment saying how a supported version's functions are named, when not by qualname."""
    if version in LAYOUTS and version < (3, 11):
        return (f"CPython {version[0]}.{version[1]}: Python functions named by co_name "
                "(no qualified names before 3.11: `spin`, not `Worker.spin`)")
    return None


def unsupported_reason(version: tuple[int, int] | None) -> str | None:
    """None when `version` has a table, else the one line that names why its frames stay native."""
    if version is not None and version in LAYOUTS:
        return None
    supported = ", ".join(f"{a}.{b}" for a, b in sorted(LAYOUTS))
    name = f"CPython {version[0]}.{version[1]}" if version else "CPython of unknown version"
    return f"{name}: Python frames not supported (supported: {supported}); native frames kept"
