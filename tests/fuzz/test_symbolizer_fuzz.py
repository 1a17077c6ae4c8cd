"""Bounded fuzzing of the symbolizer's parsers (hypothesis): corrupt input raises BpfprofError or nothing.

Each target mutates a real binary (bytes overwritten, then maybe truncated)
and runs the whole path the agent runs on a mapped file: identify, symbols,
pclntab, DWARF lines, lookups. The example counts are fixed (a few seconds
in CI); raise BPFPROF_FUZZ_EXAMPLES for a longer local run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.builder import build_c, build_go
from symbolizer.elf import ElfFile
from symbolizer.errors import BpfprofError
from symbolizer.file_symbols import FileSymbols, file_id
from symbolizer.gopclntab import load_pclntab

EXAMPLES = int(os.environ.get("BPFPROF_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_C = build_c("callchain").read_bytes()
_GO = build_go("cpusplit", stripped=True).read_bytes()


def mutations(size: int) -> st.SearchStrategy:
    return st.tuples(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=64),
                     st.one_of(st.none(), st.integers(0, size)))


def mutate(data: bytes, muts: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for off, value in muts:
        buf[off] = value
    return bytes(buf[:cut] if cut is not None else buf)


def _exercise(data: bytes, addresses: list[int]) -> None:
    try:
        elf = ElfFile.from_bytes(data, "fuzz")
    except BpfprofError:
        return
    fs = FileSymbols(elf, file_id(elf))  # never raises: parts that fail are logged and left out
    for addr in addresses:
        fs.symbolize(addr)
        fs.translate(addr, 0x400000, 0)


@FUZZ
@given(mutations(len(_C)), st.lists(st.integers(0, 0x500000), max_size=8))
def test_native_elf_and_dwarf(muts, addresses):
    _exercise(mutate(_C, *muts), addresses)


@FUZZ
@given(mutations(len(_GO)), st.lists(st.integers(0x400000, 0x600000), max_size=8))
def test_go_binary(muts, addresses):
    _exercise(mutate(_GO, *muts), addresses)


_PCLN_START = _GO.find(b"\xf1\xff\xff\xff\x00\x00")  # pclntab magic (Go 1.20+) at the section's start


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=32))
def test_pclntab_header_region(muts):
    """Mutations concentrated in the pclntab's header and first tables, where the parser trusts offsets."""
    assert _PCLN_START > 0
    buf = bytearray(_GO)
    for off, value in muts:
        buf[_PCLN_START + off] = value
    try:
        elf = ElfFile.from_bytes(bytes(buf), "fuzz")
        tab = load_pclntab(elf.image)
    except BpfprofError:
        return
    if tab is None:
        return
    for pc in (0x401000, 0x450000, 0x480000):
        try:
            tab.lookup(pc)
        except BpfprofError:
            pass
