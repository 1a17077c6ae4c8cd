"""Where a process's OTEP 4947 thread context lives: the TLS symbol `otel_thread_ctx_v1`.

OTEP 4947 (opentelemetry-specification oteps/profiles/4947-thread-ctx.md):
an SDK exports the TLS variable `otel_thread_ctx_v1` in .dynsym; it holds a
pointer to the thread's current record (NULL when detached), whose first 28
bytes are trace_id[16] span_id[8] valid trace_flags attrs_size (byte-packed).
bpf/tracectx.bpf.h reads that header at sample time.

Supported: the symbol defined in the main executable (static TLS; the linker
relaxes the access to initial- or local-exec there). On x86_64 (TLS variant
II) the executable's TLS block ends at the thread pointer (FS base), so

    address = fsbase - tls_block_offset + st_value

with tls_block_offset = round_up(PT_TLS memsz, PT_TLS align) (plus the first
byte's misalignment, as glibc's _dl_determine_tlsoffset computes it; the same
in static binaries). Left out: the symbol in a shared library. Its block sits
at an offset ld.so picks at load time (static TLS of initially loaded
libraries) or in a dynamically allocated block reached through the DTV
(dlopen'ed ones); reading it needs ld.so's link_map/DTV layout or a probe of
the library's TLS offset, which this agent does not do yet. The attrs-data
part (custom attributes keyed through OTEP 4719's process context) is not
read either.
"""

from __future__ import annotations

from symbolizer.elf import SHT_STRTAB, ElfFile
from symbolizer.elf_tls import static_tls_offset

SYMBOL = "otel_thread_ctx_v1"
RECORD_HEADER_BYTES = 28


def thread_ctx_offset(exe: ElfFile) -> int | None:
    """FS-base-relative offset of `otel_thread_ctx_v1` in the main executable, None if it exports none."""
    # Almost no executable has the symbol: a byte search of its string tables
    # (C speed) spares parsing the symbol tables of every new process. Only
    # those sections are copied in (ElfFile.ensure), not the whole file.
    needle = SYMBOL.encode()
    found = False
    for sec in exe.headers.sections:
        if sec.type == SHT_STRTAB and not found:
            exe.ensure(sec.offset, sec.size)
            found = exe.image.find(needle, sec.offset, sec.offset + sec.size) >= 0
    if not found:
        return None
    return static_tls_offset(exe, SYMBOL)
