"""The compiled-BPF cache's entry format: what is written is read back, anything else is refused."""

from __future__ import annotations

import json
import logging
import os
import stat
import struct

import pytest

from agent.bpfload import bpf_cache, preload
from agent.bpfload.bpf_cache import CacheEntryError, Entry, MapDef, NotCacheable, ProgDef

KEY = bpf_cache.key_digest({"source": "test"})


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


# r1 = map[fd 7] (ld_imm64, two slots); r2 = map value (fd 9, offset 16); r0 = 0; exit
INSNS = (insn(0x18, 1, bpf_cache.PSEUDO_MAP_FD, imm=7) + insn(0)
         + insn(0x18, 2, bpf_cache.PSEUDO_MAP_VALUE, imm=9) + insn(0, imm=16)
         + insn(0xB7, 0) + insn(0x95))


def entry() -> Entry:
    code = bytearray(INSNS)
    for i in (0, 2):
        struct.pack_into("<i", code, i * 8 + 4, 0)
    maps = (MapDef(27, 0, 0, 1 << 16, 0, "records", named="records"),
            MapDef(2, 4, 64, 1, 1 << 10, "unwind_rows", named=""))
    progs = (ProgDef("on_cpu_sample", "on_cpu_sample", 7, "GPL", 0, bytes(code), ((0, 0), (2, 1))),
             # a uprobe program loaded for uprobe_multi links (BPF_TRACE_UPROBE_MULTI): kept through the entry
             ProgDef("on_uprobe", "on_uprobe", 2, "GPL", 0, bytes(code), ((0, 0), (2, 1)), attach_type=48))
    return Entry(maps, progs)


def test_map_references_finds_fd_and_value_loads():
    assert bpf_cache.map_references(INSNS) == [(0, 7, 1), (2, 9, 2)]


@pytest.mark.parametrize("src", [3, 4, 5, 6])
def test_other_pseudo_loads_are_not_cacheable(src):
    with pytest.raises(NotCacheable, match=f"src_reg {src}"):
        bpf_cache.map_references(insn(0x18, 1, src, imm=1) + insn(0) + insn(0x95))


def test_round_trip():
    assert bpf_cache.decode(KEY, bpf_cache.encode(KEY, entry())) == entry()


def test_every_flipped_byte_is_refused():
    data = bpf_cache.encode(KEY, entry())
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(CacheEntryError):
            bpf_cache.decode(KEY, bytes(bad))


def test_truncated_or_extended_is_refused():
    data = bpf_cache.encode(KEY, entry())
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(CacheEntryError):
            bpf_cache.decode(KEY, data[:cut])
    with pytest.raises(CacheEntryError, match="payload"):
        bpf_cache.decode(KEY, data + b"\0")


def test_other_version_and_key_are_refused():
    data = bytearray(bpf_cache.encode(KEY, entry()))
    struct.pack_into("<H", data, 8, bpf_cache.FORMAT_VERSION + 1)
    with pytest.raises(CacheEntryError, match="format version"):
        bpf_cache.decode(KEY, bytes(data))
    with pytest.raises(CacheEntryError, match="another key"):
        bpf_cache.decode(bpf_cache.key_digest({"source": "other"}), bpf_cache.encode(KEY, entry()))


def test_a_reference_that_is_not_in_the_instructions_is_refused():
    e = entry()
    p = e.programs[0]
    bad = Entry(e.maps, (ProgDef(p.name, p.kernel_name, p.type, p.license, p.kern_version, p.insns, ((4, 0),)),))
    with pytest.raises(CacheEntryError, match="map references"):
        bpf_cache.decode(KEY, bpf_cache.encode(KEY, bad))
    out_of_range = Entry(e.maps, (ProgDef(p.name, p.kernel_name, p.type, p.license, p.kern_version, p.insns,
                                          ((0, 0), (2, 5))),))
    with pytest.raises(CacheEntryError, match="map references"):
        bpf_cache.decode(KEY, bpf_cache.encode(KEY, out_of_range))


def test_key_covers_every_part():
    base = {"source": "a", "cflags": ["-DX=1"], "kernel": ["6.18", "#1"], "bcc": "0.26", "programs": [], "maps": []}
    keys = {bpf_cache.key_digest(base)}
    for k, v in (("source", "b"), ("cflags", ["-DX=2"]), ("kernel", ["6.19", "#1"]), ("bcc", "0.27"),
                 ("programs", [["p", "KPROBE"]]), ("maps", ["m"])):
        keys.add(bpf_cache.key_digest({**base, k: v}))
    assert len(keys) == 7


def test_write_is_private_and_read_back(tmp_path):
    d = tmp_path / "bpf"
    path = bpf_cache.write(KEY, bpf_cache.encode(KEY, entry()), d)
    assert path is not None
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bpf_cache.read(KEY, d) == entry()
    assert [p.name for p in d.iterdir()] == [path.name]  # no temporary file left


def test_a_corrupt_file_is_removed_with_one_log_line(tmp_path, caplog):
    d = tmp_path / "bpf"
    path = bpf_cache.write(KEY, bpf_cache.encode(KEY, entry()), d)
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="agent.bpfload.bpf_cache"):
        assert bpf_cache.read(KEY, d) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"BPF cache entry {path} discarded (checksum mismatch): compiling again"]
    assert not path.exists()


def test_a_file_others_may_write_is_not_read(tmp_path):
    d = tmp_path / "bpf"
    path = bpf_cache.write(KEY, bpf_cache.encode(KEY, entry()), d)
    os.chmod(path, 0o622)
    assert bpf_cache.read(KEY, d) is None
    assert not path.exists()


def test_a_symlink_is_not_followed(tmp_path):
    d = tmp_path / "bpf"
    real = bpf_cache.write(KEY, bpf_cache.encode(KEY, entry()), d)
    target = tmp_path / "elsewhere"
    real.rename(target)
    real.symlink_to(target)
    assert bpf_cache.read(KEY, d) is None


def test_absent_is_none_without_a_log_line(tmp_path, caplog):
    assert bpf_cache.read(KEY, tmp_path / "bpf") is None
    assert not caplog.records


def test_a_group_writable_directory_is_made_private(tmp_path):
    d = tmp_path / "bpf"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    assert bpf_cache.write(KEY, bpf_cache.encode(KEY, entry()), d) is not None
    assert stat.S_IMODE(d.stat().st_mode) == 0o700



# -- start hints (agent/bpfload/preload.py) ----------------------------------------------------------------


def test_a_start_hint_names_the_options_not_the_run():
    name = preload.hint_name
    base = name("record", ["--duration", "10", "-o", "a.pb.gz", "--pid", "1"])
    assert base == name("record", ["--duration=30", "-o", "b.pb.gz", "--pid", "77"]) != name("record", ["--duration", "10"])
    assert name("record", ["--", "./app", "x"]) == name("record", ["--", "./other"])
    for other in (["--no-kernel"], ["--unwind", "fp"], ["--profile", "cpu,lock"], ["--frequency", "999"]):
        assert name("record", other) not in (name("record", []), name("agent", other))


def test_only_a_private_well_formed_hint_is_read(tmp_path):
    good = {"key": KEY, "map_entries": {"events": 1 << 20}}
    path = tmp_path / "h.start"
    assert bpf_cache.write_file(path, json.dumps(good).encode()) == path
    assert preload._read_hint(path) == (KEY, {"events": 1 << 20})
    for bad in (b"", b"{", b"[]", json.dumps({**good, "key": "../x"}).encode(),
                json.dumps({**good, "map_entries": {"events": -1}}).encode(),
                json.dumps({**good, "map_entries": {"events": True}}).encode(), b" " * 5000):
        path.write_bytes(bad)
        assert preload._read_hint(path) is None, bad
    path.write_bytes(json.dumps(good).encode())
    os.chmod(path, 0o644)  # another user could have written it
    assert preload._read_hint(path) is None
    link = tmp_path / "l.start"
    os.chmod(path, 0o600)
    link.symlink_to(path)
    assert preload._read_hint(link) is None
