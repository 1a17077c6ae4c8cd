"""Ring-buffer record decoding and ring-buffer sizing (no kernel needed)."""

from __future__ import annotations

import ctypes
import struct

from agent.probe_set import PAGE_SIZE, RINGBUF_HEADROOM, parse_record, ringbuf_pages
from agent.records import HEADER_SIZE, RecordKind, StackRecord


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
