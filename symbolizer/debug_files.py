"""Separate debug info of a binary, where distributions put it.

Distributions strip their binaries and ship the symbols apart: Debian's
libc6-dbg puts libc's at /usr/lib/debug/.build-id/xx/rest.debug (named by the
build id), others name the debug file in the binary's .gnu_debuglink (with a
CRC32 of that file), and Fedora embeds an xz-compressed ELF of function
symbols, MiniDebugInfo, in .gnu_debugdata. When debuginfod servers are
configured (symbolizer.debuginfod) they are asked after the local places and
before MiniDebugInfo (which holds function symbols only). Each is tried in that order; a
candidate is used only when it is provably the binary's (same build id, or
the debuglink's CRC), so a wrong file can never rename frames.

A binary mapped by another process is looked up in that process's root
(/proc/PID/root) first, then on this host: build-id matches make the host's
tree safe for containers' files too. Reads are bounded: ElfFile copies with
preadv (never mmap), the CRC pass reads at most MAX_DEBUG_FILE_BYTES, and
MiniDebugInfo decompresses at most MAX_DEBUGDATA_BYTES.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError

if TYPE_CHECKING:
    from symbolizer.debuginfod import DebuginfodClient

DEFAULT_DEBUG_DIRS: tuple[str, ...] = ("/usr/lib/debug",)
MAX_DEBUG_FILE_BYTES = 1 << 30  # a debug file larger than this is not read for its CRC
MAX_DEBUGDATA_BYTES = 64 << 20  # decompressed MiniDebugInfo
_CRC_CHUNK = 1 << 20


def build_id_paths(build_id: str, dirs: Sequence[str]) -> list[str]:
    """Where each debug directory's build-id tree keeps the file of `build_id` (hex)."""
    if len(build_id) < 3:
        return []
    return [os.path.join(d, ".build-id", build_id[:2], build_id[2:] + ".debug") for d in dirs]


def parse_debuglink(data: bytes) -> tuple[str, int] | None:
    """(file name, CRC32) of a .gnu_debuglink section: a NUL-terminated name, padding to 4, the CRC."""
    end = data.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3
    if crc_at + 4 > len(data):
        return None
    name = data[:end].decode("utf-8", "replace")
    if "/" in name or name in (".", ".."):
        return None  # a bare file name, never a path
    return name, struct.unpack_from("<I", data, crc_at)[0]


def file_crc32(path: str, limit: int = MAX_DEBUG_FILE_BYTES) -> int | None:
    """CRC32 (zlib's, as GNU debuglink uses) of the file, None if unreadable or larger than `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size > limit:
            return None
        crc, pos = 0, 0
        while True:
            chunk = os.pread(fd, _CRC_CHUNK, pos)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
            if pos > limit:
                return None
    except OSError:
        return None
    finally:
        os.close(fd)


def _open(path: str) -> ElfFile | None:
    try:
        return ElfFile(path)
    except ElfParseError:
        return None


def _by_build_id(build_id: str, roots: Sequence[str], dirs: Sequence[str]) -> ElfFile | None:
    for root in roots:
        for path in build_id_paths(build_id, [root + d for d in dirs]):
            if not os.path.isfile(path):
                continue
            elf = _open(path)
            if elf is None:
                continue
            try:
                same = elf.gnu_build_id == build_id
            except ElfParseError:
                same = False
            if same:
                return elf
            elf.close()
    return None


def _by_debuglink(elf: ElfFile, path: str, roots: Sequence[str], dirs: Sequence[str]) -> ElfFile | None:
    data = elf.section_bytes(".gnu_debuglink")
    link = parse_debuglink(data) if data else None
    if link is None:
        return None
    name, crc = link
    where = os.path.dirname(path) if path.startswith("/") else ""
    for root in roots:
        candidates = [root + os.path.join(d, name) for d in (where, os.path.join(where, ".debug")) if d]
        candidates += [root + os.path.join(d + where, name) for d in dirs]
        for candidate in candidates:
            if os.path.isfile(candidate) and file_crc32(candidate) == crc:
                found = _open(candidate)
                if found is not None:
                    return found
    return None


def mini_debug_info(elf: ElfFile, limit: int = MAX_DEBUGDATA_BYTES) -> ElfFile | None:
    """The ELF image embedded xz-compressed in .gnu_debugdata (MiniDebugInfo), or None."""
    data = elf.section_bytes(".gnu_debugdata")
    if not data:
        return None
    dec = lzma.LZMADecompressor()
    try:
        image = dec.decompress(data, max_length=limit)
    except lzma.LZMAError as exc:
        raise ElfParseError(f"{elf.path}: .gnu_debugdata: {exc}") from exc
    if not dec.eof:
        raise ElfParseError(f"{elf.path}: .gnu_debugdata is larger than {limit >> 20} MiB decompressed")
    return ElfFile.from_bytes(image, f"{elf.path}[.gnu_debugdata]")


def find_debug_file(elf: ElfFile, build_id: str, path: str = "", root: str = "",
                    dirs: Sequence[str] = DEFAULT_DEBUG_DIRS,
                    debuginfod: DebuginfodClient | None = None) -> ElfFile | None:
    """The separate debug file of `elf` (its GNU `build_id`, "" if none), or None.

    `path` is the binary's path as its process sees it and `root` that
    process's root on this host (/proc/PID/root; "" for this host's files).
    """
    roots = [root, ""] if root else [""]
    if build_id:
        found = _by_build_id(build_id, roots, dirs)
        if found is not None:
            return found
    found = _by_debuglink(elf, path or elf.path, roots, dirs)
    if found is not None:
        return found
    if debuginfod is not None and build_id:
        found = debuginfod.find(build_id)
        if found is not None:
            return found
    return mini_debug_info(elf)
