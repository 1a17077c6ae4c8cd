"""symbolizer.gopclntab against ground truth: the Go runtime's own symbolization.

The pcgroundtruth fixture prints, for PCs it collected with runtime.Callers,
the frames runtime.CallersFrames expands each to (inlined frames included);
our lookup(pc - 1) must give the same function/file/line sequence. `go tool nm`
and `go tool addr2line` are two more independent witnesses.
"""

from __future__ import annotations

import mmap
import random
import struct
import subprocess
from pathlib import Path

import pytest

from fixtures.builder import build_go, go_tool
from symbolizer.elf import ElfFile
from symbolizer.errors import PclntabError
from symbolizer.frames import FrameKind
from symbolizer.gopclntab import PC_CACHE_SIZE, GoPclntab, _name_for_print, load_pclntab

GroundTruth = dict[int, list[tuple[str, str, int]]]


def _run_ground_truth(binary: Path) -> GroundTruth:
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True, timeout=30).stdout
    truth: GroundTruth = {}
    pc = None
    for line in out.splitlines():
        if line.startswith("PC "):
            pc = int(line[3:], 16)
            truth[pc] = []
        elif line.startswith("F "):
            func, file, lineno = line[2:].split("\t")
            truth[pc].append((func, file, int(lineno)))
    assert len(truth) > 20, out
    return truth


@pytest.fixture(scope="module", params=[False, True], ids=["unstripped", "stripped"])
def built(request) -> tuple[Path, bytes, GroundTruth]:
    binary = build_go("pcgroundtruth", stripped=request.param)
    return binary, binary.read_bytes(), _run_ground_truth(binary)


@pytest.fixture(scope="module")
def unstripped() -> tuple[Path, bytes]:
    binary = build_go("pcgroundtruth")
    return binary, binary.read_bytes()


def _section_names(image: bytes) -> set[str]:
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    stroff, = struct.unpack_from("<Q", image, shoff + shstrndx * shentsize + 0x18)
    names = set()
    for i in range(shnum):
        name, = struct.unpack_from("<I", image, shoff + i * shentsize)
        end = image.index(b"\0", stroff + name)
        names.add(image[stroff + name:end].decode())
    return names


def _assert_matches(table: GoPclntab, truth: GroundTruth) -> None:
    inlined_seen = 0
    for pc, want in truth.items():
        frames = table.lookup(pc - 1)  # return address -> call instruction, as CallersFrames
        got = [(f.function, f.file, f.line) for f in frames]
        assert got == want, f"pc {pc:#x}"
        assert [f.inlined for f in frames] == [True] * (len(frames) - 1) + [False]
        assert all(f.kind is FrameKind.GO and f.start_line > 0 for f in frames if f.file.endswith("main.go"))
        inlined_seen += len(frames) > 1
    assert inlined_seen >= 5, "fixture no longer exercises inlining"


def test_fixture_is_non_pie(built):
    _, image, _ = built
    e_type, = struct.unpack_from("<H", image, 16)
    assert e_type == 2, "runtime PCs equal ELF vaddrs only in a non-PIE (ET_EXEC) build"


def test_lookup_matches_callers_frames(built):
    _, image, truth = built
    table = load_pclntab(image)
    assert table is not None and table.version == "1.20"
    _assert_matches(table, truth)


def test_elf_file_input_reuses_its_headers(built):
    """An ElfFile (what FileSymbols passes) gives the same table as the file's bytes."""
    binary, image, truth = built
    elf = ElfFile(binary)
    table = load_pclntab(elf)
    assert table is not None and table.text_start == load_pclntab(image).text_start
    _assert_matches(table, truth)
    del table  # release the buffer export before the mmap closes
    elf.close()


def test_stripped_build_needs_moduledata():
    image = build_go("pcgroundtruth", stripped=True).read_bytes()
    assert ".symtab" not in _section_names(image)  # so text start/gofunc came from moduledata
    table = load_pclntab(memoryview(image))
    assert table is not None and table._gofunc_off is not None


def test_pie_stripped_agrees_with_symbols():
    """PIE: moduledata (stripped) and .symtab (unstripped) give the same table."""
    pie = ("-buildmode=pie",)
    full = load_pclntab(build_go("pcgroundtruth", extra_flags=pie).read_bytes())
    bare = load_pclntab(build_go("pcgroundtruth", stripped=True, extra_flags=pie).read_bytes())
    assert full.text_start == bare.text_start
    assert list(full.functions()) == list(bare.functions())
    for entry, end, _ in list(full.functions())[::7]:
        for pc in range(entry, end, 5):
            assert full.lookup(pc) == bare.lookup(pc)


def test_found_by_scanning_when_section_is_gone(built):
    """Without a .gopclntab section name the header scan must find the same table."""
    _, image, truth = built
    assert image.count(b".gopclntab\0") == 1
    renamed = image.replace(b".gopclntab\0", b".xxpclntab\0")
    table = load_pclntab(renamed)
    assert table is not None
    _assert_matches(table, truth)


def test_mmap_input(unstripped):
    binary, _ = unstripped
    with open(binary, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        table = load_pclntab(mm)
        assert table is not None
        assert table.func_for(table.text_start) is not None
        del table  # release the buffer export before the mmap closes


def test_functions_cover_go_tool_nm(unstripped):
    binary, image = unstripped
    table = load_pclntab(image)
    ours = {(entry, name) for entry, _end, name in table.functions()}
    nm = subprocess.run([go_tool(), "tool", "nm", str(binary)], capture_output=True, text=True, check=True).stdout
    text_syms = 0
    for line in nm.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] == "T":
            text_syms += 1
            # .symtab spells assembly (ABI0) functions with a suffix the pclntab lacks.
            assert (int(parts[0], 16), parts[2].removesuffix(".abi0")) in ours, line
    assert text_syms > 1000
    spans = list(table.functions())
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(table.func_for(e) == (e, n) and table.func_for(end - 1)[0] == e for e, end, n in spans[::50])


def test_agrees_with_go_tool_addr2line(unstripped):
    """addr2line (debug/gosym) names the physical function and the innermost file:line."""
    binary, image = unstripped
    table = load_pclntab(image)
    rng = random.Random(7)
    funcs = [f for f in table.functions() if f[1] > f[0]]
    pcs = [rng.randrange(entry, end) for entry, end, _ in rng.sample(funcs, 300)]
    out = subprocess.run([go_tool(), "tool", "addr2line", str(binary)], input="".join(f"{pc:#x}\n" for pc in pcs),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2 * len(pcs)
    for i, pc in enumerate(pcs):
        frames = table.lookup(pc)
        # func_for, not frames[-1]: lookup elides autogenerated wrappers as CallersFrames does.
        assert table.func_for(pc)[1] == out[2 * i], hex(pc)
        file, _, line = out[2 * i + 1].rpartition(":")
        want = (file, int(line)) if int(line) > 0 else ("", 0)  # addr2line says ":-1" for unknown
        assert (frames[0].file, frames[0].line) == want, hex(pc)


def test_outside_text_is_empty(unstripped):
    _, image = unstripped
    table = load_pclntab(image)
    assert table.lookup(0) == () and table.lookup(table.text_start - 1) == ()
    last_end = max(end for _, end, _ in table.functions())
    assert table.lookup(last_end) == () and table.func_for(last_end) is None


def test_not_go_binaries():
    assert load_pclntab(b"") is None
    assert load_pclntab(b"not an ELF file at all" * 10) is None
    native = Path("/bin/true").read_bytes()
    assert load_pclntab(native) is None


def test_old_magic_is_unsupported(unstripped):
    _, image = unstripped
    at = image.index(b"\xf1\xff\xff\xff\x00\x00")
    old = image[:at] + b"\xfa" + image[at + 1:]  # the Go 1.16 magic
    with pytest.raises(PclntabError, match="unsupported"):
        load_pclntab(old)


def _exercise(image: bytes, pcs: list[int]) -> None:
    try:
        table = load_pclntab(image)
        if table is None:
            return
        for pc in pcs:
            table.lookup(pc)
            table.func_for(pc)
        for _ in table.functions():
            pass
        for _ in table.frame_tables():
            pass
    except PclntabError:
        pass


def test_corrupt_input_raises_only_pclntab_error(unstripped):
    """Truncations and bit flips in the table: PclntabError or a result, nothing else."""
    _, image = unstripped
    truth_pcs = [pc - 1 for pc in _run_ground_truth(unstripped[0])]
    at = image.index(b"\xf1\xff\xff\xff\x00\x00")
    table = load_pclntab(image)
    span = table._pcln - at + 8 * len(table) + 200_000  # header, tables, functab and _func records
    rng = random.Random(1234)
    for cut in (at + 8, at + 40, at + span // 3, at + span // 2, len(image) - 1):
        _exercise(image[:cut], truth_pcs)
    for _ in range(120):
        mutated = bytearray(image)
        for _ in range(rng.choice((1, 4, 32))):
            pos = at + rng.randrange(span)
            mutated[pos] ^= 1 << rng.randrange(8)
        _exercise(bytes(mutated), truth_pcs)


def test_name_for_print():
    assert _name_for_print("main.f") == "main.f"
    assert _name_for_print("main.generic[go.shape.int]") == "main.generic[...]"
    assert _name_for_print("main.T[go.shape.[]int].M[go.shape.string]") == "main.T[...].M[...]"
    assert _name_for_print("main.f[]int]x]") == "main.f[...]"  # what the runtime does with this
    assert _name_for_print("main.f[") == "main.f["


def test_every_pc_resolves_and_the_caches_agree(unstripped):
    """Every 7th byte of every function resolves, to that function, and the same PCs asked again
    (through the per-function and per-PC caches, past their eviction) give the same frames as a fresh table.
    Speed: bench/symbolizer_speed.py --only pclntab."""
    _, image = unstripped
    table = load_pclntab(image)
    spans = list(table.functions())
    pcs = [pc for entry, end, _ in spans for pc in range(entry, end, 7)]
    assert len(pcs) > PC_CACHE_SIZE  # the second pass runs through evictions
    first = [table.lookup(pc) for pc in pcs]
    assert all(first)
    assert [table.lookup(pc) for pc in pcs] == first
    fresh = load_pclntab(image)
    assert [fresh.lookup(pc) for pc in reversed(pcs)] == first[::-1]
    owners = [(entry, name) for entry, end, name in spans for _ in range(entry, end, 7)]
    assert [table.func_for(pc) for pc in pcs] == owners


def test_frame_tables_agree_with_frame_info(unstripped):
    """frame_tables() (one pass, for per-file unwind rows) gives frame_info's answer at every
    run boundary and every 5th byte of every function."""
    _, image = unstripped
    table = load_pclntab(image)
    seen = 0
    for entry, end, flag, tab in table.frame_tables():
        pcs = set(range(entry, end, 5)) | {end - 1}
        if tab is not None:
            pcs.update(entry + e + d for e in tab[0] for d in (-1, 0) if 0 <= e + d < end - entry)
        for pc in sorted(pcs):
            info = table.frame_info(pc)
            if tab is None:
                assert info is None
                continue
            ends, vals = tab
            i = next((i for i, e in enumerate(ends) if e > pc - entry), None)
            want = vals[i] if i is not None else -1
            if want < 0:
                assert info is None
            else:
                assert (info.sp_delta, info.flag, info.entry) == (want, flag, entry)
            seen += 1
    assert seen > 10000
    assert [(e, n) for e, n, _ in table.functions() if n > e] == [(e, n) for e, n, _, _ in table.frame_tables()]
