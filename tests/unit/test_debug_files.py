"""Separate debug info: the build-id tree, .gnu_debuglink (CRC checked) and MiniDebugInfo, against files that
binutils (objcopy, nm) made and read; and Debian's libc6-dbg for the real libc (packaging/setup.sh installs it)."""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from symbolizer.debug_files import find_debug_file, mini_debug_info, parse_debuglink
from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError
from symbolizer.file_symbols import SymbolCache

SOURCE = """
static int __attribute__((noinline)) hidden_work(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * x; return s; }
int exported(int x) { return hidden_work(x) + 1; }
"""
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def _run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _nm(path: Path, name: str) -> int:
    return next(int(ln.split()[0], 16) for ln in _run("nm", str(path)).splitlines() if ln.endswith(" " + name))


def _build_id(path: Path) -> str:
    return next(ln.split()[-1] for ln in _run("readelf", "-n", str(path)).splitlines() if "Build ID" in ln)


@pytest.fixture
def lib(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(unstripped library, its --only-keep-debug file, the stripped library)."""
    src = tmp_path / "x.c"
    src.write_text(SOURCE)
    full, debug, stripped = tmp_path / "libx.so", tmp_path / "libx.debug", tmp_path / "libx-stripped.so"
    _run("gcc", "-g", "-O1", "-shared", "-fPIC", "-Wl,--build-id", "-o", str(full), str(src))
    _run("objcopy", "--only-keep-debug", str(full), str(debug))
    _run("objcopy", "--strip-all", str(full), str(stripped))
    return full, debug, stripped


def _name_at(path: Path, vaddr: int, **where) -> str:
    fs = SymbolCache().get(ElfFile(path))
    for key, value in where.items():
        setattr(fs, key, value)
    frames = fs.symbolize(vaddr)
    return frames[-1].function if frames else ""


def test_build_id_tree(lib, tmp_path):
    full, debug, stripped = lib
    addr = _nm(full, "hidden_work")
    assert _name_at(stripped, addr) != "hidden_work"  # the stripped file alone does not know it
    bid = _build_id(full)
    tree = tmp_path / "debug" / ".build-id" / bid[:2]
    tree.mkdir(parents=True)
    shutil.copy(debug, tree / f"{bid[2:]}.debug")
    found = find_debug_file(ElfFile(stripped), bid, dirs=[str(tmp_path / "debug")])
    assert found is not None and found.gnu_build_id == bid
    assert _name_at(stripped, addr, debug_dirs=(str(tmp_path / "debug"),)) == "hidden_work"
    # another process's root: /ROOT/usr/lib/debug is looked at first
    root = tmp_path / "root"
    (root / "usr/lib/debug/.build-id" / bid[:2]).mkdir(parents=True)
    shutil.copy(debug, root / "usr/lib/debug/.build-id" / bid[:2] / f"{bid[2:]}.debug")
    assert _name_at(stripped, addr, debug_root=str(root), debug_path="/usr/lib/libx.so") == "hidden_work"
    # a file in the tree whose build id differs is not used
    shutil.copy(LIBC, tree / f"{bid[2:]}.debug")
    assert find_debug_file(ElfFile(stripped), bid, dirs=[str(tmp_path / "debug")]) is None


def test_debuglink_with_crc(lib, tmp_path):
    full, debug, stripped = lib
    linked = tmp_path / "libx.so.1"
    _run("objcopy", f"--add-gnu-debuglink={debug}", str(stripped), str(linked))
    name, crc = parse_debuglink(ElfFile(linked).section_bytes(".gnu_debuglink"))
    assert name == "libx.debug"
    addr = _nm(full, "hidden_work")
    assert _name_at(linked, addr, debug_path=str(linked), debug_dirs=()) == "hidden_work"
    with open(debug, "ab") as f:  # the CRC no longer matches: not its debug file
        f.write(b"\0")
    assert find_debug_file(ElfFile(linked), "", str(linked), dirs=()) is None


def test_minidebuginfo(lib, tmp_path):
    full, _, stripped = lib
    symtab_only = tmp_path / "mini.elf"
    _run("objcopy", "--only-keep-debug", "--remove-section=.debug_*", "--remove-section=.comment", str(full),
         str(symtab_only))
    xz = tmp_path / "mini.xz"
    xz.write_bytes(lzma.compress(symtab_only.read_bytes(), format=lzma.FORMAT_XZ))
    mini = tmp_path / "libx-mini.so"
    _run("objcopy", f"--add-section=.gnu_debugdata={xz}", str(stripped), str(mini))
    addr = _nm(full, "hidden_work")
    assert _name_at(mini, addr, debug_dirs=()) == "hidden_work"
    with pytest.raises(ElfParseError, match="larger than"):
        mini_debug_info(ElfFile(mini), limit=64)


def test_libc_names_from_libc6_dbg():
    """Debian's libc keeps .dynsym only; libc6-dbg's file in the build-id tree names its static functions
    as perf does (msort_with_tmp.part.0), with the inlined frames its DWARF records."""
    bid = _build_id(Path(LIBC))
    debug = Path("/usr/lib/debug/.build-id") / bid[:2] / f"{bid[2:]}.debug"
    assert debug.is_file(), f"{debug} missing: packaging/setup.sh installs libc6-dbg"
    addr = _nm(debug, "msort_with_tmp.part.0")
    fs = SymbolCache().get(ElfFile(LIBC))
    frames = fs.symbolize(addr + 0x40)
    assert frames[-1].function == "msort_with_tmp.part.0", frames
    assert frames[-1].file.endswith("msort.c")
    inlined = _run("addr2line", "-i", "-f", "-e", str(debug), hex(addr + 0x40)).splitlines()[0::2]
    assert [f.function for f in frames][:-1] == inlined[:-1], (frames, inlined)
