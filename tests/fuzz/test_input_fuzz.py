"""Bounded fuzzing of what users hand the agent (hypothesis): config files, OTLP and pprof files.

The property is the CLI's contract: the config loader raises ConfigError or
returns a config, `bpfprof convert`'s readers (and the encoder that follows
them) raise BpfprofError or return; never anything else, never a hang or a
blow-up. Inputs are mutations of real ones (the example config, a profile
encoded by our own encoders) and YAML built from hostile pieces (anchors,
aliases, deep brackets). Example counts are fixed, as in
test_symbolizer_fuzz.py (a few seconds in CI); raise BPFPROF_FUZZ_EXAMPLES
for a longer local run.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.test_otlp import make_profile

from agent.daemon.config import AgentConfig, load_config
from exporters.otlp import decode_otlp, encode_otlp_bytes
from exporters.pprof import encode_pprof
from exporters.pprof_reader import profile_from_pprof
from symbolizer.elf import ElfFile
from symbolizer.errors import BpfprofError, ConfigError
from symbolizer.file_symbols import FileSymbols, file_id

EXAMPLES = int(os.environ.get("BPFPROF_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

ROOT = Path(__file__).resolve().parents[2]
_CONFIG = (ROOT / "packaging" / "config.example.yaml").read_bytes()
_OTLP = encode_otlp_bytes([make_profile()], "node-1")
_PPROF_RAW = gzip.decompress(encode_pprof(make_profile()))


def mutations(size: int) -> st.SearchStrategy:
    return st.tuples(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=32),
                     st.one_of(st.none(), st.integers(0, size)))


def mutate(data: bytes, muts: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for off, value in muts:
        buf[off] = value
    return bytes(buf[:cut] if cut is not None else buf)


# YAML from pieces a hostile file is made of: keys the loader knows, anchors, aliases, brackets.
_PIECES = st.sampled_from([
    "export:", "profiling:", "metrics:", "selection:", "relabel:", "limits:", "interval_s:", "frequency_hz:",
    " &a", " *a", " &b [*a, *a, *a]", " *b", "[", "]", "{", "}", ",", "- ", "\n", "\n  ", ": ", "1", "-1",
    ".inf", ".nan", "1e309", "null", "~", "'x'", '"${HOME}"', "${X:-y}", "!!python/object:os.system", "!!binary",
    "? ", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "\t", "\x00", "é", "0x10", "true",
])


def _load(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(data)
    try:
        assert isinstance(load_config(str(path), {}, {}), AgentConfig)
    except ConfigError:
        pass


@FUZZ
@given(mutations(len(_CONFIG)))
def test_config_mutated_example(tmp_path, muts):
    _load(tmp_path, mutate(_CONFIG, *muts))


@FUZZ
@given(st.lists(_PIECES, max_size=80), st.integers(0, 3000))
def test_config_from_hostile_pieces(tmp_path, pieces, depth):
    _load(tmp_path, ("".join(pieces) + "\nx: " + "[" * depth + "]" * depth + "\n").encode("utf-8", "replace"))


def _convert(profiles_of) -> None:
    """What `bpfprof convert` runs after reading: decode, then encode the other format."""
    try:
        profiles = profiles_of()
        for p in profiles:
            encode_pprof(p)
        encode_otlp_bytes(profiles, "node-1")
    except BpfprofError:
        pass


@FUZZ
@given(mutations(len(_OTLP)))
def test_otlp_reader(muts):
    data = mutate(_OTLP, *muts)
    _convert(lambda: decode_otlp(data))


@FUZZ
@given(mutations(len(_PPROF_RAW)), st.booleans())
def test_pprof_reader(muts, gzipped):
    data = mutate(_PPROF_RAW, *muts)
    data = gzip.compress(data) if gzipped else data
    _convert(lambda: [profile_from_pprof(data)])



@FUZZ
@given(st.integers(0, 1 << 16), st.lists(st.integers(0, 0x500000), max_size=8))
def test_elf_file_cut_after_open(tmp_path, cut, addresses):
    """A file read through ElfFile (no mmap) and truncated under it: errors, never SIGBUS or garbage escapes."""
    from fixtures.builder import build_c  # noqa: PLC0415

    path = tmp_path / "lib"
    path.write_bytes(build_c("callchain").read_bytes())
    try:
        elf = ElfFile(path)
    except BpfprofError:
        return
    os.truncate(path, min(cut, path.stat().st_size))
    fs = FileSymbols(elf, file_id(elf))
    for addr in addresses:
        fs.symbolize(addr)
        fs.translate(addr, 0x400000, 0)
    elf.close()
