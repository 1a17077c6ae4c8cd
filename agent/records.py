"""Python mirrors of the record structs in bpf/bpfprof.h.

tests/unit/test_records_layout.py compiles the header and checks the
sizes and offsets agree with these.
"""

from __future__ import annotations

import ctypes
import enum

MAX_FRAMES = 127
COMM_LEN = 16
MAX_LABELS = 8
LABEL_KEY_LEN = 32
LABEL_VALUE_LEN = 64


class RecordKind(enum.IntEnum):
    """enum bpfprof_kind: what a record is, and so what its value and aux mean."""

    CPU = 1
    OFFCPU = 2
    ALLOC = 3
    FREE = 4
    LOCK = 5
    GOROUTINE = 6
    GO_EXIT = 7


class Drop(enum.IntEnum):
    """Indices of the BPF `drops` counter array (enum bpfprof_drop)."""

    RINGBUF_FULL = 0
    USER_STACK_ERR = 1
    KERNEL_STACK_ERR = 2
    USER_TRUNCATED = 3
    KERNEL_TRUNCATED = 4
    LABELS_TRUNCATED = 5
    TRACE_CTX_READ_ERR = 6


DROP_DESCRIPTIONS = {
    Drop.RINGBUF_FULL: "samples lost (ring buffer full)",
    Drop.USER_STACK_ERR: "user stacks that could not be read",
    Drop.KERNEL_STACK_ERR: "kernel stacks that could not be read",
    Drop.USER_TRUNCATED: "user stacks truncated at 127 frames",
    Drop.KERNEL_TRUNCATED: "kernel stacks truncated at 127 frames",
    Drop.LABELS_TRUNCATED: f"samples whose Go labels were cut (over {MAX_LABELS} labels or a long key/value)",
    Drop.TRACE_CTX_READ_ERR: "samples whose trace context could not be read",
}


class CtxKind(enum.IntEnum):
    """enum bpfprof_ctx_kind: which trace context follows a record's addresses."""

    NONE = 0
    OTEL = 1
    GO_LABELS = 2
    USTACK = 3  # BPFPROF_CTX_USTACK (bpf/ustack.bpf.h): user registers + stack copy, CPU samples only


class ProcFlag(enum.IntFlag):
    """BPFPROF_PROC_*: what to read for a process in `trace_procs`."""

    GO = 1
    OTEL = 2


class LabelsForm(enum.IntEnum):
    """BPFPROF_LABELS_*: how g.labels points at the label set."""

    MAP = 1  # Go <= 1.23: *map[string]string
    SLICE = 2  # Go >= 1.24: *[]struct{key, value string}


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


class OtelCtx(ctypes.Structure):
    """struct bpfprof_otel_ctx: the fixed part of an OTEP 4947 record."""

    _fields_ = [("trace_id", ctypes.c_uint8 * 16), ("span_id", ctypes.c_uint8 * 8), ("trace_flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 7)]


class Label(ctypes.Structure):
    """struct bpfprof_label: lengths are the Go string lengths, copies are cut to the slot."""

    _fields_ = [("key_len", ctypes.c_uint16), ("value_len", ctypes.c_uint16), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_char * LABEL_KEY_LEN), ("value", ctypes.c_char * LABEL_VALUE_LEN)]


class GoLabels(ctypes.Structure):
    """struct bpfprof_go_labels."""

    _fields_ = [("count", ctypes.c_uint32), ("total", ctypes.c_uint16), ("cut", ctypes.c_uint16),
                ("labels", Label * MAX_LABELS)]


class _CtxUnion(ctypes.Union):
    _fields_ = [("otel", OtelCtx), ("go", GoLabels)]


class TraceCtx(ctypes.Structure):
    """struct bpfprof_trace_ctx: the optional trailer after a record's addresses."""

    _anonymous_ = ("u",)
    _fields_ = [("kind", ctypes.c_uint32), ("size", ctypes.c_uint32), ("u", _CtxUnion)]


class StackRecord(ctypes.Structure):
    """struct bpfprof_stack_record (header and the most addresses a record can have)."""

    _fields_ = [("h", Header), ("ips", ctypes.c_uint64 * (2 * MAX_FRAMES))]


class Scratch(ctypes.Structure):
    """struct bpfprof_scratch: a record with room for its trace context trailer (the largest a record can be)."""

    _fields_ = [("r", StackRecord), ("ctx_room", TraceCtx)]


class ProcCtx(ctypes.Structure):
    """struct bpfprof_proc_ctx: a `trace_procs` value."""

    _fields_ = [("flags", ctypes.c_uint32), ("g_m", ctypes.c_uint16), ("m_curg", ctypes.c_uint16),
                ("g_labels", ctypes.c_uint16), ("labels_form", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 5),
                ("go_tls_g", ctypes.c_int64), ("otel_tls", ctypes.c_int64)]


USTACK_USER_MODE = 1  # BPFPROF_USTACK_USER_MODE


class Ustack(ctypes.Structure):
    """struct bpfprof_ustack (bpf/ustack.bpf.h): a CPU record's last trailer, then `len` stack bytes."""

    _fields_ = [("kind", ctypes.c_uint32), ("size", ctypes.c_uint32), ("rip", ctypes.c_uint64),
                ("rsp", ctypes.c_uint64), ("rbp", ctypes.c_uint64), ("len", ctypes.c_uint32),
                ("err", ctypes.c_int16), ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


HEADER_SIZE = ctypes.sizeof(Header)
TRACE_CTX_HEADER_SIZE = 8  # kind, size
