"""Per-process symbolization of a live PIE process, checked against nm and addr2line.

No BPF: the tracker snapshots a fixture process the test started, and
addresses are computed from `nm` plus the load bias in /proc/PID/maps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from agent.processes.tracker import ProcessTracker
from fixtures.builder import build_c
from symbolizer.elf import ElfFile
from symbolizer.file_symbols import FileSymbols, SymbolCache
from symbolizer.frames import FrameKind


@pytest.fixture
def pie_process():
    binary = build_c("callchain", flags=("-O2", "-g", "-fno-omit-frame-pointer", "-fPIE", "-pie"))
    proc = subprocess.Popen([str(binary), "30"])
    deadline = time.monotonic() + 10
    while "libc.so" not in open(f"/proc/{proc.pid}/maps").read():  # the loader is still mapping
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield binary, proc.pid
    finally:
        proc.kill()
        proc.wait()


def _nm(binary) -> dict[str, int]:
    out = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in (line.split() for line in out.splitlines()) if len(parts) == 3}


def _load_bias(pid: int, binary) -> int:
    for line in open(f"/proc/{pid}/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(binary) and int(fields[2], 16) == 0:
            return int(fields[0].split("-")[0], 16)
    raise AssertionError("binary not mapped at offset 0")


def test_pie_addresses_resolve_to_functions_and_lines(pie_process):
    binary, pid = pie_process
    tracker = ProcessTracker(cache=SymbolCache())
    info = tracker.observe(pid)
    assert info is not None and info.exe == str(binary) and info.name.startswith("c-callchain")
    bias = _load_bias(pid, binary)
    syms = _nm(binary)
    for name in ("spin", "level1", "level2", "run", "main"):
        addr = bias + syms[name] + 4  # inside the function, past its first instruction
        mapping, frames = info.symbols.resolve(addr, return_address=False)
        assert mapping is not None and mapping.path == str(binary)
        assert frames and frames[-1].function == name and frames[-1].kind is FrameKind.NATIVE
        a2l = subprocess.run(["addr2line", "-e", str(binary), f"{syms[name] + 4:x}"],
                             capture_output=True, text=True, check=True).stdout.strip()
        file, line = a2l.rsplit(":", 1)
        assert frames[0].file.endswith(file.rsplit("/", 1)[-1]) and frames[0].line == int(line.split()[0])


def _calls(binary, caller: str) -> list[tuple[int, int]]:
    """(call instruction address, return address) of each call in `caller`, from objdump."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    body = out.split(f"<{caller}>:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    addrs = [int(line.split(":")[0], 16) for line in body if ":" in line]
    return [(a, addrs[i + 1]) for i, (a, line) in enumerate(zip(addrs, body, strict=True))
            if "\tcall" in line and i + 1 < len(addrs)]


def test_return_address_is_looked_up_at_the_call(pie_process):
    """A caller's frame shows the line of its call instruction, as addr2line gives it."""
    binary, pid = pie_process
    info = ProcessTracker(cache=SymbolCache()).observe(pid)
    bias = _load_bias(pid, binary)
    calls = _calls(binary, "run")
    assert calls
    for call, ret in calls:
        _, frames = info.symbols.resolve(bias + ret, return_address=True)
        want = subprocess.run(["addr2line", "-e", str(binary), f"{call:x}"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert frames[0].line == int(want.rsplit(":", 1)[1].split()[0])


def test_libc_and_vdso_mappings_resolve(pie_process):
    _, pid = pie_process
    info = ProcessTracker(cache=SymbolCache()).observe(pid)
    names = {m.mapping.name for m in info.symbols.mappings}
    assert "[vdso]" in names and any(n.startswith("libc.so") for n in names)
    vdso = next(m for m in info.symbols.mappings if m.mapping.name == "[vdso]")
    assert vdso.symbols is not None and vdso.mapping.build_id
    libc = next(m for m in info.symbols.mappings if m.mapping.name.startswith("libc.so"))
    assert libc.mapping.build_id == libc.symbols.elf.gnu_build_id


def test_a_refresh_of_an_exiting_process_keeps_the_image_it_ran_in(pie_process):
    """An exiting process (here a zombie: killed, not reaped) has dropped its address space, yet its
    last records still come (a Go program's idle Ms wake from their futexes only at its exit): a
    refresh then must not trade the snapshot for an empty one that maps none of their addresses."""
    binary, pid = pie_process
    tracker = ProcessTracker(cache=SymbolCache())
    info = tracker.observe(pid)
    main = _nm(binary)["main"] + _load_bias(pid, binary)
    os.kill(pid, signal.SIGKILL)  # not reaped: a zombie until the fixture's wait
    deadline = time.monotonic() + 10
    while open(f"/proc/{pid}/maps").read():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert tracker.refresh(pid) is info and tracker.get(pid) is info
    assert tracker.stats.refresh_misses == 1
    assert info.symbols.resolve(main, return_address=False)[1][0].function == "main"
    # first sight of an exiting process: a snapshot (its name) with no mappings, as before
    other = ProcessTracker(cache=SymbolCache()).observe(pid)
    assert other is not None and not other.symbols.mappings and other.name == info.name


def test_unknown_pid_is_none():
    tracker = ProcessTracker(cache=SymbolCache())
    assert tracker.observe(2**22 + 12345) is None
    assert tracker.stats.snapshot_failures == 1


def test_file_symbols_from_symbols_answer_as_the_file_does():
    """What a recording keeps of a file (segments + symbols, tests/replay) translates and names every
    address as the file itself does."""
    binary = build_c("callchain", flags=("-O2", "-fno-omit-frame-pointer", "-fPIE", "-pie"))
    real = SymbolCache().get(ElfFile(str(binary)))
    kept = FileSymbols.from_symbols(real.id, str(binary), real.load_segments, list(real.symbols))
    assert kept.elf is None and kept.id == real.id and kept.unwind_table is None
    text = next(s for s in real.load_segments if s.flags & 1)
    map_start = 0x5555_5555_0000 + text.offset  # a mapping of the text segment at some bias
    for sym in real.symbols:
        for vaddr in (sym.start, sym.start + sym.size // 2, sym.start + sym.size - 1, sym.start + sym.size):
            runtime = map_start + vaddr - text.vaddr
            assert kept.translate(runtime, map_start, text.offset) == real.translate(runtime, map_start, text.offset)
            assert kept.symbolize(vaddr) == real.symbolize(vaddr)
