"""agent/python/layouts.py against CPython's own headers, 3.13's _Py_DebugOffsets against the same, and the
line-table decoders against CPython's own readers (co_lines(), dis.findlinestarts in 3.9), for every
interpreter of a supported version on the machine."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from agent.python.frames import LINE_DECODERS
from agent.python.layouts import (
    DEBUG_OFFSETS_313_BYTES,
    LAYOUTS,
    NO_CFRAME,
    DebugOffsetsError,
    from_debug_offsets,
    unsupported_reason,
)
from agent.python.registry import data_symbol, examine_file
from symbolizer.elf import ElfFile

COMMON = {
    "runtime_interpreters_head": "offsetof(_PyRuntimeState, interpreters.head)",
    "tstate_next": "offsetof(PyThreadState, next)",
    "tstate_thread_id": "offsetof(PyThreadState, thread_id)",
    "code_filename": "offsetof(PyCodeObject, co_filename)",
    "code_firstlineno": "offsetof(PyCodeObject, co_firstlineno)",
    "bytes_size": "offsetof(PyVarObject, ob_size)",
    "bytes_sval": "offsetof(PyBytesObject, ob_sval)",
    "unicode_length": "offsetof(PyASCIIObject, length)",
    "unicode_state": "offsetof(PyASCIIObject, state)",
    "ascii_data": "sizeof(PyASCIIObject)",
    "compact_data": "sizeof(PyCompactUnicodeObject)",
}
FRAME_OBJECTS = {  # 3.9, 3.10: PyFrameObject chains
    "interp_threads_head": "offsetof(PyInterpreterState, tstate_head)",
    "tstate_frame": "offsetof(PyThreadState, frame)",
    "frame_code": "offsetof(PyFrameObject, f_code)",
    "frame_previous": "offsetof(PyFrameObject, f_back)",
    "frame_instr": "offsetof(PyFrameObject, f_lasti)",
    "code_qualname": "offsetof(PyCodeObject, co_name)",  # no co_qualname before 3.11
}
INTERPRETER_FRAMES = {  # 3.11+: _PyInterpreterFrame chains
    "interp_threads_head": "offsetof(PyInterpreterState, threads.head)",
    "frame_previous": "offsetof(_PyInterpreterFrame, previous)",
    "code_qualname": "offsetof(PyCodeObject, co_qualname)",
    "code_linetable": "offsetof(PyCodeObject, co_linetable)",
    "code_adaptive": "offsetof(PyCodeObject, co_code_adaptive)",
}
SHIMS = {"frame_entry": "offsetof(_PyInterpreterFrame, owner)", "owner_cstack": "FRAME_OWNED_BY_CSTACK"}
EXPRESSIONS = {
    (3, 9): {**FRAME_OBJECTS, "code_linetable": "offsetof(PyCodeObject, co_lnotab)"},
    (3, 10): {**FRAME_OBJECTS, "code_linetable": "offsetof(PyCodeObject, co_linetable)"},
    (3, 11): {**INTERPRETER_FRAMES, "tstate_frame": "offsetof(PyThreadState, cframe)",
              "cframe_current_frame": "offsetof(_PyCFrame, current_frame)",
              "cframe_previous": "offsetof(_PyCFrame, previous)",
              "frame_code": "offsetof(_PyInterpreterFrame, f_code)",
              "frame_instr": "offsetof(_PyInterpreterFrame, prev_instr)",
              "frame_entry": "offsetof(_PyInterpreterFrame, is_entry)"},
    (3, 12): {**INTERPRETER_FRAMES, **SHIMS, "tstate_frame": "offsetof(PyThreadState, cframe)",
              "cframe_current_frame": "offsetof(_PyCFrame, current_frame)",
              "cframe_previous": "offsetof(_PyCFrame, previous)",
              "frame_code": "offsetof(_PyInterpreterFrame, f_code)",
              "frame_instr": "offsetof(_PyInterpreterFrame, prev_instr)"},
    (3, 13): {**INTERPRETER_FRAMES, **SHIMS, "tstate_frame": "offsetof(PyThreadState, current_frame)",
              "frame_code": "offsetof(_PyInterpreterFrame, f_executable)",
              "frame_instr": "offsetof(_PyInterpreterFrame, instr_ptr)"},
}


def installed() -> list[tuple[tuple[int, int], Path, Path]]:
    """(version, include dir, interpreter) of every supported CPython here: Debian's and pyenv's."""
    out = []
    if Path("/usr/bin/python3.11").exists():
        out.append(((3, 11), Path("/usr/include/python3.11"), Path("/usr/bin/python3.11")))
    for d in sorted(Path("/root/.pyenv/versions").glob("3.*")):
        m = re.fullmatch(r"3\.(\d+)\.\d+", d.name)
        if m and (3, int(m[1])) in LAYOUTS:
            v = (3, int(m[1]))
            out.append((v, d / "include" / f"python3.{v[1]}", d / "bin" / f"python3.{v[1]}"))
    return out


INSTALLED = installed()
IDS = [f"{v[0]}.{v[1]}-{py}" for v, _, py in INSTALLED]


def test_every_supported_version_is_here():
    """CI's machine has them all (pyenv 3.9-3.13, Debian 3.11): a table nobody checks is a guess."""
    assert {v for v, _, _ in INSTALLED} == set(LAYOUTS)


def compiled_offsets(tmp_path: Path, version: tuple[int, int], include: Path) -> dict[str, int]:
    assert (include / "internal" / "pycore_runtime.h").is_file(), f"{include}: CPython's internal headers missing"
    frame_header = "frameobject.h" if version < (3, 11) else "internal/pycore_frame.h"
    lines = ["#define Py_BUILD_CORE 1", "#include <Python.h>", "#include <stddef.h>", "#include <stdio.h>",
             f'#include "{frame_header}"', '#include "internal/pycore_runtime.h"',
             '#include "internal/pycore_interp.h"', "int main(void) {"]
    for name, expr in {**COMMON, **EXPRESSIONS[version]}.items():
        lines.append(f'  printf("{name} %zu\\n", (size_t)({expr}));')
    lines += ["  return 0;", "}"]
    src = tmp_path / "off.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "off"
    subprocess.run(["gcc", f"-I{include}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("version,include,python", INSTALLED, ids=IDS)
def test_table_matches_cpython_headers(tmp_path, version, include, python):
    got = compiled_offsets(tmp_path, version, include)
    table = LAYOUTS[version]
    for name, value in got.items():
        assert getattr(table, name) == value, name
    if "cframe_current_frame" not in got:
        assert table.cframe_current_frame == NO_CFRAME


def libpython_or_exe(python: Path) -> Path:
    lib = sorted(python.parent.parent.glob("lib/libpython3.*.so.1.0"))
    return lib[0] if lib else python


@pytest.mark.parametrize("version,include,python", INSTALLED, ids=IDS)
def test_interpreter_file_gives_its_version_and_layout(version, include, python):
    found = examine_file(str(libpython_or_exe(python)))
    assert found is not None and found.version == version and found.layout == LAYOUTS[version]


def test_313_debug_offsets_agree_with_its_headers(tmp_path):
    """The offsets 3.13 publishes in _PyRuntime (read from the file, as the registry does) are the ones its
    headers compile to; a wrong cookie or version is refused."""
    found = [(inc, py) for v, inc, py in INSTALLED if v == (3, 13)]
    assert found, "pyenv's CPython 3.13 is missing"
    include, python = found[0]
    path = libpython_or_exe(python)
    with ElfFile(str(path)) as elf:
        off = elf.offset_for_vaddr(data_symbol(elf, "_PyRuntime"))
    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), DEBUG_OFFSETS_313_BYTES, off)
    layout = from_debug_offsets(raw)
    got = compiled_offsets(tmp_path, (3, 13), include)
    for name, value in got.items():
        assert getattr(layout, name) == value, name
    assert dataclasses.replace(layout) == LAYOUTS[(3, 13)]
    with pytest.raises(DebugOffsetsError):
        from_debug_offsets(b"ydebugpy" + raw[8:])
    with pytest.raises(DebugOffsetsError):
        from_debug_offsets(raw[:8] + (0x030C00F0).to_bytes(8, "little") + raw[16:])
    with pytest.raises(DebugOffsetsError):
        from_debug_offsets(raw[:16] + (1).to_bytes(8, "little") + raw[24:])  # free-threaded


LINES_PY = r"""
import dis, json, sys
out = []
def lines(code):
    if hasattr(code, "co_lines"):
        return [[s, e, l] for s, e, l in code.co_lines()]
    # 3.9: the line of each instruction from dis' reading of co_lnotab
    starts = dict(dis.findlinestarts(code))
    rows, line = [], code.co_firstlineno
    for off in range(0, len(code.co_code), 2):
        line = starts.get(off, line)
        rows.append([off, off + 2, line])
    return rows
def walk(code):
    table = code.co_linetable if hasattr(code, "co_linetable") else code.co_lnotab
    out.append({"table": table.hex(), "first": code.co_firstlineno, "lines": lines(code)})
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            walk(c)
for path in sys.argv[1:]:
    walk(compile(open(path).read(), path, "exec"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("version,include,python", INSTALLED, ids=IDS)
def test_line_table_decoder_matches_cpython(version, include, python):
    """Every code unit of real modules (big, with long jumps and line gaps) gets CPython's own line."""
    root = Path(__file__).resolve().parents[2]
    sources = [str(p) for p in sorted(root.glob("agent/*/*.py"))[:16]]
    sources += [str(p) for p in sorted((root / "tests" / "fixtures" / "python").glob("*.py"))]
    out = subprocess.run([str(python), "-c", LINES_PY, *sources], capture_output=True, text=True,
                         check=True).stdout
    codes = json.loads(out)
    assert len(codes) > 100
    decode = LINE_DECODERS[LAYOUTS[version].line_table]
    checked = 0
    for code in codes:
        table = bytes.fromhex(code["table"])
        for start, end, line in code["lines"]:
            for unit in range(start // 2, end // 2):
                assert decode(table, code["first"], unit) == (line or 0), (code["first"], unit)
                checked += 1
    assert checked > 5000


def test_unsupported_versions_are_named():
    assert unsupported_reason((3, 11)) is None and unsupported_reason((3, 9)) is None
    assert "CPython 3.8" in unsupported_reason((3, 8))
    assert "3.9, 3.10, 3.11, 3.12, 3.13" in unsupported_reason(None)
    assert "unknown version" in unsupported_reason(None) and "native frames kept" in unsupported_reason(None)
