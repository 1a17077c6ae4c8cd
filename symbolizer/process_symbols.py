"""The per-process view: which file is mapped where, and address -> frames.

Holds what differs between two processes running the same binary (load
addresses); the symbols themselves are FileSymbols shared through the cache.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from symbolizer.file_symbols import FileSymbols
from symbolizer.frames import Frame, Mapping


@dataclass(frozen=True)
class MappedFile:
    """One executable mapping and the symbols of the file behind it (None: unreadable)."""

    mapping: Mapping
    symbols: FileSymbols | None


class ProcessSymbols:
    """Address -> (mapping, frames) for one process, from a snapshot of its maps."""

    def __init__(self, mapped: Sequence[MappedFile]) -> None:
        self._mapped = sorted(mapped, key=lambda m: m.mapping.start)
        self._starts = [m.mapping.start for m in self._mapped]

    def mapping_at(self, addr: int) -> MappedFile | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._mapped[i].mapping.end:
            return self._mapped[i]
        return None

    def resolve(self, addr: int, return_address: bool) -> tuple[Mapping | None, tuple[Frame, ...]]:
        """Mapping and frames of `addr` (frames innermost first; () if unresolved).

        `return_address`: the address is a caller's return address (every
        frame but the leaf); it is looked up at addr-1 so that the call
        instruction's line is reported, not the next statement's.
        """
        m = self.mapping_at(addr)
        if m is None:
            return None, ()
        if m.symbols is None:
            return m.mapping, ()
        pc = addr - 1 if return_address else addr
        vaddr = m.symbols.translate(pc, m.mapping.start, m.mapping.file_offset)
        if vaddr is None:
            return m.mapping, ()
        return m.mapping, m.symbols.symbolize(vaddr)

    @property
    def mappings(self) -> list[MappedFile]:
        return list(self._mapped)
