"""The CPU probe: bpf/cpu.bpf.c on a perf event at N Hz on every CPU.

Turns ring-buffer records into RawSample objects; symbolization happens
elsewhere. The ring buffer is sized from CPU count x frequency x drain
interval (DESIGN.md), so a full buffer means the agent fell behind, and that
is counted in BPF and reported. The program is compiled in a child process
(agent/bpf_compile.py); this process holds only its file descriptors.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent import bpf_compile, libbpf
from agent.bpf_compile import ProgType
from agent.records import HEADER_SIZE, MAX_FRAMES, Drop, StackRecord

_HEADER = struct.Struct("<IIIIQQHHhh16s")
assert _HEADER.size == HEADER_SIZE

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIN_RINGBUF_PAGES = 64
MAX_TARGETS = 65536
# Headroom over the worst case of full-size records: drains are late when the
# machine is busy, which is exactly when samples matter.
RINGBUF_HEADROOM = 4


@dataclass(frozen=True, slots=True)
class RawSample:
    """One sample as BPF saw it. Addresses are leaf first."""

    pid: int
    tid: int
    cpu: int
    ktime_ns: int
    value: int
    thread_name: str
    kernel_ips: tuple[int, ...]
    user_ips: tuple[int, ...]


def ringbuf_pages(cpus: int, frequency_hz: int, drain_interval_s: float) -> int:
    """Pages for the ring buffer: worst-case bytes per drain interval x headroom, power of two."""
    need = cpus * frequency_hz * drain_interval_s * ctypes.sizeof(StackRecord) * RINGBUF_HEADROOM
    pages = MIN_RINGBUF_PAGES
    while pages * PAGE_SIZE < need:
        pages *= 2
    return pages


def parse_record(buf: bytes) -> RawSample:
    """Decode one ring-buffer record (a bpfprof_header plus addresses)."""
    (_kind, pid, tid, cpu, ktime, value, kn, un, _kerr, _uerr, comm) = _HEADER.unpack_from(buf)
    ips = struct.unpack_from(f"<{kn + un}Q", buf, HEADER_SIZE)
    return RawSample(pid, tid, cpu, ktime, value, comm.split(b"\0", 1)[0].decode(errors="replace"),
                     ips[:kn], ips[kn:])


class CpuSampler:
    """Owns the loaded CPU program. Use as a context manager; close() detaches."""

    PROGRAM = "on_cpu_sample"
    FORK_PROGRAM = "tracepoint__sched__sched_process_fork"

    def __init__(self, frequency_hz: int, pids: Iterable[int] | None = None,
                 follow_children: bool = False, with_kernel: bool = True,
                 drain_interval_s: float = 0.1) -> None:
        self.frequency_hz = frequency_hz
        self._pids = None if pids is None else list(pids)
        self._follow = follow_children
        cpus = len(libbpf.online_cpus())
        defines = {
            "RINGBUF_PAGES": ringbuf_pages(cpus, frequency_hz, drain_interval_s),
            "FILTER_PIDS": int(self._pids is not None),
            "FOLLOW_CHILDREN": int(follow_children),
            "WITH_KERNEL": int(with_kernel),
            "MAX_TARGETS": MAX_TARGETS,
        }
        programs = {self.PROGRAM: ProgType.PERF_EVENT}
        if follow_children:
            programs[self.FORK_PROGRAM] = ProgType.TRACEPOINT
        self._objs = bpf_compile.load_programs("cpu.bpf.c", defines, programs, ["records", "drops", "targets"])
        self._events: list[int] = []
        self._ring: libbpf.RingBuffer | None = None
        for pid in self._pids or ():
            self.add_target(pid)

    def add_target(self, pid: int) -> None:
        """Sample this process too (only when the sampler filters by pid)."""
        libbpf.map_update(self._objs.maps["targets"], ctypes.c_uint32(pid), ctypes.c_uint8(1))

    def start(self, callback: Callable[[RawSample], None]) -> None:
        """Attach the perf events; `callback` gets every sample from poll()."""
        self._ring = libbpf.RingBuffer(self._objs.maps["records"], lambda buf: callback(parse_record(buf)))
        if self._follow:
            self._events += libbpf.attach_tracepoint(self._objs.programs[self.FORK_PROGRAM],
                                                     "sched", "sched_process_fork")
        self._events += libbpf.attach_cpu_clock(self._objs.programs[self.PROGRAM], self.frequency_hz)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for records and deliver them all to the callback."""
        if self._ring is not None:
            self._ring.poll(timeout_ms)

    def drain(self) -> None:
        """Deliver every record already in the buffer without waiting."""
        if self._ring is not None:
            self._ring.consume()

    def drops(self) -> dict[Drop, int]:
        """Sum of each drop counter over all CPUs."""
        return {d: sum(libbpf.map_lookup_percpu_u64(self._objs.maps["drops"], d)) for d in Drop}

    def close(self) -> None:
        """Detach and free everything (idempotent)."""
        libbpf.detach(self._events)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._objs.close()

    def __enter__(self) -> CpuSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


assert MAX_FRAMES == 127  # cpu.bpf.c bounds frame counts with `& 127`
