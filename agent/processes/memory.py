"""Reads of another process's memory through /proc/PID/mem: the agent's one way to do them.

One descriptor per reader, opened once, and os.pread at each address: no
seek state, so threads may share a reader, and nothing is mapped, so a
target that unmaps a page makes a read fail rather than fault the agent.
Sizes are bounded because many come from the target's own memory (a
slice's length, a bucket's stack depth): a torn or corrupt word must not
make a root daemon allocate gigabytes.
"""

from __future__ import annotations

import errno
import os
import struct

from symbolizer.proc_maps import read_maps

# The largest single read: runtime.allgs of 1 << 20 goroutines (8 MiB) with room to spare.
MAX_READ_BYTES = 16 << 20
# os.pread takes a signed off_t; user space ends far below it on every 64-bit Linux.
MAX_ADDRESS = (1 << 63) - 1


class ProcessMemory:
    """A process's memory, read through `{proc_root}/PID/mem`.

    Contract: every method returns what it says or raises OSError, and
    nothing else: the process is gone or was never there (opening:
    ENOENT/ESRCH), it is not ours to read (EACCES/EPERM), the address is
    not mapped (EIO), the read came back short (EIO: a process that exits
    while it is read reads as empty), or the size or address is out of range
    (EINVAL). Callers that treat any of these as "unreadable" catch OSError.
    """

    def __init__(self, pid: int | str, proc_root: str = "/proc") -> None:
        self.pid = pid
        self._fd = os.open(f"{proc_root}/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def read_prefix(self, addr: int, size: int, least: int) -> bytes:
        """Up to `size` bytes at `addr`, and at least `least` of them (a read that may run past the
        end of a mapping keeps what precedes it)."""
        if not 0 <= least <= size <= MAX_READ_BYTES:
            raise OSError(errno.EINVAL, f"read of {size} bytes (at least {least}) out of range")
        if not 0 <= addr <= MAX_ADDRESS - size:
            raise OSError(errno.EINVAL, f"address {addr:#x} out of range")
        data = os.pread(self._fd, size, addr)
        if len(data) < least:
            raise OSError(errno.EIO, f"short read at {addr:#x} in pid {self.pid}: {len(data)} of {size} bytes")
        return data

    def read(self, addr: int, size: int) -> bytes:
        """Exactly `size` bytes at `addr`."""
        return self.read_prefix(addr, size, size)

    def u64(self, addr: int) -> int:
        """The little-endian unsigned 64-bit word at `addr`."""
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def i64(self, addr: int) -> int:
        """The little-endian signed 64-bit word at `addr`."""
        return struct.unpack("<q", self.read(addr, 8))[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_vdso(pid: int | str, proc_root: str = "/proc") -> bytes | None:
    """The [vdso] of `pid` (a complete ELF image), or None if it has none. OSError as ProcessMemory."""
    for entry in read_maps(pid, proc_root):
        if entry.is_vdso:
            with ProcessMemory(pid, proc_root) as mem:
                return mem.read(entry.start, entry.end - entry.start)
    return None
