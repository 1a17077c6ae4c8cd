"""Symbols of one file, whatever it is, cached by build id.

The middle tier of the symbolizer: a FileSymbols knows one binary (Go
pclntab, ELF symbol tables, DWARF lines) and nothing of the processes that
map it; process_symbols.py holds the per-process load addresses. Everything
is parsed lazily, on the first lookup that needs it, because most mapped
files (a process maps dozens of libraries) never appear in a sample.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from symbolizer.cached_property import cached_property, computed, locks
from symbolizer.debug_files import DEFAULT_DEBUG_DIRS, find_debug_file
from symbolizer.demangle import demangle
from symbolizer.dwarf_lines import DwarfLines
from symbolizer.elf import COPY_CHUNK_BYTES, ElfFile, LoadSegment, vaddr_for_offset
from symbolizer.elf_symbols import ElfSymbols, Symbol
from symbolizer.errors import BpfprofError
from symbolizer.frames import BuildIdKind, Frame, FrameKind
from symbolizer.gopclntab import GoPclntab, load_pclntab

if TYPE_CHECKING:
    from symbolizer.cfi import FdeIndex, UnwindTable
    from symbolizer.debuginfod import DebuginfodClient

log = logging.getLogger(__name__)
FRAMES_CACHE_SIZE = 4096  # native frames kept per file (symbolize()); past it the cache starts again


@dataclass(frozen=True)
class FileId:
    """A file's identity: the cache key of its symbols (never its path)."""

    build_id: str
    kind: BuildIdKind


def file_id(elf: ElfFile) -> FileId:
    """GNU build id, else Go build id, else a hash of the file's head and tail."""
    try:
        gnu = elf.gnu_build_id
        if gnu:
            return FileId(gnu, BuildIdKind.GNU)
        go = elf.go_build_id
        if go:
            return FileId(go, BuildIdKind.GO)
    except BpfprofError:
        pass  # corrupt notes: the hash still identifies the file
    return FileId(elf.file_hash(), BuildIdKind.HASH)


class FileSymbols:
    """Address (ELF vaddr) -> frames for one binary. Never raises on lookup.

    A part of the file that fails to parse (corrupt pclntab, bogus DWARF) is
    logged once and left out; the other parts still answer.
    """

    # Where to look for separate debug info (symbolizer.debug_files): the process's root on this host and
    # the file's path in it; set by whoever opened the file through /proc/PID.
    debug_root: str = ""
    debug_path: str = ""
    debug_dirs: tuple[str, ...] = DEFAULT_DEBUG_DIRS
    debuginfod: DebuginfodClient | None = None  # asked when no local debug file is found

    # What release() drops: parsed on first use from the file's copy, parsed again after it.
    _PARSED = ("go", "debug", "symbols", "lines", "unwind_table", "fde_index", "unwind_rows")
    # The BPF walker's rows (symbolizer.unwind_rows.UnwindRows: that module imports this one), once built.
    unwind_rows: Any = None
    last_used = 0.0  # time.monotonic() of the last lookup or get() (SymbolCache's LRU by bytes)

    def __init__(self, elf: ElfFile, fid: FileId) -> None:
        self.elf: ElfFile | None = elf  # None: built from_symbols()
        self.path = elf.path
        self.id = fid
        self.errors: list[str] = []
        self.last_used = time.monotonic()
        self._frames: dict[int, tuple[Frame, ...]] = {}  # vaddr -> symbolize()'s native frames

    @classmethod
    def from_symbols(cls, fid: FileId, path: str, segments: Sequence[LoadSegment],
                     symbols: Iterable[Symbol]) -> FileSymbols:
        """A file known only by its identity, PT_LOAD segments and function symbols, not its bytes.

        What a recorded capture keeps of each binary, so that it replays
        without them (tests/replay: binaries are not committed). Frames are
        symbol names only: no Go table, DWARF lines or CFI rows.
        """
        self = cls.__new__(cls)
        self.elf = None
        self.path = path
        self.id = fid
        self.errors = []
        self._frames = {}
        # The parts __init__ leaves to be parsed on first use, given instead.
        self.__dict__.update(load_segments=list(segments), looks_like_go=False, go=None, lines=None,
                             symbols=ElfSymbols.from_symbols(symbols), unwind_table=None, fde_index=None)
        return self

    def _guarded(self, what: str, make: Callable[[], object]) -> object | None:
        try:
            return make()
        except BpfprofError as e:
            msg = f"{self.path}: {what}: {e}"
            self.errors.append(msg)
            log.warning("%s", msg)
            return None

    @cached_property
    def load_segments(self) -> list[LoadSegment]:
        """The file's PT_LOAD program headers (ElfParseError if unreadable)."""
        assert self.elf is not None
        return self.elf.load_segments

    @cached_property
    def go(self) -> GoPclntab | None:
        if not self.looks_like_go:
            return None
        return self._guarded("pclntab", lambda: load_pclntab(self.elf))  # type: ignore[return-value]

    @cached_property
    def looks_like_go(self) -> bool:
        """Whether a pclntab is worth looking for.

        The search scans the whole file when there is no .gopclntab section,
        which cost ~0.2 s per native library; every Go binary has a Go
        build-id note, a .gopclntab or a .go.buildinfo section (stripped ones
        included), so files with none of them are skipped.
        """
        try:
            return bool(self.elf.go_build_id or self.elf.section(".gopclntab") is not None
                        or self.elf.section(".go.buildinfo") is not None)
        except BpfprofError:
            return True  # corrupt headers: let the pclntab scan decide

    @cached_property
    def debug(self) -> ElfFile | None:
        """The separate debug file (build-id tree, .gnu_debuglink, MiniDebugInfo) of a binary that lacks a
        .symtab or DWARF lines itself; looked up on the first lookup that needs it."""
        elf = self.elf
        if elf is None or elf.path == "[vdso]":
            return None
        try:
            if elf.section(".symtab") is not None and elf.has_dwarf:
                return None
        except BpfprofError:
            return None
        build_id = self.id.build_id if self.id.kind == BuildIdKind.GNU else ""
        return self._guarded("debug info", lambda: find_debug_file(  # type: ignore[return-value]
            elf, build_id, self.debug_path, self.debug_root, self.debug_dirs, self.debuginfod))

    @cached_property
    def symbols(self) -> ElfSymbols | None:
        debug = self.debug
        if debug is not None and self.elf.section(".symtab") is None and debug.section(".symtab") is not None:
            found = self._guarded("debug symbols", lambda: ElfSymbols(debug))
            if found is not None:
                return found  # type: ignore[return-value]
        return self._guarded("symbols", lambda: ElfSymbols(self.elf))  # type: ignore[return-value]

    @cached_property
    def lines(self) -> DwarfLines | None:
        if self.elf.has_dwarf:
            return self._guarded("dwarf", lambda: DwarfLines(self.elf))  # type: ignore[return-value]
        debug = self.debug
        if debug is not None and debug.has_dwarf:
            return self._guarded("debug dwarf", lambda: DwarfLines(debug))  # type: ignore[return-value]
        return None

    @cached_property
    def unwind_table(self) -> UnwindTable | None:
        """CFI rows for the unwinder (None if corrupt): from the on-disk cache when the same CFI
        sections were parsed before, else built (libc: ~50 ms, node: ~0.8 s) and cached."""
        from symbolizer import unwind_cache  # noqa: PLC0415  (only unwinding needs it)
        from symbolizer.cfi import CfiInputs, cfi_inputs  # noqa: PLC0415

        # Keyed by the CFI sections' own bytes, not the build id: a copy of a binary can keep its build id
        # with other CFI, and its table must not be served to the real file (nor the other way round).
        inputs: CfiInputs | None = self._guarded("unwind table", lambda: cfi_inputs(self.elf))  # type: ignore[assignment]
        if inputs is None:
            return None
        key = inputs.digest()
        cached = unwind_cache.load(key, "cfi")
        if cached is not None:
            return cached
        table = self._guarded("unwind table", inputs.parse)
        if table is not None:
            unwind_cache.store(key, "cfi", table)
        return table

    @cached_property
    def fde_index(self) -> FdeIndex | None:
        """Per-FDE rules through .eh_frame_hdr (None without one): what a stack-copy walk uses
        while `unwind_table` is not built, so it never waits for a whole-file CFI parse."""
        from symbolizer.cfi import FdeIndex  # noqa: PLC0415  (only unwinding needs it)

        return self._guarded("fde index", lambda: FdeIndex.from_elf(self.elf))  # type: ignore[return-value]

    def unwind_rules(self) -> UnwindTable | FdeIndex | None:
        """The table if something built it already (the BPF tables' worker does), else the FDE
        index, else the table built now (a file without .eh_frame_hdr)."""
        if computed(self, "unwind_table"):
            return self.unwind_table
        return self.fde_index or self.unwind_table

    def held_bytes(self) -> int:
        """Bytes this file's parsed state holds in big blocks: the copies of the file and of its separate
        debug file, DWARF sections decompressed, CFI rows and the BPF walker's rows."""
        d = self.__dict__
        total = self.elf.copied_bytes if self.elf is not None else 0
        debug = d.get("debug")
        if debug is not None:
            total += debug.copied_bytes
        lines = d.get("lines")
        if lines is not None:
            total += lines.inflated_bytes
        table = d.get("unwind_table")
        if table is not None:
            total += sum(len(a) * a.itemsize for a in (table.pcs, table.kinds, table.cfa_offs, table.rbp_offs))
        rows = d.get("unwind_rows")
        if rows is not None:
            total += len(rows.data)
        return total

    def release(self) -> int:
        """Drop what was parsed and copied (SymbolCache's byte budget); returns the bytes given back.

        The file stays open (a dup of its descriptor), so the next lookup parses it again, also
        after its process is gone. The old copy is not closed here: a walk under way in another
        thread (the drain thread's FDE index, the unwind rows' worker) keeps reading good bytes;
        it is unmapped when the last parsed object holding it is collected (the daemon collects
        within a minute of a release). A file with a part being parsed right now is left for the
        next time (0). Files known only by their bytes (the vdso) or by their symbols keep what
        they have.
        """
        old = self.elf
        if old is None or old._fd < 0:
            return 0
        d = self.__dict__
        taken = []
        try:
            for lock in locks(self):
                if not lock.acquire(blocking=False):
                    return 0  # being computed in another thread
                taken.append(lock)
            held = self.held_bytes()
            try:
                self.elf = old.reopen()
            except BpfprofError as e:
                log.debug("%s: not released: %s", self.path, e)
                return 0
            for name in self._PARSED:
                d.pop(name, None)
            self._frames = {}
            return held
        finally:
            for lock in taken:
                lock.release()

    def touch(self) -> None:
        """Note a use (the unwind rows' builder, which reads the file without symbolize())."""
        self.last_used = time.monotonic()

    def translate(self, addr: int, map_start: int, map_file_offset: int) -> int | None:
        """Runtime address in a mapping -> ELF vaddr (PIE, shared libraries, exes alike)."""
        try:
            return vaddr_for_offset(self.load_segments, addr - map_start + map_file_offset)
        except BpfprofError:
            return None

    def symbolize(self, vaddr: int) -> tuple[Frame, ...]:
        """Frames at `vaddr`, innermost first; () when nothing covers it."""
        self.last_used = time.monotonic()
        go = self.go
        if go is not None:
            frames = go.lookup(vaddr)
            if frames:
                return frames
        # Kept per file, not per process: every process of a binary (a churn of short-lived ones, the
        # workers of a server) has the same addresses, and DWARF's inline chain costs ~0.5 ms a lookup.
        cache = self._frames
        frames = cache.get(vaddr)
        if frames is None:
            frames = self._native_frames(vaddr)
            if len(cache) >= FRAMES_CACHE_SIZE:
                cache.clear()
            cache[vaddr] = frames
        return frames

    def _native_frames(self, vaddr: int) -> tuple[Frame, ...]:
        syms = self.symbols
        sym = syms.lookup(vaddr) if syms is not None else None
        if sym is None:
            return ()
        lines = self.lines
        if lines is not None:
            try:
                chain = lines.frames(vaddr)
                row = None if chain else lines.lookup(vaddr)
            except BpfprofError:
                chain, row = [], None
            if chain:
                # The outermost frame is the physical function: name it by its
                # ELF symbol so DWARF and non-DWARF builds agree.
                *inner, _outer = chain
                out = [Frame(function=demangle(f.function), kind=FrameKind.NATIVE, file=f.file, line=f.line,
                             system_name=f.function, inlined=True) for f in inner]
                out.append(Frame(function=demangle(sym.name), kind=FrameKind.NATIVE, file=_outer.file,
                                 line=_outer.line, system_name=sym.name))
                return tuple(out)
            if row is not None:
                return (Frame(function=demangle(sym.name), kind=FrameKind.NATIVE, file=row.file, line=row.line,
                              system_name=sym.name),)
        return (Frame(function=demangle(sym.name), kind=FrameKind.NATIVE, system_name=sym.name),)


class SymbolCache:
    """FileSymbols by build id, least recently used evicted past `max_files`, and past `max_bytes` of
    copies the least recently used released (enforce_budget()).

    Shared by every session of a process, so a second capture of the same
    binary reuses what the first one parsed. A file evicted by count may
    still be held by a process's snapshot: it is released at the next
    enforce_budget() (parsed again if that process is sampled again).
    """

    # Files used more recently than this are never released: they would be parsed again at once (a soak with a
    # budget under its working set released every file at every build, spent 27 % of a CPU re-parsing, and
    # grew, with each build's garbage waiting for a collection). Past the budget with only those left, the
    # cache holds the last minute's working set.
    MIN_IDLE_S = 60.0

    def __init__(self, max_files: int = 4096, debug_dirs: tuple[str, ...] = DEFAULT_DEBUG_DIRS,
                 debuginfod: DebuginfodClient | None = None, max_bytes: int | None = None,
                 min_idle_s: float = MIN_IDLE_S) -> None:
        self.max_files = max_files
        self.max_bytes = max_bytes  # None: no byte budget (a one-shot capture)
        self.min_idle_s = min_idle_s
        self.debug_dirs = debug_dirs  # where new FileSymbols look for separate debug info
        self.debuginfod = debuginfod  # and the servers they ask when none is found there
        self._by_id: OrderedDict[FileId, FileSymbols] = OrderedDict()
        self._retired: list[FileSymbols] = []  # evicted by count, to be released by enforce_budget()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.budget_evictions = 0  # files released by the byte budget
        self.released_bytes = 0

    def get(self, elf: ElfFile) -> FileSymbols:
        """The cached FileSymbols of this file's build id, or a new one for it."""
        fid = file_id(elf)
        with self._lock:
            fs = self._by_id.get(fid)
            if fs is not None:
                self.hits += 1
                self._by_id.move_to_end(fid)
                fs.last_used = time.monotonic()
                return fs
            self.misses += 1
            fs = FileSymbols(elf, fid)
            if self.debug_dirs != DEFAULT_DEBUG_DIRS:
                fs.debug_dirs = self.debug_dirs
            if self.debuginfod is not None:
                fs.debuginfod = self.debuginfod
            self._by_id[fid] = fs
            while len(self._by_id) > self.max_files:
                _, gone = self._by_id.popitem(last=False)
                if self.max_bytes is not None:
                    self._retired.append(gone)
                self.evictions += 1
            return fs

    def enforce_budget(self) -> int:
        """Release files evicted by count, then the least recently used until the copies the cache
        holds fit `max_bytes` (those counted in budget_evictions); returns how many were released in
        all. The daemon calls it in its builder, after each interval, when no lookup of its own is
        under way (FileSymbols.release)."""
        if self.max_bytes is None:
            return 0
        with self._lock:
            retired, self._retired = self._retired, []
            files = list(self._by_id.values())
        released = 0
        for fs in retired:
            got = fs.release()
            if got > 0:
                self.released_bytes += got
                released += 1
            elif fs.elf is not None and fs.elf._fd >= 0 and fs.held_bytes() > 0:
                self._retired.append(fs)  # in use in another thread: next time
        held = [(fs.last_used, i, fs, fs.held_bytes()) for i, fs in enumerate(files)]
        total = sum(h[3] for h in held)
        if total > self.max_bytes:
            before, budget = total, 0
            recent = time.monotonic() - self.min_idle_s
            for used, _, fs, n in sorted(held):
                if total <= self.max_bytes or used > recent:
                    break
                if n <= COPY_CHUNK_BYTES:
                    continue  # what a release keeps (the ELF header's chunk): nothing to gain
                got = fs.release()
                if got <= 0:
                    continue  # in use in another thread: next time
                self.released_bytes += got
                total -= n
                budget += 1
            self.budget_evictions += budget
            released += budget
            if budget:
                log.info("symbol cache: %d files released to fit its %.1f MiB budget (%.1f -> %.1f MiB held%s)",
                         budget, self.max_bytes / 2**20, before / 2**20, total / 2**20,
                         "; the rest was used in the last minute" if total > self.max_bytes else "")
        return released

    def __len__(self) -> int:
        return len(self._by_id)

    def mapped_bytes(self) -> int:
        """Bytes the files in the cache hold copied or inflated in memory (FileSymbols.held_bytes)."""
        with self._lock:
            files = list(self._by_id.values())
        return sum(fs.held_bytes() for fs in files)


DEFAULT_CACHE = SymbolCache()
