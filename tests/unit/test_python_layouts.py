"""agent/python/layouts.py against CPython's own headers, and the location-table decoder against
CPython's own co_lines(), for every interpreter of a supported version on the machine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.python.frames import line_of
from agent.python.layouts import LAYOUTS, unsupported_reason

OFFSETS_C = r"""
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include <stdio.h>
#include "internal/pycore_runtime.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_frame.h"
#define P(name, expr) printf("%s %zu\n", name, (size_t)(expr));
int main(void) {
  P("runtime_interpreters_head", offsetof(_PyRuntimeState, interpreters.head))
  P("interp_threads_head", offsetof(PyInterpreterState, threads.head))
  P("tstate_next", offsetof(PyThreadState, next))
  P("tstate_thread_id", offsetof(PyThreadState, thread_id))
  P("tstate_cframe", offsetof(PyThreadState, cframe))
  P("cframe_current_frame", offsetof(_PyCFrame, current_frame))
  P("frame_code", offsetof(_PyInterpreterFrame, f_code))
  P("frame_previous", offsetof(_PyInterpreterFrame, previous))
  P("frame_instr", offsetof(_PyInterpreterFrame, prev_instr))
  P("frame_entry", offsetof(_PyInterpreterFrame, is_entry))
  P("code_filename", offsetof(PyCodeObject, co_filename))
  P("code_qualname", offsetof(PyCodeObject, co_qualname))
  P("code_linetable", offsetof(PyCodeObject, co_linetable))
  P("code_firstlineno", offsetof(PyCodeObject, co_firstlineno))
  P("code_adaptive", offsetof(PyCodeObject, co_code_adaptive))
  P("bytes_size", offsetof(PyVarObject, ob_size))
  P("bytes_sval", offsetof(PyBytesObject, ob_sval))
  P("unicode_length", offsetof(PyASCIIObject, length))
  P("unicode_state", offsetof(PyASCIIObject, state))
  P("ascii_data", sizeof(PyASCIIObject))
  P("compact_data", sizeof(PyCompactUnicodeObject))
  return 0;
}
"""

# Interpreters of the 3.11 layout on this machine: Debian's (headers from python3.11-dev) and pyenv's.
INCLUDES_311 = [Path("/usr/include/python3.11"), *Path("/root/.pyenv/versions").glob("3.11.*/include/python3.11")]
PYTHONS_311 = [Path("/usr/bin/python3.11"), *Path("/root/.pyenv/versions").glob("3.11.*/bin/python3.11")]


@pytest.mark.parametrize("include", INCLUDES_311, ids=str)
def test_311_table_matches_cpython_headers(tmp_path, include):
    assert (include / "internal" / "pycore_frame.h").is_file(), f"{include}: CPython's internal headers missing"
    src = tmp_path / "off.c"
    src.write_text(OFFSETS_C)
    exe = tmp_path / "off"
    subprocess.run(["gcc", f"-I{include}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    got = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    table = LAYOUTS[(3, 11)]
    for name, value in got.items():
        assert getattr(table, name) == value, name


LINES_PY = r"""
import json, sys
out = []
def walk(code):
    out.append({"table": code.co_linetable.hex(), "first": code.co_firstlineno,
                "lines": [[s, e, l] for s, e, l in code.co_lines()]})
    for c in code.co_consts:
        if hasattr(c, "co_lines"):
            walk(c)
for path in sys.argv[1:]:
    walk(compile(open(path).read(), path, "exec"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("python", PYTHONS_311, ids=str)
def test_line_table_decoder_matches_co_lines(python):
    """Every code unit of real modules (big, with long jumps and line gaps) gets co_lines()' line."""
    sources = [str(p) for p in Path(__file__).resolve().parents[2].glob("agent/*/*.py")][:40]
    sources.append(str(Path(__file__).resolve().parents[1] / "fixtures" / "python" / "split7030.py"))
    out = subprocess.run([str(python), "-c", LINES_PY, *sources], capture_output=True, text=True, check=True).stdout
    codes = json.loads(out)
    assert len(codes) > 200
    checked = 0
    for code in codes:
        table = bytes.fromhex(code["table"])
        for start, end, line in code["lines"]:
            for unit in range(start // 2, end // 2):
                assert line_of(table, code["first"], unit) == (line or 0)
                checked += 1
    assert checked > 10000


def test_unsupported_versions_are_named():
    assert unsupported_reason((3, 11)) is None
    assert "CPython 3.12" in unsupported_reason((3, 12))
    assert "3.11" in unsupported_reason(None) and "native frames kept" in unsupported_reason(None)
