"""agent/bpfload/btf.py: member offsets from BTF, against bpftool and a hand-built blob."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from agent.bpfload.btf import VMLINUX_BTF, Btf, BtfError

# Members whose offsets are read from the running kernel and compared with bpftool.
CHECKED = [("task_struct", "thread"), ("task_struct", "pid"), ("task_struct", "tgid"),
           ("task_struct", "comm"), ("thread_struct", "fsbase"), ("thread_struct", "gsbase")]


def _bpftool_offsets(struct_name: str) -> dict[str, int]:
    """Member byte offsets of `struct struct_name` as bpftool prints them (first definition)."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(VMLINUX_BTF), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    members: dict[str, int] = {}
    inside = False
    for line in out.splitlines():
        if line.startswith("["):
            if inside:
                break
            inside = bool(re.match(rf"\[\d+\] STRUCT '{struct_name}' ", line))
            continue
        m = re.match(r"\s+'(\w*)' type_id=\d+ bits_offset=(\d+)", line)
        if inside and m and m.group(1):
            members[m.group(1)] = int(m.group(2)) // 8
    return members


@pytest.mark.skipif(not VMLINUX_BTF.exists() or not shutil.which("bpftool"), reason="needs kernel BTF and bpftool")
def test_offsets_match_bpftool():
    btf = Btf.from_file()
    for struct_name, member in CHECKED:
        assert btf.offsetof(struct_name, member) == _bpftool_offsets(struct_name)[member], (struct_name, member)


class _Blob:
    """Builds a little-endian BTF blob type by type."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, size_or_type: int, trailer: bytes = b"", vlen: int = 0,
            kflag: int = 0) -> int:
        self.types += struct.pack("<III", self.s(name), (kflag << 31) | (kind << 24) | vlen, size_or_type)
        self.types += trailer
        self.next_id += 1
        return self.next_id - 1

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]], kind: int = 4,
               kflag: int = 0) -> int:
        trailer = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self.add(kind, name, size, trailer, len(members), kflag)

    def bytes(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + bytes(self.types) + bytes(self.strings)


def test_hand_built_blob():
    b = _Blob()
    u64 = b.add(1, "unsigned long", 8, struct.pack("<I", 64))
    u32 = b.add(1, "unsigned int", 4, struct.pack("<I", 32))
    b.add(13, "", 0, struct.pack("<II", 0, u64), vlen=1)  # a func proto: skipped by size
    inner = b.struct("inner", 16, [("a", u32, 0), ("fsbase", u64, 64)])
    typedef = b.add(8, "inner_t", inner)
    const = b.add(10, "", typedef)
    anon = b.struct("", 8, [("x", u32, 0), ("y", u64, 0)], kind=5)  # anonymous union
    # kind_flag set: member offsets carry a bitfield size in the top 8 bits
    b.struct("outer", 64, [("flags", u32, (3 << 24) | 0), ("", anon, 64), ("thread", const, 128)], kflag=1)
    btf = Btf(b.bytes())
    assert btf.offsetof("outer", "thread") == 16
    assert btf.offsetof("outer", "thread.fsbase") == 24
    assert btf.offsetof("outer", "y") == 8  # found inside the anonymous union
    assert btf.offsetof("inner", "fsbase") == 8
    with pytest.raises(BtfError, match="bitfield"):
        btf.offsetof("outer", "flags")
    with pytest.raises(BtfError, match="no member"):
        btf.offsetof("outer", "nope")
    with pytest.raises(BtfError, match="not in BTF"):
        btf.offsetof("task_struct", "thread")


@pytest.mark.parametrize("blob", [b"", b"\x00" * 24, struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 99, 0, 0)])
def test_corrupt_blobs_raise_btf_error(blob):
    with pytest.raises(BtfError):
        Btf(blob)
