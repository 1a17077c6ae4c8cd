"""ELF files: identity (build ids, file hash), load segments, address translation.

Address translation contract (used for executables, PIE, shared libraries and
the vdso alike):

    runtime address `addr` in a mapping (start, file_offset)
      -> file offset   off   = addr - start + file_offset
      -> ELF vaddr     vaddr = off - seg.offset + seg.vaddr
         where `seg` is the PT_LOAD segment whose file range holds `off`.

The ELF vaddr is what .symtab, .dynsym, DWARF and .gopclntab speak. Going
through the file offset (not "start - lowest vaddr") needs no guess about the
load bias, so it is right for non-PIE executables (bias 0), PIE and shared
libraries (bias = start of the first mapping) and files mapped in pieces.

The ELF header, program headers and section headers are read here with
struct (ElfHeaders), for every user: pyelftools builds an object per header,
which made build-id reads the agent's top cost when it opened every library
of every new process, and gopclntab loads in well under a millisecond on
top of them. pyelftools stays for what it is good at (symbols, DWARF).

Every parse error -- pyelftools', struct's, a bounds check's -- surfaces as
ElfParseError; callers turn that into an unknown frame and a counter.

Files are never memory-mapped: the agent runs as root and symbolizes files
other users own, and a file truncated under a shared mapping kills the
reader with SIGBUS on its next touch of the lost pages. An ElfFile keeps the
file open and copies what the parsers ask for (ElfFile.ensure) with os.preadv
into a private anonymous mapping of the file's size: untouched ranges cost
no memory (they read as zeros), a file that shrinks gives a short read and an
ElfParseError, and at most MAX_COPY_BYTES of one file are ever copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import stat
import struct
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Self

if TYPE_CHECKING:  # pyelftools costs ~40 ms to import: at first use (ElfFile.elf), off a capture's start
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import Section

from symbolizer.cached_property import cached_property
from symbolizer.errors import ElfParseError

# Bytes of head and tail that file_hash() reads, as OTel's "htlhash" does.
HASH_CHUNK_BYTES = 4096

PT_LOAD = 1
PT_NOTE = 4
PT_TLS = 7
PT_GNU_EH_FRAME = 0x6474E550
_E_TYPES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_E_MACHINES = {3: "EM_386", 40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV"}
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_NOTE = 7
SHT_NOBITS = 8
SHT_DYNSYM = 11
NT_GNU_BUILD_ID = 3
NT_GO_BUILD_ID = 4  # Go's linker writes note type 4 with name "Go"
PF_X = 1
PF_W = 2
PF_R = 4
# Extended numbering (gABI): counts too large for the ELF header live in section 0.
PN_XNUM = 0xFFFF  # e_phnum: the count is section 0's sh_info
SHN_XINDEX = 0xFFFF  # e_shstrndx: the index is section 0's sh_link

# Program and section header layouts, in the order the file stores them.
_PHDR64 = "IIQQQQQQ"  # type flags offset vaddr paddr filesz memsz align
_PHDR32 = "IIIIIIII"  # type offset vaddr paddr filesz memsz flags align
_SHDR64 = "IIQQQQIIQQ"  # name type flags addr offset size link info addralign entsize
_SHDR32 = "IIIIIIIIII"
_MAX_SECTION_NAME = 4096  # bytes of a section name we read; longer ones stay unnamed

# Granule of ElfFile's private copy: a range asked for is read in whole chunks,
# so neighbouring small reads (headers, notes) cost one preadv.
COPY_CHUNK_BYTES = 64 * 1024
# Most bytes one file's copy may hold. A file claiming a bigger symbol table or
# DWARF than this (a hostile sparse file, or a huge debug file) is left out with
# an ElfParseError instead of growing the agent without bound.
MAX_COPY_BYTES = 512 * 1024 * 1024
# Most bytes a compressed section (SHF_COMPRESSED) may inflate to: its header states the size and
# pyelftools inflates that much, so a few MB of a user's file could otherwise claim gigabytes.
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024
_MAP_NORESERVE = 0x4000  # Linux; not exported by Python 3.11's mmap. Holes reserve no swap.


def _no_ensure(off: int, size: int) -> None:
    """ensure() of an image that is whole already (bytes)."""


class LoadSegment(NamedTuple):
    """A PT_LOAD program header; `flags` are PF_X|PF_W|PF_R bits."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int


class ProgramHeader(NamedTuple):
    """One program header (Elf64_Phdr / Elf32_Phdr fields, whatever the class)."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


class SectionHeader(NamedTuple):
    """One section header with its name resolved ("" when .shstrtab does not hold it)."""

    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int


class ElfHeaders:
    """The ELF header, program headers and section headers of an image, read with struct.

    Works on bytes, an mmap or a memoryview without copying. The ELF header is
    checked on construction; each table is read, bounds-checked, on first use.
    A table that runs past the end of the image raises ElfParseError.
    """

    def __init__(self, image: bytes | mmap.mmap | memoryview, name: str = "<memory>",
                 ensure: Callable[[int, int], None] = _no_ensure) -> None:
        self.image = image
        self.name = name
        # Makes image[off:off+size] hold the file's bytes (ElfFile.ensure); a no-op for whole images.
        self.ensure = ensure
        n = len(image)
        if n < 52 or bytes(image[:4]) != b"\x7fELF" or image[4] not in (1, 2) or image[5] not in (1, 2):
            raise ElfParseError(f"{name}: not an ELF file")
        self.is64: bool = image[4] == 2
        self.endian: str = "<" if image[5] == 1 else ">"
        e = self.endian
        if self.is64:
            if n < 64:
                raise ElfParseError(f"{name}: ELF header runs past the end of the file")
            self.phoff, self.shoff = struct.unpack_from(e + "QQ", image, 32)
            (self.phentsize, self.phnum, self.shentsize, self.shnum,
             self.shstrndx) = struct.unpack_from(e + "HHHHH", image, 54)
        else:
            self.phoff, self.shoff = struct.unpack_from(e + "II", image, 28)
            (self.phentsize, self.phnum, self.shentsize, self.shnum,
             self.shstrndx) = struct.unpack_from(e + "HHHHH", image, 42)

    def _table(self, what: str, off: int, count: int, entsize: int, fmt: str) -> list[tuple[int, ...]]:
        """`count` entries of `entsize` bytes at `off`, each unpacked with `fmt` (bounds-checked)."""
        if count == 0:
            return []
        layout = struct.Struct(self.endian + fmt)
        end = off + count * entsize
        if entsize < layout.size:
            raise ElfParseError(f"{self.name}: {what}: entry size {entsize} is below {layout.size}")
        if off <= 0 or end > len(self.image):
            raise ElfParseError(f"{self.name}: {what}: {count} x {entsize} bytes at {off:#x} run past the end "
                                f"of the file ({len(self.image):#x})")
        self.ensure(off, end - off)
        if entsize == layout.size:
            return list(layout.iter_unpack(self.image[off:end]))
        return [layout.unpack_from(self.image, off + i * entsize) for i in range(count)]

    @cached_property
    def _section0(self) -> tuple[int, ...] | None:
        """Section 0, where extended numbering keeps counts the ELF header cannot hold."""
        if not self.shoff:
            return None
        return self._table("section header 0", self.shoff, 1, self.shentsize, _SHDR64 if self.is64 else _SHDR32)[0]

    @cached_property
    def program_headers(self) -> list[ProgramHeader]:
        """Every program header, in file order. ElfParseError if the table is truncated."""
        count = self.phnum
        if count == PN_XNUM and self._section0 is not None:
            count = self._section0[7]
        if self.is64:
            return [ProgramHeader(*r) for r in self._table("program headers", self.phoff, count, self.phentsize,
                                                           _PHDR64)]
        return [ProgramHeader(t, flags, off, va, pa, fsz, msz, al)
                for t, off, va, pa, fsz, msz, flags, al in self._table("program headers", self.phoff, count,
                                                                        self.phentsize, _PHDR32)]

    @cached_property
    def load_segments(self) -> list[LoadSegment]:
        """PT_LOAD program headers, in file order."""
        return [LoadSegment(p.vaddr, p.memsz, p.offset, p.filesz, p.flags)
                for p in self.program_headers if p.type == PT_LOAD]

    @cached_property
    def sections(self) -> list[SectionHeader]:
        """Every section header, indexed as the file numbers them ([] when stripped).
        ElfParseError if the table is truncated."""
        if not self.shoff:
            return []
        count, strndx = self.shnum, self.shstrndx
        if count == 0 and self._section0 is not None:
            count = self._section0[5]
        if strndx == SHN_XINDEX and self._section0 is not None:
            strndx = self._section0[6]
        raw = self._table("section headers", self.shoff, count, self.shentsize, _SHDR64 if self.is64 else _SHDR32)
        names = b""
        if 0 < strndx < len(raw):
            # One copy of the names in use (a name longer than _MAX_SECTION_NAME stays unnamed).
            lo = raw[strndx][4]
            hi = min(lo + raw[strndx][5], lo + max(r[0] for r in raw) + _MAX_SECTION_NAME, len(self.image))
            if lo < hi:
                self.ensure(lo, hi - lo)
            names = bytes(self.image[lo:hi]) if lo < hi else b""
        out = []
        make = SectionHeader._make
        for r in raw:
            end = names.find(b"\0", r[0])
            out.append(make((names[r[0]:end].decode("latin-1") if end >= 0 else "",) + r[1:]))
        return out

    @cached_property
    def _by_name(self) -> dict[str, int]:
        by_name: dict[str, int] = {}
        for i, sec in enumerate(self.sections):
            by_name.setdefault(sec.name, i)
        return by_name

    def section(self, name: str) -> SectionHeader | None:
        """The first section called `name`, or None."""
        i = self._by_name.get(name)
        return None if i is None else self.sections[i]

    def section_index(self, name: str) -> int | None:
        """The index of the first section called `name`, or None."""
        return self._by_name.get(name)

    def offset_of(self, vaddr: int, size: int = 1) -> int | None:
        """File offset of [vaddr, vaddr+size) if one PT_LOAD holds it in the image, else None."""
        for seg in self.load_segments:
            if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.filesz:
                off = vaddr - seg.vaddr + seg.offset
                return off if off + size <= len(self.image) else None
        return None


@contextlib.contextmanager
def elf_errors(what: str) -> Iterator[None]:
    """Turn any exception of a parser over untrusted bytes into ElfParseError.

    pyelftools raises ELFError, DWARFError, construct's StreamError, and on
    corrupt input also ValueError, IndexError, KeyError, struct.error,
    UnicodeDecodeError... The contract to callers is one exception type, so
    the net is deliberately wide.
    """
    try:
        yield
    except ElfParseError:
        raise
    except (Exception, RecursionError) as exc:
        raise ElfParseError(f"{what}: {type(exc).__name__}: {exc}") from exc


class ElfFile:
    """One ELF file, read with os.preadv into a private copy (or a bytes image, e.g. the vdso).

    `image` has the file's size; other parsers (gopclntab, elf_symbols,
    dwarf_lines) slice it directly instead of going through pyelftools, and
    `headers` (ElfHeaders) holds its program and section headers. A parser
    reading image[off:off+size] calls ensure(off, size) first: only then do
    those bytes hold the file's (the rest reads as zeros). Headers, notes,
    pyelftools' reads and file_hash() ensure for themselves. The file stays
    open until close() (or garbage collection), so it is readable after the
    process that mapped it is gone.
    Construction validates the ELF header; other properties parse lazily.
    pyelftools reads through one shared stream position, so an ElfFile is
    not safe to use from several threads at once: give each its own or lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise ElfParseError(f"{self.path}: cannot read: {exc}") from exc
        self._open(fd)

    def _open(self, fd: int) -> None:
        """Take `fd` (closed here on error): an empty copy of the file's size, the ELF header read."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ElfParseError(f"{self.path}: not a regular file")
            if st.st_size == 0:
                raise ElfParseError(f"{self.path}: empty file")
            image = mmap.mmap(-1, st.st_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._have = bytearray(-(-st.st_size // COPY_CHUNK_BYTES))  # 1 per chunk copied
        self.copied_bytes = 0
        self._closer = weakref.finalize(self, _release, fd, image)
        self.image = image
        self.ensure(0, 64)
        self._init(image)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<memory>") -> ElfFile:
        """An ElfFile over an in-memory image (the vdso copied from /proc/PID/mem)."""
        self = cls.__new__(cls)
        self.path = name
        self._fd = -1
        self.copied_bytes = len(data)
        self._closer = None
        self._init(bytes(data))
        return self

    def _init(self, image: mmap.mmap | bytes) -> None:
        self.image = image
        with elf_errors(self.path):
            if image[:4] != b"\x7fELF":
                raise ElfParseError(f"{self.path}: not an ELF file")
            self.headers = h = ElfHeaders(image, self.path, self.ensure)
            self.elfclass: int = 64 if h.is64 else 32
            self.little_endian: bool = h.endian == "<"
            e_type, e_machine = struct.unpack_from(h.endian + "HH", image, 16)
            self.e_type: str = _E_TYPES.get(e_type, f"ET_{e_type:#x}")  # pyelftools' names
            self.machine: str = _E_MACHINES.get(e_machine, f"EM_{e_machine}")

    @cached_property
    def elf(self) -> ELFFile:
        """pyelftools' view, made on first use: building its parsers costs ~1.5 ms a file, and most
        files a capture opens need only headers, notes and tables read with struct."""
        from elftools.elf.elffile import ELFFile  # noqa: PLC0415  (see the import at the top)

        with elf_errors(self.path):
            return ELFFile(_ImageStream(self.image, self.ensure))

    def ensure(self, off: int, size: int) -> None:
        """Make image[off:off+size] (clipped to the file) hold the file's bytes.

        Copies the missing chunks with os.preadv. ElfParseError when the file
        got shorter than it was at open (a short read: those bytes stay
        zeros), is closed, or the copy would pass MAX_COPY_BYTES.
        """
        if self._fd < 0:
            if not isinstance(self.image, bytes):
                raise ElfParseError(f"{self.path}: read after close")
            return
        if size <= 0:
            return
        have = self._have
        lo = max(off, 0) // COPY_CHUNK_BYTES
        hi = min(-(-(off + size) // COPY_CHUNK_BYTES), len(have))
        i = have.find(0, lo, hi)
        while 0 <= i < hi:
            j = have.find(1, i, hi)
            j = hi if j < 0 else j
            start, stop = i * COPY_CHUNK_BYTES, min(j * COPY_CHUNK_BYTES, len(self.image))
            if self.copied_bytes + stop - start > MAX_COPY_BYTES:
                raise ElfParseError(f"{self.path}: reading {stop - start} more bytes would pass the "
                                    f"{MAX_COPY_BYTES >> 20} MiB a file may take")
            view = memoryview(self.image)
            try:
                pos = start
                while pos < stop:
                    try:
                        n = os.preadv(self._fd, [view[pos:stop]], pos)
                    except OSError as exc:
                        raise ElfParseError(f"{self.path}: cannot read: {exc}") from exc
                    if n <= 0:
                        raise ElfParseError(f"{self.path}: file shrank to {pos:#x} bytes while being read")
                    pos += n
            finally:
                view.release()
            have[i:j] = b"\x01" * (j - i)
            self.copied_bytes += stop - start
            i = have.find(0, j, hi)

    def ensure_all(self) -> None:
        """ensure() the whole file (a copy of it, within MAX_COPY_BYTES)."""
        self.ensure(0, len(self.image))

    def ensure_loaded(self) -> None:
        """ensure() every PT_LOAD's file range: what a Go table search and its lookups read."""
        for seg in self.load_segments:
            self.ensure(seg.offset, seg.filesz)

    def close(self) -> None:
        """Close the file and release the copy. Buffers others took from `image` must be gone first."""
        if self._closer is not None and self._closer.alive:
            self._closer()
        self._fd = -1

    def reopen(self) -> ElfFile:
        """A new ElfFile over the same open file (a dup of its descriptor) with nothing copied yet: the
        file stays readable after this one is closed, also once the process that mapped it is gone.
        ElfParseError when this one is closed or holds an in-memory image."""
        if self._fd < 0:
            raise ElfParseError(f"{self.path}: cannot reopen: {'closed' if self._closer else 'not a file'}")
        try:
            fd = os.dup(self._fd)
        except OSError as exc:
            raise ElfParseError(f"{self.path}: cannot reopen: {exc}") from exc
        other = ElfFile.__new__(ElfFile)
        other.path = self.path
        other._open(fd)
        return other

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sections -----------------------------------------------------------

    def section(self, name: str) -> Section | None:
        """The section called `name`, or None (also for stripped section headers)."""
        with elf_errors(f"{self.path}: section {name}"):
            # Found by the struct-read headers, then made alone: pyelftools' by-name lookup builds every
            # section of the file first (~90 ms of a large debug file's 40 sections).
            i = self.headers.section_index(name)
            return None if i is None else self.elf.get_section(i)

    def section_bytes(self, name: str) -> bytes | None:
        """Contents of section `name` (decompressed if SHF_COMPRESSED), or None."""
        sec = self.section(name)
        if sec is None or sec["sh_type"] == "SHT_NOBITS":
            return None
        return self.section_data(sec)

    def section_data(self, sec: Section) -> bytes:
        """The bytes of `sec`, decompressed if SHF_COMPRESSED: ElfParseError when its header claims
        more than MAX_DECOMPRESSED_BYTES (a small section of a user's file claiming gigabytes)."""
        with elf_errors(f"{self.path}: section {sec.name}"):
            if sec.compressed and sec.data_size > MAX_DECOMPRESSED_BYTES:
                raise ElfParseError(f"{self.path}: section {sec.name} inflates to {sec.data_size} bytes, over the "
                                    f"{MAX_DECOMPRESSED_BYTES >> 20} MiB a compressed section may take")
            return sec.data()

    @cached_property
    def has_dwarf(self) -> bool:
        """True when the file carries line tables (.debug_info and .debug_line with bytes)."""
        with elf_errors(f"{self.path}: sections"):
            for name in (".debug_info", ".debug_line"):
                sec = self.section(name) or self.section(".z" + name[1:])
                if sec is None or sec["sh_type"] == "SHT_NOBITS" or sec["sh_size"] == 0:
                    return False
            return True

    # -- segments and addresses ---------------------------------------------

    @property
    def program_headers(self) -> list[ProgramHeader]:
        """Every program header (ElfParseError if the table is truncated)."""
        return self.headers.program_headers

    @property
    def load_segments(self) -> list[LoadSegment]:
        """PT_LOAD program headers, in file order."""
        return self.headers.load_segments

    @property
    def is_pie_or_shared(self) -> bool:
        """ET_DYN: a PIE executable or a shared library (loaded at a bias)."""
        return self.e_type == "ET_DYN"

    def vaddr_for_offset(self, file_offset: int) -> int | None:
        """The ELF vaddr of `file_offset`, via the PT_LOAD segment holding it; None if none does.

        A mapping starts on a page boundary, so an offset just before a
        segment's p_offset (the page's head) is still translated by that
        segment: offset and vaddr are congruent modulo the page size.
        """
        return vaddr_for_offset(self.load_segments, file_offset)

    def offset_for_vaddr(self, vaddr: int) -> int:
        """File offset of virtual address `vaddr` (where a uprobe goes), through the PT_LOAD segment
        holding it; ElfParseError if it is in no loaded part of the file."""
        off = self.headers.offset_of(vaddr)
        if off is not None:
            return off
        raise ElfParseError(f"{self.path}: address 0x{vaddr:x} is in no loaded segment")

    def vaddr_for_runtime(self, addr: int, map_start: int, map_file_offset: int) -> int | None:
        """The ELF vaddr of runtime address `addr` in a mapping (start, file offset)."""
        return self.vaddr_for_offset(addr - map_start + map_file_offset)

    # -- identity ------------------------------------------------------------

    def _note_ranges(self) -> list[tuple[int, int, int]]:
        """(offset, size, align) of SHT_NOTE sections, else (stripped or corrupt section headers)
        of PT_NOTE segments."""
        try:
            sections = self.headers.sections
        except ElfParseError:
            sections = []
        ranges = [(s.offset, s.size, s.addralign) for s in sections if s.type == SHT_NOTE]
        return ranges or [(p.offset, p.filesz, p.align) for p in self.program_headers if p.type == PT_NOTE]

    @cached_property
    def _note_list(self) -> list[tuple[bytes, int, bytes]]:
        with elf_errors(f"{self.path}: notes"):
            endian = "<" if self.little_endian else ">"
            out: list[tuple[bytes, int, bytes]] = []
            for off, size, align in self._note_ranges():
                self.ensure(off, size)
                out.extend(parse_notes(self.image, off, size, 8 if align == 8 else 4, endian))
            return out

    def _notes(self) -> Iterator[tuple[bytes, int, bytes]]:
        """(name, type, desc) of every note, from SHT_NOTE sections, else PT_NOTE segments."""
        return iter(self._note_list)

    @cached_property
    def gnu_build_id(self) -> str | None:
        """The NT_GNU_BUILD_ID as lowercase hex (what `readelf -n` prints), or None."""
        for name, ntype, desc in self._notes():
            if name == b"GNU" and ntype == NT_GNU_BUILD_ID and desc:
                return desc.hex()
        return None

    @cached_property
    def go_build_id(self) -> str | None:
        """Go's build id (note "Go", type 4, in .note.go.buildid), as `go tool buildid` prints it."""
        for name, ntype, desc in self._notes():
            if name == b"Go" and ntype == NT_GO_BUILD_ID and desc:
                return desc.decode("utf-8", "replace")
        return None

    def file_hash(self) -> str:
        """Identity for files without a build id: sha256(head 4 KiB + tail 4 KiB + size), 128 bits hex.

        Like the OTel profiler's "htlhash": reading 8 KiB is cheap, and head
        (ELF/program headers) plus tail (section headers, .symtab/.strtab) plus
        size change with essentially any rebuild.
        """
        img = self.image
        size = len(img)
        self.ensure(0, HASH_CHUNK_BYTES)
        self.ensure(size - HASH_CHUNK_BYTES, HASH_CHUNK_BYTES)
        h = hashlib.sha256()
        h.update(bytes(img[:HASH_CHUNK_BYTES]))
        h.update(bytes(img[max(0, size - HASH_CHUNK_BYTES):]))
        h.update(size.to_bytes(8, "little"))
        return h.hexdigest()[:32]


def vaddr_for_offset(segments: Sequence[LoadSegment], file_offset: int) -> int | None:
    """ElfFile.vaddr_for_offset over given PT_LOAD segments (a file known only by them: FileSymbols.from_symbols)."""
    for seg in segments:
        if seg.offset <= file_offset < seg.offset + seg.filesz:
            return file_offset - seg.offset + seg.vaddr
    for seg in segments:
        page_start = seg.offset & ~0xFFF
        if page_start <= file_offset < seg.offset + max(seg.filesz, 1):
            return file_offset - seg.offset + seg.vaddr
    return None


def file_to_vaddr(elf: ElfFile, file_offset: int) -> int | None:
    """Module-level spelling of ElfFile.vaddr_for_offset."""
    return elf.vaddr_for_offset(file_offset)


def parse_notes(image: bytes | mmap.mmap, off: int = 0, size: int | None = None, align: int = 4,
                endian: str = "<") -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each ELF note in image[off:off+size] (the rest of the image when size is None).

    `align` is the note section's alignment (4, or 8 for some GNU property
    notes); `endian` a struct byte-order prefix. Also reads bare note
    streams such as /sys/kernel/notes. ElfParseError when a note runs past
    the range.
    """
    if size is None:
        size = len(image) - off
    end = off + size
    if off < 0 or end > len(image):
        raise ElfParseError(f"note range {off:#x}+{size:#x} beyond end of file")
    hdr = struct.Struct(endian + "III")
    pos = off
    while pos + hdr.size <= end:
        namesz, descsz, ntype = hdr.unpack_from(image, pos)
        pos += hdr.size
        name_end = pos + namesz
        desc_start = (name_end + align - 1) & ~(align - 1)
        desc_end = desc_start + descsz
        if desc_end > end:
            raise ElfParseError(f"note at {pos:#x} runs past its section")
        yield bytes(image[pos:name_end]).rstrip(b"\0"), ntype, bytes(image[desc_start:desc_end])
        pos = (desc_end + align - 1) & ~(align - 1)


def _release(fd: int, image: mmap.mmap) -> None:
    """ElfFile's finalizer: close the file, then the copy (unless a parser still holds a view of it)."""
    os.close(fd)
    with contextlib.suppress(BufferError):
        image.close()


class _ImageStream:
    """The seek/read/tell subset pyelftools needs, over an ElfFile's image, ensuring what it reads."""

    def __init__(self, data: bytes | mmap.mmap, ensure: Callable[[int, int], None]) -> None:
        self._data = memoryview(data)
        self._ensure = ensure
        self._pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._data))[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else self._pos + n
        self._ensure(self._pos, end - self._pos)
        out = bytes(self._data[self._pos:end])
        self._pos += len(out)
        return out


_SYMBOL_TYPES = {"STT_NOTYPE": 0, "STT_OBJECT": 1, "STT_FUNC": 2, "STT_SECTION": 3, "STT_FILE": 4,
                 "STT_COMMON": 5, "STT_TLS": 6, "STT_GNU_IFUNC": 10}


def defined_symbol_value(elf: ElfFile, name: str, sym_type: str) -> int | None:
    """st_value of the defined symbol `name` of type `sym_type` (STT_OBJECT, STT_TLS...), from .dynsym
    then .symtab; None if neither defines it. (symbolizer/elf_symbols.py keeps functions only.)

    Asked of every executable a capture sees (is it a CPython? does it have an OpenTelemetry TLS
    record?), so it reads raw: a table whose string table lacks the name is not scanned at all, and
    one that has it is scanned with struct (pyelftools' symbol-by-name parses each entry, ~1 s for a
    large static binary)."""
    return defined_symbols(elf, (name,), (sym_type,)).get(name)


def defined_symbols(elf: ElfFile, names: Sequence[str], sym_types: Sequence[str] | None = None,
                    tables: Sequence[str] = (".dynsym", ".symtab")) -> dict[str, int]:
    """st_value of each defined symbol of `names` (of one of `sym_types`; None: any type), the first
    table of `tables` that defines it winning. Reads as defined_symbol_value does: through the
    ElfFile's bounded copy, no object per symbol, so a user's file claiming a huge table costs at
    most MAX_COPY_BYTES and an ElfParseError."""
    want_types = None if sym_types is None else {_SYMBOL_TYPES[t] for t in sym_types}
    headers = elf.headers
    all_headers = headers.sections
    image = elf.image
    is64 = elf.elfclass == 64
    fmt = struct.Struct(("<" if elf.little_endian else ">") + ("IBBHQQ" if is64 else "IIIBBH"))
    out: dict[str, int] = {}
    with elf_errors(f"{elf.path}: symbols {', '.join(names)}"):
        for table in tables:
            h = headers.section(table)
            if h is None or h.type not in (SHT_SYMTAB, SHT_DYNSYM) or not 0 <= h.link < len(all_headers):
                continue
            strtab = all_headers[h.link]
            if strtab.offset + strtab.size > len(image) or h.offset + h.size > len(image):
                raise ElfParseError(f"{elf.path}: {table} beyond end of file")
            elf.ensure(strtab.offset, strtab.size)
            strings = bytes(image[strtab.offset:strtab.offset + strtab.size])
            offsets: dict[int, str] = {}
            for name in names:
                if name in out:
                    continue
                needle = name.encode() + b"\0"  # not preceded by NUL: linkers share the tails of strings
                at = strings.find(needle)
                while at >= 0:
                    offsets[at] = name
                    at = strings.find(needle, at + 1)
            if not offsets:
                continue
            usable = h.size - h.size % fmt.size
            elf.ensure(h.offset, usable)
            for sym in fmt.iter_unpack(bytes(image[h.offset:h.offset + usable])):
                if is64:
                    st_name, st_info, _other, shndx, value, _size = sym
                else:
                    st_name, value, _size, st_info, _other, shndx = sym
                name = offsets.get(st_name)
                if (name is not None and name not in out and shndx != 0
                        and (want_types is None or st_info & 0xF in want_types)):
                    out[name] = value
    return out
