"""symbolizer/gobuildinfo.py against `go version -m` on the fixtures it builds."""

from __future__ import annotations

import struct
import subprocess

import pytest

from fixtures.builder import build_c, build_go, go_tool
from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError
from symbolizer.gobuildinfo import read_build_info


def _go_version_m(path) -> tuple[str, list[str]]:
    """(version, tab-separated module lines) as `go version -m` prints them."""
    out = subprocess.run([go_tool(), "version", "-m", str(path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    version = out[0].rsplit(": ", 1)[1]
    return version, [line.strip("\t") for line in out[1:]]


@pytest.mark.parametrize("stripped", [False, True], ids=["symbols", "stripped"])
def test_matches_go_version_m(stripped):
    path = build_go("cpusplit", stripped=stripped)
    version, lines = _go_version_m(path)
    info = read_build_info(ElfFile(path))
    assert info is not None
    assert info.version == version
    assert info.version_tuple is not None and info.version_tuple[:2] >= (1, 21)
    assert f"path\t{info.main_path}" in lines
    settings = [line.split("\t", 1)[1] for line in lines if line.startswith("build\t")]
    assert settings == [f"{k}={v}" for k, v in info.settings.items()]
    assert ("-ldflags" in info.settings) == stripped


def test_found_without_section_headers(tmp_path):
    """A binary whose section headers are gone is still recognised, through its writable segment."""
    data = bytearray(build_go("cpusplit", stripped=True).read_bytes())
    struct.pack_into("<Q", data, 0x28, 0)  # e_shoff
    struct.pack_into("<HHH", data, 0x3A, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
    copy = tmp_path / "noshdr"
    copy.write_bytes(bytes(data))
    info = read_build_info(ElfFile(copy))
    assert info is not None and info.version == _go_version_m(build_go("cpusplit", stripped=True))[0]


def test_not_go_is_none():
    assert read_build_info(ElfFile(build_c("symtest"))) is None


def test_corrupt_blob_raises_elf_parse_error(tmp_path):
    path = build_go("cpusplit", stripped=True)
    data = bytearray(path.read_bytes())
    pos = data.find(b"\xff Go buildinf:")
    data[pos + 32:pos + 48] = b"\xff" * 16  # a varint that never ends within 64 bits
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    with pytest.raises(ElfParseError):
        read_build_info(ElfFile(bad))
