"""Python mirrors of the record structs in bpf/bpfprof.h.

tests/integration/test_records_layout.py compiles the header and checks the
sizes and offsets agree with these.
"""

from __future__ import annotations

import ctypes
import enum

MAX_FRAMES = 127
COMM_LEN = 16


class RecordKind(enum.IntEnum):
    """enum bpfprof_kind: what a record is, and so what its value and aux mean."""

    CPU = 1
    OFFCPU = 2
    ALLOC = 3
    FREE = 4
    LOCK = 5
    GOROUTINE = 6


class Drop(enum.IntEnum):
    """Indices of the BPF `drops` counter array (enum bpfprof_drop)."""

    RINGBUF_FULL = 0
    USER_STACK_ERR = 1
    KERNEL_STACK_ERR = 2
    USER_TRUNCATED = 3
    KERNEL_TRUNCATED = 4


DROP_DESCRIPTIONS = {
    Drop.RINGBUF_FULL: "samples lost (ring buffer full)",
    Drop.USER_STACK_ERR: "user stacks that could not be read",
    Drop.KERNEL_STACK_ERR: "kernel stacks that could not be read",
    Drop.USER_TRUNCATED: "user stacks truncated at 127 frames",
    Drop.KERNEL_TRUNCATED: "kernel stacks truncated at 127 frames",
}


class Header(ctypes.Structure):
    """struct bpfprof_header."""

    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("ktime_ns", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("aux", ctypes.c_uint64),
        ("kernel_frames", ctypes.c_uint16),
        ("user_frames", ctypes.c_uint16),
        ("kernel_err", ctypes.c_int16),
        ("user_err", ctypes.c_int16),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


class StackRecord(ctypes.Structure):
    """struct bpfprof_stack_record (the largest a record can be)."""

    _fields_ = [("h", Header), ("ips", ctypes.c_uint64 * (2 * MAX_FRAMES))]


HEADER_SIZE = ctypes.sizeof(Header)
