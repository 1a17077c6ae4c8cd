"""encode_folded: exact lines for a hand-made profile, and flamegraph.pl's parse of them."""

from __future__ import annotations

import re

from exporters.folded import encode_folded
from exporters.formats import FORMATS, OutputFormat
from exporters.pprof import decode_pprof, encode_pprof
from exporters.profile import Location, Profile, SampleKey
from exporters.profile_types import cpu_profile
from symbolizer.frames import BuildIdKind, Frame, FrameKind, Mapping

APP = Mapping(0x400000, 0x600000, 0, "/usr/local/bin/app", "Xa1/Xb2", BuildIdKind.GO)
KERNEL = Mapping(0xFFFFFFFF81000000, 0xFFFFFFFF83000000, 0, "[kernel.kallsyms]")
LIBFOO = Mapping(0x7F3000000000, 0x7F3000010000, 0x1000, "/opt/lib/libfoo.so", "de" * 20, BuildIdKind.GNU)

L_HOT = Location(0x401234, APP, (
    Frame("main.hot", FrameKind.GO, "main.go", 12, inlined=True),
    Frame("main.work", FrameKind.GO, "main.go", 30),
))
L_MAIN = Location(0x401100, APP, (Frame("main.main", FrameKind.GO, "main.go", 40),))
L_KSYS = Location(0xFFFFFFFF81001000, KERNEL, (Frame("do_syscall_64", FrameKind.KERNEL),))
L_KENTRY = Location(0xFFFFFFFF81002000, KERNEL, (Frame("entry_SYSCALL_64_after_hwframe", FrameKind.KERNEL),))
L_KUNRESOLVED = Location(0xFFFFFFFF81000010, KERNEL)
L_UNRESOLVED = Location(0x7F3000000ABC, LIBFOO)  # file offset 0xabc + 0x1000
L_NOMAP = Location(0xDEADBEEF, None)
L_WEIRD = Location(0x401500, APP, (Frame("weird;name", FrameKind.NATIVE),))


def make_profile() -> Profile:
    profile = cpu_profile(0, 1_000_000_000, 100)
    events = [
        ((L_HOT, L_MAIN), 100, 100, "app", 5),
        ((L_HOT, L_MAIN), 100, 101, "app", 2),  # another thread, same line: summed
        ((L_KSYS, L_KENTRY, L_MAIN), 100, 100, "app", 3),
        ((L_KUNRESOLVED, L_KENTRY, L_MAIN), 100, 100, "app", 1),
        ((L_UNRESOLVED, L_MAIN), 100, 102, "app", 4),
        ((L_NOMAP,), 7, 7, "", 1),
        ((L_WEIRD, L_MAIN), 200, 200, "app", 2),
    ]
    for stack, pid, tid, name, n in events:
        for _ in range(n):
            profile.add(SampleKey(stack, pid, tid, name), [1, profile.period])
    profile.add(SampleKey((L_MAIN,), 300, 300, "idle"), [0, 0])  # zero: no line
    return profile


EXPECTED = """\
[unknown]-7;0xdeadbeef 1
app-100;main.main;entry_SYSCALL_64_after_hwframe_[k];[kernel.kallsyms]+0x10_[k] 1
app-100;main.main;entry_SYSCALL_64_after_hwframe_[k];do_syscall_64_[k] 3
app-100;main.main;libfoo.so+0x1abc 4
app-100;main.main;main.work;main.hot 7
app-200;main.main;weird:name 2
"""

# flamegraph.pl's own parse of a folded line: the count is after the last space.
FLAMEGRAPH_LINE = re.compile(r"^(.*)\s+?(\d+(?:\.\d*)?)$")


def test_lines_and_counts_are_exact():
    assert encode_folded(make_profile()).decode() == EXPECTED


def test_other_value_index_scales_counts():
    profile = make_profile()
    lines = encode_folded(profile, value_index=1).decode().splitlines()
    assert lines[-1] == f"app-200;main.main;weird:name {2 * profile.period}"


def test_flamegraph_parse_sums_to_profile_total():
    profile = make_profile()
    total = 0
    for line in encode_folded(profile).decode().splitlines():
        m = FLAMEGRAPH_LINE.match(line)
        assert m, line
        frames = m.group(1).split(";")
        assert all(frames), line
        total += int(m.group(2))
    assert total == profile.total(0) == 18


def test_empty_profile_is_empty():
    assert encode_folded(cpu_profile(0, 0, 99)) == b""


def test_formats_registry():
    assert set(FORMATS) == {"pprof", "folded", "otlp"}
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, OutputFormat) and fmt.name == name
    assert FORMATS["pprof"].extension == ".pb.gz"
    assert FORMATS["folded"].extension == ".folded"
    profile = make_profile()
    assert FORMATS["folded"].encode(profile) == EXPECTED.encode()
    assert sum(s.value[0] for s in decode_pprof(FORMATS["pprof"].encode(profile)).sample) == 18
    assert FORMATS["pprof"].encode(profile) == encode_pprof(profile)
