"""Unwind tables survive a round trip through the disk cache, and bad files are never trusted."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from fixtures.builder import build_go
from symbolizer import unwind_cache
from symbolizer.cfi import CfiInputs, UnwindTable
from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError
from symbolizer.file_symbols import FileSymbols, file_id
from symbolizer.unwind_rows import ROW, ROWS_FORMAT_VERSION, file_rows

LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(unwind_cache.ENV_CACHE_DIR, str(tmp_path))
    return tmp_path / "unwind"


def test_second_load_comes_from_disk_and_is_identical(cache, monkeypatch):
    elf = ElfFile(LIBC)
    built = FileSymbols(elf, file_id(elf)).unwind_table
    assert built is not None and len(built) > 1000
    assert len(list(cache.iterdir())) == 1

    def no_build(_inputs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(CfiInputs, "parse", no_build)
    loaded = FileSymbols(elf, file_id(elf)).unwind_table
    assert loaded.sources == ("cache",)
    for name in ("pcs", "kinds", "cfa_offs", "rbp_offs"):
        assert getattr(loaded, name) == getattr(built, name), name
    assert (loaded.fde_count, loaded.unsupported_fdes) == (built.fde_count, built.unsupported_fdes)
    for vaddr in list(built.pcs)[::997]:
        assert loaded.lookup(vaddr + 1) == built.lookup(vaddr + 1)


def test_a_copy_with_the_same_build_id_and_other_cfi_gets_its_own_table(cache, tmp_path):
    """libc with one .eh_frame byte changed and its build-id note kept: keyed by build id, whichever was
    parsed first was served to both."""
    elf = ElfFile(LIBC)
    sec = elf.section(".eh_frame")
    data = bytearray(LIBC.read_bytes())
    data[sec["sh_offset"] + sec["sh_size"] // 2] ^= 0x01
    copy = tmp_path / "libc-copy.so"
    copy.write_bytes(data)
    assert file_id(ElfFile(copy)) == file_id(elf)

    def fields(t: UnwindTable) -> tuple:
        return tuple(getattr(t, n).tobytes() for n in ("pcs", "kinds", "cfa_offs", "rbp_offs"))

    want = {}
    for path in (LIBC, copy):
        try:
            want[path] = fields(UnwindTable.from_elf(ElfFile(path)))
        except ElfParseError:
            want[path] = None
    assert want[LIBC] != want[copy]
    for order in ((copy, LIBC), (LIBC, copy)):
        for p in cache.glob("*.unw"):
            p.unlink()
        for path in order * 2:  # parsed, parsed, then each from the cache
            e = ElfFile(path)
            table = FileSymbols(e, file_id(e)).unwind_table
            assert (None if table is None else fields(table)) == want[path], path


@pytest.mark.parametrize("damage", ["truncate", "version", "garbage", "extra"])
def test_damaged_files_are_ignored(cache, damage):
    elf = ElfFile(LIBC)
    fid = file_id(elf)
    table = UnwindTable.from_elf(elf)
    assert unwind_cache.store(fid.build_id, fid.kind.value, table)
    (path,) = cache.iterdir()
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "version":
        data = data[:6] + b"\x63\x00" + data[8:]
    elif damage == "garbage":
        data = b"\x00" * len(data)
    else:
        data = data + b"\x01"
    path.write_bytes(data)
    assert unwind_cache.load(fid.build_id, fid.kind.value) is None


def test_unwritable_directory_is_not_an_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    table = UnwindTable.from_elf(ElfFile(LIBC))
    assert unwind_cache.store("abc", "gnu", table, directory=blocked / "sub") is False
    assert unwind_cache.load("abc", "gnu", directory=blocked / "sub") is None


# -- the BPF unwinder's packed rows (agent/unwind/tables.py) --------------------------------------------


def _rows_file(cache: Path) -> Path:
    files = list(cache.glob("*.rows"))
    assert len(files) == 1, files
    return files[0]


def test_packed_rows_come_from_disk_the_second_time_byte_for_byte(cache, monkeypatch):
    from agent.unwind import tables  # noqa: PLC0415  (the agent's use of the cache)

    for binary in (LIBC, Path(build_go("cpusplit"))):  # CFI rows; Go pclntab rows
        elf = ElfFile(binary)
        built = file_rows(FileSymbols(elf, file_id(elf)))
        assert built.count > 1000
        assert tables._default_rows(FileSymbols(elf, file_id(elf))) == (built.base, built.data)

        def no_build(_fs):
            raise AssertionError("rows built again although cached")

        with monkeypatch.context() as mp:
            mp.setattr(tables, "file_rows", no_build)
            assert tables._default_rows(FileSymbols(elf, file_id(elf))) == (built.base, built.data)
        for p in cache.glob("*.rows"):
            p.unlink()


def test_a_copy_with_the_same_build_id_and_other_inputs_gets_its_own_rows(cache, tmp_path):
    """A copy of a Go binary, build-id note kept, .gopclntab's section header bent (as test_agent's malformed
    binaries): keyed by build id, whichever was packed first walked both (a CI run lost main.worker so)."""
    real = Path(build_go("cpusplit"))
    data = bytearray(real.read_bytes())
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, shnum, strndx = struct.unpack_from("<HHH", data, 0x3A)
    str_off, = struct.unpack_from("<Q", data, shoff + strndx * entsize + 0x18)
    for i in range(shnum):
        hdr = shoff + i * entsize
        name_off, = struct.unpack_from("<I", data, hdr)
        if data[str_off + name_off:].split(b"\0", 1)[0] == b".gopclntab":
            struct.pack_into("<Q", data, hdr + 0x18, 64)  # sh_offset: the program headers
    bent = tmp_path / "bent"
    bent.write_bytes(data)
    assert file_id(ElfFile(bent)) == file_id(ElfFile(real))

    def own(path: Path) -> tuple[int, bytes] | None:
        elf = ElfFile(path)
        rows = file_rows(FileSymbols(elf, file_id(elf)))
        return (rows.base, rows.data) if rows.count else None

    from agent.unwind import tables  # noqa: PLC0415  (the agent's use of the cache)

    want = {p: own(p) for p in (bent, real)}
    assert want[bent] != want[real]
    for first, second in ((bent, real), (real, bent)):
        for p in cache.glob("*.rows"):
            p.unlink()
        for path in (first, second, first, second):  # packed, packed, then each from the cache
            elf = ElfFile(path)
            assert tables._default_rows(FileSymbols(elf, file_id(elf))) == want[path], path


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "row size", "other user", "symlink"])
def test_damaged_rows_are_never_loaded(cache, damage, tmp_path):
    rows = bytes(range(256)) * 8 * ROW.size
    assert unwind_cache.store_rows("ab" * 20, "gnu", ROWS_FORMAT_VERSION, ROW.size, 0x1000, rows)
    path = _rows_file(cache)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert unwind_cache.load_rows("ab" * 20, "gnu", ROWS_FORMAT_VERSION, ROW.size) == (0x1000, rows)
    version, row = ROWS_FORMAT_VERSION, ROW.size
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 1
        path.write_bytes(data)
    elif damage == "truncate":
        path.write_bytes(data[:-ROW.size])
    elif damage == "version":
        version += 1
    elif damage == "row size":
        row += 1
    elif damage == "other user":
        path.chmod(0o644)
    else:
        real = tmp_path / "real.rows"
        path.rename(real)
        path.symlink_to(real)
    assert unwind_cache.load_rows("ab" * 20, "gnu", version, row) is None
