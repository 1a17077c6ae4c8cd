"""Struct member offsets from the kernel's BTF (/sys/kernel/btf/vmlinux).

The kernel headers BCC compiles against may be from another version (6.1
headers for a 6.18 kernel here), so any offset into a kernel struct that a BPF
program uses is read from the running kernel's own type information and passed
in as a -D define. Only what the agent needs is decoded: names, structs,
unions, typedef/modifier chains; every other kind is skipped by its size.

Format: include/uapi/linux/btf.h (a header, a type section of variable-length
records numbered from 1, a string section).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from symbolizer.errors import BpfprofError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")

KIND_STRUCT = 4
KIND_UNION = 5
KIND_TYPEDEF = 8
_MODIFIERS = {8, 9, 10, 11, 18}  # typedef, volatile, const, restrict, type_tag: follow `type`
# Bytes after the 12-byte btf_type for each kind: (fixed, per vlen entry).
_TRAILER = {
    1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0), 8: (0, 0), 9: (0, 0),
    10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0), 15: (0, 12), 16: (0, 0), 17: (4, 0),
    18: (0, 0), 19: (0, 12),
}


class BtfError(BpfprofError):
    """BTF missing, corrupt, or without the asked-for type or member."""


@dataclass(frozen=True, slots=True)
class BtfMember:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless a bitfield


@dataclass(frozen=True, slots=True)
class BtfType:
    kind: int
    name: str
    size_or_type: int  # size for structs/unions, referenced type id for modifiers
    members: tuple[BtfMember, ...] = ()


class Btf:
    """Parsed type section of one BTF blob (vmlinux: ~150k types, parsed in well under a second)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        types_start, strs_start = hdr_len + type_off, hdr_len + str_off
        if types_start + type_len > len(data) or strs_start + str_len > len(data):
            raise BtfError("BTF sections outside the blob")
        self._strings = data[strs_start:strs_start + str_len]
        self._data = data
        # id -> offset of its btf_type record; only struct/union/modifier records are decoded on demand
        self._offsets: list[int] = [0]  # id 0 is void
        self._by_name: dict[str, list[int]] = {}
        pos, end = types_start, types_start + type_len
        while pos < end:
            name_off, info, _ = _TYPE.unpack_from(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            trailer = _TRAILER.get(kind)
            if trailer is None:
                raise BtfError(f"unknown BTF kind {kind} at byte {pos}")
            tid = len(self._offsets)
            self._offsets.append(pos)
            if kind in (KIND_STRUCT, KIND_UNION) and name_off:
                self._by_name.setdefault(self._string(name_off), []).append(tid)
            pos += _TYPE.size + trailer[0] + trailer[1] * vlen
        if pos != end:
            raise BtfError("BTF type section does not end on a type boundary")

    @classmethod
    def from_file(cls, path: Path = VMLINUX_BTF) -> Btf:
        try:
            return cls(path.read_bytes())
        except OSError as e:
            raise BtfError(f"cannot read {path}: {e.strerror}") from e

    def _string(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end if end >= 0 else None].decode(errors="replace")

    def type(self, type_id: int) -> BtfType:
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"BTF type id {type_id} out of range")
        pos = self._offsets[type_id]
        name_off, info, size_or_type = _TYPE.unpack_from(self._data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        members: list[BtfMember] = []
        if kind in (KIND_STRUCT, KIND_UNION):
            for i in range(vlen):
                m_name, m_type, m_off = _MEMBER.unpack_from(self._data, pos + _TYPE.size + i * _MEMBER.size)
                bit_off, bits = (m_off & 0xFFFFFF, m_off >> 24) if kflag else (m_off, 0)
                members.append(BtfMember(self._string(m_name) if m_name else "", m_type, bit_off, bits))
        return BtfType(kind, self._string(name_off) if name_off else "", size_or_type, tuple(members))

    def struct_ids(self, name: str) -> list[int]:
        return self._by_name.get(name, [])

    def _resolve(self, type_id: int) -> BtfType:
        t = self.type(type_id)
        while t.kind in _MODIFIERS:
            t = self.type(t.size_or_type)
        return t

    def _find_member(self, t: BtfType, name: str) -> tuple[int, BtfMember] | None:
        """(bit offset, member) of `name` in `t`, looking inside anonymous structs/unions."""
        for m in t.members:
            if m.name == name:
                return m.bit_offset, m
        for m in t.members:
            if not m.name:
                inner = self._resolve(m.type_id)
                found = self._find_member(inner, name) if inner.kind in (KIND_STRUCT, KIND_UNION) else None
                if found is not None:
                    return m.bit_offset + found[0], found[1]
        return None

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path ("thread.fsbase") in `struct struct_name`."""
        ids = self.struct_ids(struct_name)
        if not ids:
            raise BtfError(f"struct {struct_name} not in BTF")
        t, bits = self.type(ids[0]), 0
        for part in path.split("."):
            if t.kind not in (KIND_STRUCT, KIND_UNION):
                raise BtfError(f"{struct_name}.{path}: {part!r} is not inside a struct")
            found = self._find_member(t, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            off, member = found
            if member.bitfield_size:
                raise BtfError(f"{struct_name}.{path} is a bitfield")
            bits += off
            t = self._resolve(member.type_id)
        if bits % 8:
            raise BtfError(f"{struct_name}.{path} is not byte-aligned")
        return bits // 8


@cache
def vmlinux() -> Btf:
    """The running kernel's BTF, parsed once per process."""
    return Btf.from_file()


def task_fsbase_offset() -> int:
    """Offset of thread.fsbase in task_struct on the running kernel (x86_64): the user FS base (TLS).

    Remembered on disk per kernel (release, version string, BTF size): parsing
    vmlinux's BTF costs ~0.35 s of CPU on every start otherwise.
    """
    key_path = _offset_cache_path()
    if key_path is not None:
        try:
            return int(key_path.read_text())
        except (OSError, ValueError):
            pass
    btf = vmlinux()
    offset = btf.offsetof("task_struct", "thread") + btf.offsetof("thread_struct", "fsbase")
    if key_path is not None:
        try:
            key_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = key_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(str(offset))
            os.replace(tmp, key_path)
        except OSError:
            pass  # a read-only cache directory only costs the parse next time
    return offset


def _offset_cache_path() -> Path | None:
    """Where this kernel's fsbase offset is remembered; None if BTF is absent."""
    from symbolizer.unwind_cache import cache_dir  # noqa: PLC0415  (the one cache directory setting)

    try:
        size = VMLINUX_BTF.stat().st_size
    except OSError:
        return None
    u = os.uname()
    key = hashlib.sha256(f"{u.release}\0{u.version}\0{size}".encode()).hexdigest()[:32]
    return cache_dir().parent / "btf" / f"task-fsbase-{key}"
