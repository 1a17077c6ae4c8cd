"""top_functions ranks like `go tool pprof -top`: by flat, with cum beside it."""

from __future__ import annotations

from exporters.profile import Location, SampleKey
from exporters.profile_types import cpu_profile
from exporters.summary import top_functions
from symbolizer.frames import Frame, FrameKind, Mapping

APP = Mapping(0x1000, 0x9000, 0, "/bin/app")


def loc(addr, *names):
    return Location(addr, APP, tuple(Frame(n, FrameKind.NATIVE, inlined=i < len(names) - 1) for i, n in enumerate(names)))


def test_flat_and_cum():
    p = cpu_profile(0, 1, 100)
    main = loc(0x1100, "main")
    work = loc(0x1200, "work")
    hot = loc(0x1300, "hot", "work")  # hot inlined into work
    p.add(SampleKey((hot, main), 1, 1, "t"), [6, 60])
    p.add(SampleKey((work, main), 1, 1, "t"), [3, 30])
    p.add(SampleKey((main,), 1, 2, "t"), [1, 10])
    p.add(SampleKey((Location(0x8000, APP),), 1, 2, "t"), [2, 20])
    top = {f.name: (f.flat, f.cum) for f in top_functions(p, 10)}
    assert top == {"hot": (6, 6), "work": (3, 9), "main": (1, 10), "app+0x7000": (2, 2)}
    assert [f.name for f in top_functions(p, 2)] == ["hot", "work"]
    assert [f.name for f in top_functions(p, 1, value_index=1)] == ["hot"]
