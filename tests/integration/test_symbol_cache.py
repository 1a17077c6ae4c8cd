"""A second capture of the same binary reuses the symbols the first one parsed."""

from __future__ import annotations

import subprocess
import threading

import pytest

from agent.capture.session import RecordOptions, RecordSession
from agent.processes.tracker import ProcessTracker
from fixtures.builder import build_go
from symbolizer.file_symbols import SymbolCache

# Its fixtures run for a wall time and need the CPU they ask for (sample counts): no other test beside.
pytestmark = pytest.mark.alone


def _capture(binary, cache):
    tracker = ProcessTracker(cache=cache)
    session = RecordSession(RecordOptions(frequency_hz=199, command=(str(binary), "-duration", "1s")), tracker)
    session.run(threading.Event())
    profile = session.build_profile()
    assert profile.total() > 50
    fixture = [p for p in tracker.processes() if p.exe == str(binary)]
    assert len(fixture) == 1
    (own,) = [m for m in fixture[0].symbols.mappings if m.mapping.path == str(binary)]
    return own.symbols, profile


def test_second_capture_does_not_reparse(tmp_path):
    binary = build_go("cpusplit", stripped=True)
    cache = SymbolCache()
    first, prof1 = _capture(binary, cache)
    misses = cache.misses
    second, prof2 = _capture(binary, cache)
    assert second is first, "the same build id must map to the same parsed symbols"
    assert cache.misses == misses and cache.hits > 0
    # keyed by the file's build id (Go's linker also writes a GNU one), not its path
    notes = subprocess.run(["readelf", "-n", str(binary)], capture_output=True, text=True, check=True).stdout
    assert f"Build ID: {first.id.build_id}" in notes
    # both captures resolved the fixture's functions from that one parse
    for prof in (prof1, prof2):
        names = {f.function for s in prof.samples for loc in s.stack for f in loc.frames}
        assert {"main.spinA", "main.spinB"} <= names
