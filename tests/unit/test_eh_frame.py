"""symbolizer.cfi against `readelf --debug-dump=frames-interp`, the independent reader.

For every row readelf prints (CFA rule, RBP rule, RA rule per PC), our table's
lookup at that PC must agree; corrupt CFI raises ElfParseError and nothing else.
"""

from __future__ import annotations

import random
import re
import struct
import subprocess
from pathlib import Path

import pytest

from fixtures.builder import build_c, build_go
from symbolizer.cfi import RBP_LOST, RBP_SAME, CfaKind, UnwindTable, _Section, parse_cfi
from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
LIBSTDCXX = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")

_FDE = re.compile(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.([0-9a-f]+)")
_ROW = re.compile(r"^([0-9a-f]{16}) (.*)$")
_VALUE = re.compile(r"r\d+ \(\w+\)|\S+")
_SECTION = re.compile(r"^Contents of the (\.\w+) section")


def readelf_rows(path: Path, section: str) -> list[tuple[int, int, dict[str, str]]]:
    """(fde_start, pc, {column: rule}) for each interpreted row of `section`."""
    # readelf exits 1 over a missing separate debug file (.gnu_debuglink) yet prints everything.
    text = subprocess.run(["readelf", "-wF", str(path)], capture_output=True, text=True, check=False).stdout
    rows: list[tuple[int, int, dict[str, str]]] = []
    current = ""
    cols: list[str] = []
    fde_start = -1
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            current = m.group(1)
            continue
        if current != section:
            continue
        m = _FDE.match(line)
        if m or " CIE" in line or "ZERO terminator" in line:
            fde_start = int(m.group(1), 16) if m else -1  # a CIE's own rows are not code
            cols = []
            continue
        if line.strip().startswith("LOC"):
            cols = line.split()[1:]
            continue
        m = _ROW.match(line)
        if m and fde_start >= 0 and cols:
            values = _VALUE.findall(m.group(2))  # "r9 (r9)" is one value: in register r9
            rows.append((fde_start, int(m.group(1), 16), dict(zip(cols, values, strict=True))))
    return rows


def expected(rule: dict[str, str], signal_ok: bool = True) -> tuple[set[CfaKind], int | None, int | None]:
    """(allowed kinds, cfa offset, rbp offset) readelf's row implies; None: not checked."""
    ra = rule.get("ra", "c-8")
    cfa = rule["CFA"]
    if ra == "u":
        return {CfaKind.OUTERMOST}, None, None
    if ra == "exp" and cfa == "exp":
        return {CfaKind.SIGNAL, CfaKind.UNSUPPORTED}, None, None
    if ra != "c-8":
        return {CfaKind.UNSUPPORTED}, None, None
    if cfa == "exp":
        return {CfaKind.PLT, CfaKind.DEREF_RSP, CfaKind.DEREF_RBP, CfaKind.UNSUPPORTED}, None, None
    m = re.fullmatch(r"(rsp|rbp)\+(\d+)", cfa)
    if not m:
        return {CfaKind.UNSUPPORTED}, None, None
    kind = CfaKind.RSP if m.group(1) == "rsp" else CfaKind.RBP
    rbp = rule.get("rbp", "u")
    if rbp in ("u", "s"):
        rbp_off = RBP_SAME
    elif re.fullmatch(r"c-\d+", rbp):
        rbp_off = int(rbp[1:])
    else:
        rbp_off = RBP_LOST
    return {kind}, int(m.group(2)), rbp_off


def check_against_readelf(path: Path, section: str, min_rows: int) -> UnwindTable:
    table = UnwindTable.from_elf(ElfFile(path))
    rows = readelf_rows(path, section)
    assert len(rows) >= min_rows
    checked = 0
    for fde_start, pc, rule in rows:
        kinds, cfa_off, rbp_off = expected(rule)
        got = table.lookup(pc)
        assert got.kind in kinds, (hex(fde_start), hex(pc), rule, got)
        if cfa_off is not None:
            assert got.cfa_off == cfa_off, (hex(pc), rule, got)
            assert got.rbp_off == rbp_off, (hex(pc), rule, got)
            checked += 1
    assert checked > min_rows // 2
    return table


def test_libc_matches_readelf():
    table = check_against_readelf(LIBC, ".eh_frame", 20000)
    kinds = set(table.kinds)
    # ld's .plt expression, glibc's __restore_rt signal frame, _start/clone's undefined RA.
    assert {CfaKind.PLT, CfaKind.SIGNAL, CfaKind.OUTERMOST} <= kinds
    assert table.sources == (".eh_frame",)


@pytest.mark.skipif(not LIBSTDCXX.exists(), reason="libstdc++ not installed")
def test_libstdcxx_matches_readelf():
    check_against_readelf(LIBSTDCXX, ".eh_frame", 20000)


@pytest.mark.parametrize("flags", [("-O2", "-fno-omit-frame-pointer"), ("-O2", "-fomit-frame-pointer"),
                                   ("-O0",)])
def test_fixture_matches_readelf(flags):
    table = check_against_readelf(build_c("unwind_chain", flags), ".eh_frame", 40)
    assert CfaKind.OUTERMOST in set(table.kinds)  # _start


def test_debug_frame_only_binary():
    """-fno-asynchronous-unwind-tables -g moves our functions' CFI to .debug_frame."""
    binary = build_c("unwind_chain", ("-O2", "-g", "-fno-asynchronous-unwind-tables", "-fomit-frame-pointer"))
    table = check_against_readelf(binary, ".debug_frame", 20)
    assert ".debug_frame" in table.sources


def test_go_debug_frame_matches_readelf():
    """Go writes (compressed) .debug_frame in unstripped binaries."""
    table = check_against_readelf(build_go("unwind"), ".debug_frame", 1000)
    assert table.sources == (".debug_frame",)


def test_gaps_and_outside_are_none():
    table = UnwindTable.from_elf(ElfFile(LIBC))
    assert table.lookup(0).kind == CfaKind.NONE
    assert table.lookup(table.pcs[-1] + 0x1000).kind == CfaKind.NONE
    assert table.kinds[-1] == CfaKind.NONE


def test_without_section_headers(tmp_path):
    """Section headers stripped: .eh_frame is found through PT_GNU_EH_FRAME."""
    src = build_c("unwind_chain", ("-O2", "-fomit-frame-pointer"))
    want = UnwindTable.from_elf(ElfFile(src))
    data = bytearray(src.read_bytes())
    struct.pack_into("<Q", data, 0x28, 0)  # e_shoff
    struct.pack_into("<HHH", data, 0x3A, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
    bare = tmp_path / "bare"
    bare.write_bytes(bytes(data))
    got = UnwindTable.from_elf(ElfFile(bare))
    assert list(got.pcs) == list(want.pcs)
    assert list(got.kinds) == list(want.kinds)
    assert list(got.cfa_offs) == list(want.cfa_offs)


def _eh_frame_of(path: Path) -> tuple[bytes, int]:
    elf = ElfFile(path)
    sec = elf.section(".eh_frame")
    return bytes(sec.data()), sec["sh_addr"]


def test_corrupt_eh_frame_raises_only_elf_parse_error():
    data, addr = _eh_frame_of(build_c("unwind_chain", ("-O2", "-fomit-frame-pointer")))
    rng = random.Random(7)
    outcomes = {"ok": 0, "error": 0}
    for i in range(600):
        buf = bytearray(data)
        if i % 3 == 0:
            buf = buf[:rng.randrange(len(buf))]
        else:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(buf))
                buf[pos] = rng.randrange(256) if i % 3 == 1 else buf[pos] ^ (1 << rng.randrange(8))
        try:
            table = parse_cfi([_Section(bytes(buf), addr, True)])
        except ElfParseError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        # Whatever survives is still a sorted table lookups can trust.
        assert list(table.pcs) == sorted(table.pcs)
    assert outcomes["error"] > 50 and outcomes["ok"] > 50, outcomes


@pytest.mark.parametrize("blob", [b"", b"\xff\xff\xff\xff", b"\x10\0\0\0\0\0\0\0\x09", b"\x08\0\0\0\x04\0\0\0",
                                  b"\x0c\0\0\0\0\0\0\0\x01zR\0" + b"\x80" * 20])
def test_corrupt_snippets(blob):
    try:
        parse_cfi([_Section(blob, 0x1000, True)])
    except ElfParseError:
        pass
