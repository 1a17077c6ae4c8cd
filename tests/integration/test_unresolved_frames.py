"""An unresolved frame reads the same in every output: the file's name plus the file offset.

A real capture of a program whose CPU goes to a static function of a stripped shared library: pprof
(as `go tool pprof` shows it), the OTLP request a collector receives, folded stacks, the viewer's
flame graph names and record's top table all name the frame `libspin.so+0xOFFSET`; and the offset is
one that the unstripped copy of the library (what debug info fetched by build id would be) symbolizes
to that function with addr2line and nm.
"""

from __future__ import annotations

import re
import subprocess

from otlp_collector import HttpCollector

from exporters.folded import encode_folded
from exporters.otlp import decode_otlp
from exporters.pprof_reader import profile_from_pprof
from fixtures.builder import build_stripped_lib
from gotool import go_pprof, parse_top
from recording import BPFPROF
from viewer.store import Store, iter_names

LIB = "libspin.so"
NAME = re.compile(re.escape(LIB) + r"\+0x[0-9a-f]+")


def _load_segments(path) -> list[tuple[int, int, int]]:
    """(p_offset, p_vaddr, p_filesz) of the PT_LOAD segments, from readelf (the independent reader)."""
    out = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["LOAD"]]
    return [(int(r[1], 16), int(r[2], 16), int(r[4], 16)) for r in rows]


def _build_id(path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", out).group(1)


def _vaddr(path, offset: int) -> int:
    for p_offset, p_vaddr, filesz in _load_segments(path):
        if p_offset <= offset < p_offset + filesz:
            return offset - p_offset + p_vaddr
    raise AssertionError(f"offset 0x{offset:x} is in no load segment of {path}")


def test_unresolved_frame_is_file_and_offset_everywhere(tmp_path):
    program, full_lib = build_stripped_lib("libspin", "libspin_main")
    out = tmp_path / "spin.pb.gz"
    with HttpCollector() as collector:
        proc = subprocess.run([str(BPFPROF), "record", "--frequency", "199", "--no-kernel", "-o", str(out),
                               "--otlp-endpoint", collector.url, "--", str(program), "2"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(collector.received.requests) == 1

    # pprof, as its own reader shows it.
    _, rows = parse_top(go_pprof(tmp_path, "-top", "-nodecount=1000", "-nodefraction=0",
                                       "-sample_index=samples", str(out)))
    in_pprof = {name for name in rows if NAME.fullmatch(name)}
    assert in_pprof, f"no unresolved {LIB} frame in pprof: {sorted(rows)}"
    assert "libspin_run" in rows, "the exported caller resolves from .dynsym"
    assert not any(name.startswith(f"{LIB}+0x7f") for name in rows), "runtime addresses leaked"

    # OTLP, as a collector receives it: the function names of the library's locations.
    request = collector.received.requests[0]
    d = request.dictionary
    st = d.string_table
    in_otlp = {st[d.function_table[line.function_index].name_strindex]
               for loc in d.location_table[1:] if st[d.mapping_table[loc.mapping_index].filename_strindex]
               .endswith("/" + LIB) for line in loc.lines}
    assert {n for n in in_otlp if NAME.fullmatch(n)} == in_pprof

    # Folded stacks of the same capture, and the viewer's names of the OTLP it received.
    folded = encode_folded(profile_from_pprof(out.read_bytes())).decode()
    assert set(NAME.findall(folded)) == in_pprof
    store = Store(tmp_path / "view.sqlite")
    store.add_profiles(decode_otlp(request))
    ids = [row[0] for row in store._db.execute("SELECT id FROM stacks")]
    in_viewer = {n for text in store.stacks(ids).values() for n in iter_names(text) if NAME.fullmatch(n)}
    store.close()
    assert in_viewer == in_pprof

    # record's own top table.
    top = set(NAME.findall(proc.stdout))
    assert top and top <= in_pprof, proc.stdout

    # The offsets symbolize with the file: each is inside hidden_spin of the unstripped copy (nm's range),
    # and addr2line names it. The stripped and unstripped files share their layout and build id.
    assert _build_id(full_lib) == _build_id(program.parent / LIB)
    nm = subprocess.run(["nm", "-S", str(full_lib)], capture_output=True, text=True, check=True).stdout
    start, size = next((int(a, 16), int(s, 16)) for a, s, _, n in (ln.split() for ln in nm.splitlines()
                                                                    if len(ln.split()) == 4) if n == "hidden_spin")
    addrs = [_vaddr(full_lib, int(n.split("+0x")[1], 16)) for n in sorted(in_pprof)]
    assert all(start <= a < start + size for a in addrs), (hex(start), size, [hex(a) for a in addrs])
    a2l = subprocess.run(["addr2line", "-f", "-e", str(full_lib), *map(hex, addrs)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert set(a2l[0::2]) == {"hidden_spin"}, a2l
