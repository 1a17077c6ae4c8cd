"""Thread-local storage of an ELF executable: where a TLS symbol sits relative to the thread pointer.

On x86_64 (TLS variant II) the executable's TLS block ends at the thread
pointer (FS base), so a symbol defined in it is at

    fsbase - tls_block_offset + st_value

with tls_block_offset = round_up(PT_TLS memsz, PT_TLS align) (plus the first
byte's misalignment, as glibc's _dl_determine_tlsoffset computes it; the same
in static binaries). Used for OTEP 4947's `otel_thread_ctx_v1` and Go's
`runtime.tlsg`.
"""

from __future__ import annotations

from dataclasses import dataclass

from symbolizer.elf import PT_TLS, ElfFile, defined_symbol_value


@dataclass(frozen=True)
class TlsSegment:
    vaddr: int
    memsz: int
    align: int

    @property
    def block_offset(self) -> int:
        """How far below the thread pointer the executable's TLS block starts (x86_64, variant II)."""
        align = max(self.align, 1)
        firstbyte = (-self.vaddr) & (align - 1)
        return _round_up(self.memsz - firstbyte, align) + firstbyte


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def tls_segment(elf: ElfFile) -> TlsSegment | None:
    """The PT_TLS program header, or None (no thread-local storage); ElfParseError on a truncated table."""
    for h in elf.program_headers:
        if h.type == PT_TLS:
            return TlsSegment(h.vaddr, h.memsz, h.align)
    return None


def tls_symbol_value(elf: ElfFile, name: str) -> int | None:
    """st_value (offset in the TLS segment) of STT_TLS symbol `name`, from .dynsym then .symtab."""
    return defined_symbol_value(elf, name, "STT_TLS")


def static_tls_offset(elf: ElfFile, name: str) -> int | None:
    """FS-base-relative offset of TLS symbol `name` defined in executable `elf`, or None."""
    if elf.e_type != "ET_EXEC" and elf.e_type != "ET_DYN":
        return None
    value = tls_symbol_value(elf, name)
    seg = tls_segment(elf) if value is not None else None
    if value is None or seg is None:
        return None
    return value - seg.block_offset
