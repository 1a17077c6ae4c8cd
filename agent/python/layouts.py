"""CPython struct offsets per version, from CPython's own headers.

Each table was printed by compiling `offsetof(...)` against the version's
installed headers (Include/ and Include/internal/, with Py_BUILD_CORE);
tests/unit/test_python_layouts.py compiles the same program against every
interpreter present on the machine and compares. Versions without a table
are named by `unsupported_reason` (their samples keep native frames only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PyLayout:
    """Offsets the BPF walk (bpf/python.bpf.h) and the code object reader need."""

    version: tuple[int, int]
    runtime_interpreters_head: int  # _PyRuntimeState.interpreters.head
    interp_threads_head: int  # PyInterpreterState.threads.head
    tstate_next: int
    tstate_thread_id: int  # pthread_self(): the thread's FS base on x86-64 glibc
    tstate_cframe: int
    cframe_current_frame: int
    frame_code: int  # _PyInterpreterFrame.f_code
    frame_previous: int
    frame_instr: int  # prev_instr (3.11): the last code unit started
    frame_entry: int  # is_entry (3.11)
    entry_kind: int  # BPFPROF_PY_ENTRY_*
    code_filename: int
    code_qualname: int
    code_linetable: int
    code_firstlineno: int
    code_adaptive: int  # co_code_adaptive: the first code unit
    bytes_size: int  # PyVarObject.ob_size
    bytes_sval: int
    unicode_length: int
    unicode_state: int
    ascii_data: int  # sizeof(PyASCIIObject): a compact ASCII string's characters
    compact_data: int  # sizeof(PyCompactUnicodeObject): other compact strings' characters


ENTRY_BOOL = 1  # BPFPROF_PY_ENTRY_BOOL

LAYOUTS: dict[tuple[int, int], PyLayout] = {
    (3, 11): PyLayout(
        version=(3, 11), runtime_interpreters_head=40, interp_threads_head=16, tstate_next=8,
        tstate_thread_id=152, tstate_cframe=56, cframe_current_frame=8, frame_code=32, frame_previous=48,
        frame_instr=56, frame_entry=68, entry_kind=ENTRY_BOOL, code_filename=112, code_qualname=128,
        code_linetable=136, code_firstlineno=72, code_adaptive=184, bytes_size=16, bytes_sval=32,
        unicode_length=16, unicode_state=32, ascii_data=48, compact_data=72),
}


def version_of(hexversion: int) -> tuple[int, int]:
    """(major, minor) of a PY_VERSION_HEX value (Py_Version)."""
    return (hexversion >> 24) & 0xFF, (hexversion >> 16) & 0xFF


def unsupported_reason(version: tuple[int, int] | None) -> str | None:
    """None when `version` has a table, else the one line that names why its frames stay native."""
    if version is not None and version in LAYOUTS:
        return None
    supported = ", ".join(f"{a}.{b}" for a, b in sorted(LAYOUTS))
    name = f"CPython {version[0]}.{version[1]}" if version else "CPython < 3.11 (no Py_Version)"
    return f"{name}: Python frames not supported (supported: {supported}); native frames kept"
