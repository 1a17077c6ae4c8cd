"""Source positions from DWARF: vaddr -> file:line, and the inlined call chain.

Built lazily and per compile unit: the first lookup builds a sorted index of
CU address ranges (from .debug_aranges, or the CUs' top DIEs when that is
missing or incomplete); a CU's line table and its inline tree are decoded only
when an address inside it is first asked for. A profiler touches few CUs of
a big binary, and pyelftools decodes DWARF at Python speed.

DWARF 2-5 are handled (gcc 12 emits 5: 0-based file and directory indices,
.debug_rnglists, DW_FORM_line_strp). Any decoding error is raised as
ElfParseError; callers fall back to the symbol table.
"""

from __future__ import annotations

import bisect
import os
from typing import Any, NamedTuple

from symbolizer.elf import ElfFile, elf_errors
from symbolizer.errors import ElfParseError


class SourceLine(NamedTuple):
    """A line-table row: source path (as addr2line prints it) and 1-based line (0: unknown)."""

    file: str
    line: int


class InlineFrame(NamedTuple):
    """One level of the call chain at an address, innermost first.

    `function` is the DIE's linkage name (mangled, for demangle()) or its
    plain name. `file`/`line` is the position inside that function: for the
    innermost frame the line-table row, for outer ones the call site of the
    frame inside them. `inlined` is true for all but the outermost frame.
    """

    function: str
    file: str
    line: int
    inlined: bool


class _Scope(NamedTuple):
    ranges: tuple[tuple[int, int], ...]
    depth: int
    die: Any  # pyelftools DIE, for the name (resolved only when asked)
    call_file: int
    call_line: int
    inlined: bool


class _CuData:
    """Decoded pieces of one CU: sorted line rows, file names, inline scopes."""

    def __init__(self) -> None:
        self.addrs: list[int] = []
        self.rows: list[tuple[int, int, bool]] = []  # (file index, line, end_sequence)
        self.files: list[str] = []
        self.file_base = 1  # DWARF < 5 numbers files from 1
        self.scopes: list[_Scope] | None = None


class DwarfLines:
    """Line tables and inline trees of one ELF file's DWARF; addresses are ELF vaddrs."""

    def __init__(self, elf: ElfFile) -> None:
        if not elf.has_dwarf:
            raise ElfParseError(f"{elf.path}: no DWARF line information")
        self._elf = elf
        with elf_errors(f"{elf.path}: DWARF"):
            self._dwarf = elf.elf.get_dwarf_info(relocate_dwarf_sections=False)
        self._cu_starts: list[int] | None = None
        self._cu_ranges: list[tuple[int, int, int]] = []  # (start, end, cu offset), sorted
        self._cus: dict[int, _CuData] = {}
        self._cu_objs: dict[int, Any] = {}

    # -- public ----------------------------------------------------------------

    def lookup(self, vaddr: int) -> SourceLine | None:
        """The line-table row covering `vaddr`, or None. Raises ElfParseError on corrupt DWARF."""
        with elf_errors(f"{self._elf.path}: DWARF line table"):
            cu_off = self._cu_for(vaddr)
            if cu_off is None:
                return None
            data = self._cu_data(cu_off)
            i = bisect.bisect_right(data.addrs, vaddr) - 1
            if i < 0:
                return None
            file_index, line, end_sequence = data.rows[i]
            if end_sequence:
                return None
            return SourceLine(self._file_name(data, file_index), line)

    def frames(self, vaddr: int) -> list[InlineFrame]:
        """The call chain at `vaddr`, innermost first (what `addr2line -f -i` prints).

        Empty when DWARF knows nothing of `vaddr`; one frame with function ""
        when a line row covers it but no function DIE does (inter-function
        padding), as addr2line then takes the name from the symbol table.
        Raises ElfParseError on corrupt DWARF.
        """
        with elf_errors(f"{self._elf.path}: DWARF inline tree"):
            cu_off = self._cu_for(vaddr)
            if cu_off is None:
                return []
            data = self._cu_data(cu_off)
            if data.scopes is None:
                data.scopes = self._scopes(cu_off)
            chain = [s for s in data.scopes if any(lo <= vaddr < hi for lo, hi in s.ranges)]
            if not chain:
                # Padding after a function still has line rows: keep the position,
                # leave the name to the symbol table.
                row = self.lookup(vaddr)
                return [InlineFrame("", row.file, row.line, False)] if row else []
            chain.sort(key=lambda s: s.depth)
            # Drop scopes outside the innermost subprogram (nested functions are rare; keep the last).
            first = max(i for i, s in enumerate(chain) if not s.inlined)
            chain = chain[first:]
            row = self.lookup(vaddr)
            file, line = (row.file, row.line) if row else ("", 0)
            out: list[InlineFrame] = []
            for scope in reversed(chain):
                out.append(InlineFrame(self._function_name(scope.die), file, line, scope.inlined))
                # The caller's position is where this (inlined) scope was called from.
                file, line = self._file_name(data, scope.call_file), scope.call_line
            return out

    # -- CU index ----------------------------------------------------------------

    def _cu_for(self, vaddr: int) -> int | None:
        if self._cu_starts is None:
            self._build_cu_index()
        i = bisect.bisect_right(self._cu_starts, vaddr) - 1
        # Ranges of different CUs do not overlap in sane output; look back a little anyway.
        for j in range(i, max(i - 4, -1), -1):
            start, end, cu_off = self._cu_ranges[j]
            if start <= vaddr < end:
                return cu_off
        return None

    def _build_cu_index(self) -> None:
        dwarf = self._dwarf
        ranges: list[tuple[int, int, int]] = []
        covered: set[int] = set()
        aranges = dwarf.get_aranges()
        if aranges is not None:
            for e in aranges.entries:
                if e.length:
                    ranges.append((e.begin_addr, e.begin_addr + e.length, e.info_offset))
                    covered.add(e.info_offset)
        # CUs without aranges entries (assembly, some toolchains): ask their top DIE.
        for cu in dwarf.iter_CUs():
            if cu.cu_offset in covered:
                continue
            top = cu.get_top_DIE()
            for lo, hi in self._die_ranges(cu, top):
                ranges.append((lo, hi, cu.cu_offset))
        ranges.sort()
        self._cu_ranges = ranges
        self._cu_starts = [r[0] for r in ranges]

    def _cu(self, cu_off: int) -> Any:
        cu = self._cu_objs.get(cu_off)
        if cu is None:
            cu = self._dwarf.get_CU_at(cu_off)
            self._cu_objs[cu_off] = cu
        return cu

    # -- per CU ------------------------------------------------------------------

    def _cu_data(self, cu_off: int) -> _CuData:
        data = self._cus.get(cu_off)
        if data is not None:
            return data
        data = _CuData()
        cu = self._cu(cu_off)
        prog = self._dwarf.line_program_for_CU(cu)
        if prog is not None:
            version = prog["version"]
            data.file_base = 0 if version >= 5 else 1
            top = cu.get_top_DIE()
            comp_dir = _text(top.attributes["DW_AT_comp_dir"].value) if "DW_AT_comp_dir" in top.attributes else ""
            dirs = [_text(d) for d in prog["include_directory"]]
            for fe in prog["file_entry"]:
                d = fe.dir_index
                if version >= 5:
                    directory = dirs[d] if d < len(dirs) else ""
                else:
                    directory = comp_dir if d == 0 else (dirs[d - 1] if d - 1 < len(dirs) else "")
                if directory and not os.path.isabs(directory) and comp_dir:
                    directory = os.path.join(comp_dir, directory)
                data.files.append(os.path.join(directory, _text(fe.name)))
            rows: list[tuple[int, int, int, bool]] = []
            for seq, entry in enumerate(prog.get_entries()):
                st = entry.state
                if st is not None:
                    # seq keeps rows of one address in program order after the sort.
                    rows.append((st.address, seq, st.file, st.line, st.end_sequence))
            # A sequence's end row sorts before a row starting at the same address.
            rows.sort(key=lambda r: (r[0], not r[4], r[1]))
            data.addrs = [r[0] for r in rows]
            data.rows = [(r[2], r[3], r[4]) for r in rows]
        self._cus[cu_off] = data
        return data

    def _file_name(self, data: _CuData, index: int) -> str:
        i = index - data.file_base
        return data.files[i] if 0 <= i < len(data.files) else ""

    def _scopes(self, cu_off: int) -> list[_Scope]:
        """Every subprogram and inlined_subroutine of the CU that has code ranges."""
        cu = self._cu(cu_off)
        scopes: list[_Scope] = []
        stack = [(cu.get_top_DIE(), 0)]
        while stack:
            die, depth = stack.pop()
            if die.tag in ("DW_TAG_subprogram", "DW_TAG_inlined_subroutine"):
                ranges = tuple(self._die_ranges(cu, die))
                if ranges:
                    attrs = die.attributes
                    inlined = die.tag == "DW_TAG_inlined_subroutine"
                    call_file = attrs["DW_AT_call_file"].value if "DW_AT_call_file" in attrs else -1
                    call_line = attrs["DW_AT_call_line"].value if "DW_AT_call_line" in attrs else 0
                    scopes.append(_Scope(ranges, depth, die, call_file, call_line, inlined))
            if die.has_children:
                stack.extend((child, depth + 1) for child in die.iter_children())
        return scopes

    def _die_ranges(self, cu: Any, die: Any) -> list[tuple[int, int]]:
        attrs = die.attributes
        if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
            lo = attrs["DW_AT_low_pc"].value
            hi_attr = attrs["DW_AT_high_pc"]
            # DWARF 4+: a constant-class high_pc is a length, not an address.
            hi = hi_attr.value if hi_attr.form == "DW_FORM_addr" else lo + hi_attr.value
            return [(lo, hi)] if hi > lo else []
        if "DW_AT_ranges" in attrs:
            rl = self._dwarf.range_lists()
            if rl is None:
                return []
            offset = attrs["DW_AT_ranges"].value
            top = cu.get_top_DIE()
            base = top.attributes["DW_AT_low_pc"].value if "DW_AT_low_pc" in top.attributes else 0
            out = []
            for entry in rl.get_range_list_at_offset(offset, cu=cu):
                if hasattr(entry, "base_address"):
                    base = entry.base_address
                    continue
                lo, hi = entry.begin_offset, entry.end_offset
                if not entry.is_absolute:
                    lo, hi = lo + base, hi + base
                if hi > lo:
                    out.append((lo, hi))
            return out
        return []

    @staticmethod
    def _function_name(die: Any) -> str:
        """Linkage name along the abstract_origin/specification chain, else the first plain name."""
        plain = ""
        for _ in range(8):  # bounded: a corrupt file could make the chain a cycle
            attrs = die.attributes
            for key in ("DW_AT_linkage_name", "DW_AT_MIPS_linkage_name"):
                if key in attrs:
                    return _text(attrs[key].value)
            if not plain and "DW_AT_name" in attrs:
                plain = _text(attrs["DW_AT_name"].value)
            key = next((k for k in ("DW_AT_abstract_origin", "DW_AT_specification") if k in attrs), None)
            if key is None:
                break
            die = die.get_DIE_from_attribute(key)
        return plain


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
