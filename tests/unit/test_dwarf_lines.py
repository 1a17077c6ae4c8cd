"""DwarfLines against `addr2line -f -i` over every byte of .text of the C and C++ fixtures."""

from __future__ import annotations

import os
import random
import subprocess
import sysconfig

import pytest

from fixtures.builder import build_c
from symbolizer.dwarf_lines import DwarfLines, InlineFrame
from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError


def addr2line(binary, addrs: list[int]) -> dict[int, list[tuple[str, str, int]]]:
    """addr -> [(function, file, line)] innermost first; file "" / line 0 when addr2line says '?'."""
    out = subprocess.run(["addr2line", "-e", str(binary), "-f", "-i", "-a", *map(hex, addrs)],
                         capture_output=True, text=True, check=True).stdout
    result: dict[int, list[tuple[str, str, int]]] = {}
    lines = out.splitlines()
    i = 0
    while i < len(lines):
        addr = int(lines[i], 16)
        i += 1
        frames = []
        while i < len(lines) and not lines[i].startswith("0x"):
            func, pos = lines[i], lines[i + 1].split(" (discriminator")[0]
            file, _, line = pos.rpartition(":")
            frames.append((func, "" if file == "??" else file, int(line) if line.isdigit() else 0))
            i += 2
        result[addr] = frames
    return result


def text_addresses(elf: ElfFile) -> list[int]:
    h = elf.section(".text").header
    return list(range(h.sh_addr, h.sh_addr + h.sh_size))


@pytest.mark.parametrize("flags", [
    ("-O2", "-g"),                 # gcc 12 default: DWARF 5
    ("-O2", "-g", "-gdwarf-4"),
    ("-O0", "-g"),
    ("-O2", "-g", "-fPIE", "-pie"),
], ids=["dwarf5", "dwarf4", "O0", "pie"])
def test_c_lines_and_inline_chains_match_addr2line(flags):
    binary = build_c("symtest", flags=flags)
    elf = ElfFile(binary)
    dwarf = DwarfLines(elf)
    addrs = text_addresses(elf)
    ref = addr2line(binary, addrs)
    compared = 0
    for addr in addrs:
        expected = ref[addr]
        if expected[0][2] == 0:
            # No line row (crt code without DWARF): addr2line falls back to the symbol table.
            assert dwarf.lookup(addr) is None
            continue
        row = dwarf.lookup(addr)
        assert (row.file, row.line) == expected[0][1:], hex(addr)
        frames = dwarf.frames(addr)
        if frames[0].function == "":  # no function DIE here: addr2line names it from .symtab
            frames = [frames[0]._replace(function=expected[0][0])]
        assert [(f.function, f.file, f.line) for f in frames] == expected, hex(addr)
        compared += 1
    assert compared > 100


def test_inlined_frames_of_always_inline_helper():
    binary = build_c("symtest")
    dwarf = DwarfLines(ElfFile(binary))
    elf = ElfFile(binary)
    chains = [dwarf.frames(a) for a in text_addresses(elf)]
    inlined = [c for c in chains if c and c[0].function == "square_add"]
    assert inlined, "square_add must be inlined into mix"
    chain = inlined[0]
    assert [f.function for f in chain] == ["square_add", "mix"]
    assert chain[0].inlined and not chain[1].inlined
    assert chain[0].file.endswith("symtest.c") and chain[1].file.endswith("symtest.c")
    # The outer frame's line is the call site inside mix (lines 17-18 of symtest.c).
    source = (binary.parents[1] / "c" / "symtest.c").read_text().splitlines()
    assert "square_add(" in source[chain[1].line - 1]
    assert isinstance(chain[0], InlineFrame)


def test_cc_lines_and_functions_match_addr2line():
    binary = build_c("symtest_cc", flags=("-O2", "-g"))
    elf = ElfFile(binary)
    dwarf = DwarfLines(elf)
    addrs = text_addresses(elf)
    ref = addr2line(binary, addrs)
    compared = 0
    for addr in addrs:
        expected = ref[addr]
        if expected[0][2] == 0:
            continue
        frames = dwarf.frames(addr)
        if frames[0].function == "":
            frames = [frames[0]._replace(function=expected[0][0])]
        # Lines and (mangled) function names of the whole chain. File names are
        # compared only in the C test: on a few addresses binutils 2.40 names the
        # CU's primary file where `readelf --debug-dump=decodedline` (and we)
        # show the header the row belongs to.
        assert [(f.function, f.line) for f in frames] == [(f, ln) for f, _, ln in expected], hex(addr)
        assert dwarf.lookup(addr).line == expected[0][2]
        compared += 1
    assert compared > 100
    names = {f.function for a in addrs for f in dwarf.frames(a)}
    assert "_ZN5outer5inner11AccumulatorIlE3addEl" in names
    assert "_ZN5outer5inner7sum_allIlEET_RKSt6vectorIS2_SaIS2_EE" in names


def test_address_outside_dwarf_is_none():
    dwarf = DwarfLines(ElfFile(build_c("symtest")))
    assert dwarf.lookup(0) is None
    assert dwarf.frames(0) == []


def test_file_without_dwarf_raises():
    with pytest.raises(ElfParseError):
        DwarfLines(ElfFile(build_c("symtest", flags=("-O2",))))


def _libpython() -> str | None:
    """This interpreter's libpython when it is a shared library with DWARF (pyenv builds are)."""
    name = sysconfig.get_config_var("INSTSONAME")
    libdir = sysconfig.get_config_var("LIBDIR")
    if not name or not libdir:
        return None
    path = os.path.join(libdir, name)
    return path if os.path.exists(path) else None


LIBPYTHON = _libpython() or "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"


def readelf_row_files(binary, addrs: list[int]) -> dict[int, str | None]:
    """addr -> base name of the file of the last line row at or before it (`readelf --debug-dump=decodedline`)."""
    out = subprocess.run(["readelf", "--debug-dump=decodedline", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    best: dict[int, tuple[int, str | None]] = {}
    for text in out.splitlines():
        parts = text.split()
        if len(parts) < 3 or not parts[2].startswith("0x"):
            continue
        row_addr = int(parts[2], 16)
        for addr in addrs:
            if row_addr <= addr and row_addr >= best.get(addr, (-1, None))[0]:
                best[addr] = (row_addr, None if parts[1] == "-" else parts[0])
    return {addr: best[addr][1] for addr in best}


@pytest.mark.skipif(not os.path.exists(LIBPYTHON), reason=f"{LIBPYTHON} does not exist")
def test_libpython_random_addresses_match_addr2line():
    elf = ElfFile(LIBPYTHON)
    if not elf.has_dwarf:
        pytest.skip(f"{LIBPYTHON} has no DWARF")
    dwarf = DwarfLines(elf)
    h = elf.section(".text").header
    rng = random.Random(20240601)
    addrs = sorted(rng.randrange(h.sh_addr, h.sh_addr + h.sh_size) for _ in range(100))
    ref = addr2line(LIBPYTHON, addrs)
    compared = 0
    other_file: list[int] = []
    for addr in addrs:
        expected = ref[addr]
        if expected[0][2] == 0:
            assert dwarf.lookup(addr) is None, hex(addr)
            continue
        row = dwarf.lookup(addr)
        assert row.line == expected[0][2], hex(addr)
        frames = dwarf.frames(addr)
        if frames[0].function == "":
            frames = [frames[0]._replace(function=expected[0][0])]
        assert [(f.function, f.line) for f in frames] == [(f, ln) for f, _, ln in expected], hex(addr)
        assert frames[0].file == row.file
        if [f.file for f in frames] != [f for _, f, _ in expected]:
            other_file.append(addr)
        compared += 1
    assert compared > 80
    # binutils 2.40 names the CU's primary file for rows of some headers
    # (fastsearch.h, unicodetype_db.h); readelf's decoded line table is the
    # witness there, and only the innermost (line-table) file may differ.
    assert len(other_file) <= 5
    witness = readelf_row_files(LIBPYTHON, other_file)
    for addr in other_file:
        frames = dwarf.frames(addr)
        assert [f.file for f in frames[1:]] == [f for _, f, _ in ref[addr][1:]], hex(addr)
        assert os.path.basename(frames[0].file) == witness[addr], hex(addr)
