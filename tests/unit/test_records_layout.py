"""The Python mirrors in agent/bpfload/records.py have the C layout of bpf/bpfprof.h (records and map values).

gcc compiles the real header (with BCC's integer typedefs) and prints sizes
and offsets; ctypes must agree field by field.
"""

from __future__ import annotations

import ctypes
import subprocess

from agent.bpfload import records
from agent.bpfload.records import (
    HEADER_SIZE,
    IPS,
    LABEL_KEY_LEN,
    LABEL_VALUE_LEN,
    MAX_FRAMES,
    MAX_LABELS,
    MAX_USER_FRAMES,
    USTACK_CONTINUE,
    USTACK_RBP_UNKNOWN,
    USTACK_RIP_RETURN,
    USTACK_USER_MODE,
    CtxKind,
    Drop,
    GoLabels,
    GorLayout,
    Header,
    Label,
    LabelsForm,
    OtelCtx,
    ProcCtx,
    ProcFlag,
    RecordKind,
    Scratch,
    StackRecord,
    TraceCtx,
    Ustack,
)
from agent.python import layouts
from bpf import BPF_DIR

PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
typedef unsigned short u16; typedef short s16; typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8; typedef long long s64;
#include "bpfprof.h"
#define F(f) printf(#f " %zu\n", offsetof(struct bpfprof_header, f));
#define O(s, f) printf(#s "." #f " %zu\n", offsetof(struct s, f));
#define S(s) printf(#s " %zu\n", sizeof(struct s));
#define D(c) printf(#c " %d\n", (int)(c));
int main(void) {
    printf("header %zu\n", sizeof(struct bpfprof_header));
    printf("record %zu\n", sizeof(struct bpfprof_stack_record));
    printf("drops %d\n", BPFPROF_DROP_MAX);
    printf("kinds %d\n", BPFPROF_KIND_GO_EXIT);
    F(kind) F(pid) F(tid) F(cpu) F(ktime_ns) F(value) F(aux) F(kernel_frames) F(user_frames)
    F(kernel_err) F(user_err) F(comm)
    S(bpfprof_otel_ctx) S(bpfprof_label) S(bpfprof_go_labels) S(bpfprof_trace_ctx) S(bpfprof_proc_ctx)
    S(bpfprof_scratch) O(bpfprof_scratch, ctx_room) O(bpfprof_trace_ctx, otel) O(bpfprof_trace_ctx, go)
    O(bpfprof_otel_ctx, span_id) O(bpfprof_otel_ctx, trace_flags)
    O(bpfprof_label, key) O(bpfprof_label, value) O(bpfprof_go_labels, total) O(bpfprof_go_labels, cut)
    O(bpfprof_go_labels, labels)
    O(bpfprof_proc_ctx, g_m) O(bpfprof_proc_ctx, m_curg) O(bpfprof_proc_ctx, g_labels)
    O(bpfprof_proc_ctx, labels_form) O(bpfprof_proc_ctx, go_tls_g) O(bpfprof_proc_ctx, otel_tls)
    D(BPFPROF_MAX_LABELS) D(BPFPROF_LABEL_KEY_LEN) D(BPFPROF_LABEL_VALUE_LEN)
    D(BPFPROF_CTX_OTEL) D(BPFPROF_CTX_GO_LABELS) D(BPFPROF_PROC_GO) D(BPFPROF_PROC_OTEL)
    D(BPFPROF_LABELS_MAP) D(BPFPROF_LABELS_SLICE)
    D(BPFPROF_DROP_LABELS_TRUNCATED) D(BPFPROF_DROP_TRACE_CTX_READ_ERR)
    D(BPFPROF_MAX_FRAMES) D(BPFPROF_FRAMES_MASK) D(BPFPROF_MAX_USER_FRAMES) D(BPFPROF_IPS)
    S(gor_layout) O(gor_layout, goid) O(gor_layout, labels) O(gor_layout, gopc) O(gor_layout, startpc)
    S(bpfprof_py_proc) O(bpfprof_scratch, py_room)
    O(bpfprof_py_proc, interpreters_head) O(bpfprof_py_proc, interp_threads_head) O(bpfprof_py_proc, tstate_next)
    O(bpfprof_py_proc, tstate_thread_id) O(bpfprof_py_proc, tstate_frame) O(bpfprof_py_proc, cframe_current_frame)
    O(bpfprof_py_proc, frame_code) O(bpfprof_py_proc, frame_previous) O(bpfprof_py_proc, frame_instr)
    O(bpfprof_py_proc, frame_entry) O(bpfprof_py_proc, code_adaptive) O(bpfprof_py_proc, entry_kind)
    O(bpfprof_py_proc, instr_kind) O(bpfprof_py_proc, owner_cstack) O(bpfprof_py_proc, cframe_previous)
    O(bpfprof_py_proc, shim_owner) O(bpfprof_py_proc, entry_keep) O(bpfprof_py_proc, lasti_shift)
    S(bpfprof_py_frames) D(BPFPROF_CTX_PYTHON) D(BPFPROF_PY_MAX_FRAMES) D(BPFPROF_PY_UNIT_SHIFT)
    D(BPFPROF_PY_UNIT_MASK) D(BPFPROF_PY_ENTRY_BIT) D(BPFPROF_PY_ENTRY_BOOL)
    D(BPFPROF_PY_ENTRY_OWNER) D(BPFPROF_PY_ENTRY_ALL) D(BPFPROF_PY_INSTR_POINTER) D(BPFPROF_PY_INSTR_LASTI_UNITS)
    D(BPFPROF_PY_INSTR_LASTI_BYTES) D(BPFPROF_PY_NO_CFRAME)
    D(BPFPROF_DROP_PY_READ_ERR) D(BPFPROF_DROP_PY_TRUNCATED) D(BPFPROF_DROP_PY_THREAD_UNSEEN) D(BPFPROF_DROP_MAX)
    printf("py_code_mask_bits %d\n", __builtin_popcountll(BPFPROF_PY_CODE_MASK));
    printf("BPFPROF_PY_SHIM %llu\n", BPFPROF_PY_SHIM);
    return 0;
}
"""


def layout_values(tmp_path) -> dict[str, int]:
    """PROGRAM's output: each printed name with its value as the C compiler sees it."""
    src = tmp_path / "layout.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{BPF_DIR}", "-o", str(exe), str(src)], check=True)
    return {k: int(v) for k, v in (line.split() for line in subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True).stdout.splitlines())}


def test_sizes_and_offsets_agree(tmp_path):
    c = layout_values(tmp_path)
    assert c["header"] == ctypes.sizeof(Header) == HEADER_SIZE
    assert c["record"] == ctypes.sizeof(StackRecord)
    assert c["drops"] == len(Drop)
    assert c["kinds"] == max(RecordKind)
    for name, _ in Header._fields_:
        assert c[name] == getattr(Header, name).offset, name


def test_frame_limit_agrees(tmp_path):
    """The records' address arrays are sized by MAX_FRAMES; BPF bounds every frame count with
    BPFPROF_FRAMES_MASK, which must leave each count up to the limit as it is (the header's
    _Static_assert checks the same in C, so the header compiling at all is part of the test)."""
    c = layout_values(tmp_path)
    assert c["BPFPROF_MAX_FRAMES"] == MAX_FRAMES
    mask = c["BPFPROF_FRAMES_MASK"]
    assert all(n & mask == n for n in range(MAX_FRAMES + 1))
    assert c["BPFPROF_MAX_USER_FRAMES"] == MAX_USER_FRAMES and c["BPFPROF_IPS"] == IPS
    assert MAX_FRAMES + MAX_USER_FRAMES <= IPS and IPS & (IPS - 1) == 0  # a full stack fits; the index mask bounds
    assert ctypes.sizeof(StackRecord) == HEADER_SIZE + IPS * 8


def test_trace_context_layout_agrees(tmp_path):
    c = layout_values(tmp_path)
    for name, cls in [("bpfprof_otel_ctx", OtelCtx), ("bpfprof_label", Label), ("bpfprof_go_labels", GoLabels),
                      ("bpfprof_trace_ctx", TraceCtx), ("bpfprof_proc_ctx", ProcCtx)]:
        assert c[name] == ctypes.sizeof(cls), name
    assert c["bpfprof_scratch"] == ctypes.sizeof(Scratch)
    assert c["bpfprof_scratch.ctx_room"] == Scratch.ctx_room.offset == ctypes.sizeof(StackRecord)
    assert c["bpfprof_trace_ctx.otel"] == TraceCtx.otel.offset and c["bpfprof_trace_ctx.go"] == TraceCtx.go.offset
    for struct_name, cls in [("bpfprof_otel_ctx", OtelCtx), ("bpfprof_label", Label), ("bpfprof_go_labels", GoLabels),
                             ("bpfprof_proc_ctx", ProcCtx)]:
        for field in (k.split(".", 1)[1] for k in c if k.startswith(struct_name + ".")):
            assert c[f"{struct_name}.{field}"] == getattr(cls, field).offset, (struct_name, field)
    assert (c["BPFPROF_MAX_LABELS"], c["BPFPROF_LABEL_KEY_LEN"], c["BPFPROF_LABEL_VALUE_LEN"]) == (
        MAX_LABELS, LABEL_KEY_LEN, LABEL_VALUE_LEN)
    assert (c["BPFPROF_CTX_OTEL"], c["BPFPROF_CTX_GO_LABELS"]) == (CtxKind.OTEL, CtxKind.GO_LABELS)
    assert (c["BPFPROF_PROC_GO"], c["BPFPROF_PROC_OTEL"]) == (ProcFlag.GO, ProcFlag.OTEL)
    assert (c["BPFPROF_LABELS_MAP"], c["BPFPROF_LABELS_SLICE"]) == (LabelsForm.MAP, LabelsForm.SLICE)
    assert (c["BPFPROF_DROP_LABELS_TRUNCATED"], c["BPFPROF_DROP_TRACE_CTX_READ_ERR"]) == (
        Drop.LABELS_TRUNCATED, Drop.TRACE_CTX_READ_ERR)


def test_map_value_layouts_agree(tmp_path):
    """Values the agent writes into BPF maps: struct gor_layout (`gor_procs`)."""
    c = layout_values(tmp_path)
    assert c["gor_layout"] == ctypes.sizeof(GorLayout)
    for name, _ in GorLayout._fields_:
        assert c[f"gor_layout.{name}"] == getattr(GorLayout, name).offset, name


def test_python_layouts_agree(tmp_path):
    """struct bpfprof_py_proc (`py_procs`) and the CPython frames trailer (bpf/python.bpf.h)."""
    c = layout_values(tmp_path)
    assert c["bpfprof_py_proc"] == ctypes.sizeof(records.PyProc)
    for name, _ in records.PyProc._fields_:
        if f"bpfprof_py_proc.{name}" in c:
            assert c[f"bpfprof_py_proc.{name}"] == getattr(records.PyProc, name).offset, name
    assert c["bpfprof_scratch.py_room"] == records.Scratch.py_room.offset
    room = ctypes.sizeof(records.Scratch) - records.Scratch.py_room.offset
    assert c["bpfprof_py_frames"] == 8 + 8 * records.PY_MAX_FRAMES == room
    assert c["BPFPROF_CTX_PYTHON"] == CtxKind.PYTHON and c["BPFPROF_PY_MAX_FRAMES"] == records.PY_MAX_FRAMES
    assert (c["BPFPROF_PY_UNIT_SHIFT"], c["BPFPROF_PY_UNIT_MASK"], c["BPFPROF_PY_ENTRY_BIT"]) == (
        records.PY_UNIT_SHIFT, records.PY_UNIT_MASK, records.PY_ENTRY_BIT)
    assert c["py_code_mask_bits"] == records.PY_CODE_MASK.bit_count() == 48
    assert c["BPFPROF_PY_SHIM"] == records.PY_SHIM
    for name in ("ENTRY_BOOL", "ENTRY_OWNER", "ENTRY_ALL", "INSTR_POINTER", "INSTR_LASTI_UNITS",
                 "INSTR_LASTI_BYTES", "NO_CFRAME"):
        assert c[f"BPFPROF_PY_{name}"] == getattr(layouts, name), name
    assert (c["BPFPROF_DROP_PY_READ_ERR"], c["BPFPROF_DROP_PY_TRUNCATED"], c["BPFPROF_DROP_PY_THREAD_UNSEEN"]) == (
        Drop.PY_READ_ERR, Drop.PY_TRUNCATED, Drop.PY_THREAD_UNSEEN)
    assert c["BPFPROF_DROP_MAX"] == len(Drop)


USTACK_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
typedef unsigned short u16; typedef short s16; typedef unsigned int u32;
typedef unsigned long long u64; typedef unsigned char u8; typedef long long s64;
#include "ustack.bpf.h"
#define O(f) printf(#f " %zu\n", offsetof(struct bpfprof_ustack, f));
int main(void) {
    printf("sizeof %zu\n", sizeof(struct bpfprof_ustack));
    O(kind) O(size) O(rip) O(rsp) O(rbp) O(len) O(err) O(flags)
    printf("ctx_kind %d\nuser_mode %d\n", BPFPROF_CTX_USTACK, BPFPROF_USTACK_USER_MODE);
    printf("continue %d\nrip_return %d\nrbp_unknown %d\n", BPFPROF_USTACK_CONTINUE, BPFPROF_USTACK_RIP_RETURN,
           BPFPROF_USTACK_RBP_UNKNOWN);
    return 0;
}
"""


def test_ustack_trailer_layout_agrees(tmp_path):
    """bpf/ustack.bpf.h's trailer (USTACK_BYTES 0: only the struct, no BPF code) against the mirror."""
    src = tmp_path / "ustack.c"
    src.write_text(USTACK_PROGRAM)
    exe = tmp_path / "ustack"
    # the header includes a kernel uapi file; a stand-in pt_regs is enough for the structs
    uapi = tmp_path / "uapi" / "linux"
    uapi.mkdir(parents=True)
    (uapi / "ptrace.h").write_text("struct pt_regs { unsigned long r[21]; };\n")
    subprocess.run(["gcc", f"-I{BPF_DIR}", f"-I{tmp_path}", "-o", str(exe), str(src)], check=True)
    c = {k: int(v) for k, v in (line.split() for line in subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True).stdout.splitlines())}
    assert c["sizeof"] == ctypes.sizeof(Ustack)
    for name, _ in Ustack._fields_:
        if name in c:
            assert c[name] == getattr(Ustack, name).offset, name
    assert c["ctx_kind"] == CtxKind.USTACK and c["user_mode"] == USTACK_USER_MODE
    assert (c["continue"], c["rip_return"], c["rbp_unknown"]) == (USTACK_CONTINUE, USTACK_RIP_RETURN,
                                                                  USTACK_RBP_UNKNOWN)
