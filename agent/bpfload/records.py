"""Python mirrors of the record and map-value structs in bpf/bpfprof.h, and the decoder of a ring-buffer record.

tests/unit/test_records_layout.py compiles the header and checks the
sizes and offsets agree with these.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from dataclasses import dataclass, field

from exporters.profile import TraceLink

MAX_FRAMES = 127
MAX_USER_FRAMES = 128  # BPFPROF_MAX_USER_FRAMES: stacks walked in BPF
IPS = 256  # BPFPROF_IPS
COMM_LEN = 16
MAX_LABELS = 8
LABEL_KEY_LEN = 32
LABEL_VALUE_LEN = 64
PY_MAX_FRAMES = 64  # BPFPROF_PY_MAX_FRAMES


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
    PY_READ_ERR = 7
    PY_TRUNCATED = 8
    PY_THREAD_UNSEEN = 9


DROP_DESCRIPTIONS = {
    Drop.RINGBUF_FULL: "samples lost (ring buffer full)",
    Drop.USER_STACK_ERR: "user stacks that could not be read",
    Drop.KERNEL_STACK_ERR: "kernel stacks that could not be read",
    Drop.USER_TRUNCATED: "user stacks truncated at 127 frames",
    Drop.KERNEL_TRUNCATED: "kernel stacks truncated at 127 frames",
    Drop.LABELS_TRUNCATED: f"samples whose Go labels were cut (over {MAX_LABELS} labels or a long key/value)",
    Drop.TRACE_CTX_READ_ERR: "samples whose trace context could not be read",
    Drop.PY_READ_ERR: "samples whose Python frames could not be read",
    Drop.PY_TRUNCATED: f"Python stacks cut at {PY_MAX_FRAMES} frames",
    Drop.PY_THREAD_UNSEEN: "samples of a Python thread not reached yet among its process's many threads",
}


@dataclass(frozen=True)
class Loss:
    """Events lost or cut short for one reason: a running total, or one interval's growth of it."""

    reason: str  # a metric label: ringbuf_full, heap_live_map_full, unwind_no_process ...
    count: int
    description: str  # reads after the count: "samples lost (ring buffer full)"
    warn: bool = False  # worth a warning each time it grows (a full map), not only a count

    def line(self) -> str:
        return f"{self.count} {self.description}"


class CtxKind(enum.IntEnum):
    """enum bpfprof_ctx_kind: which trace context follows a record's addresses."""

    NONE = 0
    OTEL = 1
    GO_LABELS = 2
    USTACK = 3  # BPFPROF_CTX_USTACK (bpf/ustack.bpf.h): user registers + stack copy, CPU samples only
    PYTHON = 4  # BPFPROF_CTX_PYTHON (bpf/python.bpf.h): the thread's CPython frames, one word each


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

    _fields_ = [("h", Header), ("ips", ctypes.c_uint64 * IPS)]


class Scratch(ctypes.Structure):
    """struct bpfprof_scratch: a record with room for its trace context trailer (the largest a record can be)."""

    _fields_ = [("r", StackRecord), ("ctx_room", TraceCtx), ("py_room", ctypes.c_uint64 * (1 + PY_MAX_FRAMES))]


class PyProc(ctypes.Structure):
    """struct bpfprof_py_proc (bpf/python.bpf.h): a `py_procs` value."""

    _fields_ = [("interpreters_head", ctypes.c_uint64)] + [
        (name, ctypes.c_uint16) for name in (
            "interp_threads_head", "tstate_next", "tstate_thread_id", "tstate_frame", "cframe_current_frame",
            "frame_code", "frame_previous", "frame_instr", "frame_entry", "code_adaptive")] + [
        ("entry_kind", ctypes.c_uint8), ("instr_kind", ctypes.c_uint8), ("owner_cstack", ctypes.c_uint8),
        ("cframe_previous", ctypes.c_uint8), ("shim_owner", ctypes.c_uint8), ("entry_keep", ctypes.c_uint8),
        ("lasti_shift", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


# One word of a PYTHON trailer (BPFPROF_PY_*): the code object, the code unit it ran, an entry frame.
PY_CODE_MASK = (1 << 48) - 1
PY_UNIT_SHIFT = 48
PY_UNIT_MASK = 0x3FFF
PY_ENTRY_BIT = 62
PY_SHIM = 1 << PY_ENTRY_BIT  # BPFPROF_PY_SHIM: an eval call's shim frame (3.12+), no code object


class ProcCtx(ctypes.Structure):
    """struct bpfprof_proc_ctx: a `trace_procs` value."""

    _fields_ = [("flags", ctypes.c_uint32), ("g_m", ctypes.c_uint16), ("m_curg", ctypes.c_uint16),
                ("g_labels", ctypes.c_uint16), ("labels_form", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 5),
                ("go_tls_g", ctypes.c_int64), ("otel_tls", ctypes.c_int64)]


class GorLayout(ctypes.Structure):
    """struct gor_layout: a `gor_procs` value (bpf/goroutine.bpf.c), the g offsets its uprobes read."""

    _fields_ = [("goid", ctypes.c_uint16), ("labels", ctypes.c_uint16), ("gopc", ctypes.c_uint16),
                ("startpc", ctypes.c_uint16)]


USTACK_USER_MODE = 1  # BPFPROF_USTACK_USER_MODE
USTACK_CONTINUE = 2  # BPFPROF_USTACK_CONTINUE: user_ips are frames walked in BPF, the last one at the registers
USTACK_RIP_RETURN = 4  # BPFPROF_USTACK_RIP_RETURN
USTACK_RBP_UNKNOWN = 8  # BPFPROF_USTACK_RBP_UNKNOWN


class Ustack(ctypes.Structure):
    """struct bpfprof_ustack (bpf/ustack.bpf.h): a CPU record's last trailer, then `len` stack bytes."""

    _fields_ = [("kind", ctypes.c_uint32), ("size", ctypes.c_uint32), ("rip", ctypes.c_uint64),
                ("rsp", ctypes.c_uint64), ("rbp", ctypes.c_uint64), ("len", ctypes.c_uint32),
                ("err", ctypes.c_int16), ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


HEADER_SIZE = ctypes.sizeof(Header)
TRACE_CTX_HEADER_SIZE = 8  # kind, size


@dataclass(slots=True, unsafe_hash=True)
class RawRecord:
    """One ring-buffer record as BPF wrote it. Addresses are leaf first.

    Treat it as immutable (dataclasses.replace makes a changed copy), but for
    `image`, which the pipeline sets as it delivers the record. It is not
    frozen only because a frozen dataclass's __init__ sets each field through
    object.__setattr__: ~1 us of the agent's few per sample (bench/sample_path_speed.py).
    """

    kind: int
    pid: int
    tid: int
    cpu: int
    ktime_ns: int  # CLOCK_MONOTONIC
    value: int
    aux: int
    thread_name: str
    kernel_ips: tuple[int, ...]
    user_ips: tuple[int, ...]
    # Trace context read at sample time (bpf/tracectx.bpf.h), when the probe asked for it:
    go_labels: tuple[tuple[str, str], ...] = ()  # the running goroutine's pprof labels, in Go's order
    go_labels_truncated: bool = False  # labels missing or cut: the set above is not the whole set
    otel_link: TraceLink | None = None  # from an OTEP 4947 thread context record
    # CPU samples with a stack copy (bpf/ustack.bpf.h), until the agent unwinds them:
    user_regs: tuple[int, int, int] | None = None  # RIP, RSP, RBP; None: no copy was sent
    user_stack: bytes = b""  # user memory from RSP up
    user_mode: bool = True  # the sample hit user mode (RIP is the interrupted instruction)
    ustack_flags: int = 0  # BPFPROF_USTACK_* of the copy
    # CPython frames (bpf/python.bpf.h), leaf first, one word each (PY_* above); () when not a Python thread
    py_frames: tuple[int, ...] = ()
    # The process snapshot (processes.tracker.ProcessInfo) the record belongs to, set at delivery: a
    # process that execs keeps its pid, and its earlier samples resolve against the image they ran in.
    image: object = field(default=None, compare=False)


_HEADER = struct.Struct("<IIIIQQQHHhh16s")
assert _HEADER.size == HEADER_SIZE

_CTX_HEADER = struct.Struct("<II")
_GO_LABELS_HEADER = struct.Struct("<IHH")
_LABEL = struct.Struct(f"<HHI{LABEL_KEY_LEN}s{LABEL_VALUE_LEN}s")
_OTEL = struct.Struct("<16s8sB")
_LABELS_AT = TRACE_CTX_HEADER_SIZE + GoLabels.labels.offset
_USTACK = struct.Struct("<IIQQQIhBB")
assert _USTACK.size == ctypes.sizeof(Ustack)
assert _LABEL.size == ctypes.sizeof(Label) and _CTX_HEADER.size == TRACE_CTX_HEADER_SIZE
assert TraceCtx.otel.offset == TraceCtx.go.offset == TRACE_CTX_HEADER_SIZE


def _labels(buf: bytes, pos: int, end: int) -> tuple[tuple[tuple[str, str], ...], bool]:
    """Go labels of a trailer at `pos`: (pairs, truncated). A cut key or value is dropped, not kept cut."""
    count, total, cut = _GO_LABELS_HEADER.unpack_from(buf, pos + TRACE_CTX_HEADER_SIZE)
    out = []
    for i in range(count):
        at = pos + _LABELS_AT + i * _LABEL.size
        if at + _LABEL.size > end:
            return tuple(out), True
        klen, vlen, _, key, value = _LABEL.unpack_from(buf, at)
        if klen <= LABEL_KEY_LEN and vlen <= LABEL_VALUE_LEN:
            out.append((key[:klen].decode(errors="replace"), value[:vlen].decode(errors="replace")))
    return tuple(out), bool(cut) or count < total


# A record's time and value, the header's only fields that differ between repeats of one sample.
_TIME_VALUE = struct.Struct("<QQ")
TIME_AT = Header.ktime_ns.offset  # after kind, pid, tid, cpu
AFTER_TIME = TIME_AT + _TIME_VALUE.size  # the time, then the value
assert Header.value.offset == TIME_AT + 8
# Records longer than this carry a stack copy (kilobytes, different every time): never repeats.
REPEAT_MAX_BYTES = 2048


def repeat_key(buf: bytes) -> bytes | None:
    """All of a record but its time and value, None for one that cannot repeat (a stack copy).

    Two records with the same key are the same sample taken twice: same kind,
    process, thread, CPU, name, stacks and trailers. The pipeline uses it to
    add a repeat to its entry without parsing it (CapturePipeline.deliver_bufs).
    """
    if len(buf) > REPEAT_MAX_BYTES:
        return None
    return buf[:TIME_AT] + buf[AFTER_TIME:]


def time_value(buf: bytes) -> tuple[int, int]:
    """(ktime_ns, value) of a record."""
    return _TIME_VALUE.unpack_from(buf, TIME_AT)


def parse_record(buf: bytes) -> RawRecord:
    """Decode one ring-buffer record: a bpfprof_header, addresses, then optional trailers.

    Trailers follow one another, each starting with (kind, size): a trace
    context (any family), then a user stack copy (CPU samples). An unknown or
    malformed trailer ends the walk; what came before is kept.
    """
    (kind, pid, tid, cpu, ktime, value, aux, kn, un, _kerr, _uerr, comm) = _HEADER.unpack_from(buf)
    ips = struct.unpack_from(f"<{kn + un}Q", buf, HEADER_SIZE) if kn + un else ()
    name = comm.split(b"\0", 1)[0].decode(errors="replace")
    pos = HEADER_SIZE + 8 * (kn + un)
    if len(buf) < pos + TRACE_CTX_HEADER_SIZE:
        return RawRecord(kind, pid, tid, cpu, ktime, value, aux, name, ips[:kn], ips[kn:])
    labels: tuple[tuple[str, str], ...] = ()
    truncated = False
    link = None
    regs = None
    stack = b""
    user_mode = True
    ustack_flags = 0
    py: tuple[int, ...] = ()
    while len(buf) >= pos + TRACE_CTX_HEADER_SIZE:
        ctx_kind, size = _CTX_HEADER.unpack_from(buf, pos)
        if size < TRACE_CTX_HEADER_SIZE:
            break
        end = min(len(buf), pos + size)
        if ctx_kind == CtxKind.GO_LABELS and end >= pos + _LABELS_AT:
            labels, truncated = _labels(buf, pos, end)
        elif ctx_kind == CtxKind.OTEL and end >= pos + TRACE_CTX_HEADER_SIZE + _OTEL.size:
            trace_id, span_id, _flags = _OTEL.unpack_from(buf, pos + TRACE_CTX_HEADER_SIZE)
            link = TraceLink(trace_id, span_id)
        elif ctx_kind == CtxKind.USTACK and end >= pos + _USTACK.size:
            _k, _s, rip, rsp, rbp, length, _err, flags, _pad = _USTACK.unpack_from(buf, pos)
            regs = (rip, rsp, rbp)
            start = pos + _USTACK.size
            stack = buf[start:min(end, start + length)]
            user_mode = bool(flags & USTACK_USER_MODE)
            ustack_flags = flags
        elif ctx_kind == CtxKind.PYTHON:
            n = (end - pos - TRACE_CTX_HEADER_SIZE) // 8
            py = struct.unpack_from(f"<{n}Q", buf, pos + TRACE_CTX_HEADER_SIZE) if n > 0 else ()
        pos += size
    return RawRecord(kind, pid, tid, cpu, ktime, value, aux, name, ips[:kn], ips[kn:], labels, truncated, link,
                     regs, stack, user_mode, ustack_flags, py)
