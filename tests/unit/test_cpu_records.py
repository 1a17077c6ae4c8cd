"""Ring-buffer record decoding, ring-buffer sizing, and completing user stacks from a copy (no kernel needed)."""

from __future__ import annotations

import ctypes
import struct

from agent.bpfload.records import HEADER_SIZE, USTACK_USER_MODE, CtxKind, RecordKind, StackRecord, Ustack, parse_record
from agent.probes.probe_set import PAGE_SIZE, RINGBUF_HEADROOM, ringbuf_pages
from agent.processes.stack_resolver import StackResolver, UnwoundStack, UserStacks, continue_with_fp


def test_parse_record_splits_kernel_and_user_frames():
    kernel = (0xFFFFFFFF81000010, 0xFFFFFFFF81000020)
    user = (0x401000, 0x402000, 0x403000)
    header = struct.pack("<IIIIQQQHHhh16s", RecordKind.CPU, 42, 43, 1, 123456789, 1, 0xABC, len(kernel),
                         len(user), 0, 0, b"worker\0garbage")
    assert len(header) == HEADER_SIZE
    s = parse_record(header + struct.pack(f"<{len(kernel) + len(user)}Q", *kernel, *user))
    assert (s.kind, s.pid, s.tid, s.cpu, s.ktime_ns, s.value, s.aux) == (RecordKind.CPU, 42, 43, 1, 123456789, 1, 0xABC)
    assert s.thread_name == "worker"
    assert s.kernel_ips == kernel and s.user_ips == user


def test_header_only_record():
    header = struct.pack("<IIIIQQQHHhh16s", RecordKind.FREE, 7, 7, 0, 5, 0, 0x7F00, 0, 0, 0, 0, b"x")
    s = parse_record(header)
    assert s.kind == RecordKind.FREE and s.aux == 0x7F00 and s.kernel_ips == () and s.user_ips == ()


def test_ringbuf_is_a_power_of_two_pages_holding_a_drain_interval():
    for cpus, hz, interval in ((1, 99, 0.1), (2, 99, 0.1), (64, 999, 0.1), (256, 99, 1.0)):
        pages = ringbuf_pages(cpus, hz, interval)
        assert pages & (pages - 1) == 0
        assert pages * PAGE_SIZE >= cpus * hz * interval * ctypes.sizeof(StackRecord) * RINGBUF_HEADROOM
    assert ringbuf_pages(64, 999, 0.1) > ringbuf_pages(2, 99, 0.1)


def _header(kind: int, kn: int, un: int) -> bytes:
    return struct.pack("<IIIIQQQHHhh16s", kind, 42, 43, 1, 5, 1, 0, kn, un, 0, 0, b"w")


def _ustack(regs: tuple[int, int, int], data: bytes, user_mode: bool = True) -> bytes:
    size = (ctypes.sizeof(Ustack) + len(data) + 7) & ~7
    head = struct.pack("<IIQQQIhBB", CtxKind.USTACK, size, *regs, len(data), -14, USTACK_USER_MODE if user_mode else 0, 0)
    return head + data + bytes(size - len(head) - len(data))


def test_stack_copy_trailer_after_the_addresses():
    data = bytes(range(256)) * 3
    buf = _header(RecordKind.CPU, 0, 2) + struct.pack("<2Q", 0x401000, 0x402000) + _ustack((0x401000, 0x7FF0, 0x7FF8),
                                                                                               data)
    r = parse_record(buf)
    assert r.user_ips == (0x401000, 0x402000)
    assert r.user_regs == (0x401000, 0x7FF0, 0x7FF8) and r.user_stack == data and r.user_mode


def test_stack_copy_trailer_after_a_trace_context():
    otel = struct.pack("<II16s8sB7x", CtxKind.OTEL, 8 + 32, b"t" * 16, b"s" * 8, 1)
    buf = _header(RecordKind.CPU, 1, 1) + struct.pack("<2Q", 0xFFFFFFFF81000000, 0x401000) + otel + _ustack(
        (0x401000, 0x7FF0, 0), b"\x01" * 13, user_mode=False)
    r = parse_record(buf)
    assert r.otel_link is not None and r.otel_link.span_id == b"s" * 8
    assert r.user_regs == (0x401000, 0x7FF0, 0) and r.user_stack == b"\x01" * 13 and not r.user_mode


def test_records_without_a_copy_have_no_registers():
    r = parse_record(_header(RecordKind.OFFCPU, 0, 1) + struct.pack("<Q", 0x401000))
    assert r.user_regs is None and r.user_stack == b""


def test_ringbuf_holds_records_with_a_stack_copy():
    big = ctypes.sizeof(StackRecord) + 8192
    pages = ringbuf_pages(2, 499, 0.1, record_bytes=big)
    assert pages * PAGE_SIZE >= 2 * 499 * 0.1 * big * RINGBUF_HEADROOM


def test_fp_stack_continues_an_unwind_from_a_shared_frame():
    # the unwinder found the leaf's caller (0x20) the frame-pointer walk missed, then stopped at 0x30
    assert continue_with_fp([0x10, 0x20, 0x30], (0x10, 0x30, 0x40, 0x50)) == (0x40, 0x50)
    # nothing shared: no tail (never a frame the two walks disagree on)
    assert continue_with_fp([0x10, 0x20, 0x30], (0x10, 0x99, 0x40)) is None
    # recursion: the same return address repeats; the match no deeper than the unwound frame wins
    assert continue_with_fp([0x10, 0x30, 0x30], (0x10, 0x30, 0x30, 0x30, 0x40)) == (0x30, 0x40)
    assert continue_with_fp([0x10], ()) is None


class _Proc:
    """A process whose one mapping has no symbols: the unwinder falls back to frame pointers in it."""

    def __init__(self, mapping) -> None:
        self.symbols = self
        self._m = mapping

    def mapping_at(self, addr):
        return self._m if self._m.mapping.start <= addr < self._m.mapping.end else None


class _Tracker:
    def __init__(self, proc) -> None:
        self.proc = proc

    def get(self, pid):
        return self.proc

    def observe(self, pid):
        return self.proc

    def refresh(self, pid):
        return self.proc

    def on_evict(self, forget):
        pass


def _mapped():
    from symbolizer.frames import Mapping
    from symbolizer.process_symbols import MappedFile

    return MappedFile(Mapping(start=0x400000, end=0x500000, file_offset=0, path="/x"), None)


def _rec(stack: bytes, regs, fp_ips, user_mode=True):
    from agent.bpfload.records import RawRecord

    return RawRecord(RecordKind.CPU, 7, 7, 0, 1, 1, 0, "x", (), fp_ips, user_regs=regs, user_stack=stack,
                     user_mode=user_mode)


def test_user_stacks_walk_the_copy_and_mark_the_leaf_exact():
    # frames at 0x7000 (rbp chain): [saved rbp=0x7010, ra=0x401234] [0, 0] -> RA 0 ends the walk
    base = 0x7000
    stack = struct.pack("<4Q", 0x7010, 0x401234, 0, 0)
    us = UserStacks(_Tracker(_Proc(_mapped())))
    r = us.complete(_rec(stack, (0x401000, base, base), (0x401000,)))
    assert tuple(r.user_ips) == (0x401000, 0x401234)
    assert isinstance(r.user_ips, UnwoundStack) and r.user_ips.exact == {0}
    assert r.user_stack == b"" and r.user_regs is None
    assert us.outcomes == {"complete": 1}
    kernel_mode = us.complete(_rec(stack, (0x401000, base, base), (0x401000,), user_mode=False))
    assert kernel_mode.user_ips.exact == frozenset()


def test_user_stacks_count_short_stacks_and_continue_with_frame_pointers():
    base = 0x7000
    stack = struct.pack("<2Q", 0x7010, 0x401234)  # the next frame is past the copy
    us = UserStacks(_Tracker(_Proc(_mapped())))
    r = us.complete(_rec(stack, (0x401000, base, base), (0x401000, 0x401234, 0x405678)))
    assert tuple(r.user_ips) == (0x401000, 0x401234, 0x405678)
    r = us.complete(_rec(stack, (0x401000, base, base), (0x401000, 0x499999)))
    assert tuple(r.user_ips) == (0x401000, 0x401234)
    assert us.outcomes == {"fp_continued:stack_truncated": 1, "truncated:stack_truncated": 1}
    assert [loss.line() for loss in us.losses()] == ["1 user stacks cut short by the unwinder (stack_truncated)"]
    no_copy = _rec(b"", None, (0x401000,))
    assert us.complete(no_copy) is no_copy and us.outcomes["no_copy"] == 1


def test_resolver_looks_up_exact_pcs_as_they_are():
    calls = []

    class Symbols:
        def mapping_at(self, addr):
            return object()

        def resolve(self, addr, return_address):
            calls.append((addr, return_address))
            return None, ()

    class Info:
        symbols = Symbols()

    class Tracker:
        def get(self, pid):
            return Info()

    res = StackResolver(Tracker(), None)
    res.stack(1, (), UnwoundStack([0x10, 0x20, 0x30], frozenset({0, 2})))
    assert calls == [(0x10, False), (0x20, True), (0x30, False)]
