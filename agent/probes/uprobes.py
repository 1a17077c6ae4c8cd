"""Where to put a uprobe: a function's file offset in an ELF file."""

from __future__ import annotations

from symbolizer.elf import ElfFile
from symbolizer.elf_symbols import ElfSymbols


def function_offsets(path: str, names: list[str]) -> dict[str, int]:
    """File offsets of the functions `names` that `path` defines (missing names are left out)."""
    with ElfFile(path) as elf:
        syms = ElfSymbols(elf)
        out = {}
        for name in names:
            sym = syms.find(name)
            if sym is not None:
                out[name] = elf.offset_for_vaddr(sym.start)
        return out
