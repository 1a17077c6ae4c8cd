"""Go build information from the `.go.buildinfo` blob: toolchain version and module info.

This is what `go version -m BINARY` prints. Layout (cmd/go/internal/version,
debug/buildinfo): a 32-byte header, 16-byte aligned, `\\xff Go buildinf:`,
pointer size, flags; with flag bit 1 (Go 1.18+) the version and the module
info follow inline as uvarint-prefixed strings, before that they are two
pointers to Go string headers elsewhere in the data segment. The blob is found
through its section, else by scanning the writable PT_LOAD segments (section
headers can be stripped).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from symbolizer.elf import ElfFile, elf_errors
from symbolizer.errors import ElfParseError
from symbolizer.leb128 import uleb128 as _uvarint  # Go uvarints are unsigned LEB128

MAGIC = b"\xff Go buildinf:"
HEADER_SIZE = 32
FLAG_BIG_ENDIAN = 1
FLAG_INLINE_STRINGS = 2
PF_W = 2
MAX_STRING_BYTES = 1 << 20  # module info of huge programs is tens of KiB; more is corruption
_VERSION = re.compile(r"^go(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class GoBuildInfo:
    """`version` is the toolchain's string ("go1.27.3"); `settings` the `build` lines."""

    version: str
    main_path: str = ""
    main_module: str = ""  # "path\tversion\tsum" as printed
    deps: tuple[str, ...] = ()
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def version_tuple(self) -> tuple[int, int, int] | None:
        """(1, 27, 3) for "go1.27.3"; None for a development toolchain ("devel ...")."""
        m = _VERSION.match(self.version)
        if m is None:
            return None
        return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _find_blob(elf: ElfFile) -> tuple[bytes, int] | None:
    """(bytes from the header on, ELF vaddr of the header), or None if the file has no build info."""
    sec = elf.section(".go.buildinfo")
    if sec is not None and sec["sh_type"] != "SHT_NOBITS":
        off, size = sec["sh_offset"], sec["sh_size"]
        elf.ensure(off, max(size, HEADER_SIZE))
        return bytes(elf.image[off:off + max(size, HEADER_SIZE)]), sec["sh_addr"]
    for seg in elf.load_segments:  # section headers stripped: the blob sits in a writable segment
        if not seg.flags & PF_W:
            continue
        elf.ensure(seg.offset, seg.filesz)
        data = bytes(elf.image[seg.offset:seg.offset + seg.filesz])
        pos = data.find(MAGIC)
        while pos >= 0 and (seg.vaddr + pos) % 16:
            pos = data.find(MAGIC, pos + 1)
        if pos >= 0:
            return data[pos:], seg.vaddr + pos
    return None


def _read_at_vaddr(elf: ElfFile, vaddr: int, size: int) -> bytes:
    for seg in elf.load_segments:
        if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.filesz:
            off = seg.offset + vaddr - seg.vaddr
            elf.ensure(off, size)
            return bytes(elf.image[off:off + size])
    raise ElfParseError(f"address {vaddr:#x} of a build info string is outside the file")


def _pointer_strings(elf: ElfFile, blob: bytes, ptr_size: int, big_endian: bool) -> tuple[str, str]:
    """Pre-1.18 form: two pointers to Go string headers (data pointer, length)."""
    fmt = ("<>"[big_endian]) + ("Q" if ptr_size == 8 else "I")
    out = []
    for i in range(2):
        (hdr,) = struct.unpack_from(fmt, blob, 16 + i * ptr_size)
        data_ptr, length = struct.unpack(fmt + fmt[1], _read_at_vaddr(elf, hdr, 2 * ptr_size))
        if length > MAX_STRING_BYTES:
            raise ElfParseError("implausible build info string length")
        out.append(_read_at_vaddr(elf, data_ptr, length).decode(errors="replace") if length else "")
    return out[0], out[1]


def _strip_modinfo(modinfo: str) -> str:
    # cmd/go wraps the module info in 16-byte sentinels
    if len(modinfo) >= 33 and modinfo[-17] == "\n":
        return modinfo[16:-16]
    return modinfo


def read_build_info(elf: ElfFile) -> GoBuildInfo | None:
    """The Go build info of `elf`, or None if it is not a Go binary. ElfParseError if it is corrupt."""
    with elf_errors(f"{elf.path}: .go.buildinfo"):
        found = _find_blob(elf)
        if found is None:
            return None
        blob, _vaddr = found
        if len(blob) < HEADER_SIZE or not blob.startswith(MAGIC):
            raise ElfParseError(f"{elf.path}: .go.buildinfo has no magic")
        ptr_size, flags = blob[14], blob[15]
        if flags & FLAG_INLINE_STRINGS:
            n, pos = _uvarint(blob, HEADER_SIZE)
            version = blob[pos:pos + n].decode(errors="replace")
            n2, pos2 = _uvarint(blob, pos + n)
            modinfo = blob[pos2:pos2 + n2].decode(errors="replace")
            if pos + n > len(blob) or pos2 + n2 > len(blob):
                raise ElfParseError(f"{elf.path}: .go.buildinfo strings run past the blob")
        else:
            if ptr_size not in (4, 8):
                raise ElfParseError(f"{elf.path}: .go.buildinfo pointer size {ptr_size}")
            version, modinfo = _pointer_strings(elf, blob, ptr_size, bool(flags & FLAG_BIG_ENDIAN))
    return parse_modinfo(version, _strip_modinfo(modinfo))


def parse_modinfo(version: str, modinfo: str) -> GoBuildInfo:
    """Split the module info text (tab-separated lines, as `go version -m` prints them)."""
    main_path, main_module, deps, settings = "", "", [], {}
    for line in modinfo.splitlines():
        key, _, rest = line.partition("\t")
        if key == "path":
            main_path = rest
        elif key == "mod":
            main_module = rest
        elif key == "dep":
            deps.append(rest)
        elif key == "build":
            k, _, v = rest.partition("=")
            settings[k] = v
    return GoBuildInfo(version=version, main_path=main_path, main_module=main_module, deps=tuple(deps),
                       settings=settings)
