"""symbolizer.cfi.FdeIndex (one FDE through .eh_frame_hdr) against UnwindTable (every FDE).

The whole-file table is itself checked against readelf (test_eh_frame.py); the
index must give the same rule at every row boundary of it, and a corrupt
file must raise ElfParseError only (the unwinder turns it into UNSUPPORTED).
"""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

import pytest

from fixtures.builder import build_c
from symbolizer.cached_property import cached_property, computed
from symbolizer.cfi import CfaKind, FdeIndex, UnwindTable
from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError
from symbolizer.file_symbols import FileSymbols, file_id

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
PYTHON = Path("/usr/bin/python3.11")


def _same_rules(path: Path) -> int:
    table = UnwindTable.from_elf(ElfFile(path))
    index = FdeIndex.from_elf(ElfFile(path))
    assert index is not None and len(index) >= table.fde_count
    probes = sorted({v for pc in table.pcs for v in (pc - 1, pc, pc + 1)} | {0, table.pcs[-1] + 4096})
    for v in probes:
        want = tuple(table.lookup(v))
        assert index.rule(v) == want, hex(v)
    return len(probes)


@pytest.mark.parametrize("path", [LIBC, PYTHON, None], ids=["libc", "python3.11", "fixture"])
def test_same_rules_as_the_whole_table(path):
    path = path or build_c("unwind_chain", ("-O2", "-fomit-frame-pointer"))
    assert _same_rules(path) > 30


def test_plt_signal_and_outermost_rows_come_through():
    index = FdeIndex.from_elf(ElfFile(LIBC))
    table = UnwindTable.from_elf(ElfFile(LIBC))
    kinds = {index.rule(pc)[0] for pc, k in zip(table.pcs, table.kinds, strict=True) if k != CfaKind.NONE}
    assert {CfaKind.PLT, CfaKind.SIGNAL, CfaKind.OUTERMOST} <= kinds


def test_debug_frame_files_get_no_index():
    """The whole table merges .debug_frame under .eh_frame; an index of .eh_frame alone would differ."""
    binary = build_c("unwind_chain", ("-O2", "-g", "-fno-asynchronous-unwind-tables", "-fomit-frame-pointer"))
    assert FdeIndex.from_elf(ElfFile(binary)) is None


def test_file_symbols_use_the_index_until_a_table_is_built():
    elf = ElfFile(LIBC)
    fs = FileSymbols(elf, file_id(elf))
    assert isinstance(fs.unwind_rules(), FdeIndex) and not computed(fs, "unwind_table")
    fs.unwind_table  # noqa: B018  (what the BPF tables' worker does)
    assert isinstance(fs.unwind_rules(), UnwindTable)


def test_corrupt_fdes_raise_only_elf_parse_error(tmp_path):
    src = build_c("unwind_chain", ("-O2", "-fomit-frame-pointer"))
    clean = UnwindTable.from_elf(ElfFile(src))
    elf = ElfFile(src)
    eh = elf.section(".eh_frame")
    lo, hi = eh["sh_offset"], eh["sh_offset"] + eh["sh_size"]
    data = src.read_bytes()
    rng = random.Random(11)
    outcomes = {"ok": 0, "error": 0}
    for i in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(lo, hi)
            buf[pos] = rng.randrange(256)
        bad = tmp_path / f"bad{i}"
        bad.write_bytes(bytes(buf))
        index = FdeIndex.from_elf(ElfFile(bad))
        assert index is not None  # the header is intact
        for pc in clean.pcs:
            try:
                kind, _, _ = index.rule(pc)
            except ElfParseError:
                outcomes["error"] += 1
                continue
            outcomes["ok"] += 1
            assert kind in set(CfaKind)
    assert outcomes["error"] > 20 and outcomes["ok"] > 20, outcomes


def test_search_table_pointing_outside_eh_frame(tmp_path):
    src = build_c("unwind_chain", ("-O2", "-fomit-frame-pointer"))
    elf = ElfFile(src)
    hdr = elf.section(".eh_frame_hdr")
    data = bytearray(src.read_bytes())
    first_fde = hdr["sh_offset"] + 12 + 4  # version, encodings, eh_frame_ptr, count; then (loc, fde)
    struct.pack_into("<i", data, first_fde, 0x7FFFFFF0)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    index = FdeIndex.from_elf(ElfFile(bad))
    loc = struct.unpack_from("<i", data, first_fde - 4)[0] + hdr["sh_addr"]
    with pytest.raises(ElfParseError):
        index.rule(loc)


class _Slow:
    def __init__(self, gate: threading.Event, entered: threading.Event) -> None:
        self.gate, self.entered = gate, entered

    @cached_property
    def value(self) -> int:
        self.entered.set()
        self.gate.wait()
        return 1


def test_cached_property_locks_per_instance():
    """One object's slow computation does not hold up another object's (3.11's functools did)."""
    gate, entered = threading.Event(), threading.Event()
    slow = _Slow(gate, entered)
    other = _Slow(threading.Event(), threading.Event())
    other.gate.set()
    blocker = threading.Thread(target=lambda: slow.value)
    blocker.start()
    assert entered.wait(10)
    reader = threading.Thread(target=lambda: other.value)
    reader.start()
    reader.join(30)
    finished = not reader.is_alive()
    gate.set()
    blocker.join()
    assert finished and other.value == 1 and slow.value == 1
