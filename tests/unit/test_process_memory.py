"""The /proc/PID/mem reader on this test process's own memory: what ctypes put there is what comes back,
and every way a read can fail is an OSError."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

import pytest

from agent.processes.memory import MAX_READ_BYTES, ProcessMemory, read_vdso
from symbolizer.proc_maps import read_maps

libc = ctypes.CDLL(None, use_errno=True)
PAGE = mmap.PAGESIZE


def test_reads_what_ctypes_wrote():
    words = (ctypes.c_uint64 * 4)(0x1122334455667788, 2**64 - 1, 0, 42)
    text = ctypes.create_string_buffer(b"goroutine labels\0")
    with ProcessMemory(os.getpid()) as mem:
        base = ctypes.addressof(words)
        assert mem.read(base, 32) == bytes(words)
        assert mem.u64(base) == 0x1122334455667788
        assert mem.u64(base + 8) == 2**64 - 1 and mem.i64(base + 8) == -1
        assert mem.read(ctypes.addressof(text), 16) == b"goroutine labels"
        words[3] = 43  # no caching: each read is of the memory as it is now
        assert mem.u64(base + 24) == 43


def _pages(n: int) -> int:
    """`n` fresh anonymous pages of our own (libc's mmap: ctypes knows where they are)."""
    libc.mmap.restype = ctypes.c_void_p
    addr = libc.mmap(None, ctypes.c_size_t(n * PAGE), mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, ctypes.c_long(0))
    assert addr not in (None, ctypes.c_void_p(-1).value)
    return addr


def _unmap(addr: int, n: int) -> None:
    assert libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(n * PAGE)) == 0


def test_an_unmapped_address_is_an_oserror():
    addr = _pages(1)
    _unmap(addr, 1)  # nothing is there when we read it (this thread maps nothing in between)
    with ProcessMemory(os.getpid()) as mem:
        with pytest.raises(OSError) as e:
            mem.read(addr, 8)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError):
            mem.u64(0)  # page zero is never mapped


def test_a_read_across_the_end_of_a_mapping_keeps_its_prefix_only_when_asked():
    base = _pages(2)
    ctypes.memmove(base, bytes(range(256)) * (PAGE // 256), PAGE)
    tail = base + PAGE
    _unmap(tail, 1)  # only the first page stays
    try:
        with ProcessMemory(os.getpid()) as mem:
            assert mem.read_prefix(tail - 16, 64, least=16) == bytes(range(240, 256))
            with pytest.raises(OSError):
                mem.read(tail - 16, 64)
            with pytest.raises(OSError):
                mem.read_prefix(tail - 16, 64, least=17)
    finally:
        _unmap(base, 1)


def test_absurd_sizes_and_addresses_are_oserrors_not_allocations():
    buf = ctypes.create_string_buffer(8)
    with ProcessMemory(os.getpid()) as mem:
        for addr, size in [(ctypes.addressof(buf), MAX_READ_BYTES + 1), (ctypes.addressof(buf), -1),
                           (-8, 8), (2**64 - 8, 8)]:
            with pytest.raises(OSError) as e:
                mem.read(addr, size)
            assert e.value.errno == errno.EINVAL


def test_a_process_that_is_not_there_is_an_oserror():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(OSError):
        ProcessMemory(pid)


def test_read_vdso_is_an_elf_image():
    image = read_vdso("self")
    assert image is not None and image[:4] == b"\x7fELF"
    vdso = next(e for e in read_maps("self") if e.is_vdso)
    assert len(image) == vdso.end - vdso.start
    assert struct.unpack_from("<H", image, 16)[0] == 3  # ET_DYN, as every vdso is
