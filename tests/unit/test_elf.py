"""ElfFile and ElfSymbols against readelf/nm, and address translation in live processes."""

from __future__ import annotations

import ctypes
import os
import random
import re
import subprocess

import pytest

from agent.processes.memory import read_vdso
from fixtures.builder import FIXTURES, build_c
from symbolizer.dwarf_lines import DwarfLines
from symbolizer.elf import ElfFile, ElfHeaders, file_to_vaddr, parse_notes
from symbolizer.elf_symbols import ElfSymbols
from symbolizer.errors import ElfParseError
from symbolizer.proc_maps import open_mapped_file, read_maps

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
PIE_FLAGS = ("-O2", "-g", "-fPIE", "-pie")
NOPIE_FLAGS = ("-O2", "-g", "-fno-pie", "-no-pie")


@pytest.fixture(scope="module")
def symtest():
    return build_c("symtest")


def readelf_build_id(path) -> str | None:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    return m.group(1) if m else None


def readelf_symbols(path) -> dict[str, tuple[int, int, str]]:
    """name -> (value, size, type) of defined symbols, from `readelf -sW`."""
    out = subprocess.run(["readelf", "-sW", str(path)], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0].endswith(":") and f[0] != "Num:" and f[6] != "UND":
            syms.setdefault(f[7].split("@")[0], (int(f[1], 16), int(f[2], 0), f[3]))
    return syms


# -- identity and layout --------------------------------------------------------


@pytest.mark.parametrize("flags", [("-O2", "-g"), PIE_FLAGS, NOPIE_FLAGS])
def test_build_id_matches_readelf(flags):
    binary = build_c("symtest", flags=flags)
    assert ElfFile(binary).gnu_build_id == readelf_build_id(binary)
    assert ElfFile(LIBC).gnu_build_id == readelf_build_id(LIBC)


def test_no_build_id_falls_back_to_file_hash(symtest):
    bare = build_c("symtest", flags=("-O2", "-Wl,--build-id=none"))
    elf = ElfFile(bare)
    assert elf.gnu_build_id is None and elf.go_build_id is None
    h = elf.file_hash()
    assert re.fullmatch(r"[0-9a-f]{32}", h)
    assert h == ElfFile(bare).file_hash()
    assert h != ElfFile(symtest).file_hash()


def test_load_segments_match_readelf(symtest):
    out = subprocess.run(["readelf", "-lW", str(symtest)], capture_output=True, text=True, check=True).stdout
    expected = [
        (int(f[2], 16), int(f[5], 16), int(f[1], 16), int(f[4], 16))
        for f in (line.split() for line in out.splitlines())
        if f and f[0] == "LOAD"
    ]
    got = [(s.vaddr, s.memsz, s.offset, s.filesz) for s in ElfFile(symtest).load_segments]
    assert got == expected


# readelf -lW's names for p_type values; anything else it prints as LOOS+0x...
_READELF_PT = {0: "NULL", 1: "LOAD", 2: "DYNAMIC", 3: "INTERP", 4: "NOTE", 5: "SHLIB", 6: "PHDR", 7: "TLS",
               0x6474E550: "GNU_EH_FRAME", 0x6474E551: "GNU_STACK", 0x6474E552: "GNU_RELRO",
               0x6474E553: "GNU_PROPERTY", 0x6474E554: "GNU_SFRAME"}
_PHDR_LINE = re.compile(r"^\s+(\S+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)"
                        r"\s([RWE ]{3})\s(0x[0-9a-f]+)$")


def readelf_program_headers(path) -> list[tuple]:
    """(type, offset, vaddr, paddr, filesz, memsz, flags, align) of each `readelf -lW` program header."""
    out = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.split("Program Headers:", 1)[1].split("Section to Segment", 1)[0].splitlines():
        m = _PHDR_LINE.match(line)
        if m:
            flags = sum(bit for letter, bit in (("R", 4), ("W", 2), ("E", 1)) if letter in m.group(7))
            rows.append((m.group(1), *(int(m.group(i), 16) for i in range(2, 7)), flags, int(m.group(8), 16)))
    return rows


def elf32_binary(tmp_path):
    out = tmp_path / "elf32"
    built = subprocess.run(["gcc", "-m32", "-nostdlib", "-static", "-Wl,--build-id", "-o", str(out),
                            str(FIXTURES / "c" / "elf32_start.c")], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"gcc cannot build a 32-bit executable here: {built.stderr.strip()[-200:]}")
    return out


@pytest.mark.parametrize("which", ["ls", "libc", "elf32"])
def test_program_headers_match_readelf(which, tmp_path):
    path = {"ls": "/bin/ls", "libc": LIBC}.get(which) or elf32_binary(tmp_path)
    expected = readelf_program_headers(path)
    assert len(expected) >= 5
    elf = ElfFile(path)
    got = [(_READELF_PT.get(p.type, hex(p.type)), p.offset, p.vaddr, p.paddr, p.filesz, p.memsz, p.flags, p.align)
           for p in elf.program_headers]
    assert got == expected
    assert [(s.vaddr, s.offset) for s in elf.load_segments] == [(p[2], p[1]) for p in expected if p[0] == "LOAD"]
    assert elf.gnu_build_id == readelf_build_id(path)  # notes found through the section headers


def test_section_headers_match_readelf():
    out = subprocess.run(["readelf", "-SW", LIBC], capture_output=True, text=True, check=True).stdout
    expected = {}
    for m in re.finditer(r"\]\s+(\.\S+)\s+\S+\s+([0-9a-f]{16})\s+([0-9a-f]{6,})\s+([0-9a-f]{6,})", out):
        expected[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16))
    headers = ElfFile(LIBC).headers
    assert len(expected) > 20
    for name, (addr, offset, size) in expected.items():
        sec = headers.section(name)
        assert sec is not None and (sec.addr, sec.offset, sec.size) == (addr, offset, size), name


def test_truncated_program_header_table_raises_elf_parse_error():
    data = open("/bin/ls", "rb").read()
    headers = ElfHeaders(data)
    table_end = headers.phoff + headers.phnum * headers.phentsize
    for cut in (table_end - 1, headers.phoff + 3, 64):
        with pytest.raises(ElfParseError, match="program headers"):
            ElfHeaders(data[:cut]).program_headers  # noqa: B018
    grown = bytearray(data)
    grown[56:58] = (len(data) // headers.phentsize + 1).to_bytes(2, "little")  # e_phnum past the end of the file
    elf = ElfFile.from_bytes(bytes(grown))
    with pytest.raises(ElfParseError, match="run past the end"):
        elf.load_segments  # noqa: B018
    short = bytearray(data)
    short[54:56] = (16).to_bytes(2, "little")  # e_phentsize below an Elf64_Phdr
    with pytest.raises(ElfParseError, match="entry size"):
        ElfHeaders(bytes(short)).program_headers  # noqa: B018


def test_kernel_notes_give_the_build_id_perf_reports():
    from agent.processes.stack_resolver import kernel_build_id  # noqa: PLC0415

    try:
        notes = open("/sys/kernel/notes", "rb").read()
    except OSError:
        pytest.skip("/sys/kernel/notes unreadable")
    perf = subprocess.run(["perf", "buildid-list", "-k"], capture_output=True, text=True)
    if perf.returncode != 0 or not perf.stdout.strip():
        pytest.skip("perf buildid-list -k gives nothing here")
    assert kernel_build_id() == perf.stdout.strip()
    assert any(name == b"GNU" for name, _, _ in parse_notes(notes))
    with pytest.raises(ElfParseError):
        list(parse_notes(b"\x04\0\0\0\x40\0\0\0\x03\0\0\0GNU\0short"))  # desc runs past the end


def test_pie_and_shared_flags():
    assert ElfFile(build_c("symtest", flags=PIE_FLAGS)).is_pie_or_shared
    assert ElfFile(LIBC).is_pie_or_shared
    assert not ElfFile(build_c("symtest", flags=NOPIE_FLAGS)).is_pie_or_shared


def test_has_dwarf(symtest):
    assert ElfFile(symtest).has_dwarf
    assert not ElfFile(build_c("symtest", flags=("-O2", "-s"))).has_dwarf


def test_vaddr_for_offset_uses_the_segment_holding_it():
    elf = ElfFile(LIBC)
    text = max(elf.load_segments, key=lambda s: s.flags & 1 and s.filesz)
    off = text.offset + 0x123
    assert elf.vaddr_for_offset(off) == text.vaddr + 0x123
    assert file_to_vaddr(elf, off) == elf.vaddr_for_offset(off)
    assert elf.vaddr_for_offset(os.path.getsize(LIBC) + 0x100000) is None


# -- symbols -------------------------------------------------------------------


def test_symbols_match_readelf(symtest):
    syms = ElfSymbols(ElfFile(symtest))
    ref = readelf_symbols(symtest)
    for name in ("main", "mix", "loop_sum"):
        value, size, typ = ref[name]
        assert typ == "FUNC"
        assert syms.lookup(value) == (name, value, size)
        assert syms.lookup(value + size - 1).name == name
        assert syms.find(name) == (name, value, size)
    # Every defined FUNC of the binary is found at its own address.
    for name, (value, size, typ) in ref.items():
        if typ == "FUNC" and size:
            hit = syms.lookup(value)
            assert hit is not None and hit.start == value, name


def test_zero_sized_notype_label_extends_to_next_symbol_within_section(symtest):
    syms = ElfSymbols(ElfFile(symtest))
    value, size, typ = readelf_symbols(symtest)["untyped_label"]
    assert (typ, size) == ("NOTYPE", 0)
    hit = syms.lookup(value + 2)  # the `ret` after two nops
    assert hit is not None and hit.name == "untyped_label" and hit.start == value
    assert hit.size > 2
    # It never extends past the end of .text.
    elf = ElfFile(symtest)
    text = elf.section(".text").header
    assert hit.start + hit.size <= text.sh_addr + text.sh_size


def test_libc_aliases_resolve_like_perf():
    syms = ElfSymbols(ElfFile(LIBC))
    malloc = syms.find("malloc")
    assert malloc is not None
    assert syms.lookup(malloc.start + 1).name == "malloc"  # not __libc_malloc


def test_address_outside_every_symbol_is_none(symtest):
    assert ElfSymbols(ElfFile(symtest)).lookup(0) is None


# -- runtime address translation --------------------------------------------------


def symbolize_runtime(pid, addr):
    """maps -> file (via open_mapped_file) -> vaddr -> symbol name, as process_symbols will."""
    entry = next(e for e in read_maps(pid) if e.start <= addr < e.end)
    elf = ElfFile(open_mapped_file(pid, entry))
    vaddr = elf.vaddr_for_runtime(addr, entry.start, entry.offset)
    hit = ElfSymbols(elf).lookup(vaddr)
    return hit.name if hit else None, elf, vaddr


def test_shared_library_translation_libc_malloc():
    addr = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    name, elf, _ = symbolize_runtime("self", addr)
    assert name == "malloc"
    assert elf.is_pie_or_shared


@pytest.mark.parametrize("flags", [PIE_FLAGS, NOPIE_FLAGS], ids=["pie", "no-pie"])
def test_executable_translation_in_live_process(flags):
    binary = build_c("symtest", flags=flags)
    proc = subprocess.Popen([str(binary), "addrs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        mix, loop_sum, label = (int(x, 16) for x in proc.stdout.readline().split())
        assert symbolize_runtime(proc.pid, mix)[0] == "mix"
        assert symbolize_runtime(proc.pid, loop_sum + 3)[0] == "loop_sum"
        assert symbolize_runtime(proc.pid, label + 1)[0] == "untyped_label"
        _, elf, vaddr = symbolize_runtime(proc.pid, mix)
        assert DwarfLines(elf).lookup(vaddr).file.endswith("symtest.c")
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_vdso_read_and_symbolized():
    vdso_entry = next(e for e in read_maps("self") if e.is_vdso)
    # The kernel's own pointer to the vdso (getauxval(AT_SYSINFO_EHDR)) is an independent witness.
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    assert libc.getauxval(33) == vdso_entry.start
    image = read_vdso("self")
    elf = ElfFile.from_bytes(image, "[vdso]")
    syms = ElfSymbols(elf)
    sym = syms.find("__vdso_clock_gettime")
    assert sym is not None and sym.size > 0
    # Runtime address per the kernel's parse_vdso.c: base + st_value - p_vaddr + p_offset.
    seg = elf.load_segments[0]
    runtime = vdso_entry.start + sym.start - seg.vaddr + seg.offset + 4
    vaddr = elf.vaddr_for_runtime(runtime, vdso_entry.start, vdso_entry.offset)
    assert syms.lookup(vaddr).name == "__vdso_clock_gettime"
    assert ctypes.string_at(runtime, 8) == image[vaddr:vaddr + 8]


# -- corrupt input ---------------------------------------------------------------


def exercise(path_or_bytes):
    """Everything a caller may ask of a file; only ElfParseError may escape."""
    elf = ElfFile.from_bytes(path_or_bytes) if isinstance(path_or_bytes, bytes) else ElfFile(path_or_bytes)
    elf.gnu_build_id, elf.go_build_id, elf.load_segments, elf.is_pie_or_shared, elf.file_hash()
    elf.vaddr_for_offset(0x1100)
    syms = ElfSymbols(elf)
    for addr in (0x1100, 0x1200, 0x1300):
        syms.lookup(addr)
    if elf.has_dwarf:
        lines = DwarfLines(elf)
        for addr in (0x1100, 0x1200, 0x1300):
            lines.lookup(addr)
            lines.frames(addr)


def test_corrupt_inputs_raise_elf_parse_error_only(symtest, tmp_path):
    data = symtest.read_bytes()
    exercise(data)  # the pristine file is fine
    rng = random.Random(1234)
    cases = [data[:n] for n in (0, 3, 16, 63, 64, 200, len(data) // 2, len(data) - 100)]
    for _ in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        cases.append(bytes(buf))
    # Flips aimed at the tables the parsers walk: symbols, strings, DWARF.
    elf = ElfFile(symtest)
    for name in (".symtab", ".strtab", ".dynsym", ".debug_info", ".debug_line", ".debug_abbrev", ".debug_rnglists"):
        sec = elf.section(name)
        if sec is None:
            continue
        lo, size = sec["sh_offset"], sec["sh_size"]
        for _ in range(25):
            buf = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                buf[lo + rng.randrange(size)] = rng.randrange(256)
            cases.append(bytes(buf))
    # Corrupt headers specifically: section table offset, program header count.
    for off in (0x20, 0x28, 0x38, 0x3C, 0x3E):
        buf = bytearray(data)
        buf[off:off + 2] = b"\xff\x7f"
        cases.append(bytes(buf))
    failures = 0
    for case in cases:
        try:
            exercise(case)
        except ElfParseError:
            failures += 1
    assert failures > 10  # the corruption did reach the parsers
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ElfParseError):
        ElfFile(empty)
    with pytest.raises(ElfParseError):
        ElfFile(tmp_path / "missing")



def test_file_cut_after_open_is_a_short_read_not_sigbus(tmp_path):
    """The file is read, not mapped: bytes not yet copied when the file is cut are an ElfParseError.

    With the old mmap, touching a page past the new end killed the process with SIGBUS. Bytes
    copied before the cut (headers, build id, here the symbol tables in the same chunk) stay good.
    """
    from symbolizer.elf import COPY_CHUNK_BYTES  # noqa: PLC0415

    lib = build_c("trunc_lib", flags=("-O1", "-g", "-shared", "-fPIC"))
    path = tmp_path / "libtrunc.so"
    path.write_bytes(lib.read_bytes() + bytes(3 * COPY_CHUNK_BYTES))  # a tail the parsers never ask for
    elf = ElfFile(path)
    assert elf.gnu_build_id
    copied = elf.copied_bytes
    assert copied < path.stat().st_size
    os.truncate(path, 4 * 4096)  # the loaded part stays
    with pytest.raises(ElfParseError, match="shrank"):
        elf.ensure(path.stat().st_size + 2 * COPY_CHUNK_BYTES, 16)
    assert elf.copied_bytes == copied
    sym = ElfSymbols(elf).find("trunc_lib_spin")  # its tables were copied before the cut
    assert sym is not None
    elf.close()
    with pytest.raises(ElfParseError, match="after close"):
        elf.ensure(0, 1)
