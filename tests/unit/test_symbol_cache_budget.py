"""The symbol cache's byte budget: least recently used files released, parsed again when asked.

Under churn a host shows the agent an endless line of new binaries (every
build of a test program is a new build id); the copies the cache holds of
them once grew the agent from 53 to 678 MB in 30 minutes. Past
limits.max_symbol_cache_bytes the least recently used files give their
copies back, counted and logged; the file stays open, so a later sample of a
process that maps it still resolves, also after its path is gone.
"""

from __future__ import annotations

import logging
import shutil
import threading

from fixtures.builder import build_c
from symbolizer.cached_property import _LOCKS
from symbolizer.elf import COPY_CHUNK_BYTES, ElfFile
from symbolizer.file_symbols import SymbolCache

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
FUNCTIONS = {"libc": "qsort", "trunc_lib": "trunc_lib_spin", "callchain": "main"}


def _files(tmp_path):
    """name -> (a copy of the file in tmp_path, a function it defines); libc is the first and largest."""
    out = {}
    for name, function in FUNCTIONS.items():
        if name == "libc":
            binary = LIBC
        else:
            binary = build_c(name, flags=("-O1", "-g", "-shared", "-fPIC") if name == "trunc_lib" else ("-O1", "-g"))
        copy = tmp_path / name
        shutil.copy(binary, copy)
        out[name] = (copy, function)
    return out


def _frames(fs, function):
    sym = fs.symbols.find(function)
    assert sym is not None, function
    return sym.start, fs.symbolize(sym.start)


def test_past_the_budget_the_least_recently_used_are_released_and_parse_again(tmp_path, caplog):
    files = _files(tmp_path)
    cache = SymbolCache(max_bytes=1, min_idle_s=0)  # below any file: every release shows
    got = {}
    for name, (path, function) in files.items():
        fs = cache.get(ElfFile(path))
        got[name] = (fs, *_frames(fs, function))
        assert got[name][2], f"{function} must resolve before the release"
    held = {name: g[0].held_bytes() for name, g in got.items()}
    assert all(n > 0 for n in held.values()), held
    assert cache.mapped_bytes() == sum(held.values())
    for path, _ in files.values():
        path.unlink()  # the processes and their files are gone: the open descriptor is what is left
    assert held["libc"] > 4 * COPY_CHUNK_BYTES
    cache.max_bytes = sum(held.values()) - held["libc"] + COPY_CHUNK_BYTES  # the oldest one must go
    with caplog.at_level(logging.INFO, logger="symbolizer.file_symbols"):
        assert cache.enforce_budget() == 1
    assert cache.budget_evictions == 1
    libc = got["libc"][0]
    assert libc.held_bytes() <= COPY_CHUNK_BYTES, "the least recently used file kept its copy"  # its ELF header
    assert "symbols" not in libc.__dict__
    assert got["callchain"][0].held_bytes() == held["callchain"]
    assert cache.mapped_bytes() <= cache.max_bytes
    lines = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert len(lines) == 1 and "1 files released" in lines[0], lines
    # re-openable: the same frames from a new parse of the same open file
    fs, addr, frames = got["libc"]
    assert fs.symbolize(addr) == frames
    assert fs.held_bytes() > COPY_CHUNK_BYTES
    cache.max_bytes = 1
    small = [name for name, n in held.items() if n <= COPY_CHUNK_BYTES]  # a release would keep it all
    assert cache.enforce_budget() == 3 - len(small)
    assert cache.mapped_bytes() <= 3 * COPY_CHUNK_BYTES
    for fs, addr, frames in got.values():
        assert fs.symbolize(addr) == frames
    assert cache.budget_evictions == 4 - len(small)


def test_files_evicted_by_count_are_released_at_the_next_budget_check(tmp_path):
    files = _files(tmp_path)
    cache = SymbolCache(max_files=1, max_bytes=1 << 30, min_idle_s=0)
    held = []
    for path, function in files.values():
        fs = cache.get(ElfFile(path))
        _frames(fs, function)
        held.append(fs)
    assert len(cache) == 1 and cache.evictions == 2
    assert held[0].held_bytes() > 4 * COPY_CHUNK_BYTES  # libc, still held by the snapshots that mapped it
    assert cache.enforce_budget() == 2  # within the budget: nothing released by it...
    assert cache.budget_evictions == 0
    assert held[0].held_bytes() <= COPY_CHUNK_BYTES  # ...but the files evicted by count let go
    assert ["symbols" in fs.__dict__ for fs in held] == [False, False, True]


def test_without_a_budget_nothing_is_released(tmp_path):
    files = _files(tmp_path)
    cache = SymbolCache()
    for path, function in files.values():
        _frames(cache.get(ElfFile(path)), function)
    before = cache.mapped_bytes()
    assert cache.enforce_budget() == 0
    assert cache.mapped_bytes() == before > 0


def test_a_file_being_parsed_in_another_thread_is_left_for_the_next_check(tmp_path):
    """The unwind rows' worker may be building a file's table while the builder enforces the budget."""
    path, function = _files(tmp_path)["libc"]
    cache = SymbolCache(max_bytes=1, min_idle_s=0)
    fs = cache.get(ElfFile(path))
    _frames(fs, function)
    parsing, done = threading.Event(), threading.Event()

    def slow_table() -> None:
        lock = fs.__dict__.setdefault(_LOCKS, {}).setdefault("unwind_table", threading.RLock())
        with lock:  # what cached_property holds while it computes
            parsing.set()
            done.wait(30)

    worker = threading.Thread(target=slow_table)
    worker.start()
    parsing.wait(30)
    try:
        assert cache.enforce_budget() == 0
        assert "symbols" in fs.__dict__  # untouched while in use
    finally:
        done.set()
        worker.join()
    assert cache.enforce_budget() == 1
    assert "symbols" not in fs.__dict__
    assert fs.symbolize(fs.symbols.find(function).start)  # parsed again


def test_files_used_in_the_last_minute_are_kept_past_the_budget(tmp_path, caplog):
    """Releasing what the next interval parses again saves nothing and costs a re-parse (and garbage)."""
    files = _files(tmp_path)
    cache = SymbolCache(max_bytes=1)
    got = [cache.get(ElfFile(path)) for path, _ in files.values()]
    for fs, (_, function) in zip(got, files.values(), strict=True):
        _frames(fs, function)
    got[0].last_used -= SymbolCache.MIN_IDLE_S + 1  # libc: idle for over a minute
    with caplog.at_level(logging.INFO, logger="symbolizer.file_symbols"):
        assert cache.enforce_budget() == 1
    assert "symbols" not in got[0].__dict__ and all("symbols" in fs.__dict__ for fs in got[1:])
    assert cache.mapped_bytes() > cache.max_bytes
    assert any("the rest was used in the last minute" in r.getMessage() for r in caplog.records)
    assert cache.enforce_budget() == 0  # nothing idle left: no release, no log line


def test_frames_are_kept_per_file_and_go_with_a_release(tmp_path):
    """The processes of one binary share its addresses: a second lookup of an address returns what the
    first found (DWARF's inline chain is not walked again), until a release gives the file's parse back."""
    path, function = _files(tmp_path)["libc"]  # large enough to be released (a small file keeps its one chunk)
    cache = SymbolCache(max_bytes=1, min_idle_s=0)
    fs = cache.get(ElfFile(path))
    addr, first = _frames(fs, function)
    assert first and fs.symbolize(addr) is first
    cache.enforce_budget()
    again = fs.symbolize(addr)
    assert again == first and again is not first  # parsed again after the release
