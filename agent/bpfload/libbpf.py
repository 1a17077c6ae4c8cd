"""The few kernel interfaces the agent needs once programs are loaded.

libbpf (Debian's libbpf1, a dependency of BCC, 350 KB) through ctypes for map
access and the ring buffer, and the perf_event_open syscall for attaching.
The long-lived agent process uses only this; BCC and its LLVM (~150 MB of
RSS once a program is compiled) stay in the short-lived compile child, see
agent/bpfload/bpf_compile.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import BpfLoadError

_SYS_PERF_EVENT_OPEN = 298  # x86_64
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
# _IOW('$', 4, __u64): a new sample period (a new frequency for an event still in frequency mode).
PERF_EVENT_IOC_PERIOD = 0x40082404
BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)
PERF_FLAG_FD_CLOEXEC = 8
_ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER7; the kernel accepts any size it knows
_FLAG_DISABLED = 1 << 0
_FLAG_FREQ = 1 << 10
TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """libbpf.so.1, loaded once, with argument types declared."""
    global _lib
    if _lib is None:
        try:
            so = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise BpfLoadError("libbpf.so.1 not found: apt-get install libbpf1") from e
        vp, i = ctypes.c_void_p, ctypes.c_int
        so.bpf_map_update_elem.argtypes = [i, vp, vp, ctypes.c_uint64]
        so.bpf_map_lookup_elem.argtypes = [i, vp, vp]
        so.bpf_map_delete_elem.argtypes = [i, vp]
        so.bpf_map_get_next_key.argtypes = [i, vp, vp]
        so.bpf_map_create.argtypes = [i, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, vp]
        so.bpf_prog_load.argtypes = [i, ctypes.c_char_p, ctypes.c_char_p, vp, ctypes.c_size_t, vp]
        so.bpf_obj_get_info_by_fd.argtypes = [i, vp, ctypes.POINTER(ctypes.c_uint32)]
        _lib = so
    return _lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise BpfLoadError(f"{what}: {os.strerror(-rc)}")


def map_update(fd: int, key: ctypes._SimpleCData, value: ctypes._SimpleCData) -> None:
    _check(lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0), "bpf map update")


def map_delete(fd: int, key: ctypes._SimpleCData) -> bool:
    """Delete `key`; False if it was not there (BpfLoadError for any other refusal)."""
    rc = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if rc == -errno.ENOENT:
        return False
    _check(rc, "bpf map delete")
    return True


def map_lookup_percpu_u64(fd: int, key: int) -> list[int]:
    """One key of a BPF_PERCPU_ARRAY of u64: a value per possible CPU."""
    n = possible_cpus()
    values = (ctypes.c_uint64 * n)()
    k = ctypes.c_uint32(key)
    _check(lib().bpf_map_lookup_elem(fd, ctypes.byref(k), values), "bpf map lookup")
    return list(values)


def map_keys_u32(fd: int) -> list[int]:
    """Every key of a BPF hash map with u32 keys (the shared `targets` set, for one)."""
    so = lib()
    keys: list[int] = []
    key, nxt = ctypes.c_uint32(), ctypes.c_uint32()
    prev = None
    while so.bpf_map_get_next_key(fd, prev, ctypes.byref(nxt)) == 0:
        keys.append(nxt.value)
        key.value = nxt.value
        prev = ctypes.byref(key)
    return keys


def _cpu_list(path: str) -> list[int]:
    """Parse a kernel CPU list such as '0-3,6'."""
    cpus: list[int] = []
    for part in Path(path).read_text().strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def online_cpus() -> list[int]:
    return _cpu_list("/sys/devices/system/cpu/online")


@functools.cache
def possible_cpus() -> int:
    """Per-CPU map values per key. Fixed at boot (CPUs hot-plugged later are already counted as possible),
    so read once: the counters read it for every key they look up."""
    return max(_cpu_list("/sys/devices/system/cpu/possible")) + 1


def _perf_event_open(attr: ctypes.Array, pid: int, cpu: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_PERF_EVENT_OPEN, attr, pid, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise BpfLoadError(f"perf_event_open on cpu {cpu}: {os.strerror(ctypes.get_errno())}")
    return fd


def _attr(type_: int, config: int, period_or_freq: int, flags: int) -> ctypes.Array:
    attr = (ctypes.c_uint8 * _ATTR_SIZE)()
    ctypes.c_uint32.from_buffer(attr, 0).value = type_
    ctypes.c_uint32.from_buffer(attr, 4).value = _ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 8).value = config
    ctypes.c_uint64.from_buffer(attr, 16).value = period_or_freq
    ctypes.c_uint64.from_buffer(attr, 40).value = flags
    ctypes.c_uint32.from_buffer(attr, 48).value = 1  # wakeup_events
    return attr


def _attach(fd: int, prog_fd: int) -> int:
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as e:
        os.close(fd)
        raise BpfLoadError(f"attaching a BPF program to a perf event: {e.strerror}") from e
    return fd


def attach_cpu_clock(prog_fd: int, frequency_hz: int) -> list[int]:
    """A cpu-clock sampling event at `frequency_hz` on every online CPU, running `prog_fd`."""
    fds = []
    try:
        for cpu in online_cpus():
            attr = _attr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK, frequency_hz, _FLAG_DISABLED | _FLAG_FREQ)
            fds.append(_attach(_perf_event_open(attr, -1, cpu), prog_fd))
    except BpfLoadError:
        detach(fds)
        raise
    return fds


def set_cpu_clock_period(fds: list[int], period_ns: int) -> None:
    """Change the sampling period of attach_cpu_clock's events in place: no detach, no BPF reload.

    The argument of PERF_EVENT_IOC_PERIOD is a period unless the event is in frequency mode, and the
    kernel turns a cpu-clock event opened with freq=1 into a fixed-period hrtimer at open time
    (perf_swevent_init_hrtimer clears attr.freq): so it takes a period in ns (a frequency passed there
    would be a period of a few ns, which the kernel rounds up to 10 us: 100 kHz). The kernel restarts
    each event's timer from the call (__perf_event_period clears period_left): the part of the period
    that had run is not sampled. BpfLoadError if the kernel refuses.
    """
    arg = ctypes.c_uint64(max(1, period_ns))
    for fd in fds:
        try:
            fcntl.ioctl(fd, PERF_EVENT_IOC_PERIOD, arg)
        except OSError as e:
            raise BpfLoadError(f"perf event period {period_ns} ns: {e.strerror}") from None


def tracepoint_id(category: str, name: str) -> int:
    for root in TRACEFS_ROOTS:
        p = root / "events" / category / name / "id"
        if p.exists():
            return int(p.read_text())
    raise BpfLoadError(f"tracepoint {category}:{name} not found: is tracefs mounted? (bpfprof doctor --fix)")


def attach_tracepoint(prog_fd: int, category: str, name: str) -> list[int]:
    """Run `prog_fd` on a tracepoint (one event: the program is attached to the tracepoint, all CPUs)."""
    attr = _attr(PERF_TYPE_TRACEPOINT, tracepoint_id(category, name), 1, _FLAG_DISABLED)
    return [_attach(_perf_event_open(attr, -1, 0), prog_fd)]


def detach(fds: list[int]) -> None:
    for fd in fds:
        try:
            fcntl.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)
        except OSError:
            pass
        os.close(fd)
    fds.clear()


log = logging.getLogger(__name__)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_RB_BUSY = 1 << 31  # kernel/bpf/ringbuf.c: BPF_RINGBUF_BUSY_BIT, a record reserved, not yet committed
_RB_DISCARD = 1 << 30  # BPF_RINGBUF_DISCARD_BIT: committed as discarded, skipped
_RB_HDR = 8  # struct bpf_ringbuf_hdr {u32 len; u32 pg_off;}
_RB_LEN = struct.Struct("<I")
_PROT_READ, _PROT_WRITE, _MAP_SHARED = 0x1, 0x2, 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    c = ctypes.CDLL(None, use_errno=True)
    c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    c.mmap.restype = ctypes.c_void_p
    c.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return c

# The longest one consume() delivers records before returning to its caller.
MAX_CONSUME_S = 0.25
# Records per callback: per-sample work that can be done per batch is (CapturePipeline.deliver_bufs);
# small enough that the deadline above is looked at often.
BATCH = 256


class RingBuffer:
    """A BPF ring buffer map read in place; `callback(list of bytes)` per batch of records.

    The map is mapped the way the kernel lays it out for consumers (and as
    libbpf reads it): a page holding the consumer position (ours to write),
    then the producer position page and the data pages mapped twice, so a
    record that wraps reads as one run. Records are copied out in one pass
    and the consumer position is stored once, before any is handled, so BPF
    gets the space back at once. Reading in Python costs less per record than
    libbpf's ring_buffer__consume calling back into Python through ctypes
    (bench/sample_path_speed.py). The kernel writes its own memory only: the
    map is ours, nothing another user controls.

    wait() sleeps in an epoll of its own on the map (BPF's wake-ups) and an
    eventfd that wake() writes: another thread or a signal handler can end the
    wait at once, so a waiting loop needs no short timeout to notice a stop.
    """

    def __init__(self, map_fd: int, callback: Callable[[list[bytes]], None],
                 max_consume_s: float = MAX_CONSUME_S) -> None:
        self._callback = callback
        self.max_consume_s = max_consume_s
        self.errors = 0
        self.stopped_early = False  # the last consume() left records behind (max_consume_s)
        self._pending: list[bytes] = []  # taken out, delivered up to _at
        self._at = 0
        size = map_info(map_fd).max_entries  # data bytes, a power of two
        self._mask = size - 1
        self._libc = _libc()
        self._cons_len, self._prod_len = PAGE_SIZE, PAGE_SIZE + 2 * size
        cons = self._libc.mmap(None, self._cons_len, _PROT_READ | _PROT_WRITE, _MAP_SHARED, map_fd, 0)
        if cons in (None, _MAP_FAILED):
            raise BpfLoadError(f"mmap of the ring buffer's consumer page: {os.strerror(ctypes.get_errno())}")
        prod = self._libc.mmap(None, self._prod_len, _PROT_READ, _MAP_SHARED, map_fd, PAGE_SIZE)
        if prod in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            self._libc.munmap(cons, self._cons_len)
            raise BpfLoadError(f"mmap of the ring buffer's data pages: {os.strerror(err)}")
        self._cons_addr, self._prod_addr = cons, prod
        # One aligned 8-byte load or store each (ctypes copies the value whole): the
        # positions are never seen torn. Headers are read with struct: between reserve
        # and commit only their top byte (the busy and discard bits) changes.
        self._consumer = ctypes.c_uint64.from_address(cons)
        self._producer = ctypes.c_uint64.from_address(prod)
        self._data = memoryview((ctypes.c_char * (2 * size)).from_address(prod + PAGE_SIZE)).cast("B")
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self._epoll.register(self._wake, select.EPOLLIN)

    def wait(self, timeout_s: float) -> int:
        """Sleep until BPF wakes us, wake() is called or `timeout_s` passes; then consume every record.
        Returns the number consumed."""
        for fd, _ in self._epoll.poll(timeout_s):
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
        return self.consume()

    def wake(self) -> None:
        """End a wait() now (async-signal-safe: one write to an eventfd)."""
        try:
            os.eventfd_write(self._wake, 1)
        except (BlockingIOError, OSError):
            pass

    def take(self) -> list[bytes]:
        """Copy out the records committed when it starts and give their space back to BPF."""
        if self._data is None:
            return []
        data, mask, unpack = self._data, self._mask, _RB_LEN.unpack_from
        out: list[bytes] = []
        cons = self._consumer.value
        prod = self._producer.value
        while cons < prod:
            at = cons & mask
            (length,) = unpack(data, at)
            if length & _RB_BUSY:
                break  # reserved, not committed yet: the next take() gets it (records commit in order)
            size = length & ~(_RB_BUSY | _RB_DISCARD)
            if not length & _RB_DISCARD:
                out.append(bytes(data[at + _RB_HDR:at + _RB_HDR + size]))
            cons += (size + _RB_HDR + 7) & ~7
        self._consumer.value = cons
        return out

    def consume(self) -> int:
        """Deliver what the buffer holds, BATCH records to a callback, for at most max_consume_s: when BPF
        writes faster than the agent reads, the caller's loop still gets its turn (interval cuts, the
        overhead governor, signals); records taken out and not yet delivered wait for the next call, at
        most one ring's worth, so a slow agent still makes BPF drop (counted), never grows without bound.
        A batch the callback fails on is counted in `errors` and logged (the first, then at powers of
        two), not fatal: the callback keeps one bad record from costing its batch (deliver_bufs).
        Returns the number delivered."""
        pending, at = self._pending, self._at
        if at >= len(pending):
            pending, at = self.take(), 0
        deadline = time.monotonic() + self.max_consume_s
        callback, n = self._callback, 0
        while at < len(pending):
            batch = pending[at:at + BATCH]
            at += len(batch)
            n += len(batch)
            try:
                callback(batch)
            except Exception:
                self.errors += 1
                if self.errors & (self.errors - 1) == 0:
                    log.exception("%d ring-buffer records not handled (%d batches so far)", len(batch), self.errors)
            if time.monotonic() > deadline:
                break
        self._pending, self._at = pending, at
        self.stopped_early = at < len(pending)
        return n

    def close(self) -> None:
        if self._data is not None:
            self._data.release()
            self._data = None
            self._libc.munmap(self._prod_addr, self._prod_len)
            self._libc.munmap(self._cons_addr, self._cons_len)
            self._epoll.close()
            os.close(self._wake)


UPROBE_PMU_TYPE = Path("/sys/bus/event_source/devices/uprobe/type")
_UPROBE_RETPROBE_BIT = 1 << 0  # format/retprobe: config:0


# BPF uprobe_multi links (kernel >= 6.6), from include/uapi/linux/bpf.h.
_SYS_BPF = 321  # x86_64
BPF_LINK_CREATE = 28  # enum bpf_cmd
BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type: also the expected_attach_type of programs so attached
BPF_F_UPROBE_MULTI_RETURN = 1 << 0
BPF_PROG_TYPE_KPROBE = 2  # uprobe programs are of this type
# The most threads close_all() closes on at once: each waits out its own RCU grace period in close().
CLOSE_THREADS = 64


class _UprobeMultiLinkAttr(ctypes.Structure):
    """union bpf_attr's link_create, with its uprobe_multi member (include/uapi/linux/bpf.h)."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("path", ctypes.c_uint64), ("offsets", ctypes.c_uint64),
                ("ref_ctr_offsets", ctypes.c_uint64), ("cookies", ctypes.c_uint64), ("cnt", ctypes.c_uint32),
                ("uprobe_flags", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("path_fd", ctypes.c_uint32)]


def _uprobe_multi_link(prog_fd: int, path: str, offsets: list[int], pid: int, retprobe: bool) -> int:
    """BPF_LINK_CREATE of a uprobe_multi link (libbpf 1.1, Debian 12's, has no options for it); its fd.
    OSError with the kernel's errno if refused."""
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    offs = (ctypes.c_uint64 * len(offsets))(*offsets)
    attr = _UprobeMultiLinkAttr(prog_fd=prog_fd, attach_type=BPF_TRACE_UPROBE_MULTI,
                                path=ctypes.addressof(path_buf), offsets=ctypes.addressof(offs), cnt=len(offsets),
                                uprobe_flags=BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, pid=max(pid, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_BPF, BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.set_inheritable(fd, False)  # BPF link fds are O_CLOEXEC already; said, not assumed
    return fd


_uprobe_links: bool | None = None
# Set to 1: uprobes as perf events even where links exist (a comparison, or a kernel whose links misbehave).
UPROBE_PERF_EVENTS_ENV = "BPFPROF_UPROBE_PERF_EVENTS"


def uprobe_links() -> bool:
    """Whether this kernel attaches uprobes through BPF uprobe_multi links (probed once, as libbpf does:
    a link on "/" is refused with EBADF where the link type exists, EINVAL where it does not)."""
    global _uprobe_links
    if _uprobe_links is None and os.environ.get(UPROBE_PERF_EVENTS_ENV, "") not in ("", "0"):
        _uprobe_links = False
    if _uprobe_links is None:
        insns = struct.pack("<QQ", 0xb7, 0x95)  # r0 = 0; exit
        try:
            prog = prog_load(BPF_PROG_TYPE_KPROBE, "uprobe_probe", "GPL", insns,
                             expected_attach_type=BPF_TRACE_UPROBE_MULTI)
        except BpfLoadError:
            _uprobe_links = False
        else:
            try:
                os.close(_uprobe_multi_link(prog, "/", [0], 0, False))
                _uprobe_links = False  # not expected: a uprobe in a directory
            except OSError as e:
                _uprobe_links = e.errno == errno.EBADF
            finally:
                os.close(prog)
    return _uprobe_links


def uprobe_attach_type() -> int:
    """The expected_attach_type to load uprobe programs with: what attach_uprobes() will attach them by
    (tail calls between programs also need it to agree)."""
    return BPF_TRACE_UPROBE_MULTI if uprobe_links() else 0


def attach_uprobes(prog_fd: int, path: str, offsets: list[int], pid: int = -1, retprobe: bool = False) -> list[int]:
    """Run `prog_fd` at each of `offsets` of the file at `path` (in `pid`, or every process: -1).

    One uprobe_multi link for them all where the kernel has it (uprobe_links():
    the program was loaded with uprobe_attach_type()): closing it unregisters
    every offset after one RCU grace period. Else one perf event per offset,
    each close waiting for its own grace period (~100 ms on 6.18), serialized
    in the kernel. The fds to close, with close_all().
    """
    if not offsets:
        return []
    if uprobe_links():
        try:
            return [_uprobe_multi_link(prog_fd, path, list(offsets), pid, retprobe)]
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):  # the file or the process is gone
                raise FileNotFoundError(e.errno, e.strerror, path) from None
            raise BpfLoadError(f"uprobe link on {path} ({len(offsets)} offsets, pid {pid}): {e.strerror}") from e
    fds: list[int] = []
    try:
        for offset in offsets:
            fds += attach_uprobe(prog_fd, path, offset, pid, retprobe)
    except BaseException:
        close_all(fds)
        raise
    return fds


def close_all(fds: list[int]) -> None:
    """detach() on up to CLOSE_THREADS threads at once, and clear `fds`.

    Closing a uprobe waits for an RCU tasks-trace grace period in the kernel:
    closes of links in parallel threads share grace periods (20 links: 0.08 s,
    against 0.9 s one after another), perf event uprobes are serialized by the
    kernel whatever the threads. For anything else it is just detach().
    """
    if len(fds) <= 1:
        detach(fds)
        return
    chunks = [fds[i::min(len(fds), CLOSE_THREADS)] for i in range(min(len(fds), CLOSE_THREADS))]
    threads = [threading.Thread(target=detach, args=(chunk,), name="bpfprof-close", daemon=True) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fds.clear()


def attach_uprobe(prog_fd: int, path: str, file_offset: int, pid: int = -1, retprobe: bool = False) -> list[int]:
    """Run `prog_fd` when code at `file_offset` of the file at `path` executes.

    Through the uprobe PMU (no tracefs writes): with pid -1 it fires in every
    process mapping that file, with a pid only in that process. Never use
    `retprobe` on Go functions: Go moves stacks and the return trampoline
    crashes the program (DESIGN.md); instrument their RET instructions instead.
    """
    try:
        pmu = int(UPROBE_PMU_TYPE.read_text())
    except (OSError, ValueError) as e:
        raise BpfLoadError(f"uprobes are not available here ({UPROBE_PMU_TYPE}): {e}") from e
    attr = _attr(pmu, _UPROBE_RETPROBE_BIT if retprobe else 0, 1, _FLAG_DISABLED)
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    ctypes.c_uint64.from_buffer(attr, 56).value = ctypes.addressof(path_buf)  # config1: uprobe_path
    ctypes.c_uint64.from_buffer(attr, 64).value = file_offset  # config2: probe_offset
    fd = _perf_event_open(attr, pid, 0 if pid == -1 else -1)
    return [_attach(fd, prog_fd)]


# -- creating maps and loading programs without BCC (agent/bpfload/bpf_cache.py) --------------------------

BPF_OBJ_NAME_LEN = 16


class _MapCreateOpts(ctypes.Structure):
    """libbpf's struct bpf_map_create_opts (1.1 layout; `sz` tells libbpf which fields we know)."""

    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


class _ProgLoadOpts(ctypes.Structure):
    """libbpf's struct bpf_prog_load_opts, up to log_buf (its last field in libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_int),
                ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
                ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_btf_obj_fd", ctypes.c_uint32), ("attach_prog_fd", ctypes.c_int),
                ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
                ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_char_p)]


class MapInfo(ctypes.Structure):
    """The kernel's struct bpf_map_info (uapi/linux/bpf.h), as bpf_obj_get_info_by_fd fills it."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
                ("netns_ino", ctypes.c_uint64), ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_id", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64)]


class ProgInfo(ctypes.Structure):
    """The head of the kernel's struct bpf_prog_info: what identifies a program (type, id, name)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class ProgRunInfo(ctypes.Structure):
    """struct bpf_prog_info (uapi/linux/bpf.h) up to its run-time statistics, which the kernel
    fills only while kernel.bpf_stats_enabled (or a BPF_ENABLE_STATS fd) is on."""

    _fields_ = [*ProgInfo._fields_,
                ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
                ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
                ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
                ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
                ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
                ("recursion_misses", ctypes.c_uint64)]


def bpf_stats_enabled() -> bool:
    """Whether the kernel counts BPF programs' run time (kernel.bpf_stats_enabled)."""
    try:
        with open(BPF_STATS_SYSCTL) as f:
            return f.read(16).strip() not in ("", "0")
    except OSError:
        return False


def prog_run_time(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program so far; zeros while the kernel does not count them."""
    info = _obj_info(fd, ProgRunInfo())
    return int(info.run_time_ns), int(info.run_cnt)


def prog_recursion_misses(fd: int) -> int:
    """Runs of a program the kernel skipped because another BPF program was running on that CPU (counted
    whether or not run-time statistics are on; 0 on kernels before 5.12, which do not count them)."""
    return int(_obj_info(fd, ProgRunInfo()).recursion_misses)


def prog_run_info(prog_id: int) -> ProgRunInfo | None:
    """Type, name and run-time statistics of any loaded program by its id (root), None if it is gone:
    what `bpftool prog show` prints, without starting a process."""
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return _obj_info(fd, ProgRunInfo())
    except BpfLoadError:
        return None
    finally:
        os.close(fd)


def _obj_info(fd: int, info: ctypes.Structure) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return info


def map_info(fd: int) -> MapInfo:
    """What the kernel says a map is: type, sizes, flags, name."""
    return _obj_info(fd, MapInfo())


def prog_info(fd: int) -> ProgInfo:
    """What the kernel says a program is: its type, id and (possibly truncated) name."""
    return _obj_info(fd, ProgInfo())


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, map_extra: int = 0) -> int:
    """A new BPF map (no BTF); its fd. BpfLoadError if the kernel refuses."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags, map_extra=map_extra)
    fd = lib().bpf_map_create(map_type, name.encode() or None, key_size, value_size, max_entries, ctypes.byref(opts))
    _check(fd, f"creating BPF map {name!r}")
    return fd


VERIFIER_LOG_BYTES = 1 << 20  # only after a failed load: the verifier's reason


def prog_load(prog_type: int, name: str, license_: str, insns: bytes, kern_version: int = 0,
              expected_attach_type: int = 0) -> int:
    """Load instructions (map fds already patched in) as a program; its fd.

    On failure the load is repeated with the verifier's log, whose last lines
    go into the BpfLoadError.
    """
    buf = ctypes.create_string_buffer(insns, len(insns))
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), kern_version=kern_version,
                         expected_attach_type=expected_attach_type)
    args = (prog_type, name.encode() or None, license_.encode(), buf, len(insns) // 8)
    fd = lib().bpf_prog_load(*args, ctypes.byref(opts))
    if fd >= 0:
        return fd
    err = -fd
    log_buf = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
    opts.log_level, opts.log_size, opts.log_buf = 1, VERIFIER_LOG_BYTES, ctypes.cast(log_buf, ctypes.c_char_p)
    fd = lib().bpf_prog_load(*args, ctypes.byref(opts))
    if fd >= 0:  # it loaded the second time: keep it
        return fd
    tail = " / ".join(log_buf.value.decode(errors="replace").strip().splitlines()[-3:])
    raise BpfLoadError(f"loading BPF program {name!r}: {os.strerror(err)}" + (f" (verifier: {tail})" if tail else ""))
