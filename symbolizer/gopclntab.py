"""Go's .gopclntab: PC -> function, file, line and inlined frames, without DWARF.

Our own reader of the table the Go runtime itself symbolizes with, so stripped
(`-ldflags='-s -w'`) binaries resolve too. Layout facts come from the Go
sources (runtime/symtab.go `pcHeader`/`moduledata`, runtime/runtime2.go
`_func`, runtime/symtabinl.go `inlinedCall`, internal/abi/symtab.go,
cmd/link/internal/ld/pcln.go and symtab.go); no code is taken from them.

Supported: the Go 1.18/1.19 table (magic 0xfffffff0) and Go 1.20+ (0xfffffff1,
still current in 1.27), either byte order, 4- or 8-byte pointers. Go 1.2 and
1.16 tables raise PclntabError("unsupported").

Layout (all offsets relative to the pcHeader, the start of the table):

    pcHeader   magic u32, 0, 0, minLC u8, ptrSize u8, nfunc, nfiles,
               textStart (0 since Go 1.26), funcname/cu/filetab/pctab/pcln offsets
    functab    (nfunc+1) x (entryOff u32, funcOff u32); entryOff is relative to
               the module's text start, funcOff to the functab itself
    _func      entryOff, nameOff, args, deferreturn, pcsp, pcfile, pcln,
               npcdata, cuOffset, [startLine: 1.20+], funcID, flag, pad,
               nfuncdata; then pcdata[npcdata] u32, funcdata[nfuncdata] u32
    pcvalue    tables of (zigzag value delta, pc delta / minLC) varint pairs

FUNCDATA_InlTree offsets are relative to moduledata.gofunc (the `go:func.*`
symbol, `go.func.*` before 1.20), which the header does not record: it comes
from the symbol table, or, in stripped binaries, from the moduledata found in
the writable data by its pointer back to the pcHeader.

Measured on tests/fixtures/go/pcgroundtruth (Go 1.27, amd64, 2.4 MB, 1,854
funcs, one core; bench/symbolizer_speed.py --only pclntab prints them):
load_pclntab ~0.45 ms with .symtab, ~0.35 ms stripped (moduledata scan);
lookup() ~150k/s on never-seen PCs (decodes and caches the function's
tables), ~7M/s on repeated PCs (per-PC cache). Parse cost is O(nfunc) list
building plus one pass over .symtab, so a 10k-function binary stays in the
low milliseconds.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import re
import struct
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import NamedTuple, TypeVar

from symbolizer.elf import PF_W, SHT_NOBITS, SHT_SYMTAB, ElfFile, ElfHeaders, LoadSegment
from symbolizer.errors import ElfParseError, PclntabError
from symbolizer.frames import Frame, FrameKind

__all__ = ["GoFrameInfo", "GoPclntab", "load_pclntab"]

# Header magics (internal/abi PCLnTabMagic), read in the file's byte order.
MAGIC_GO12 = 0xFFFFFFFB
MAGIC_GO116 = 0xFFFFFFFA
MAGIC_GO118 = 0xFFFFFFF0
MAGIC_GO120 = 0xFFFFFFF1
_SUPPORTED = {MAGIC_GO118: "1.18", MAGIC_GO120: "1.20"}
_UNSUPPORTED = {MAGIC_GO12: "1.2", MAGIC_GO116: "1.16"}

# abi.FuncFlag bits (internal/abi/symtab.go), stable since Go 1.18.
FUNC_FLAG_TOP_FRAME = 1  # the outermost frame of a stack (goexit, mstart, rt0_go)
FUNC_FLAG_SPWRITE = 2  # writes SP in a way pcsp does not describe (stack switches)
FUNC_FLAG_ASM = 4

# Indices into _func's pcdata/funcdata arrays (internal/abi).
PCDATA_INL_TREE_INDEX = 2
FUNCDATA_INL_TREE = 3
# funcdata offset meaning "no such funcdata" (cmd/link writes ^uint32(0)).
NO_FUNCDATA = 0xFFFFFFFF
# cutab entry meaning "file unknown" (runtime funcfile checks for it).
NO_FILE = 0xFFFFFFFF

# Inlined frames deeper than this mean a cyclic (corrupt) inline tree; the
# compiler's inlining budget keeps real chains far shorter.
MAX_INLINE_DEPTH = 256
# Functions whose decoded tables stay cached; a profile touches a few
# thousand hot functions, each holding three small decoded tables.
FUNC_CACHE_SIZE = 8192
# Symbolized PCs kept (frames are immutable, so shared between callers).
PC_CACHE_SIZE = 65536

# Names of the runtime functions whose callers' inlined wrappers stay visible
# (runtime.elideWrapperCalling). Matched by name because funcID numbers shift
# between Go versions.
_PANIC_FUNCS = frozenset({"runtime.gopanic", "runtime.sigpanic", "runtime.panicwrap"})

_NUL = re.compile(b"\x00")
# A pcHeader start: any known magic (either byte order), pad 0,0, minLC, ptrSize.
_HEADER_RE = re.compile(
    rb"(?:[\xf0\xf1\xfa\xfb]\xff\xff\xff|\xff\xff\xff[\xf0\xf1\xfa\xfb])\x00\x00[\x01\x02\x04][\x04\x08]"
)

_T = TypeVar("_T")


def _guard(what: str, fn: Callable[[], _T]) -> _T:
    """Run a parse step over untrusted bytes; any low-level failure is PclntabError."""
    try:
        return fn()
    except PclntabError:
        raise
    except (IndexError, struct.error, ValueError, OverflowError, KeyError, TypeError,
            MemoryError, RecursionError) as exc:
        raise PclntabError(f"corrupt .gopclntab ({what}): {exc!r}") from exc


# --------------------------------------------------------------------------
# ELF facts: headers from symbolizer.elf (struct over the image, no copy, no
# pyelftools); the .symtab values the loader needs are read here.


def _file_segments(elf: ElfHeaders) -> list[LoadSegment]:
    """PT_LOADs with file bytes inside the image: where a table or moduledata can be."""
    size = len(elf.image)
    return [seg for seg in elf.load_segments if seg.filesz and seg.offset + seg.filesz <= size]


def _symtab_values(elf: ElfHeaders, buf: memoryview, wanted: set[str]) -> dict[str, int]:
    """Values of the `wanted` names in .symtab (stripped binaries have none)."""
    sec = elf.section(".symtab")
    found: dict[str, int] = {}
    sections = elf.sections
    if sec is None or sec.type != SHT_SYMTAB or sec.link >= len(sections):
        return found
    strsec = sections[sec.link]
    elf.ensure(strsec.offset, strsec.size)
    elf.ensure(sec.offset, sec.size)
    strtab = buf[strsec.offset:strsec.offset + strsec.size]
    # Find each name's string-table offset first, then match symbols by
    # that integer: no decoding of tens of thousands of names.
    by_off: dict[int, str] = {}
    for name in wanted:
        for m in re.finditer(b"\x00" + re.escape(name.encode()) + b"\x00", strtab):
            by_off[m.start() + 1] = name
    if not by_off:
        return found
    fmt = elf.endian + ("IBBHQQ" if elf.is64 else "IIIBBH")
    entsize = struct.calcsize(fmt)
    if sec.entsize and sec.entsize != entsize:
        return found
    n = max(0, min(sec.size, len(buf) - sec.offset)) // entsize
    for ent in struct.iter_unpack(fmt, buf[sec.offset:sec.offset + n * entsize]):
        name = by_off.get(ent[0])
        if name is not None:
            found.setdefault(name, ent[4] if elf.is64 else ent[1])
    return found


def _varint_tail(buf: memoryview, p: int, limit: int, first: int) -> tuple[int, int]:
    """The rest of a varint whose first byte (>= 0x80) was `first`, read from p -> (value, next p)."""
    uv = first & 0x7F
    shift = 7
    while True:
        if p >= limit:
            raise PclntabError("pcvalue table runs past the end")
        b = buf[p]
        p += 1
        uv |= (b & 0x7F) << shift
        if b < 0x80:
            return uv, p
        shift += 7
        if shift > 35:
            raise PclntabError("bad varint in pcvalue table")


# --------------------------------------------------------------------------
# The table.


class _InlinedCall(NamedTuple):
    func_id: int
    name_off: int
    parent_pc: int  # offset from the physical function's entry of the call site
    start_line: int


class GoFrameInfo(NamedTuple):
    """What unwinding needs at one PC of a Go function.

    `sp_delta` is runtime.funcspdelta: bytes the function has pushed or
    reserved below its entry SP at this PC (0 at entry and in frameless
    leaves). On amd64 the caller's SP (the CFA) is SP + sp_delta + 8 and the
    return address sits at CFA-8 (runtime.(*unwinder).resolveInternal).
    `flag` holds abi.FuncFlag bits: FUNC_FLAG_TOP_FRAME ends the stack,
    FUNC_FLAG_SPWRITE means the SP cannot be trusted past this frame.
    """

    entry: int
    sp_delta: int
    flag: int
    func_id: int


class _Func:
    """One _func record plus its lazily decoded pcvalue tables."""

    __slots__ = ("entry", "end", "name_off", "pcsp", "pcfile", "pcln", "cu_offset", "start_line",
                 "func_id", "flag", "inl_pcdata", "inl_funcdata", "_file_tab", "_line_tab", "_inl_tab",
                 "_inl_tree", "_sp_tab")

    def __init__(self) -> None:
        self._file_tab = self._line_tab = self._inl_tab = self._sp_tab = None
        self._inl_tree: dict[int, _InlinedCall] | None = None


class GoPclntab:
    """The parsed .gopclntab of one Go binary.

    Addresses are ELF virtual addresses (translate runtime addresses of PIE
    mappings first). `lookup` of a return address must be given `pc - 1`, as
    runtime.CallersFrames does, or the caller's line is off by one call.

    Thread safety: lookups only read the image and fill caches with whole
    objects, so concurrent lookups are safe under the GIL.
    """

    def __init__(self, buf: memoryview, start: int, end: int, text_start: int, gofunc_off: int | None) -> None:
        self._buf = buf
        self._base = start
        self._limit = end
        magic_le = struct.unpack_from("<I", buf, start)[0]
        if magic_le in _SUPPORTED or magic_le in _UNSUPPORTED:
            self._bo = "<"
        else:
            self._bo = ">"
        magic = struct.unpack_from(self._bo + "I", buf, start)[0]
        if magic in _UNSUPPORTED:
            raise PclntabError(f"unsupported .gopclntab version (Go {_UNSUPPORTED[magic]})")
        if magic not in _SUPPORTED:
            raise PclntabError(f"unknown .gopclntab magic {magic:#x}")
        self.version: str = _SUPPORTED[magic]
        self._quantum = buf[start + 6]
        self._ptr = buf[start + 7]
        if buf[start + 4] or buf[start + 5] or self._quantum not in (1, 2, 4) or self._ptr not in (4, 8):
            raise PclntabError("bad .gopclntab header")
        word = "Q" if self._ptr == 8 else "I"
        (nfunc, _nfiles, _text, funcname, cu, filetab, pctab, pcln) = struct.unpack_from(
            self._bo + word * 8, buf, start + 8)
        size = end - start
        hdr_size = 8 + 8 * self._ptr
        for off in (funcname, cu, filetab, pctab, pcln):
            if not hdr_size <= off <= size:
                raise PclntabError("bad .gopclntab header offsets")
        if not 0 < nfunc < size // 8:
            raise PclntabError("bad .gopclntab function count")
        self._funcname = start + funcname
        self._cutab = start + cu
        self._filetab = start + filetab
        self._pctab = start + pctab
        self._pcln = start + pcln
        if self._pcln + (nfunc + 1) * 8 > end:
            raise PclntabError("truncated .gopclntab functab")
        self._nfunc = nfunc
        self._gofunc_off = gofunc_off
        self._names: dict[int, str] = {}
        self._files: dict[int, str] = {}
        self._cache: OrderedDict[int, _Func] = OrderedDict()
        self._pc_cache: dict[int, tuple[Frame, ...]] = {}
        self._wrapper_id: int | None = None
        pairs = struct.unpack_from(f"{self._bo}{2 * (nfunc + 1)}I", buf, self._pcln)
        self._entry_offs = pairs[0::2]
        self._funcoffs = pairs[1::2]
        # A sorted functab is what binary search needs; an unsorted one is corrupt.
        if sorted(self._entry_offs) != list(self._entry_offs):
            raise PclntabError("functab is not sorted")
        self._rebase(text_start)
        self._func_size = 44 if self.version != "1.18" else 36
        self._inl_size = 16 if self.version != "1.18" else 20

    def fingerprint(self) -> bytes:
        """A digest of everything this table's answers come from: its bytes, where it says text starts,
        the go:func.* offset. Equal digests give equal tables, whatever file and build id they came in."""
        h = hashlib.sha256(self._buf[self._base:self._limit])
        h.update(struct.pack("<Qq", self.text_start, -1 if self._gofunc_off is None else self._gofunc_off))
        return h.digest()

    def _rebase(self, text_start: int) -> None:
        """Set the text start entry offsets are relative to; drops caches."""
        self.text_start: int = text_start
        self._entries: list[int] = [text_start + e for e in self._entry_offs]
        self._cache.clear()
        self._pc_cache.clear()

    # -- reading helpers ----------------------------------------------------

    def _cstring(self, start: int, off: int, cache: dict[int, str]) -> str:
        s = cache.get(start + off)
        if s is None:
            pos = start + off
            if not start <= pos < self._limit:
                raise PclntabError(f"string offset {off:#x} out of range")
            m = _NUL.search(self._buf, pos, self._limit)
            if m is None:
                raise PclntabError("unterminated string")
            s = bytes(self._buf[pos:m.start()]).decode("utf-8", "replace")
            cache[start + off] = s
        return s

    def _name(self, name_off: int) -> str:
        return self._cstring(self._funcname, name_off, self._names)

    def _func(self, idx: int) -> _Func:
        f = self._cache.get(idx)
        if f is not None:
            try:
                self._cache.move_to_end(idx)
            except KeyError:  # another thread (drain, builder) pushed it out just now: it stays ours
                pass
            return f
        f = _guard("func", lambda: self._read_func(idx))
        self._cache[idx] = f
        if len(self._cache) > FUNC_CACHE_SIZE:
            self._cache.popitem(last=False)
        return f

    def _read_func(self, idx: int) -> _Func:
        off = self._pcln + self._funcoffs[idx]
        if off + self._func_size > self._limit:
            raise PclntabError(f"func {idx} out of range")
        bo = self._bo
        if self.version == "1.18":
            (entry_off, name_off, _, _, pcsp, pcfile, pcln, npcdata, cu_off,
             func_id, flag, _, nfuncdata) = struct.unpack_from(bo + "IiiIIIIIIBBBB", self._buf, off)
            start_line = 0
        else:
            (entry_off, name_off, _, _, pcsp, pcfile, pcln, npcdata, cu_off, start_line,
             func_id, flag, _, nfuncdata) = struct.unpack_from(bo + "IiiIIIIIIiBBBB", self._buf, off)
        f = _Func()
        f.entry = self.text_start + entry_off
        f.end = self._entries[idx + 1]
        if f.entry != self._entries[idx]:
            raise PclntabError(f"func {idx} entry disagrees with functab")
        f.name_off, f.pcfile, f.pcln, f.cu_offset = name_off, pcfile, pcln, cu_off
        f.start_line, f.func_id = start_line, func_id
        f.pcsp, f.flag = pcsp, flag
        tail = off + self._func_size
        f.inl_pcdata = 0
        if npcdata > PCDATA_INL_TREE_INDEX:
            f.inl_pcdata = struct.unpack_from(bo + "I", self._buf, tail + 4 * PCDATA_INL_TREE_INDEX)[0]
        f.inl_funcdata = NO_FUNCDATA
        if nfuncdata > FUNCDATA_INL_TREE:
            f.inl_funcdata = struct.unpack_from(
                bo + "I", self._buf, tail + 4 * npcdata + 4 * FUNCDATA_INL_TREE)[0]
        return f

    def _decode(self, table_off: int) -> tuple[list[int], list[int]]:
        """Decode a pcvalue table into (end offsets from entry, values).

        The value vals[i] holds for entry offsets below ends[i] (and at or
        above ends[i-1]). Offsets relative to the entry keep the decoding
        independent of the function, which Go shares tables between.
        """
        buf = self._buf
        p = self._pctab + table_off
        limit = self._limit
        quantum = self._quantum
        ends: list[int] = []
        vals: list[int] = []
        pc = 0
        val = -1
        first = True
        while True:
            # Two varints: zigzag value delta, then pc delta in quanta. Most
            # are one byte, read without the loop (half the decoding time).
            if p >= limit:
                raise PclntabError("pcvalue table runs past the end")
            uv = buf[p]
            p += 1
            if uv >= 0x80:
                uv, p = _varint_tail(buf, p, limit, uv)
            if uv == 0 and not first:
                return ends, vals
            first = False
            val += -((uv >> 1) + 1) if uv & 1 else uv >> 1
            if p >= limit:
                raise PclntabError("pcvalue table runs past the end")
            d = buf[p]
            p += 1
            if d >= 0x80:
                d, p = _varint_tail(buf, p, limit, d)
            pc += d * quantum
            ends.append(pc)
            vals.append(val)
            if len(ends) > 1_000_000:
                raise PclntabError("pcvalue table too long")

    @staticmethod
    def _value(table: tuple[list[int], list[int]], off: int) -> int:
        ends, vals = table
        i = bisect_right(ends, off)
        return vals[i] if i < len(vals) else -1

    def _file_line(self, f: _Func, pc: int) -> tuple[str, int]:
        """runtime.funcline1: file and line of the physical function at pc.

        ("", 0) when unknown -- the Frame convention; the runtime prints "?".
        """
        if f._file_tab is None:
            f._file_tab = self._decode(f.pcfile) if f.pcfile else ([], [])
            f._line_tab = self._decode(f.pcln) if f.pcln else ([], [])
        off = pc - f.entry
        fileno = self._value(f._file_tab, off)
        line = self._value(f._line_tab, off)
        if fileno < 0 or line < 0:
            return "", 0
        cu = self._cutab + 4 * (f.cu_offset + fileno)
        if cu + 4 > self._filetab:
            return "", 0
        file_off = struct.unpack_from(self._bo + "I", self._buf, cu)[0]
        if file_off == NO_FILE:
            return "", 0
        return self._cstring(self._filetab, file_off, self._files), line

    def _inline_index(self, f: _Func, pc: int) -> int:
        if not f.inl_pcdata or f.inl_funcdata == NO_FUNCDATA or self._gofunc_off is None:
            return -1
        if f._inl_tab is None:
            f._inl_tab = self._decode(f.inl_pcdata)
        return self._value(f._inl_tab, pc - f.entry)

    def _inlined_call(self, f: _Func, ix: int) -> _InlinedCall:
        tree = f._inl_tree
        if tree is None:
            tree = f._inl_tree = {}
        call = tree.get(ix)
        if call is None:
            assert self._gofunc_off is not None
            off = self._gofunc_off + f.inl_funcdata + ix * self._inl_size
            if off + self._inl_size > len(self._buf):
                raise PclntabError("inline tree out of range")
            if self.version == "1.18":
                # parent i16, funcID u8, pad, file i32, line i32, nameOff i32, parentPc i32
                _, func_id, _, _, _, name_off, parent_pc = struct.unpack_from(
                    self._bo + "hBBiiii", self._buf, off)
                start_line = 0
            else:
                func_id, name_off, parent_pc, start_line = struct.unpack_from(
                    self._bo + "B3xiii", self._buf, off)
            call = tree[ix] = _InlinedCall(func_id, name_off, parent_pc, start_line)
        return call

    def _wrapper_func_id(self) -> int:
        """abi.FuncIDWrapper: always the last FuncID, so the largest one in use.

        Its number moved between Go versions (new special IDs were added
        before it), and every binary has autogenerated wrappers (type:.eq.*).
        """
        if self._wrapper_id is None:
            at = 40 if self.version != "1.18" else 32
            hi = 0
            for fo in self._funcoffs[:-1]:
                hi = max(hi, self._buf[self._pcln + fo + at])
            self._wrapper_id = hi or -1
        return self._wrapper_id

    def _index(self, vaddr: int) -> int:
        entries = self._entries
        if not entries[0] <= vaddr < entries[-1]:
            return -1
        return bisect_right(entries, vaddr) - 1

    # -- public API ---------------------------------------------------------

    def lookup(self, vaddr: int) -> tuple[Frame, ...]:
        """Frames at ELF vaddr, innermost first; () when no function covers it.

        Inlined frames come first with inlined=True; the last frame is the
        physical function. The line of each outer frame is its call site
        (the pcln value at the inline tree's parentPc), and inlined wrapper
        frames are elided as runtime.CallersFrames does. Raises PclntabError
        if the table is corrupt at this address.
        """
        frames = self._pc_cache.get(vaddr)
        if frames is not None:
            return frames
        idx = self._index(vaddr)
        if idx < 0:
            return ()
        frames = _guard("lookup", lambda: self._expand(self._func(idx), vaddr))
        if len(self._pc_cache) >= PC_CACHE_SIZE:
            # Profiles revisit the same hot PCs; dropping the oldest half
            # keeps the cache bounded without per-hit bookkeeping.
            for pc in list(itertools.islice(self._pc_cache, PC_CACHE_SIZE // 2)):
                del self._pc_cache[pc]
        self._pc_cache[vaddr] = frames
        return frames

    def _expand(self, f: _Func, pc: int) -> tuple[Frame, ...]:
        frames: list[Frame] = []
        ix = self._inline_index(f, pc)
        callee_name = ""
        for _ in range(MAX_INLINE_DEPTH):
            if ix >= 0:
                call = self._inlined_call(f, ix)
                name, start_line, func_id = self._name(call.name_off), call.start_line, call.func_id
            else:
                name, start_line, func_id = self._name(f.name_off), f.start_line, f.func_id
            # CallersFrames drops wrapper frames around an inlined callee
            # unless that callee is a panic function (elideWrapperCalling).
            elide = bool(frames) and func_id == self._wrapper_func_id() and callee_name not in _PANIC_FUNCS
            if not elide:
                file, line = self._file_line(f, pc)
                frames.append(Frame(function=_name_for_print(name), kind=FrameKind.GO, file=file, line=line,
                                    system_name=name, inlined=ix >= 0, start_line=start_line))
            if ix < 0:
                if elide and frames[-1].inlined:
                    # The physical wrapper was dropped: the frame that stands
                    # for it now ends the chain, as the not-inlined frame.
                    frames[-1] = replace(frames[-1], inlined=False)
                return tuple(frames)
            callee_name = name
            pc = f.entry + call.parent_pc
            if not f.entry <= pc < f.end:
                raise PclntabError("inline parentPc outside its function")
            ix = self._inline_index(f, pc)
        raise PclntabError("inline tree too deep (cycle?)")

    def frame_info(self, vaddr: int) -> GoFrameInfo | None:
        """Unwind facts at ELF vaddr (see GoFrameInfo); None when no Go function covers it.

        Also None for a function without a pcsp table (external code such as
        race-detector stubs; the runtime's traceback stops there too), or
        when the table has no value at this PC. Like lookup(), give a return
        address as pc - 1. Raises PclntabError if the table is corrupt here.
        """
        idx = self._index(vaddr)
        if idx < 0:
            return None
        f = self._func(idx)
        if not f.pcsp:
            return None
        tab = f._sp_tab
        if tab is None:
            tab = f._sp_tab = _guard("pcsp", lambda: self._decode(f.pcsp))
        delta = self._value(tab, vaddr - f.entry)
        if delta < 0:
            return None
        return GoFrameInfo(f.entry, delta, f.flag, f.func_id)

    def frame_tables(self) -> Iterator[tuple[int, int, int, tuple[list[int], list[int]] | None]]:
        """(entry, end, flag, pcsp) of every function with code, in address order.

        What frame_info answers over a whole function at once, for tables
        built per file (symbolizer/unwind_rows.py): `pcsp` is (end offsets
        from entry, sp deltas) as frame_info reads it, or None where
        frame_info is None over the whole function (no pcsp table, or a
        corrupt record or table). Reads each _func directly and decodes each
        distinct pcsp table once (the linker shares them), bypassing the
        per-function cache so a full pass does not evict the hot functions.
        """
        buf, bo, limit = self._buf, self._bo, self._limit
        head = struct.Struct(bo + "I12xI8xI")  # entryOff, pcsp, npcdata
        flag_at = 41 if self.version != "1.18" else 37
        size = self._func_size
        entries = self._entries
        base = self._pcln
        decoded: dict[int, tuple[list[int], list[int]] | None] = {}
        text_start = self.text_start
        nbuf = len(buf)
        for idx, fo in enumerate(self._funcoffs[:-1]):
            entry, end = entries[idx], entries[idx + 1]
            if end <= entry:
                continue  # empty: bisection gives its pcs to the next function
            off = base + fo
            try:
                if off + size > limit:
                    raise IndexError(off)
                entry_off, pcsp, npcdata = head.unpack_from(buf, off)
                flag, nfuncdata = buf[off + flag_at], buf[off + flag_at + 2]
            except (IndexError, struct.error):
                yield entry, end, 0, None
                continue
            # _read_func also reads the inline pcdata/funcdata words: where they
            # are past the image, frame_info fails for the whole function.
            tail = off + size
            if (text_start + entry_off != entry or not pcsp
                    or (npcdata > PCDATA_INL_TREE_INDEX and tail + 4 * PCDATA_INL_TREE_INDEX + 4 > nbuf)
                    or (nfuncdata > FUNCDATA_INL_TREE and tail + 4 * (npcdata + FUNCDATA_INL_TREE) + 4 > nbuf)):
                yield entry, end, flag, None
                continue
            tab = decoded.get(pcsp, False)
            if tab is False:
                try:
                    tab = _guard("pcsp", partial(self._decode, pcsp))
                except PclntabError:
                    tab = None
                decoded[pcsp] = tab
            yield entry, end, flag, tab

    def sp_delta(self, vaddr: int) -> int | None:
        """runtime.funcspdelta at ELF vaddr, or None (see frame_info)."""
        info = self.frame_info(vaddr)
        return info.sp_delta if info is not None else None

    def func_for(self, vaddr: int) -> tuple[int, str] | None:
        """(entry, raw name) of the physical function covering vaddr, else None."""
        idx = self._index(vaddr)
        if idx < 0:
            return None
        f = self._func(idx)
        return f.entry, _guard("name", lambda: self._name(f.name_off))

    def functions(self) -> Iterator[tuple[int, int, str]]:
        """(entry, end, raw name) of every function, in address order."""
        bo = self._bo
        for idx in range(self._nfunc):
            # the lambdas run at once, inside this iteration
            name_off = _guard("name", lambda: struct.unpack_from(  # noqa: B023
                bo + "i", self._buf, self._pcln + self._funcoffs[idx] + 4)[0])  # noqa: B023
            name = _guard("name", lambda: self._name(name_off))  # noqa: B023
            yield self._entries[idx], self._entries[idx + 1], name

    def __len__(self) -> int:
        return self._nfunc


def _name_for_print(name: str) -> str:
    """A function name as runtime.CallersFrames prints it: generic shapes as [...].

    `pkg.F[go.shape.int]` -> `pkg.F[...]`; a generic method of a generic type
    `pkg.T[go.shape.int].M[go.shape.string]` -> `pkg.T[...].M[...]`. Malformed
    brackets leave the name as is (runtime.funcNamePiecesForPrint).
    """
    i = name.find("[")
    if i < 0:
        return name
    j = name.rfind("]")
    if j <= i:
        return name
    inner = name[i + 1:j]
    if "[" not in inner:
        return name[:i] + "[...]" + name[j + 1:]
    # Find where the first bracket group closes and a second one opens.
    depth = 1
    close = -1
    for k, c in enumerate(inner):
        if c == "[":
            depth += 1
            if depth == 1:
                return name[:i] + "[...]" + inner[close + 1:k] + "[...]" + name[j + 1:]
        elif c == "]":
            depth -= 1
            if depth < 0:
                return name
            if depth == 0:
                close = k
    if depth == 1 and close < 0:
        return name[:i] + "[...]" + name[j + 1:]
    return name


# --------------------------------------------------------------------------
# Locating the table, the text start and gofunc in an ELF image.


def load_pclntab(image: ElfFile | bytes | mmap.mmap | memoryview) -> GoPclntab | None:
    """Parse the pclntab of an ElfFile or a whole ELF file image.

    Returns None when the image is not ELF, its headers are truncated or it
    holds no Go pclntab (not a Go binary). Raises PclntabError when it is Go
    but the table is corrupt or of an unsupported version (Go 1.2-1.17). The
    image is read in place: pass an ElfFile or an mmap to avoid reading the
    file into memory.
    """
    if isinstance(image, ElfFile):
        try:
            image.ensure_loaded()  # the table, moduledata and go:func.* all lie in loaded ranges
        except ElfParseError as exc:
            raise PclntabError(str(exc)) from exc
        elf, image = image.headers, image.image
    else:
        elf = None
    buf = image if isinstance(image, memoryview) else memoryview(image)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    try:
        if elf is None:
            elf = ElfHeaders(buf)
        elf.sections  # noqa: B018  (read both tables now: a truncated one means "not a usable ELF")
        elf.program_headers  # noqa: B018
    except ElfParseError:
        return None
    return _guard("load", lambda: _load(buf, elf))


def _load(buf: memoryview, elf: ElfHeaders) -> GoPclntab | None:
    found = _find_table(buf, elf)
    if found is None:
        return None
    start, end, vaddr = found
    # A fresh table to read the header offsets from; text/gofunc come next.
    table = GoPclntab(buf, start, end, text_start=0, gofunc_off=None)
    syms = _symtab_values(elf, buf, {"runtime.text", "go:func.*", "go.func.*"})
    moddata = _find_moduledata(buf, elf, table, vaddr) if vaddr is not None else None
    text_start = _text_start_of(elf, syms, moddata, buf, start, table._ptr, table._bo)
    if text_start is None:
        raise PclntabError("no text start: header field is 0 and no runtime.text/moduledata/.text")
    table._rebase(text_start)
    gofunc_vaddr = syms.get("go:func.*") or syms.get("go.func.*")
    if gofunc_vaddr is None and moddata is not None:
        gofunc_vaddr = _gofunc_from_moduledata(table, elf, moddata)
    if gofunc_vaddr is not None:
        table._gofunc_off = elf.offset_of(gofunc_vaddr)
    return table


def _text_start_of(elf: ElfHeaders, syms: dict[str, int], moddata: tuple[int, ...] | None,
                   buf: memoryview, start: int, ptr: int, bo: str) -> int | None:
    """The address functab entry offsets are relative to.

    The runtime adds entryOff to moduledata.text (runtime.(*moduledata).textAddr),
    and the linker fills moduledata.text with the runtime.text symbol, which
    is also what it subtracts when writing entryOff (cmd/link textOff). So:
    runtime.text from .symtab when present, else moduledata.text read from
    the image (stripped binaries), else the header's textStart (1.18-1.25; 0
    since 1.26, when it stopped being relocated), else the .text section's
    address -- debug/gosym's choice, which is wrong when an external linker
    put C code before runtime.text (cgo), hence last.
    """
    if syms.get("runtime.text"):
        return syms["runtime.text"]
    if moddata is not None and moddata[_MD_TEXT]:
        return moddata[_MD_TEXT]
    hdr_text = struct.unpack_from(bo + ("Q" if ptr == 8 else "I"), buf, start + 8 + 2 * ptr)[0]
    if hdr_text:
        return hdr_text
    sec = elf.section(".text")
    return sec.addr if sec is not None and sec.addr else None


def _find_table(buf: memoryview, elf: ElfHeaders) -> tuple[int, int, int | None] | None:
    """(file start, file end, vaddr) of the pclntab, or None if there is none.

    The section names the table in every ELF Go has written (also in
    -s -w builds); `.data.rel.ro.gopclntab` is its name in externally linked
    PIE. Failing both (sections stripped by other tools, or the table merged
    into .rodata/.data.rel.ro), scan the loaded file ranges for a pcHeader:
    magic, pad bytes 0,0, minLC in {1,2,4}, ptrSize in {4,8}, pointer-aligned,
    and a header whose offsets, function count and sorted functab check out.
    """
    for name in (".gopclntab", ".data.rel.ro.gopclntab"):
        sec = elf.section(name)
        if sec is not None and sec.type != SHT_NOBITS and sec.size:
            if sec.offset + sec.size > len(buf):
                raise PclntabError(f"{name} runs past the end of the file")
            return sec.offset, sec.offset + sec.size, sec.addr or None
    for seg in _file_segments(elf):
        seg_end = seg.offset + seg.filesz
        for m in _HEADER_RE.finditer(buf, seg.offset, seg_end):
            at = m.start()
            ptr = buf[at + 7]
            if (at - seg.offset) % ptr:
                continue
            magic = struct.unpack_from("<I", buf, at)[0]
            if magic not in _SUPPORTED and magic not in _UNSUPPORTED:
                magic = struct.unpack_from(">I", buf, at)[0]
            nfunc = struct.unpack_from(("<" if buf[at] != 0xFF else ">") + ("Q" if ptr == 8 else "I"), buf, at + 8)[0]
            if magic in _UNSUPPORTED and 0 < nfunc < (seg_end - at) // 8:
                raise PclntabError(f"unsupported .gopclntab version (Go {_UNSUPPORTED[magic]})")
            try:
                GoPclntab(buf, at, seg_end, text_start=0, gofunc_off=None)
            except (PclntabError, IndexError, struct.error, ValueError):
                continue  # a chance match of the magic bytes
            return at, seg_end, at - seg.offset + seg.vaddr
    return None


# Word indices in moduledata, stable from Go 1.18 to 1.27: pcHeader, then
# five []byte/[]uint32 slices and ftab (3 words each), findfunctab, minpc,
# maxpc, text.
_MD_PCHEADER, _MD_FUNCNAMETAB, _MD_FTAB, _MD_MINPC, _MD_TEXT = 0, 1, 16, 20, 22
# Word index of moduledata.gofunc, counted from text, by layout:
#   1.18-1.19  text etext noptrdata enoptrdata data edata bss ebss noptrbss
#              enoptrbss end gcdata gcbss types etypes rodata gofunc        -> 16
#   1.20-      covctrs, ecovctrs added after enoptrbss                      -> 18
#   1.27       typedesclen after types; itaboffset, itabsize after etypes   -> 21
# Tried newest first; the inline trees they point at decide (see below).
_MD_GOFUNC_FROM_TEXT = {"1.18": (16,), "1.20": (21, 18, 16)}
_MD_WORDS = _MD_TEXT + 24


def _find_moduledata(buf: memoryview, elf: ElfHeaders, table: GoPclntab, vaddr: int) -> tuple[int, ...] | None:
    """The first words of runtime.firstmoduledata, found by its pcHeader pointer.

    The linker writes moduledata into writable data (.noptrdata; .go.module
    in the 1.27 we build with) starting with a pointer to the pcHeader and then the
    funcnametab slice, whose pointer is pcHeader + funcnameOffset. Both
    together, plus ftab pointing at the functab, pin it down.
    """
    word = "Q" if table._ptr == 8 else "I"
    needle = re.compile(re.escape(struct.pack(table._bo + word, vaddr)))
    funcnametab = vaddr + (table._funcname - table._base)
    ftab = vaddr + (table._pcln - table._base)
    size = _MD_WORDS * table._ptr
    for seg in _file_segments(elf):
        if not seg.flags & PF_W:
            continue
        for m in needle.finditer(buf, seg.offset, seg.offset + seg.filesz):
            at = m.start()
            if (at - seg.offset) % table._ptr or at + size > seg.offset + seg.filesz:
                continue
            words = struct.unpack_from(table._bo + word * _MD_WORDS, buf, at)
            if words[_MD_FUNCNAMETAB] == funcnametab and words[_MD_FTAB] == ftab:
                return words
    return None


def _gofunc_from_moduledata(table: GoPclntab, elf: ElfHeaders, words: tuple[int, ...]) -> int | None:
    """moduledata.gofunc, choosing the layout whose value yields sane inline trees.

    Field order after `text` changed across releases without a pclntab magic
    change, so each candidate slot is tried: the address must be mapped and
    the inline trees of a sample of functions read through it must have zero
    padding, names at the start of a funcnametab string and call sites
    inside their function.
    """
    sample = _inline_sample(table)
    for delta in _MD_GOFUNC_FROM_TEXT[table.version]:
        cand = words[_MD_TEXT + delta]
        off = elf.offset_of(cand)
        if not cand or off is None:
            continue
        if not sample or all(_inline_tree_ok(table, f, off) for f in sample):
            return cand
    return None


def _inline_sample(table: GoPclntab, want: int = 16) -> list[_Func]:
    found: list[_Func] = []
    step = max(1, table._nfunc // 512)
    for idx in range(0, table._nfunc, step):
        try:
            f = table._func(idx)
        except PclntabError:
            continue  # one bad record should not decide the layout
        if f.inl_pcdata and f.inl_funcdata != NO_FUNCDATA:
            found.append(f)
            if len(found) >= want:
                break
    return found


def _inline_tree_ok(table: GoPclntab, f: _Func, gofunc_off: int) -> bool:
    try:
        ends, vals = table._decode(f.inl_pcdata)
        n = max(vals, default=-1) + 1
        if n <= 0:
            return True
        names_end = table._cutab
        for ix in range(n):
            off = gofunc_off + f.inl_funcdata + ix * table._inl_size
            if table.version == "1.18":
                parent, _, pad, _, _, name_off, parent_pc = struct.unpack_from(
                    table._bo + "hBBiiii", table._buf, off)
                if pad or parent < -1 or parent >= n:
                    return False
            else:
                _, p0, p1, p2, name_off, parent_pc, start_line = struct.unpack_from(
                    table._bo + "BBBBiii", table._buf, off)
                if p0 or p1 or p2 or start_line < 0:
                    return False
            pos = table._funcname + name_off
            if not (table._funcname <= pos < names_end and (name_off == 0 or table._buf[pos - 1] == 0)):
                return False
            if not 0 <= parent_pc < f.end - f.entry:
                return False
        return True
    except (struct.error, IndexError, PclntabError):
        return False
