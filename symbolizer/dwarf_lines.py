"""Source positions from DWARF: vaddr -> file:line, and the inlined call chain.

Everything is decoded here, straight from the section bytes (the ElfFile's
image: a section is copied in when first used, untouched DWARF costs no memory): unit headers, abbreviation tables,
DIE attributes, .debug_aranges, range lists and line-number programs. pyelftools
is used only to find the sections (and to decompress SHF_COMPRESSED ones).

Lazily and per compile unit (CU):

- The first lookup builds a sorted index of CU address ranges from
  .debug_aranges, or from the CUs' top DIEs when that is missing or incomplete.
- A CU's line program is decoded when an address inside it is first asked for,
  into three flat arrays (address, file index, line) plus one entry per
  sequence; no per-row Python objects.
- frames() needs the CU's subprograms: one pass over the CU's top-level DIEs
  (descending only into namespaces, skipping every other subtree by its
  DW_AT_sibling or, without one, by size from the abbreviation table) gives
  sorted (low, high, DIE offset) arrays. For an address, only the covering
  subprogram's children whose ranges contain it are descended into; the rest
  are skipped the same way. No whole-CU DIE walk, no DIE objects kept.
- At most MAX_CACHED_UNITS decoded CUs are kept per file (least recently used
  evicted); a kept CU is its line arrays, its subprogram index, its
  abbreviation table and the names resolved so far.

DWARF 2-5 are handled (gcc 12 emits 5: 0-based file and directory indices,
.debug_rnglists, DW_FORM_line_strp; clang's strx/addrx/rnglistx forms too).
VLIW line programs (maximum_operations_per_instruction > 1) are decoded as if
it were 1. Any decoding error is raised as ElfParseError; callers fall back to
the symbol table.

Measured on libpython3.11.so (23 MB with debug info, 146 CUs, gcc 12, DWARF 5),
Python 3.11, this host; bench/symbolizer_speed.py prints these figures:

  first lookup()+frames() in the CU of PyUnicode_FromString (unicodeobject.c,
  71k line rows, the largest line table):
      before (pyelftools line program, whole-CU DIE walk): 1.48 s CPU, +88 MB RSS
      now: 29-39 ms CPU, +2.5-3 MB RSS (mmap pages touched included); the CU
      keeps 1.2 MB of arrays
  every CU's first lookup()+frames(): slowest 31 ms, median 2 ms CPU
  200 random .text addresses, lookup()+frames() each (68 CUs touched):
      before: 17.7 s CPU, +895 MB RSS
      now: 0.42 s CPU, +16 MB RSS
  line program alone: 24x less CPU than pyelftools' get_entries() (27 vs 657 ms)
  frames() in _PyEval_EvalFrameDefault (43 kB of code, thousands of DIEs): ~0.7 ms

Memory bound per file: MAX_CACHED_UNITS (32) decoded CUs; a CU keeps 16 bytes
per line row plus 24 per subprogram (libpython's largest: 1.2 MB, median
0.04 MB), so one file's DWARF state stays under ~40 MB even if every kept CU
were the largest, plus the CU index (24 bytes per address range).
"""

from __future__ import annotations

import bisect
import os
import struct
from array import array
from collections import OrderedDict
from typing import Any, NamedTuple

from symbolizer.elf import ElfFile, elf_errors
from symbolizer.errors import ElfParseError
from symbolizer.leb128 import sleb128 as _sleb
from symbolizer.leb128 import uleb128 as _uleb

# Decoded CUs kept per DwarfLines (least recently used evicted); each holds its
# line table (16 bytes a row) and subprogram index: 1.2 MB for libpython's largest.
MAX_CACHED_UNITS = 32

# A reference chain (abstract_origin/specification) longer than this is a cycle in a corrupt file.
_MAX_NAME_HOPS = 8

# -- DWARF constants -----------------------------------------------------------

_TAG_LEXICAL_BLOCK = 0x0B
_TAG_INLINED_SUBROUTINE = 0x1D
_TAG_CATCH_BLOCK = 0x25
_TAG_SUBPROGRAM = 0x2E
_TAG_TRY_BLOCK = 0x32
_TAG_NAMESPACE = 0x39
_TAG_MODULE = 0x1E
# Scopes without ranges of their own whose children may still hold code.
_BLOCK_TAGS = frozenset((_TAG_LEXICAL_BLOCK, _TAG_CATCH_BLOCK, _TAG_TRY_BLOCK, _TAG_INLINED_SUBROUTINE,
                         _TAG_SUBPROGRAM))
# Top-level DIEs under which subprogram definitions can sit (C++ and Fortran).
_CONTAINER_TAGS = frozenset((_TAG_NAMESPACE, _TAG_MODULE))

_AT_SIBLING = 0x01
_AT_NAME = 0x03
_AT_STMT_LIST = 0x10
_AT_LOW_PC = 0x11
_AT_HIGH_PC = 0x12
_AT_COMP_DIR = 0x1B
_AT_ABSTRACT_ORIGIN = 0x31
_AT_SPECIFICATION = 0x47
_AT_RANGES = 0x55
_AT_CALL_FILE = 0x58
_AT_CALL_LINE = 0x59
_AT_LINKAGE_NAME = 0x6E
_AT_STR_OFFSETS_BASE = 0x72
_AT_ADDR_BASE = 0x73
_AT_RNGLISTS_BASE = 0x74
_AT_MIPS_LINKAGE_NAME = 0x2007

_FORM_ADDR = 0x01
_FORM_BLOCK2 = 0x03
_FORM_BLOCK4 = 0x04
_FORM_DATA2 = 0x05
_FORM_DATA4 = 0x06
_FORM_DATA8 = 0x07
_FORM_STRING = 0x08
_FORM_BLOCK = 0x09
_FORM_BLOCK1 = 0x0A
_FORM_DATA1 = 0x0B
_FORM_FLAG = 0x0C
_FORM_SDATA = 0x0D
_FORM_STRP = 0x0E
_FORM_UDATA = 0x0F
_FORM_REF_ADDR = 0x10
_FORM_REF1 = 0x11
_FORM_REF2 = 0x12
_FORM_REF4 = 0x13
_FORM_REF8 = 0x14
_FORM_REF_UDATA = 0x15
_FORM_INDIRECT = 0x16
_FORM_SEC_OFFSET = 0x17
_FORM_EXPRLOC = 0x18
_FORM_FLAG_PRESENT = 0x19
_FORM_STRX = 0x1A
_FORM_ADDRX = 0x1B
_FORM_REF_SUP4 = 0x1C
_FORM_STRP_SUP = 0x1D
_FORM_DATA16 = 0x1E
_FORM_LINE_STRP = 0x1F
_FORM_REF_SIG8 = 0x20
_FORM_IMPLICIT_CONST = 0x21
_FORM_LOCLISTX = 0x22
_FORM_RNGLISTX = 0x23
_FORM_REF_SUP8 = 0x24
_FORM_STRX1 = 0x25
_FORM_STRX2 = 0x26
_FORM_STRX3 = 0x27
_FORM_STRX4 = 0x28
_FORM_ADDRX1 = 0x29
_FORM_ADDRX2 = 0x2A
_FORM_ADDRX3 = 0x2B
_FORM_ADDRX4 = 0x2C
_FORM_GNU_ADDR_INDEX = 0x1F01
_FORM_GNU_STR_INDEX = 0x1F02
_FORM_GNU_REF_ALT = 0x1F20
_FORM_GNU_STRP_ALT = 0x1F21

_CU_RELATIVE_REFS = frozenset((_FORM_REF1, _FORM_REF2, _FORM_REF4, _FORM_REF8, _FORM_REF_UDATA))
_STRX_FORMS = frozenset((_FORM_STRX, _FORM_STRX1, _FORM_STRX2, _FORM_STRX3, _FORM_STRX4, _FORM_GNU_STR_INDEX))
_ADDRX_FORMS = frozenset((_FORM_ADDRX, _FORM_ADDRX1, _FORM_ADDRX2, _FORM_ADDRX3, _FORM_ADDRX4,
                          _FORM_GNU_ADDR_INDEX))
_ULEB_FORMS = frozenset((_FORM_UDATA, _FORM_REF_UDATA, _FORM_STRX, _FORM_ADDRX, _FORM_LOCLISTX, _FORM_RNGLISTX,
                         _FORM_GNU_ADDR_INDEX, _FORM_GNU_STR_INDEX))
_UNSIGNED_SIZES = {
    _FORM_DATA1: 1, _FORM_REF1: 1, _FORM_FLAG: 1, _FORM_STRX1: 1, _FORM_ADDRX1: 1,
    _FORM_DATA2: 2, _FORM_REF2: 2, _FORM_STRX2: 2, _FORM_ADDRX2: 2,
    _FORM_STRX3: 3, _FORM_ADDRX3: 3,
    _FORM_DATA4: 4, _FORM_REF4: 4, _FORM_STRX4: 4, _FORM_ADDRX4: 4, _FORM_REF_SUP4: 4,
    _FORM_DATA8: 8, _FORM_REF8: 8, _FORM_REF_SIG8: 8, _FORM_REF_SUP8: 8,
}

# Unit types (DWARF 5) and line-program content types.
_UT_COMPILE, _UT_TYPE, _UT_PARTIAL, _UT_SKELETON, _UT_SPLIT_COMPILE, _UT_SPLIT_TYPE = 1, 2, 3, 4, 5, 6
_LNCT_PATH = 1
_LNCT_DIRECTORY_INDEX = 2

# Range list entry kinds (.debug_rnglists).
_RLE_END, _RLE_BASEX, _RLE_STARTX_ENDX, _RLE_STARTX_LENGTH = 0, 1, 2, 3
_RLE_OFFSET_PAIR, _RLE_BASE, _RLE_START_END, _RLE_START_LENGTH = 4, 5, 6, 7

# File index stored for an end_sequence row (no real file has it).
_END_ROW = 0xFFFFFFFF

# Attribute sets a DIE is parsed for (a parse plan is compiled per abbreviation and set).
_PLAN_WALK = 0  # tree walks: sibling, code ranges, call site
_PLAN_NAME = 1  # function names
_PLAN_BASES = 2  # top DIE, first pass: the bases other forms are relative to
_PLAN_TOP = 3  # top DIE, second pass
_PLAN_ATTRS = (
    frozenset((_AT_SIBLING, _AT_LOW_PC, _AT_HIGH_PC, _AT_RANGES, _AT_CALL_FILE, _AT_CALL_LINE)),
    frozenset((_AT_NAME, _AT_LINKAGE_NAME, _AT_MIPS_LINKAGE_NAME, _AT_ABSTRACT_ORIGIN, _AT_SPECIFICATION)),
    frozenset((_AT_STR_OFFSETS_BASE, _AT_ADDR_BASE, _AT_RNGLISTS_BASE)),
    frozenset((_AT_STMT_LIST, _AT_COMP_DIR, _AT_LOW_PC, _AT_HIGH_PC, _AT_RANGES)),
)


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


# -- byte-level readers ----------------------------------------------------------


def _initial_length(buf: Any, pos: int, fmt: str) -> tuple[int, int, int]:
    """A DWARF unit's initial length: (length, offset size 4 or 8, position after it)."""
    (length,) = struct.unpack_from(fmt + "I", buf, pos)
    if length == 0xFFFFFFFF:  # 64-bit DWARF
        (length,) = struct.unpack_from(fmt + "Q", buf, pos + 4)
        return length, 8, pos + 12
    return length, 4, pos + 4


def _cstring_end(buf: Any, pos: int, limit: int) -> int:
    end = buf.find(b"\0", pos, limit)
    if end < 0:
        raise ElfParseError(f"unterminated string at {pos:#x}")
    return end


class _Section:
    """One DWARF section as (buffer, base, size): positions are offsets into the section."""

    __slots__ = ("buf", "base", "size", "end")

    def __init__(self, buf: Any, base: int, size: int) -> None:
        self.buf, self.base, self.size, self.end = buf, base, size, base + size

    def abs(self, offset: int) -> int:
        if not 0 <= offset < self.size:
            raise ElfParseError(f"offset {offset:#x} outside a section of {self.size:#x} bytes")
        return self.base + offset

    def cstring(self, offset: int) -> str:
        pos = self.abs(offset)
        return bytes(self.buf[pos:_cstring_end(self.buf, pos, self.end)]).decode("utf-8", "replace")


# -- abbreviations ---------------------------------------------------------------


class _Abbrev:
    """One abbreviation: tag, children flag, attribute specs and per-attribute-set parse plans."""

    __slots__ = ("tag", "has_children", "specs", "plans", "size")

    def __init__(self, tag: int, has_children: bool, specs: tuple[tuple[int, int, int], ...]) -> None:
        self.tag = tag
        self.has_children = has_children
        self.specs = specs  # (attribute, form, implicit_const)
        self.plans: list[Any] = [None, None, None, None]
        self.size: int | None = -1  # fixed byte size of the attributes, None if variable; -1 unknown

    def plan(self, unit: _Unit, which: int) -> tuple[tuple[int, int, int, int], ...]:
        """Steps (kind, attribute or byte count, form, implicit) for one attribute set.

        kind 0 skips a run of fixed-size attributes, 1 reads a wanted one, 2
        skips one of variable size.
        """
        plan = self.plans[which]
        if plan is None:
            wanted = _PLAN_ATTRS[which]
            fixed = unit.fixed_sizes
            steps: list[tuple[int, int, int, int]] = []
            run = 0
            for at, form, ic in self.specs:
                size = fixed.get(form)
                if at in wanted or form == _FORM_INDIRECT:
                    if run:
                        steps.append((0, run, 0, 0))
                        run = 0
                    steps.append((1, at, form, ic))
                elif size is not None:
                    run += size
                else:
                    if run:
                        steps.append((0, run, 0, 0))
                        run = 0
                    steps.append((2, at, form, ic))
            if run:
                steps.append((0, run, 0, 0))
            plan = self.plans[which] = tuple(steps)
        return plan

    def fixed_size(self, unit: _Unit) -> int | None:
        if self.size == -1:
            fixed = unit.fixed_sizes
            total: int | None = 0
            for _, form, _ in self.specs:
                size = fixed.get(form)
                if size is None:
                    total = None
                    break
                total += size  # type: ignore[operator]
            self.size = total
        return self.size


def _parse_abbrevs(sec: _Section, offset: int) -> dict[int, _Abbrev]:
    buf = sec.buf
    pos = sec.abs(offset)
    end = sec.end
    out: dict[int, _Abbrev] = {}
    while pos < end:
        code, pos = _uleb(buf, pos)
        if code == 0:
            break
        tag, pos = _uleb(buf, pos)
        has_children = buf[pos] != 0
        pos += 1
        specs = []
        while True:
            at, pos = _uleb(buf, pos)
            form, pos = _uleb(buf, pos)
            if at == 0 and form == 0:
                break
            ic = 0
            if form == _FORM_IMPLICIT_CONST:
                ic, pos = _sleb(buf, pos)
            specs.append((at, form, ic))
            if pos >= end:
                raise ElfParseError(f"abbreviation table at {offset:#x} runs past .debug_abbrev")
        out[code] = _Abbrev(tag, has_children, tuple(specs))
    return out


# -- units -------------------------------------------------------------------------


class _Unit:
    """One unit of .debug_info: header, abbreviations, top-DIE attributes, decoded lazily."""

    def __init__(self, dw: DwarfLines, offset: int) -> None:
        self.dw = dw
        info = dw._info
        buf = info.buf
        self.offset = offset
        self.pos0 = pos = info.abs(offset)  # absolute position of the header (CU-relative refs add to it)
        fmt = dw._endian
        length, self.offset_size, pos = _initial_length(buf, pos, fmt)
        self.end = pos + length
        if self.end > info.end:
            raise ElfParseError(f"unit at {offset:#x} runs past .debug_info")
        (self.version,) = struct.unpack_from(fmt + "H", buf, pos)
        pos += 2
        if not 2 <= self.version <= 5:
            raise ElfParseError(f"unit at {offset:#x}: DWARF version {self.version}")
        osz = "I" if self.offset_size == 4 else "Q"
        self.unit_type = _UT_COMPILE
        if self.version >= 5:
            self.unit_type, self.addr_size = buf[pos], buf[pos + 1]
            (abbrev_off,) = struct.unpack_from(fmt + osz, buf, pos + 2)
            pos += 2 + self.offset_size
            if self.unit_type in (_UT_SKELETON, _UT_SPLIT_COMPILE):
                pos += 8
            elif self.unit_type in (_UT_TYPE, _UT_SPLIT_TYPE):
                pos += 8 + self.offset_size
        else:
            (abbrev_off,) = struct.unpack_from(fmt + osz, buf, pos)
            self.addr_size = buf[pos + self.offset_size]
            pos += self.offset_size + 1
        if self.addr_size not in (1, 2, 4, 8):
            raise ElfParseError(f"unit at {offset:#x}: address size {self.addr_size}")
        self.die_pos = pos
        self.addr_fmt = fmt + {1: "B", 2: "H", 4: "I", 8: "Q"}[self.addr_size]
        self.off_fmt = fmt + osz
        self.fixed_sizes = _fixed_sizes(self.version, self.addr_size, self.offset_size)
        self.abbrevs = _parse_abbrevs(dw._abbrev, abbrev_off)
        # Bases for indexed forms, then the rest of the top DIE.
        self.str_offsets_base = 8 if self.version >= 5 else 0
        self.addr_base = 8 if self.version >= 5 else 0
        self.rnglists_base = 0
        self.top_tag = 0
        top: dict[int, tuple[int, Any]] = {}
        if pos < self.end:
            abbrev, bases, _ = self.die(pos, _PLAN_BASES)
            if abbrev is not None:
                self.top_tag = abbrev.tag
                self.str_offsets_base = bases.get(_AT_STR_OFFSETS_BASE, (0, self.str_offsets_base))[1]
                self.addr_base = bases.get(_AT_ADDR_BASE, (0, self.addr_base))[1]
                self.rnglists_base = bases.get(_AT_RNGLISTS_BASE, (0, 0))[1]
                _, top, _ = self.die(pos, _PLAN_TOP)
        self.top = top
        low = top.get(_AT_LOW_PC)
        self.base_address: int = low[1] if low else 0
        # Decoded on demand:
        self.lines: _LineTable | None = None
        self.sub_lo: array | None = None
        self.sub_hi: array = array("Q")
        self.sub_die: array = array("Q")
        self.names: dict[int, str] = {}

    # -- DIEs --------------------------------------------------------------------

    def die(self, pos: int, which: int) -> tuple[_Abbrev | None, dict[int, tuple[int, Any]], int]:
        """(abbreviation or None for a null entry, wanted attributes as {at: (form, value)}, end)."""
        buf = self.dw._info.buf
        code, pos = _uleb(buf, pos)
        if code == 0:
            return None, {}, pos
        abbrev = self.abbrevs.get(code)
        if abbrev is None:
            raise ElfParseError(f"DIE at {pos:#x}: unknown abbreviation {code}")
        vals: dict[int, tuple[int, Any]] = {}
        for kind, a, form, ic in abbrev.plan(self, which):
            if kind == 0:
                pos += a
            elif kind == 1:
                form_used = form
                if form == _FORM_INDIRECT:
                    form_used, pos = _uleb(buf, pos)
                value, pos = self.form_value(form_used, pos, ic)
                vals[a] = (form_used, value)
            else:
                pos = self.form_skip(form, pos)
        if pos > self.end:
            raise ElfParseError(f"DIE runs past the end of unit {self.offset:#x}")
        return abbrev, vals, pos

    def skip_die(self, pos: int) -> tuple[_Abbrev | None, int, int]:
        """(abbreviation, position after its attributes, sibling position or 0)."""
        buf = self.dw._info.buf
        code, pos = _uleb(buf, pos)
        if code == 0:
            return None, pos, 0
        abbrev = self.abbrevs.get(code)
        if abbrev is None:
            raise ElfParseError(f"DIE at {pos:#x}: unknown abbreviation {code}")
        size = abbrev.fixed_size(self)
        if size is not None and not abbrev.has_children:
            return abbrev, pos + size, 0
        sibling = 0
        for kind, a, form, ic in abbrev.plan(self, _PLAN_WALK):
            if kind == 0:
                pos += a
            elif kind == 1:
                form_used = form
                if form == _FORM_INDIRECT:
                    form_used, pos = _uleb(buf, pos)
                if a == _AT_SIBLING and form_used != _FORM_INDIRECT:
                    sibling, pos = self.form_value(form_used, pos, ic)
                else:
                    pos = self.form_skip(form_used, pos)
            else:
                pos = self.form_skip(form, pos)
        return abbrev, pos, sibling

    def skip_children(self, pos: int) -> int:
        """Position after the null entry closing the children list that starts at `pos`."""
        depth = 1
        end = self.end
        while depth:
            if pos >= end:
                raise ElfParseError(f"children list runs past the end of unit {self.offset:#x}")
            abbrev, pos, sibling = self.skip_die(pos)
            if abbrev is None:
                depth -= 1
            elif abbrev.has_children:
                if pos < sibling <= end:
                    pos = sibling
                else:
                    depth += 1
        return pos

    def form_value(self, form: int, pos: int, ic: int) -> tuple[Any, int]:
        buf = self.dw._info.buf
        size = _UNSIGNED_SIZES.get(form)
        if size is not None:
            value = int.from_bytes(buf[pos:pos + size], self.dw._byteorder)
            pos += size
            if form in _CU_RELATIVE_REFS:
                return self.pos0 + value, pos
            if form in _STRX_FORMS:
                return self.strx(value), pos
            if form in _ADDRX_FORMS:
                return self.addrx(value), pos
            return value, pos
        if form == _FORM_ADDR:
            return struct.unpack_from(self.addr_fmt, buf, pos)[0], pos + self.addr_size
        if form in (_FORM_SEC_OFFSET, _FORM_STRP, _FORM_LINE_STRP, _FORM_STRP_SUP, _FORM_GNU_STRP_ALT,
                    _FORM_GNU_REF_ALT) or (form == _FORM_REF_ADDR and self.version > 2):
            value = struct.unpack_from(self.off_fmt, buf, pos)[0]
            pos += self.offset_size
            if form == _FORM_STRP:
                return self.dw._debug_str.cstring(value), pos
            if form == _FORM_LINE_STRP:
                return self.dw._line_str.cstring(value), pos
            if form in (_FORM_STRP_SUP, _FORM_GNU_STRP_ALT):
                return "", pos  # in a supplementary file we do not read
            if form == _FORM_GNU_REF_ALT:
                return None, pos
            if form == _FORM_REF_ADDR:
                return self.dw._info.abs(value), pos
            return value, pos
        if form == _FORM_REF_ADDR:  # DWARF 2: address-sized
            value = struct.unpack_from(self.addr_fmt, buf, pos)[0]
            return self.dw._info.abs(value), pos + self.addr_size
        if form in _ULEB_FORMS:
            value, pos = _uleb(buf, pos)
            if form == _FORM_REF_UDATA:
                return self.pos0 + value, pos
            if form in _STRX_FORMS:
                return self.strx(value), pos
            if form in _ADDRX_FORMS:
                return self.addrx(value), pos
            return value, pos
        if form == _FORM_SDATA:
            return _sleb(buf, pos)
        if form == _FORM_STRING:
            end = _cstring_end(buf, pos, self.end)
            return bytes(buf[pos:end]).decode("utf-8", "replace"), end + 1
        if form == _FORM_IMPLICIT_CONST:
            return ic, pos
        if form == _FORM_FLAG_PRESENT:
            return 1, pos
        if form == _FORM_INDIRECT:
            real, pos = _uleb(buf, pos)
            return self.form_value(real, pos, ic)
        return None, self.form_skip(form, pos)

    def form_skip(self, form: int, pos: int) -> int:
        buf = self.dw._info.buf
        size = self.fixed_sizes.get(form)
        if size is not None:
            return pos + size
        if form in _ULEB_FORMS or form == _FORM_SDATA:
            while buf[pos] & 0x80:
                pos += 1
            return pos + 1
        if form == _FORM_STRING:
            return _cstring_end(buf, pos, self.end) + 1
        if form in (_FORM_EXPRLOC, _FORM_BLOCK):
            n, pos = _uleb(buf, pos)
            return pos + n
        if form == _FORM_BLOCK1:
            return pos + 1 + buf[pos]
        if form == _FORM_BLOCK2:
            return pos + 2 + struct.unpack_from(self.dw._endian + "H", buf, pos)[0]
        if form == _FORM_BLOCK4:
            return pos + 4 + struct.unpack_from(self.dw._endian + "I", buf, pos)[0]
        if form == _FORM_INDIRECT:
            real, pos = _uleb(buf, pos)
            return self.form_skip(real, pos)
        raise ElfParseError(f"unit {self.offset:#x}: unknown attribute form {form:#x}")

    def strx(self, index: int) -> str:
        sec = self.dw._str_offsets
        value = struct.unpack_from(self.off_fmt, sec.buf, sec.abs(self.str_offsets_base + index * self.offset_size))[0]
        return self.dw._debug_str.cstring(value)

    def addrx(self, index: int) -> int:
        sec = self.dw._addr
        return struct.unpack_from(self.addr_fmt, sec.buf, sec.abs(self.addr_base + index * self.addr_size))[0]

    # -- ranges ------------------------------------------------------------------

    def ranges(self, vals: dict[int, tuple[int, Any]]) -> list[tuple[int, int]]:
        """Code ranges of a DIE from its low_pc/high_pc or DW_AT_ranges; [] when it has none."""
        low = vals.get(_AT_LOW_PC)
        high = vals.get(_AT_HIGH_PC)
        if low is not None and high is not None:
            lo = low[1]
            form, value = high
            # DWARF 4+: a constant-class high_pc is a length, not an address.
            hi = value if form == _FORM_ADDR or form in _ADDRX_FORMS else lo + value
            return [(lo, hi)] if hi > lo else []
        rng = vals.get(_AT_RANGES)
        if rng is None:
            return []
        form, value = rng
        if self.version >= 5:
            return self._rnglist(value, form == _FORM_RNGLISTX)
        return self._ranges_v4(value)

    def _ranges_v4(self, offset: int) -> list[tuple[int, int]]:
        sec = self.dw._ranges
        if sec is None:
            return []
        buf = sec.buf
        pos = sec.abs(offset)
        pair = struct.Struct(self.addr_fmt + self.addr_fmt[1])
        step = 2 * self.addr_size
        max_addr = (1 << (8 * self.addr_size)) - 1
        base = self.base_address
        out = []
        while pos + step <= sec.end:
            lo, hi = pair.unpack_from(buf, pos)
            pos += step
            if lo == 0 and hi == 0:
                break
            if lo == max_addr:
                base = hi
                continue
            if hi > lo:
                out.append((lo + base, hi + base))
        return out

    def _rnglist(self, value: int, indexed: bool) -> list[tuple[int, int]]:
        sec = self.dw._rnglists
        if sec is None:
            return []
        buf = sec.buf
        if indexed:
            offset = self.rnglists_base + struct.unpack_from(
                self.off_fmt, buf, sec.abs(self.rnglists_base + value * self.offset_size))[0]
        else:
            offset = value
        pos = sec.abs(offset)
        afmt, asz = self.addr_fmt, self.addr_size
        base = self.base_address
        out = []
        while pos < sec.end:
            kind = buf[pos]
            pos += 1
            if kind == _RLE_END:
                break
            if kind == _RLE_OFFSET_PAIR:
                a, pos = _uleb(buf, pos)
                b, pos = _uleb(buf, pos)
                lo, hi = base + a, base + b
            elif kind == _RLE_BASE:
                base = struct.unpack_from(afmt, buf, pos)[0]
                pos += asz
                continue
            elif kind == _RLE_BASEX:
                i, pos = _uleb(buf, pos)
                base = self.addrx(i)
                continue
            elif kind == _RLE_START_END:
                lo, hi = struct.unpack_from(afmt, buf, pos)[0], struct.unpack_from(afmt, buf, pos + asz)[0]
                pos += 2 * asz
            elif kind == _RLE_START_LENGTH:
                lo = struct.unpack_from(afmt, buf, pos)[0]
                n, pos = _uleb(buf, pos + asz)
                hi = lo + n
            elif kind == _RLE_STARTX_ENDX:
                i, pos = _uleb(buf, pos)
                j, pos = _uleb(buf, pos)
                lo, hi = self.addrx(i), self.addrx(j)
            elif kind == _RLE_STARTX_LENGTH:
                i, pos = _uleb(buf, pos)
                n, pos = _uleb(buf, pos)
                lo = self.addrx(i)
                hi = lo + n
            else:
                raise ElfParseError(f"range list at {offset:#x}: unknown entry kind {kind}")
            if hi > lo:
                out.append((lo, hi))
        return out

    # -- line table ----------------------------------------------------------------

    def line_table(self) -> _LineTable:
        if self.lines is None:
            stmt = self.top.get(_AT_STMT_LIST)
            comp_dir = self.top.get(_AT_COMP_DIR)
            if stmt is None or self.dw._line is None:
                self.lines = _LineTable.empty()
            else:
                self.lines = _decode_line_program(self, stmt[1], comp_dir[1] if comp_dir else "")
        return self.lines

    # -- subprograms -------------------------------------------------------------

    def subprogram_at(self, vaddr: int) -> int | None:
        """Position of the DIE of the top-level subprogram whose code covers `vaddr`, or None."""
        if self.sub_lo is None:
            self._index_subprograms()
        lo = self.sub_lo
        i = bisect.bisect_right(lo, vaddr) - 1  # type: ignore[arg-type]
        hi = self.sub_hi
        # Subprograms do not overlap in sane output; look back a little anyway.
        for j in range(i, max(i - 8, -1), -1):
            if vaddr < hi[j]:
                return self.sub_die[j]
        return None

    def _index_subprograms(self) -> None:
        entries: list[tuple[int, int, int]] = []
        end = self.end
        abbrev, pos, _ = self.skip_die(self.die_pos)
        if abbrev is not None and abbrev.has_children:
            stack = 1  # depth below the top DIE
            while stack and pos < end:
                start = pos
                abbrev, pos, sibling = self.skip_die(pos)
                if abbrev is None:
                    stack -= 1
                    continue
                tag = abbrev.tag
                if tag == _TAG_SUBPROGRAM:
                    _, vals, _ = self.die(start, _PLAN_WALK)
                    for lo, hi in self.ranges(vals):
                        entries.append((lo, hi, start))
                if abbrev.has_children:
                    if tag in _CONTAINER_TAGS:
                        stack += 1
                    elif pos < sibling <= end:
                        pos = sibling
                    else:
                        pos = self.skip_children(pos)
        entries.sort()
        self.sub_lo = array("Q", [e[0] for e in entries])
        self.sub_hi = array("Q", [e[1] for e in entries])
        self.sub_die = array("Q", [e[2] for e in entries])

    def scope_chain(self, sub_pos: int, vaddr: int) -> list[tuple[int, bool, int, int]]:
        """(DIE position, inlined?, call_file, call_line) of the scopes covering `vaddr`, outermost first.

        Starts at the subprogram DIE at `sub_pos` and descends only into
        children whose ranges contain `vaddr` (or blocks without ranges).
        """
        abbrev, vals, pos = self.die(sub_pos, _PLAN_WALK)
        chain = [(sub_pos, False, -1, 0)]
        if abbrev is None or not abbrev.has_children:
            return chain
        end = self.end
        # One flag per open children list: was it entered because its owner covers vaddr?
        # Leaving such a list means the chain is complete.
        covering = [True]
        while covering and pos < end:
            start = pos
            abbrev, vals, pos = self.die(pos, _PLAN_WALK)
            if abbrev is None:
                if covering.pop():
                    break
                continue
            tag = abbrev.tag
            if not abbrev.has_children and tag != _TAG_INLINED_SUBROUTINE:
                continue
            if _AT_LOW_PC in vals or _AT_RANGES in vals:
                contains = any(lo <= vaddr < hi for lo, hi in self.ranges(vals))
                if contains:
                    if tag == _TAG_INLINED_SUBROUTINE:
                        cf = vals.get(_AT_CALL_FILE)
                        cl = vals.get(_AT_CALL_LINE)
                        chain.append((start, True, cf[1] if cf else -1, cl[1] if cl else 0))
                    elif tag == _TAG_SUBPROGRAM:  # a nested function: it is the physical frame
                        chain.append((start, False, -1, 0))
                    if not abbrev.has_children:
                        break  # an innermost leaf scope
                    covering.append(True)
                    continue
            elif abbrev.has_children and tag in _BLOCK_TAGS:
                covering.append(False)  # a block without ranges: look inside
                continue
            if abbrev.has_children:
                sib = vals.get(_AT_SIBLING)
                if sib is not None and pos < sib[1] <= end:
                    pos = sib[1]
                else:
                    pos = self.skip_children(pos)
        return chain

    def function_name(self, die_pos: int) -> str:
        """Linkage name along the abstract_origin/specification chain, else the first plain name."""
        name = self.names.get(die_pos)
        if name is None:
            name = self.names[die_pos] = self.dw._function_name(self, die_pos)
        return name


def _fixed_sizes(version: int, addr_size: int, offset_size: int) -> dict[int, int]:
    sizes = {
        _FORM_ADDR: addr_size, _FORM_DATA1: 1, _FORM_REF1: 1, _FORM_FLAG: 1, _FORM_STRX1: 1, _FORM_ADDRX1: 1,
        _FORM_DATA2: 2, _FORM_REF2: 2, _FORM_STRX2: 2, _FORM_ADDRX2: 2, _FORM_STRX3: 3, _FORM_ADDRX3: 3,
        _FORM_DATA4: 4, _FORM_REF4: 4, _FORM_STRX4: 4, _FORM_ADDRX4: 4, _FORM_REF_SUP4: 4,
        _FORM_DATA8: 8, _FORM_REF8: 8, _FORM_REF_SIG8: 8, _FORM_REF_SUP8: 8, _FORM_DATA16: 16,
        _FORM_STRP: offset_size, _FORM_LINE_STRP: offset_size, _FORM_SEC_OFFSET: offset_size,
        _FORM_STRP_SUP: offset_size, _FORM_GNU_REF_ALT: offset_size, _FORM_GNU_STRP_ALT: offset_size,
        _FORM_REF_ADDR: addr_size if version == 2 else offset_size,
        _FORM_FLAG_PRESENT: 0, _FORM_IMPLICIT_CONST: 0,
    }
    return sizes


# -- line programs -----------------------------------------------------------------


class _LineTable:
    """Rows of one CU's line program in program order, as flat arrays, plus sorted sequences.

    Within a sequence addresses do not decrease; sequences are indexed by
    (low, high, first row, end row) sorted by low.
    """

    __slots__ = ("addrs", "files", "lines", "seq_lo", "seq_hi", "seq_first", "seq_end", "names", "file_base")

    def __init__(self) -> None:
        self.addrs = array("Q")
        self.files = array("I")
        self.lines = array("I")
        self.seq_lo = array("Q")
        self.seq_hi = array("Q")
        self.seq_first = array("I")
        self.seq_end = array("I")
        self.names: list[str] = []
        self.file_base = 1  # DWARF < 5 numbers files from 1

    @classmethod
    def empty(cls) -> _LineTable:
        return cls()

    def row(self, vaddr: int) -> tuple[int, int] | None:
        """(file index, line) of the row covering `vaddr`, or None."""
        i = bisect.bisect_right(self.seq_lo, vaddr) - 1
        for j in range(i, max(i - 8, -1), -1):
            if vaddr < self.seq_hi[j]:
                k = bisect.bisect_right(self.addrs, vaddr, self.seq_first[j], self.seq_end[j]) - 1
                if self.files[k] == _END_ROW:
                    return None
                return self.files[k], self.lines[k]
        return None

    def file_name(self, index: int) -> str:
        i = index - self.file_base
        return self.names[i] if 0 <= i < len(self.names) else ""

    def nbytes(self) -> int:
        arrays = (self.addrs, self.files, self.lines, self.seq_lo, self.seq_hi, self.seq_first, self.seq_end)
        return sum(a.itemsize * len(a) for a in arrays) + sum(len(n) + 49 for n in self.names)


def _decode_line_program(unit: _Unit, offset: int, comp_dir: str) -> _LineTable:
    dw = unit.dw
    sec = dw._line
    buf = sec.buf
    fmt = dw._endian
    pos = sec.abs(offset)
    length, offset_size, pos = _initial_length(buf, pos, fmt)
    end = pos + length
    if end > sec.end:
        raise ElfParseError(f"line program at {offset:#x} runs past .debug_line")
    (version,) = struct.unpack_from(fmt + "H", buf, pos)
    pos += 2
    if not 2 <= version <= 5:
        raise ElfParseError(f"line program at {offset:#x}: version {version}")
    addr_size = unit.addr_size
    if version >= 5:
        addr_size = buf[pos]
        pos += 2  # address_size, segment_selector_size
    (header_length,) = struct.unpack_from(fmt + ("I" if offset_size == 4 else "Q"), buf, pos)
    pos += offset_size
    program = pos + header_length
    min_inst = buf[pos]
    pos += 1
    if version >= 4:
        pos += 1  # maximum_operations_per_instruction: VLIW only, decoded as 1
    pos += 1  # default_is_stmt
    line_base = struct.unpack_from("b", buf, pos)[0]
    line_range = buf[pos + 1]
    opcode_base = buf[pos + 2]
    pos += 3
    if line_range == 0 or opcode_base == 0:
        raise ElfParseError(f"line program at {offset:#x}: line_range {line_range}, opcode_base {opcode_base}")
    std_lengths = bytes(buf[pos:pos + opcode_base - 1])
    pos += opcode_base - 1

    table = _LineTable()
    dirs: list[str] = []
    files: list[tuple[int, str]] = []  # (directory index, name)
    if version >= 5:
        table.file_base = 0
        for target in (dirs, files):
            nformats = buf[pos]
            pos += 1
            formats = []
            for _ in range(nformats):
                ct, pos = _uleb(buf, pos)
                form, pos = _uleb(buf, pos)
                formats.append((ct, form))
            count, pos = _uleb(buf, pos)
            for _ in range(count):
                path, dir_index = "", 0
                for ct, form in formats:
                    value, pos = _line_form(unit, buf, pos, form, offset_size, end)
                    if ct == _LNCT_PATH:
                        path = value if isinstance(value, str) else ""
                    elif ct == _LNCT_DIRECTORY_INDEX and isinstance(value, int):
                        dir_index = value
                if target is dirs:
                    dirs.append(path)
                else:
                    files.append((dir_index, path))
                if pos > end:
                    raise ElfParseError(f"line program header at {offset:#x} runs past its end")
    else:
        while True:
            e = _cstring_end(buf, pos, end)
            if e == pos:
                pos += 1
                break
            dirs.append(bytes(buf[pos:e]).decode("utf-8", "replace"))
            pos = e + 1
        while True:
            e = _cstring_end(buf, pos, end)
            if e == pos:
                pos += 1
                break
            name = bytes(buf[pos:e]).decode("utf-8", "replace")
            d, pos = _uleb(buf, e + 1)
            _, pos = _uleb(buf, pos)  # mtime
            _, pos = _uleb(buf, pos)  # length
            files.append((d, name))

    _run_line_program(table, buf, program, end, min_inst, line_base, line_range, opcode_base, std_lengths,
                      addr_size, fmt, files)
    for d, name in files:
        if version >= 5:
            directory = dirs[d] if d < len(dirs) else ""
        else:
            directory = comp_dir if d == 0 else (dirs[d - 1] if d - 1 < len(dirs) else "")
        if directory and not os.path.isabs(directory) and comp_dir:
            directory = os.path.join(comp_dir, directory)
        table.names.append(os.path.join(directory, name))
    return table


def _line_form(unit: _Unit, buf: Any, pos: int, form: int, offset_size: int, end: int) -> tuple[Any, int]:
    """A value in a DWARF 5 line-program header (forms relative to .debug_line, not .debug_info)."""
    dw = unit.dw
    if form == _FORM_STRING:
        e = _cstring_end(buf, pos, end)
        return bytes(buf[pos:e]).decode("utf-8", "replace"), e + 1
    if form in (_FORM_LINE_STRP, _FORM_STRP, _FORM_SEC_OFFSET, _FORM_STRP_SUP, _FORM_GNU_STRP_ALT):
        value = struct.unpack_from(dw._endian + ("I" if offset_size == 4 else "Q"), buf, pos)[0]
        pos += offset_size
        if form == _FORM_LINE_STRP:
            return dw._line_str.cstring(value), pos
        if form == _FORM_STRP:
            return dw._debug_str.cstring(value), pos
        return "", pos
    if form == _FORM_UDATA:
        return _uleb(buf, pos)
    if form == _FORM_SDATA:
        return _sleb(buf, pos)
    size = _UNSIGNED_SIZES.get(form)
    if size is not None:
        value = int.from_bytes(buf[pos:pos + size], dw._byteorder)
        if form in _STRX_FORMS:
            return unit.strx(value), pos + size
        return value, pos + size
    if form == _FORM_STRX:
        value, pos = _uleb(buf, pos)
        return unit.strx(value), pos
    if form == _FORM_DATA16:
        return None, pos + 16
    if form in (_FORM_BLOCK, _FORM_EXPRLOC):
        n, pos = _uleb(buf, pos)
        return None, pos + n
    if form == _FORM_BLOCK1:
        return None, pos + 1 + buf[pos]
    if form == _FORM_BLOCK2:
        return None, pos + 2 + struct.unpack_from(dw._endian + "H", buf, pos)[0]
    if form == _FORM_BLOCK4:
        return None, pos + 4 + struct.unpack_from(dw._endian + "I", buf, pos)[0]
    raise ElfParseError(f"line program header: unsupported form {form:#x}")


def _run_line_program(table: _LineTable, buf: Any, pos: int, end: int, min_inst: int, line_base: int,
                      line_range: int, opcode_base: int, std_lengths: bytes, addr_size: int, fmt: str,
                      files: list[tuple[int, str]]) -> None:
    """The DWARF line-number state machine; rows go to `table`'s arrays (addresses only matter here)."""
    add_addr = table.addrs.append
    add_file = table.files.append
    add_line = table.lines.append
    # Special opcodes: address and line advance per opcode, precomputed.
    addr_adv = [0] * 256
    line_adv = [0] * 256
    for op in range(opcode_base, 256):
        adj = op - opcode_base
        addr_adv[op] = (adj // line_range) * min_inst
        line_adv[op] = line_base + adj % line_range
    const_add = addr_adv[255]
    byteorder = "little" if fmt == "<" else "big"
    seqs: list[tuple[int, int, int, int]] = []  # (low, high, first row, end row)
    seq_start = 0
    addr, file, line = 0, 1, 1
    nrows = 0
    while pos < end:
        op = buf[pos]
        pos += 1
        if op >= opcode_base:
            addr += addr_adv[op]
            line += line_adv[op]
            add_addr(addr)
            add_file(file)
            add_line(line)
            nrows += 1
        elif op == 2:  # DW_LNS_advance_pc
            b = buf[pos]
            if b < 0x80:
                pos += 1
            else:
                b, pos = _uleb(buf, pos)
            addr += b * min_inst
        elif op == 3:  # DW_LNS_advance_line
            b = buf[pos]
            if b < 0x40:
                line += b
                pos += 1
            else:
                b, pos = _sleb(buf, pos)
                line += b
        elif op == 1:  # DW_LNS_copy
            add_addr(addr)
            add_file(file)
            add_line(line)
            nrows += 1
        elif op == 0:  # extended
            n, pos = _uleb(buf, pos)
            sub_end = pos + n
            if n:
                sub = buf[pos]
                if sub == 1:  # DW_LNE_end_sequence
                    add_addr(addr)
                    add_file(_END_ROW)
                    add_line(line)
                    nrows += 1
                    if nrows - 1 > seq_start:
                        seqs.append((table.addrs[seq_start], addr, seq_start, nrows))
                    seq_start = nrows
                    addr, file, line = 0, 1, 1
                elif sub == 2:  # DW_LNE_set_address
                    addr = int.from_bytes(buf[pos + 1:sub_end], byteorder)
                elif sub == 3:  # DW_LNE_define_file (DWARF < 5)
                    e = _cstring_end(buf, pos + 1, sub_end)
                    d, _ = _uleb(buf, e + 1)
                    files.append((d, bytes(buf[pos + 1:e]).decode("utf-8", "replace")))
            pos = sub_end
        elif op == 4:  # DW_LNS_set_file
            file, pos = _uleb(buf, pos)
        elif op == 5 or op == 12:  # DW_LNS_set_column, DW_LNS_set_isa
            _, pos = _uleb(buf, pos)
        elif op == 8:  # DW_LNS_const_add_pc
            addr += const_add
        elif op == 9:  # DW_LNS_fixed_advance_pc
            addr += int.from_bytes(buf[pos:pos + 2], byteorder)
            pos += 2
        elif op in (6, 7, 10, 11):  # negate_stmt, set_basic_block, prologue_end, epilogue_begin
            pass
        else:  # an opcode this decoder does not know: skip its ULEB operands
            for _ in range(std_lengths[op - 1]):
                _, pos = _uleb(buf, pos)
    seqs.sort()
    for lo, hi, first, stop in seqs:
        table.seq_lo.append(lo)
        table.seq_hi.append(hi)
        table.seq_first.append(first)
        table.seq_end.append(stop)


# -- the file ------------------------------------------------------------------------


class DwarfLines:
    """Line tables and inline trees of one ELF file's DWARF; addresses are ELF vaddrs.

    Not thread-safe (like ElfFile): give each thread its own or lock.
    """

    def __init__(self, elf: ElfFile) -> None:
        if not elf.has_dwarf:
            raise ElfParseError(f"{elf.path}: no DWARF line information")
        self._elf = elf
        self._endian = "<" if elf.little_endian else ">"
        self._byteorder = "little" if elf.little_endian else "big"
        self.inflated_bytes = 0  # held by compressed sections decompressed (not in the ElfFile's copy)
        with elf_errors(f"{elf.path}: DWARF"):
            self._info = self._section(".debug_info", required=True)
            self._abbrev = self._section(".debug_abbrev", required=True)
            self._line = self._section(".debug_line")
            self._debug_str = self._section(".debug_str") or _Section(b"", 0, 0)
            self._line_str = self._section(".debug_line_str") or _Section(b"", 0, 0)
            self._str_offsets = self._section(".debug_str_offsets") or _Section(b"", 0, 0)
            self._addr = self._section(".debug_addr") or _Section(b"", 0, 0)
            self._ranges = self._section(".debug_ranges")
            self._rnglists = self._section(".debug_rnglists")
            self._aranges = self._section(".debug_aranges")
        self._unit_offsets: list[int] | None = None
        self._cu_starts: list[int] = []
        self._cu_ranges: list[tuple[int, int, int]] = []  # (start, end, unit offset), sorted
        self._units: OrderedDict[int, _Unit] = OrderedDict()

    def _section(self, name: str, required: bool = False) -> _Section | None:
        sec = self._elf.section(name) or self._elf.section(".z" + name[1:])
        if sec is None or sec["sh_type"] == "SHT_NOBITS":
            if required:
                raise ElfParseError(f"{self._elf.path}: no {name}")
            return None
        image = self._elf.image
        compressed = sec["sh_flags"] & 0x800 or sec.name.startswith(".z")  # SHF_COMPRESSED, GNU .zdebug
        offset, size = sec["sh_offset"], sec["sh_size"]
        if compressed or offset + size > len(image):
            data = self._elf.section_data(sec)
            self.inflated_bytes += len(data)
            return _Section(data, 0, len(data))
        self._elf.ensure(offset, size)
        return _Section(image, offset, size)

    # -- public ----------------------------------------------------------------

    def lookup(self, vaddr: int) -> SourceLine | None:
        """The line-table row covering `vaddr`, or None. Raises ElfParseError on corrupt DWARF."""
        with elf_errors(f"{self._elf.path}: DWARF line table"):
            unit = self._unit_for(vaddr)
            if unit is None:
                return None
            table = unit.line_table()
            row = table.row(vaddr)
            if row is None:
                return None
            return SourceLine(table.file_name(row[0]), row[1])

    def frames(self, vaddr: int) -> list[InlineFrame]:
        """The call chain at `vaddr`, innermost first (what `addr2line -f -i` prints).

        Empty when DWARF knows nothing of `vaddr`; one frame with function ""
        when a line row covers it but no function DIE does (inter-function
        padding), as addr2line then takes the name from the symbol table.
        Raises ElfParseError on corrupt DWARF.
        """
        with elf_errors(f"{self._elf.path}: DWARF inline tree"):
            unit = self._unit_for(vaddr)
            if unit is None:
                return []
            sub = unit.subprogram_at(vaddr)
            row = self.lookup(vaddr)
            if sub is None:
                # Padding after a function still has line rows: keep the position,
                # leave the name to the symbol table.
                return [InlineFrame("", row.file, row.line, False)] if row else []
            chain = unit.scope_chain(sub, vaddr)
            # Drop scopes outside the innermost physical function (a nested one, rare).
            first = max(i for i, s in enumerate(chain) if not s[1])
            chain = chain[first:]
            table = unit.line_table()
            file, line = (row.file, row.line) if row else ("", 0)
            out: list[InlineFrame] = []
            for die_pos, inlined, call_file, call_line in reversed(chain):
                out.append(InlineFrame(unit.function_name(die_pos), file, line, inlined))
                # The caller's position is where this (inlined) scope was called from.
                file, line = table.file_name(call_file), call_line
            return out

    def cached_units(self) -> int:
        """How many decoded CUs are held now (at most MAX_CACHED_UNITS)."""
        return len(self._units)

    # -- CU index ----------------------------------------------------------------

    def _unit_for(self, vaddr: int) -> _Unit | None:
        if self._unit_offsets is None:
            self._build_cu_index()
        i = bisect.bisect_right(self._cu_starts, vaddr) - 1
        # Ranges of different CUs do not overlap in sane output; look back a little anyway.
        for j in range(i, max(i - 4, -1), -1):
            start, end, unit_off = self._cu_ranges[j]
            if start <= vaddr < end:
                return self._unit(unit_off)
        return None

    def _unit(self, offset: int) -> _Unit:
        unit = self._units.get(offset)
        if unit is not None:
            self._units.move_to_end(offset)
            return unit
        unit = _Unit(self, offset)
        self._units[offset] = unit
        while len(self._units) > MAX_CACHED_UNITS:
            self._units.popitem(last=False)
        return unit

    def _unit_containing(self, info_pos: int) -> _Unit:
        """The unit whose bytes hold absolute .debug_info position `info_pos` (for ref_addr)."""
        assert self._unit_offsets is not None
        off = info_pos - self._info.base
        i = bisect.bisect_right(self._unit_offsets, off) - 1
        if i < 0:
            raise ElfParseError(f"reference {off:#x} before the first unit")
        return self._unit(self._unit_offsets[i])

    def _build_cu_index(self) -> None:
        info = self._info
        buf = info.buf
        fmt = self._endian
        offsets: list[int] = []
        pos = info.base
        while pos + 11 <= info.end:  # smallest header: 4 + 2 + 4 + 1
            offsets.append(pos - info.base)
            length, _, pos = _initial_length(buf, pos, fmt)
            pos += length
        ranges: list[tuple[int, int, int]] = []
        covered = self._read_aranges(ranges)
        known = set(offsets)
        ranges = [r for r in ranges if r[2] in known]
        # Units without aranges entries (assembly, clang): ask their top DIE.
        for off in offsets:
            if off in covered:
                continue
            unit = _Unit(self, off)
            if unit.top_tag == 0 or unit.unit_type not in (_UT_COMPILE, _UT_PARTIAL, _UT_SKELETON):
                continue
            for lo, hi in unit.ranges(unit.top):
                ranges.append((lo, hi, off))
        ranges.sort()
        self._cu_ranges = ranges
        self._cu_starts = [r[0] for r in ranges]
        self._unit_offsets = offsets

    def _read_aranges(self, out: list[tuple[int, int, int]]) -> set[int]:
        sec = self._aranges
        covered: set[int] = set()
        if sec is None:
            return covered
        buf = sec.buf
        fmt = self._endian
        pos = sec.base
        while pos + 16 <= sec.end:
            start = pos
            length, osz, pos = _initial_length(buf, pos, fmt)
            set_end = pos + length
            if set_end > sec.end:
                raise ElfParseError(".debug_aranges set runs past its section")
            pos += 2  # version
            (info_off,) = struct.unpack_from(fmt + ("I" if osz == 4 else "Q"), buf, pos)
            pos += osz
            addr_size, seg_size = buf[pos], buf[pos + 1]
            pos += 2
            if addr_size not in (4, 8):
                raise ElfParseError(f".debug_aranges: address size {addr_size}")
            tuple_size = 2 * addr_size + seg_size
            rem = (pos - start) % tuple_size
            if rem:
                pos += tuple_size - rem
            tfmt = fmt + ("Q" if addr_size == 8 else "I")
            while pos + tuple_size <= set_end:
                addr = struct.unpack_from(tfmt, buf, pos + seg_size)[0]
                n = struct.unpack_from(tfmt, buf, pos + seg_size + addr_size)[0]
                pos += tuple_size
                if addr == 0 and n == 0:
                    break
                if n:
                    out.append((addr, addr + n, info_off))
                    covered.add(info_off)
            pos = set_end
        return covered

    # -- names -------------------------------------------------------------------

    def _function_name(self, unit: _Unit, die_pos: int) -> str:
        plain = ""
        for _ in range(_MAX_NAME_HOPS):  # bounded: a corrupt file could make the chain a cycle
            if not unit.pos0 <= die_pos < unit.end:
                unit = self._unit_containing(die_pos)
            abbrev, vals, _ = unit.die(die_pos, _PLAN_NAME)
            if abbrev is None:
                break
            for key in (_AT_LINKAGE_NAME, _AT_MIPS_LINKAGE_NAME):
                if key in vals and isinstance(vals[key][1], str):
                    return vals[key][1]
            if not plain and _AT_NAME in vals and isinstance(vals[_AT_NAME][1], str):
                plain = vals[_AT_NAME][1]
            ref = vals.get(_AT_ABSTRACT_ORIGIN) or vals.get(_AT_SPECIFICATION)
            if ref is None or not isinstance(ref[1], int):
                break
            die_pos = ref[1]
        return plain
