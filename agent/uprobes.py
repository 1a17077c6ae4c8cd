"""Where to put a uprobe: a function's file offset in an ELF file."""

from __future__ import annotations

from symbolizer.elf import ElfFile
from symbolizer.elf_symbols import ElfSymbols
from symbolizer.errors import BpfLoadError


def vaddr_to_offset(elf: ElfFile, vaddr: int) -> int:
    """File offset of ELF virtual address `vaddr`, through the PT_LOAD segment holding it."""
    for seg in elf.load_segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
            return vaddr - seg.vaddr + seg.offset
    raise BpfLoadError(f"{elf.path}: address 0x{vaddr:x} is in no loaded segment")


def function_offsets(path: str, names: list[str]) -> dict[str, int]:
    """File offsets of the functions `names` that `path` defines (missing names are left out)."""
    with ElfFile(path) as elf:
        syms = ElfSymbols(elf)
        out = {}
        for name in names:
            sym = syms.find(name)
            if sym is not None:
                out[name] = vaddr_to_offset(elf, sym.start)
        return out
