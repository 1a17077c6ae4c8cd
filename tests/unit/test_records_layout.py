"""The Python mirrors in agent/records.py have the C layout of bpf/bpfprof.h.

gcc compiles the real header (with BCC's integer typedefs) and prints sizes
and offsets; ctypes must agree field by field.
"""

from __future__ import annotations

import ctypes
import subprocess

from agent.records import HEADER_SIZE, Drop, Header, RecordKind, StackRecord
from bpf import BPF_DIR

PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
typedef unsigned short u16; typedef short s16; typedef unsigned int u32;
typedef unsigned long long u64;
#include "bpfprof.h"
#define F(f) printf(#f " %zu\n", offsetof(struct bpfprof_header, f));
int main(void) {
    printf("header %zu\n", sizeof(struct bpfprof_header));
    printf("record %zu\n", sizeof(struct bpfprof_stack_record));
    printf("drops %d\n", BPFPROF_DROP_MAX);
    printf("kinds %d\n", BPFPROF_KIND_GOROUTINE);
    F(kind) F(pid) F(tid) F(cpu) F(ktime_ns) F(value) F(aux) F(kernel_frames) F(user_frames)
    F(kernel_err) F(user_err) F(comm)
    return 0;
}
"""


def test_sizes_and_offsets_agree(tmp_path):
    src = tmp_path / "layout.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{BPF_DIR}", "-o", str(exe), str(src)], check=True)
    c = dict(line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                      check=True).stdout.splitlines())
    assert int(c["header"]) == ctypes.sizeof(Header) == HEADER_SIZE
    assert int(c["record"]) == ctypes.sizeof(StackRecord)
    assert int(c["drops"]) == len(Drop)
    assert int(c["kinds"]) == max(RecordKind)
    for name, _ in Header._fields_:
        assert int(c[name]) == getattr(Header, name).offset, name
