"""Call-frame information (.eh_frame, .debug_frame) -> a compact x86-64 unwind table.

The unwinder needs, for any PC, three facts: where the caller's stack pointer
(the CFA) is, where the return address is, and where the caller's RBP is.
This module runs every FDE's CFA program once per build id and keeps only
those facts, as sorted rows in flat arrays (array module, no per-row
objects), looked up by bisection:

    row i holds for pcs[i] <= vaddr < pcs[i+1]
    kinds[i]     CfaKind: how to compute the CFA (or why we cannot)
    cfa_offs[i]  the offset in that rule
    rbp_offs[i]  RBP_SAME, RBP_LOST, or the (negative) offset from the CFA
                 at which the caller's RBP is saved; for PLT rows the
                 threshold of the PLT expression, for SIGNAL rows the offset
                 of the saved RBP from RSP.

The return address is at CFA-8 on x86-64 (the CALL pushed it); rows whose
CFI says otherwise become UNSUPPORTED, rows whose RA is DW_CFA_undefined
(_start, clone, thread start) become OUTERMOST. Gaps between FDEs are NONE
rows: the unwinder falls back to frame pointers there.

Recognised CFA expressions (everything else is UNSUPPORTED, never guessed):
  PLT       DW_OP_breg7 N; breg16 0; lit15; and; litT; ge; lit3; shl; plus
            -> CFA = RSP + N + (8 if (RIP & 15) >= T else 0)   (ld's .plt)
  SIGNAL    in an FDE with augmentation 'S' (glibc's __restore_rt):
            CFA = [RSP + N] (breg7 N; deref), RIP at RSP+N+8 and RBP at
            RSP+M by DW_CFA_expression breg7 -- the kernel's rt_sigframe.
  DEREF_*   DW_OP_breg7/breg6 N; deref -> CFA = [RSP/RBP + N] (stack-realigning
            prologues, e.g. main at -O0 -mstackrealign).

Pointer encodings: absptr, uleb128, udata2/4/8, sleb128, sdata2/4/8, applied
as absolute, pcrel, textrel, datarel (relative to .got), aligned; indirect is
accepted for personality pointers (whose value we never need). CIE
augmentations z, R, P, L, S (and unknown letters after 'z', skipped by the
augmentation length); .debug_frame CIE versions 1, 3 and 4; 32- and 64-bit
DWARF lengths.

Any structural corruption (a length past the section, a CIE pointer to
nowhere, a truncated operand) raises ElfParseError; an FDE whose program has
an opcode we do not know is kept as UNSUPPORTED over its range and counted.

Measured (Python 3.11, this 2-CPU VM, one core; bench/unwind_speed.py --tables
prints them):
  libc.so.6            1.9 MB,  3,713 FDEs,  28k rows, 0.5 MB of arrays,  46 ms CPU
  libstdc++.so.6       2.2 MB,  4,867 FDEs,  34k rows, 0.6 MB,            57 ms
  /usr/bin/python3.11  6.8 MB, 10,221 FDEs,  65k rows, 1.1 MB,           113 ms
  /usr/bin/node       99 MB,   75,922 FDEs, 372k rows, 6.3 MB,           740 ms
(17 bytes a row.) A table is built on first use per build id and kept on
disk by symbolizer/unwind_cache.py, so the next capture reads it back in a
few hundred microseconds instead of building it again.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import threading
from array import array
from bisect import bisect_right
from enum import IntEnum
from typing import NamedTuple

from symbolizer.elf import PT_GNU_EH_FRAME, ElfFile, elf_errors
from symbolizer.errors import ElfParseError
from symbolizer.leb128 import sleb128 as _sleb
from symbolizer.leb128 import uleb128 as _uleb

__all__ = ["RBP_LOST", "RBP_SAME", "CfaKind", "FdeIndex", "UnwindRow", "UnwindTable", "parse_cfi"]

# DWARF register numbers on x86-64 (System V psABI, "DWARF Register Number Mapping").
REG_RBP = 6
REG_RSP = 7
REG_RA = 16


class CfaKind(IntEnum):
    """How a row computes the CFA (the caller's RSP), or why it cannot."""

    NONE = 0  # no FDE covers the pc: frame-pointer fallback
    RSP = 1  # CFA = RSP + off
    RBP = 2  # CFA = RBP + off
    PLT = 3  # CFA = RSP + off + (8 if (RIP & 15) >= threshold else 0)
    SIGNAL = 4  # rt_sigframe: RSP at [RSP+off], RIP at [RSP+off+8], RBP at [RSP+rbp_off]
    OUTERMOST = 5  # RA is undefined: the first frame of a thread
    DEREF_RSP = 6  # CFA = [RSP + off]
    DEREF_RBP = 7  # CFA = [RBP + off]
    UNSUPPORTED = 8  # CFA on another register, an unknown expression, RA not at CFA-8


# rbp_offs sentinels. A saved slot is 8-aligned and below the CFA, so neither
# 0 nor 1 can be a real offset.
RBP_SAME = 0  # the caller's RBP is this frame's RBP (not yet pushed, or restored)
RBP_LOST = 1  # RBP is saved somewhere we do not model (another register, an expression)

# DW_CFA opcodes (DWARF 5, section 6.4.2; GNU extensions).
_ADVANCE_LOC, _OFFSET, _RESTORE = 0x40, 0x80, 0xC0
_NOP, _SET_LOC, _ADV1, _ADV2, _ADV4 = 0x00, 0x01, 0x02, 0x03, 0x04
_OFFSET_EXT, _RESTORE_EXT, _UNDEFINED, _SAME_VALUE, _REGISTER = 0x05, 0x06, 0x07, 0x08, 0x09
_REMEMBER, _RESTORE_STATE, _DEF_CFA, _DEF_CFA_REG, _DEF_CFA_OFF = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
_DEF_CFA_EXPR, _EXPRESSION, _OFFSET_EXT_SF, _DEF_CFA_SF, _DEF_CFA_OFF_SF = 0x0F, 0x10, 0x11, 0x12, 0x13
_VAL_OFFSET, _VAL_OFFSET_SF, _VAL_EXPRESSION = 0x14, 0x15, 0x16
_GNU_WINDOW_SAVE, _GNU_ARGS_SIZE, _GNU_NEG_OFFSET_EXT = 0x2D, 0x2E, 0x2F

# DW_EH_PE pointer encodings (LSB "Linux Standard Base Core", .eh_frame).
_PE_OMIT = 0xFF
_PE_INDIRECT = 0x80
_PE_PCREL, _PE_TEXTREL, _PE_DATAREL, _PE_FUNCREL, _PE_ALIGNED = 0x10, 0x20, 0x30, 0x40, 0x50
_PE_FIXED = {0x02: (2, "<H"), 0x03: (4, "<I"), 0x04: (8, "<Q"), 0x0A: (2, "<h"), 0x0B: (4, "<i"),
             0x0C: (8, "<q"), 0x00: (8, "<Q")}

# Register rules we track (only RBP and RA matter to the unwinder).
_R_SAME, _R_OFF, _R_UNDEF, _R_EXPR_RSP, _R_OTHER = 0, 1, 2, 3, 4
# CFA register value meaning "the CFA is an expression" (kind in cfa_expr).
_CFA_IS_EXPR = -1

# DW_OP values for the expressions we recognise.
_OP_DEREF, _OP_AND, _OP_SHL, _OP_PLUS, _OP_GE = 0x06, 0x1A, 0x24, 0x22, 0x2A
_OP_LIT0, _OP_BREG0 = 0x30, 0x70

# An FDE program longer than this many rows is corrupt (real ones have tens).
_MAX_ROWS_PER_FDE = 1 << 20


class UnwindRow(NamedTuple):
    """The rule at one pc: see the module docstring for the meaning of the offsets."""

    kind: CfaKind
    cfa_off: int
    rbp_off: int


class _Cie(NamedTuple):
    code_align: int
    data_align: int
    ra_reg: int
    fde_enc: int
    has_z: bool
    signal: bool
    addr_size: int
    init_start: int
    init_end: int


class _Section(NamedTuple):
    data: bytes
    vaddr: int  # sh_addr: the base of pcrel pointers
    is_eh: bool  # .eh_frame rules (relative CIE pointers, CIE id 0, encodings)


class _Parser:
    """Decodes one CFI section into per-FDE row runs (appended to shared arrays)."""

    def __init__(self, sec: _Section, text_vaddr: int, data_vaddr: int, out: _Rows) -> None:
        self.buf = sec.data
        self.base = sec.vaddr
        self.eh = sec.is_eh
        self.text_vaddr = text_vaddr
        self.data_vaddr = data_vaddr
        self.out = out
        self.cies: dict[int, _Cie] = {}
        self.cie_states: dict[int, tuple[int, ...]] = {}
        self.unsupported_fdes = 0

    def pointer(self, pos: int, enc: int) -> tuple[int, int]:
        """Decode a DW_EH_PE-encoded pointer at pos -> (value, next pos)."""
        if enc == _PE_OMIT:
            return 0, pos
        app = enc & 0x70
        if app == _PE_ALIGNED:
            pos = (pos + 7) & ~7
        fmt = enc & 0x0F
        buf = self.buf
        if fmt == 0x01:
            val, npos = _uleb(buf, pos)
        elif fmt == 0x09:
            val, npos = _sleb(buf, pos)
        else:
            spec = _PE_FIXED.get(fmt)
            if spec is None:
                raise ElfParseError(f"unknown pointer encoding {enc:#x}")
            val = struct.unpack_from(spec[1], buf, pos)[0]
            npos = pos + spec[0]
        if app == _PE_PCREL:
            val += self.base + pos
        elif app == _PE_TEXTREL:
            val += self.text_vaddr
        elif app == _PE_DATAREL:
            val += self.data_vaddr
        elif app not in (0, _PE_ALIGNED, _PE_FUNCREL):
            raise ElfParseError(f"unknown pointer application {enc:#x}")
        return val & 0xFFFFFFFFFFFFFFFF, npos

    def range_value(self, pos: int, enc: int) -> tuple[int, int]:
        """An FDE's pc_range: the encoding's format, never its application."""
        return self.pointer(pos, enc & 0x0F)

    def run(self) -> None:
        buf = self.buf
        size = len(buf)
        pos = 0
        while pos + 4 <= size:
            start = pos
            length = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
            if length == 0:
                if self.eh:
                    break  # the terminator (crtend.o's zero word)
                continue
            dwarf64 = length == 0xFFFFFFFF
            if dwarf64:
                length = struct.unpack_from("<Q", buf, pos)[0]
                pos += 8
            end = pos + length
            if end > size or length < 4:
                raise ElfParseError(f"CFI entry at {start:#x} runs past its section")
            id_pos = pos
            if dwarf64:
                cie_id = struct.unpack_from("<Q", buf, pos)[0]
                pos += 8
                is_cie = cie_id == 0 if self.eh else cie_id == 0xFFFFFFFFFFFFFFFF
            else:
                cie_id = struct.unpack_from("<I", buf, pos)[0]
                pos += 4
                is_cie = cie_id == 0 if self.eh else cie_id == 0xFFFFFFFF
            if is_cie:
                self.cie(start, pos, end)
            else:
                cie_off = id_pos - cie_id if self.eh else cie_id
                self.fde(cie_off, pos, end)
            pos = end

    def cie(self, start: int, pos: int, end: int) -> _Cie:
        cached = self.cies.get(start)
        if cached is not None:
            return cached
        buf = self.buf
        version = buf[pos]
        pos += 1
        if version not in (1, 3, 4):
            raise ElfParseError(f"CIE at {start:#x}: version {version}")
        nul = buf.find(b"\0", pos, end)  # find, not index: buf may be a file image (mmap)
        if nul < 0:
            raise ElfParseError(f"CIE at {start:#x}: augmentation string runs past its end")
        aug = buf[pos:nul].decode("latin-1")
        pos = nul + 1
        addr_size = 8
        if version == 4:
            addr_size = buf[pos]
            pos += 2  # address_size, segment_selector_size
            if addr_size not in (4, 8):
                raise ElfParseError(f"CIE at {start:#x}: address size {addr_size}")
        if aug.startswith("eh"):
            raise ElfParseError(f"CIE at {start:#x}: pre-GCC-3 'eh' augmentation")
        code_align, pos = _uleb(buf, pos)
        data_align, pos = _sleb(buf, pos)
        if version == 1:
            ra_reg = buf[pos]
            pos += 1
        else:
            ra_reg, pos = _uleb(buf, pos)
        fde_enc = 0x00  # absptr unless 'R' says otherwise
        has_z = aug.startswith("z")
        signal = "S" in aug
        if has_z:
            aug_len, pos = _uleb(buf, pos)
            aug_end = pos + aug_len
            p = pos
            for ch in aug[1:]:
                if ch == "R":
                    fde_enc = buf[p]
                    p += 1
                elif ch == "L":
                    p += 1
                elif ch == "P":
                    penc = buf[p] & ~_PE_INDIRECT  # the personality is never dereferenced
                    _, p = self.pointer(p + 1, penc)
                elif ch in "SBG":
                    continue
                else:
                    break  # unknown letter: the length lets us skip the rest
            pos = aug_end
        elif aug:
            raise ElfParseError(f"CIE at {start:#x}: unknown augmentation {aug!r}")
        if pos > end:
            raise ElfParseError(f"CIE at {start:#x}: header runs past its end")
        if not self.eh and addr_size == 4:
            fde_enc = 0x03
        c = _Cie(code_align, data_align, ra_reg, fde_enc, has_z, signal, addr_size, pos, end)
        self.cies[start] = c
        return c

    def fde(self, cie_off: int, pos: int, end: int) -> None:
        buf = self.buf
        if not 0 <= cie_off < len(buf) - 8:
            raise ElfParseError(f"FDE at {pos:#x}: CIE pointer out of range")
        cie = self.cies.get(cie_off)
        if cie is None:  # a CIE after its FDE: legal, if unusual
            length = struct.unpack_from("<I", buf, cie_off)[0]
            p = cie_off + 4
            wide = length == 0xFFFFFFFF
            if wide:
                length = struct.unpack_from("<Q", buf, p)[0]
                p += 8
            cend = p + length
            cid = struct.unpack_from("<Q" if wide else "<I", buf, p)[0]
            p += 8 if wide else 4
            want = 0 if self.eh else (0xFFFFFFFFFFFFFFFF if wide else 0xFFFFFFFF)
            if cid != want or cend > len(buf):
                raise ElfParseError(f"FDE at {pos:#x}: CIE pointer to a non-CIE")
            cie = self.cie(cie_off, p, cend)
        begin, pos = self.pointer(pos, cie.fde_enc)
        pc_range, pos = self.range_value(pos, cie.fde_enc)
        if cie.has_z:
            aug_len, pos = _uleb(buf, pos)
            pos += aug_len
        if pos > end:
            raise ElfParseError(f"FDE at {pos:#x}: header runs past its end")
        if begin + pc_range >= 1 << 64:
            raise ElfParseError(f"FDE at {pos:#x}: range past the end of the address space")
        if pc_range == 0 or begin == 0:
            return  # a discarded function (gc-sections / COMDAT): covers nothing
        out = self.out
        i0 = len(out.pcs)
        try:
            init = self.cie_states.get(cie_off)
            if init is None:
                init = _execute(self, cie, cie.init_start, cie.init_end, 0, 0, 1 << 64, None, None)
                self.cie_states[cie_off] = init
            _execute(self, cie, pos, end, begin, begin, begin + pc_range, init, out)
        except _Unsupported:
            del out.pcs[i0:], out.kinds[i0:], out.cfa[i0:], out.rbp[i0:]
            out.add(begin, CfaKind.UNSUPPORTED, 0, RBP_LOST)
            self.unsupported_fdes += 1
        out.fdes.append((begin, begin + pc_range, i0, len(out.pcs), out.priority))


class _Unsupported(Exception):
    """An opcode or operand we do not model: the whole FDE becomes UNSUPPORTED."""


class _Rows:
    """Row arrays shared by the parsers of one file, plus the FDE runs into them."""

    def __init__(self) -> None:
        self.pcs = array("Q")
        self.kinds = array("B")
        self.cfa = array("i")
        self.rbp = array("i")
        self.fdes: list[tuple[int, int, int, int, int]] = []  # begin, end, i0, i1, priority
        self.priority = 0

    def add(self, pc: int, kind: int, cfa_off: int, rbp_off: int) -> None:
        self.pcs.append(pc)
        self.kinds.append(kind)
        self.cfa.append(cfa_off)
        self.rbp.append(rbp_off)


def _classify(cie: _Cie, cfa_reg: int, cfa_off: int, cfa_expr: int, cfa_extra: int,
              rbp_k: int, rbp_v: int, ra_k: int, ra_v: int) -> tuple[int, int, int]:
    """Reduce a full rule set to (kind, cfa_off, rbp_off)."""
    if ra_k == _R_UNDEF:
        return CfaKind.OUTERMOST, 0, 0
    if cie.signal:
        if (cfa_reg == _CFA_IS_EXPR and cfa_expr == CfaKind.DEREF_RSP and ra_k == _R_EXPR_RSP
                and ra_v == cfa_off + 8 and rbp_k == _R_EXPR_RSP):
            return CfaKind.SIGNAL, cfa_off, rbp_v
        return CfaKind.UNSUPPORTED, 0, RBP_LOST
    if ra_k != _R_OFF or ra_v != -8:
        return CfaKind.UNSUPPORTED, 0, RBP_LOST
    if cfa_reg == REG_RSP:
        kind = CfaKind.RSP
    elif cfa_reg == REG_RBP:
        kind = CfaKind.RBP
    elif cfa_reg == _CFA_IS_EXPR:
        kind = cfa_expr
        if kind == CfaKind.PLT:
            return kind, cfa_off, cfa_extra
    else:
        return CfaKind.UNSUPPORTED, 0, RBP_LOST
    if rbp_k == _R_SAME:
        rbp = RBP_SAME
    elif rbp_k == _R_OFF and rbp_v & 7 == 0 and rbp_v < 0:
        rbp = rbp_v
    else:
        rbp = RBP_LOST
    return kind, cfa_off, rbp


def _cfa_expression(block: bytes) -> tuple[int, int, int]:
    """(CfaKind, offset, extra) of a DW_CFA_def_cfa_expression block."""
    if len(block) >= 2 and block[0] in (_OP_BREG0 + REG_RSP, _OP_BREG0 + REG_RBP):
        off, p = _sleb(block, 1)
        rest = block[p:]
        if rest == bytes((_OP_DEREF,)):
            return (CfaKind.DEREF_RSP if block[0] == _OP_BREG0 + REG_RSP else CfaKind.DEREF_RBP), off, 0
        if (block[0] == _OP_BREG0 + REG_RSP and len(rest) == 9 and rest[:4] == b"\x80\x00\x3f\x1a"
                and _OP_LIT0 <= rest[4] < _OP_LIT0 + 32 and rest[5:] == b"\x2a\x33\x24\x22"):
            return CfaKind.PLT, off, rest[4] - _OP_LIT0
    return CfaKind.UNSUPPORTED, 0, 0


def _reg_expression(block: bytes) -> tuple[int, int]:
    """Rule of a DW_CFA_expression block: (_R_EXPR_RSP, off) for `breg7 off`, else other."""
    if len(block) >= 2 and block[0] == _OP_BREG0 + REG_RSP:
        off, p = _sleb(block, 1)
        if p == len(block):
            return _R_EXPR_RSP, off
    return _R_OTHER, 0


def _execute(parser: _Parser, cie: _Cie, pos: int, end: int, loc: int, begin: int, pc_end: int,
             init: tuple[int, ...] | None, out: _Rows | None) -> tuple[int, ...]:
    """Run a CFA program. Without `out` (a CIE's initial instructions) return the state.

    State: cfa_reg, cfa_off, cfa_expr, cfa_extra, rbp_k, rbp_v, ra_k, ra_v.
    Only RBP and the RA column are tracked; other registers' operands are skipped.
    """
    buf = parser.buf
    caf = cie.code_align
    daf = cie.data_align
    ra_reg = cie.ra_reg
    if init is None:
        cfa_reg, cfa_off, cfa_expr, cfa_extra = REG_RSP, 0, 0, 0
        rbp_k, rbp_v, ra_k, ra_v = _R_SAME, 0, _R_SAME, 0
    else:
        cfa_reg, cfa_off, cfa_expr, cfa_extra, rbp_k, rbp_v, ra_k, ra_v = init
    stack: list[tuple[int, ...]] = []
    last: tuple[int, int, int] | None = None
    rows = 0

    def emit() -> None:
        nonlocal last, rows
        row = _classify(cie, cfa_reg, cfa_off, cfa_expr, cfa_extra, rbp_k, rbp_v, ra_k, ra_v)
        if row != last and loc < pc_end:
            assert out is not None
            if rows and out.pcs[-1] == loc:
                out.kinds[-1], out.cfa[-1], out.rbp[-1] = row  # same pc: the later rule wins
            else:
                out.add(loc, *row)
            last = row
            rows += 1
            if rows > _MAX_ROWS_PER_FDE:
                raise ElfParseError("FDE program too long")

    def set_reg(reg: int, kind: int, val: int) -> None:
        nonlocal rbp_k, rbp_v, ra_k, ra_v
        if reg == REG_RBP:
            rbp_k, rbp_v = kind, val
        elif reg == ra_reg:
            ra_k, ra_v = kind, val

    def restore_reg(reg: int) -> None:
        if init is None:
            set_reg(reg, _R_SAME, 0)
        elif reg == REG_RBP:
            set_reg(reg, init[4], init[5])
        elif reg == ra_reg:
            set_reg(reg, init[6], init[7])

    while pos < end:
        op = buf[pos]
        pos += 1
        hi = op & 0xC0
        if hi == _ADVANCE_LOC:
            if out is not None:
                emit()
            loc += (op & 0x3F) * caf
            continue
        if hi == _OFFSET:
            reg = op & 0x3F
            b = buf[pos]
            if b < 0x80:
                pos += 1
            else:
                b, pos = _uleb(buf, pos)
            set_reg(reg, _R_OFF, b * daf)
            continue
        if hi == _RESTORE:
            restore_reg(op & 0x3F)
            continue
        if op == _DEF_CFA_OFF:
            cfa_off, pos = _uleb(buf, pos)
        elif op == _NOP:
            pass
        elif op == _ADV1 or op == _ADV2 or op == _ADV4:
            if out is not None:
                emit()
            if op == _ADV1:
                delta = buf[pos]
                pos += 1
            elif op == _ADV2:
                delta = struct.unpack_from("<H", buf, pos)[0]
                pos += 2
            else:
                delta = struct.unpack_from("<I", buf, pos)[0]
                pos += 4
            loc += delta * caf
        elif op == _SET_LOC:
            if out is not None:
                emit()
            if parser.eh:
                new, pos = parser.pointer(pos, cie.fde_enc)
            else:
                new = struct.unpack_from("<Q" if cie.addr_size == 8 else "<I", buf, pos)[0]
                pos += cie.addr_size
            if new < loc:
                raise ElfParseError("DW_CFA_set_loc goes backwards")
            loc = new
        elif op == _DEF_CFA:
            cfa_reg, pos = _uleb(buf, pos)
            cfa_off, pos = _uleb(buf, pos)
        elif op == _DEF_CFA_SF:
            cfa_reg, pos = _uleb(buf, pos)
            cfa_off, pos = _sleb(buf, pos)
            cfa_off *= daf
        elif op == _DEF_CFA_REG:
            cfa_reg, pos = _uleb(buf, pos)
        elif op == _DEF_CFA_OFF_SF:
            cfa_off, pos = _sleb(buf, pos)
            cfa_off *= daf
        elif op == _DEF_CFA_EXPR:
            n, pos = _uleb(buf, pos)
            cfa_expr, cfa_off, cfa_extra = _cfa_expression(bytes(buf[pos:pos + n]))
            cfa_reg = _CFA_IS_EXPR
            pos += n
        elif op == _OFFSET_EXT or op == _VAL_OFFSET:
            reg, pos = _uleb(buf, pos)
            n, pos = _uleb(buf, pos)
            set_reg(reg, _R_OFF if op == _OFFSET_EXT else _R_OTHER, n * daf)
        elif op == _OFFSET_EXT_SF or op == _VAL_OFFSET_SF:
            reg, pos = _uleb(buf, pos)
            n, pos = _sleb(buf, pos)
            set_reg(reg, _R_OFF if op == _OFFSET_EXT_SF else _R_OTHER, n * daf)
        elif op == _GNU_NEG_OFFSET_EXT:
            reg, pos = _uleb(buf, pos)
            n, pos = _uleb(buf, pos)
            set_reg(reg, _R_OFF, -n * daf)
        elif op == _RESTORE_EXT:
            reg, pos = _uleb(buf, pos)
            restore_reg(reg)
        elif op == _UNDEFINED:
            reg, pos = _uleb(buf, pos)
            set_reg(reg, _R_UNDEF, 0)
        elif op == _SAME_VALUE:
            reg, pos = _uleb(buf, pos)
            set_reg(reg, _R_SAME, 0)
        elif op == _REGISTER:
            reg, pos = _uleb(buf, pos)
            _, pos = _uleb(buf, pos)
            set_reg(reg, _R_OTHER, 0)
        elif op == _EXPRESSION or op == _VAL_EXPRESSION:
            reg, pos = _uleb(buf, pos)
            n, pos = _uleb(buf, pos)
            if op == _EXPRESSION:
                set_reg(reg, *_reg_expression(bytes(buf[pos:pos + n])))
            else:
                set_reg(reg, _R_OTHER, 0)
            pos += n
        elif op == _REMEMBER:
            stack.append((cfa_reg, cfa_off, cfa_expr, cfa_extra, rbp_k, rbp_v, ra_k, ra_v))
        elif op == _RESTORE_STATE:
            if not stack:
                raise ElfParseError("DW_CFA_restore_state without remember_state")
            cfa_reg, cfa_off, cfa_expr, cfa_extra, rbp_k, rbp_v, ra_k, ra_v = stack.pop()
        elif op == _GNU_ARGS_SIZE:
            _, pos = _uleb(buf, pos)
        else:
            raise _Unsupported(f"DW_CFA opcode {op:#x}")
    if pos > end:
        raise ElfParseError("CFA program runs past its entry")
    if out is not None:
        emit()
    return (cfa_reg, cfa_off, cfa_expr, cfa_extra, rbp_k, rbp_v, ra_k, ra_v)


class UnwindTable:
    """Sorted unwind rows of one file, keyed by ELF vaddr. Read-only once built.

    `lookup(vaddr)` is a bisection plus three array reads. The arrays are
    public (`pcs`, `kinds`, `cfa_offs`, `rbp_offs`) so the unwinder's hot
    loop can index them without a call.
    """

    __slots__ = ("cfa_offs", "fde_count", "kinds", "pcs", "rbp_offs", "sources", "unsupported_fdes")

    def __init__(self, pcs: array, kinds: array, cfa_offs: array, rbp_offs: array,
                 fde_count: int = 0, unsupported_fdes: int = 0, sources: tuple[str, ...] = ()) -> None:
        self.pcs = pcs
        self.kinds = kinds
        self.cfa_offs = cfa_offs
        self.rbp_offs = rbp_offs
        self.fde_count = fde_count
        self.unsupported_fdes = unsupported_fdes
        self.sources = sources

    def lookup(self, vaddr: int) -> UnwindRow:
        """The rule at `vaddr`; kind NONE when no FDE covers it."""
        i = bisect_right(self.pcs, vaddr) - 1
        if i < 0:
            return UnwindRow(CfaKind.NONE, 0, RBP_SAME)
        return UnwindRow(CfaKind(self.kinds[i]), self.cfa_offs[i], self.rbp_offs[i])

    def __len__(self) -> int:
        return len(self.pcs)

    @property
    def nbytes(self) -> int:
        """Memory held by the row arrays."""
        return sum(a.itemsize * len(a) for a in (self.pcs, self.kinds, self.cfa_offs, self.rbp_offs))

    @classmethod
    def from_elf(cls, elf: ElfFile) -> UnwindTable:
        """Build the table of an ELF file from .eh_frame and .debug_frame.

        Where both describe a pc, .eh_frame wins (it is what the C++ runtime
        itself unwinds with). Raises ElfParseError on corrupt CFI or a
        non-x86-64 file.
        """
        return cfi_inputs(elf).parse()


class CfiInputs(NamedTuple):
    """Everything a file's UnwindTable is built from: its CFI sections' bytes and two addresses."""

    path: str
    sections: list[_Section]
    text_vaddr: int
    got_vaddr: int

    def digest(self) -> str:
        """Equal digests build equal tables: the disk cache's key (a build id can be copied into any file)."""
        h = hashlib.sha256(struct.pack("<QQ", self.text_vaddr, self.got_vaddr))
        for sec in self.sections:
            h.update(struct.pack("<?QQ", sec.is_eh, sec.vaddr, len(sec.data)))
            h.update(sec.data)
        return h.hexdigest()

    def parse(self) -> UnwindTable:
        """The table (ElfParseError on corrupt CFI)."""
        with elf_errors(f"{self.path}: CFI"):
            return parse_cfi(self.sections, self.text_vaddr, self.got_vaddr)


def cfi_inputs(elf: ElfFile) -> CfiInputs:
    """The CFI sections of an x86-64 file, read but not parsed (ElfParseError on a bad or foreign file)."""
    with elf_errors(f"{elf.path}: CFI"):
        if elf.machine != "EM_X86_64" or elf.elfclass != 64:
            raise ElfParseError(f"{elf.path}: unwind tables are x86-64 only ({elf.machine})")
        sections: list[_Section] = []
        for name, is_eh in ((".eh_frame", True), (".debug_frame", False)):
            sec = elf.section(name)
            if sec is not None and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"]:
                data = elf.section_bytes(name)
                if data:
                    sections.append(_Section(bytes(data), sec["sh_addr"] if is_eh else 0, is_eh))
        if not any(s.is_eh for s in sections):
            found = _eh_frame_from_segments(elf)
            if found is not None:
                sections.insert(0, found)
        text = elf.section(".text")
        got = elf.section(".got")
        return CfiInputs(str(elf.path), sections, text["sh_addr"] if text is not None else 0,
                         got["sh_addr"] if got is not None else 0)


def parse_cfi(sections: list[_Section], text_vaddr: int = 0, got_vaddr: int = 0) -> UnwindTable:
    """Build a table from CFI section images (first has priority where FDEs overlap)."""
    rows = _Rows()
    unsupported = 0
    for prio, sec in enumerate(sections):
        rows.priority = prio
        p = _Parser(sec, text_vaddr, got_vaddr, rows)
        try:
            p.run()
        except (IndexError, struct.error, ValueError, OverflowError, MemoryError, _Unsupported) as exc:
            raise ElfParseError(f"corrupt {'.eh_frame' if sec.is_eh else '.debug_frame'}: {exc!r}") from exc
        unsupported += p.unsupported_fdes
    return _merge(rows, unsupported, tuple(".eh_frame" if s.is_eh else ".debug_frame" for s in sections))


def _merge(rows: _Rows, unsupported: int, sources: tuple[str, ...]) -> UnwindTable:
    """Sort FDE runs by address, drop overlaps, insert NONE rows in the gaps."""
    pcs, kinds, cfa, rbp = array("Q"), array("B"), array("i"), array("i")
    last_end = -1
    last_row: tuple[int, int, int] | None = None
    kept = 0
    for begin, end, i0, i1, _prio in sorted(rows.fdes, key=lambda f: (f[0], f[4])):
        if begin < last_end:
            continue  # overlaps an FDE already kept (same function in both sections)
        if last_end >= 0 and begin > last_end:
            pcs.append(last_end)
            kinds.append(CfaKind.NONE)
            cfa.append(0)
            rbp.append(RBP_SAME)
            last_row = (CfaKind.NONE, 0, RBP_SAME)
        kept += 1
        for i in range(i0, i1):
            row = (rows.kinds[i], rows.cfa[i], rows.rbp[i])
            pc = rows.pcs[i]
            if pc >= end:
                break
            if row == last_row:
                continue
            if pcs and pcs[-1] == pc:
                kinds[-1], cfa[-1], rbp[-1] = row
            else:
                pcs.append(pc)
                kinds.append(row[0])
                cfa.append(row[1])
                rbp.append(row[2])
            last_row = row
        last_end = end
    if last_end >= 0:
        pcs.append(last_end)
        kinds.append(CfaKind.NONE)
        cfa.append(0)
        rbp.append(RBP_SAME)
    return UnwindTable(pcs, kinds, cfa, rbp, kept, unsupported, sources)


def _eh_frame_from_segments(elf: ElfFile) -> _Section | None:
    """.eh_frame found through PT_GNU_EH_FRAME when section headers are stripped.

    The .eh_frame_hdr's eh_frame_ptr gives the start; the section runs to its
    zero terminator, so the containing PT_LOAD's end is a safe bound.
    """
    img = elf.image
    for h in elf.program_headers:
        if h.type != PT_GNU_EH_FRAME:
            continue
        off, vaddr = h.offset, h.vaddr
        elf.ensure(off, 16)
        if off + 4 > len(img) or img[off] != 1:
            return None
        hdr = _Parser(_Section(bytes(img[off:off + 16]), vaddr, True), 0, 0, _Rows())
        ptr, _ = hdr.pointer(4, img[off + 1])
        for seg in elf.load_segments:
            if seg.vaddr <= ptr < seg.vaddr + seg.filesz:
                start = ptr - seg.vaddr + seg.offset
                stop = seg.offset + seg.filesz
                elf.ensure(start, stop - start)
                return _Section(bytes(img[start:stop]), ptr, True)
        return None
    return None


# .eh_frame_hdr's search table encoding: DW_EH_PE_datarel | sdata4, what GNU ld, gold and lld write.
_HDR_TABLE_ENC = 0x3B
# FDEs whose rows an FdeIndex keeps (a few KiB each at most); past it the oldest half is dropped.
_INDEX_CACHED_FDES = 4096
_NONE_RULE = (CfaKind.NONE, 0, RBP_SAME)


class FdeIndex:
    """The rule at a pc from one FDE, found through .eh_frame_hdr's sorted search table.

    What a runtime unwinder does (and what the BPF walker's worker does not
    wait for): bisect the header's (initial location, FDE) pairs, run that
    one FDE's program, keep its rows. Building a whole UnwindTable runs every
    FDE of the file first (libLLVM: 180k FDEs, seconds of CPU on first sight);
    a stack-copy sample of a file whose table is not built yet needs only the
    few functions it passes through. Same rows as UnwindTable for files whose
    CFI is all in .eh_frame (a file with .debug_frame gets no index: the
    table merges both). Thread-safe; parsed FDEs are kept, bounded.
    """

    def __init__(self, elf: ElfFile, eh_vaddr: int, eh_off: int, eh_end: int, hdr_vaddr: int,
                 locs: array, fdes: array) -> None:
        self._elf = elf
        self._eh_vaddr = eh_vaddr
        self._eh_off = eh_off
        self._eh_end = eh_end
        self._hdr_vaddr = hdr_vaddr
        self._locs = locs  # initial locations - hdr_vaddr, sorted
        self._fdes = fdes  # FDE addresses - hdr_vaddr
        # Positions in the parser are file offsets: pcrel pointers add base + pos.
        self._parser = _Parser(_Section(elf.image, eh_vaddr - eh_off, True), 0, 0, _Rows())  # type: ignore[arg-type]
        self._cache: dict[int, tuple[int, int, list[int], list[tuple[int, int, int]]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._locs)

    @classmethod
    def from_elf(cls, elf: ElfFile) -> FdeIndex | None:
        """The index of an x86-64 file with a usable .eh_frame_hdr and no .debug_frame, else None."""
        if elf.machine != "EM_X86_64" or elf.elfclass != 64 or elf.section(".debug_frame") is not None:
            return None
        hdr = next((h for h in elf.program_headers if h.type == PT_GNU_EH_FRAME), None)
        if hdr is None or hdr.filesz < 12:
            return None
        with elf_errors(f"{elf.path}: .eh_frame_hdr"):
            elf.ensure(hdr.offset, hdr.filesz)
            img = elf.image
            if hdr.offset + hdr.filesz > len(img):
                return None
            head = _Parser(_Section(bytes(img[hdr.offset:hdr.offset + hdr.filesz]), hdr.vaddr, True), 0, 0, _Rows())
            version, ptr_enc, count_enc, table_enc = head.buf[:4]
            if version != 1 or table_enc != _HDR_TABLE_ENC:
                return None
            eh_vaddr, pos = head.pointer(4, ptr_enc)
            count, pos = head.pointer(pos, count_enc)
            if count == 0 or pos + 8 * count > len(head.buf):
                return None
            pairs = array("i")
            pairs.frombytes(head.buf[pos:pos + 8 * count])
            if sys.byteorder != "little":
                pairs.byteswap()
            seg = next((s for s in elf.load_segments if s.vaddr <= eh_vaddr < s.vaddr + s.filesz), None)
            if seg is None:
                return None
            locs = pairs[0::2]
            if any(locs[i] > locs[i + 1] for i in range(len(locs) - 1)):
                return None  # the table must be sorted to be searched
            eh_off = eh_vaddr - seg.vaddr + seg.offset
            return cls(elf, eh_vaddr, eh_off, min(seg.offset + seg.filesz, len(img)), hdr.vaddr, locs, pairs[1::2])

    def rule(self, vaddr: int) -> tuple[int, int, int]:
        """(kind, cfa_off, rbp_off) at `vaddr`, as UnwindTable.lookup; NONE where no FDE covers it.

        Raises ElfParseError when the FDE it finds is corrupt.
        """
        i = bisect_right(self._locs, vaddr - self._hdr_vaddr) - 1
        if i < 0:
            return _NONE_RULE
        got = self._cache.get(i)
        if got is None:
            with self._lock:
                got = self._parse(i)
                if len(self._cache) >= _INDEX_CACHED_FDES:
                    for k in list(self._cache)[:_INDEX_CACHED_FDES // 2]:
                        del self._cache[k]
                self._cache[i] = got
        begin, end, pcs, rules = got
        if not begin <= vaddr < end:
            return _NONE_RULE
        j = bisect_right(pcs, vaddr) - 1
        return rules[j] if j >= 0 else _NONE_RULE

    def _entry(self, off: int) -> tuple[int, int]:
        """(position after the length, end) of the CFI entry at file offset `off`, its bytes made present."""
        if not self._eh_off <= off < self._eh_end - 8:
            raise ElfParseError(f"FDE pointer {off:#x} outside .eh_frame")
        self._elf.ensure(off, 12)
        length = struct.unpack_from("<I", self._elf.image, off)[0]
        pos = off + 4
        if length == 0xFFFFFFFF:
            length = struct.unpack_from("<Q", self._elf.image, pos)[0]
            pos += 8
        end = pos + length
        if length < 4 or end > self._eh_end:
            raise ElfParseError(f"CFI entry at {off:#x} runs past .eh_frame")
        self._elf.ensure(off, end - off)
        return pos, end

    def _parse(self, i: int) -> tuple[int, int, list[int], list[tuple[int, int, int]]]:
        off = self._fdes[i] + self._hdr_vaddr - self._eh_vaddr + self._eh_off
        try:
            pos, end = self._entry(off)
            wide = pos - off == 12
            cie_id = struct.unpack_from("<Q" if wide else "<I", self._elf.image, pos)[0]
            if cie_id == 0:
                raise ElfParseError(f"search table entry {i} points at a CIE")
            cie_off = pos - cie_id
            self._entry(cie_off)  # the parser reads the CIE from the image
            rows = self._parser.out = _Rows()
            self._parser.fde(cie_off, pos + (8 if wide else 4), end)
        except (IndexError, struct.error, ValueError, OverflowError) as exc:
            raise ElfParseError(f"{self._elf.path}: corrupt FDE at {off:#x}: {exc!r}") from exc
        if not rows.fdes:
            return (0, 0, [], [])  # a discarded function: covers nothing
        begin, fde_end, i0, i1, _ = rows.fdes[-1]
        pcs = [pc for pc in rows.pcs[i0:i1] if pc < fde_end]
        rules = [(rows.kinds[k], rows.cfa[k], rows.rbp[k]) for k in range(i0, i0 + len(pcs))]
        return (begin, fde_end, pcs, rules)
