"""Compiled BPF programs kept on disk, so that a start loads them without clang.

BCC stays the compiler (agent/bpfload/bpf_compile.py). What it produced for
one source, its flags, the kernel, BCC's version and the probe selection is
written here once: each program's instructions, type, license and kernel
version, and the definition of every map an instruction refers to. A later
start creates those maps again with libbpf, writes their new fds into the
instructions that referred to the old ones (ld_imm64 with src_reg
BPF_PSEUDO_MAP_FD or BPF_PSEUDO_MAP_VALUE) and loads the programs: no fork,
no LLVM, a few milliseconds.

An entry is a header (magic, format version, the key's digest, the
payload's sha256 and length) and a payload (JSON description, then the
instructions). Anything that does not match, a wrong key, version, checksum
or a field out of range, is refused (CacheEntryError), never loaded; the
caller discards it and compiles again. Files are written atomically
(tempfile + rename) into a directory only root reads (0700, files 0600),
and an entry is read only if this user owns it and nobody else may write it.

The directory: bpf/ next to the other caches ($BPFPROF_CACHE_DIR, else
/var/cache/bpfprof when writable, symbolizer/unwind_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bpfload import libbpf
from agent.errors import BpfLoadError

log = logging.getLogger(__name__)

MAGIC = b"BPFPROG\0"
FORMAT_VERSION = 2  # bump whenever what an entry holds, or how it is loaded, changes
_HEADER = struct.Struct("<8sH6s32s32sQ")  # magic, version, reserved (zero), key digest, payload sha256, length
_META_LEN = struct.Struct("<I")
MAX_ENTRY_BYTES = 64 << 20  # a bound on what is read; bpfprof's entries are tens of KB
INSN_BYTES = 8
BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
PSEUDO_MAP_FD = 1  # imm: a map fd
PSEUDO_MAP_VALUE = 2  # imm: a map fd, next imm: an offset into its value
# Maps whose definition needs more than type/sizes/flags (an inner map, BTF, a struct_ops type): not cached.
_UNCACHEABLE_MAP_TYPES = {12: "array_of_maps", 13: "hash_of_maps", 26: "struct_ops"}
_MAX_NAME = libbpf.BPF_OBJ_NAME_LEN - 1


class CacheEntryError(BpfLoadError):
    """A cache entry that must not be loaded: corrupt, foreign, of another version."""


class NotCacheable(BpfLoadError):
    """Compiled programs this cache cannot describe (a map or instruction kind it does not recreate)."""


@dataclass(frozen=True)
class MapDef:
    """A map as created again: the kernel's own description of it, and the name the agent knows it by."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str  # the kernel's (BCC's, truncated to 15 characters)
    map_extra: int = 0
    named: str = ""  # the name in LoadedObjects.maps, "" for a map only programs refer to


@dataclass(frozen=True)
class ProgDef:
    """A program: its instructions with map references zeroed, and which map each reference is."""

    name: str  # the name in LoadedObjects.programs
    kernel_name: str  # the name BCC gave the kernel (15 characters at most)
    type: int
    license: str
    kern_version: int
    insns: bytes
    relocs: tuple[tuple[int, int], ...]  # (instruction index, index into Entry.maps)
    attach_type: int = 0  # expected_attach_type it was loaded with (uprobe_multi links need theirs)


@dataclass(frozen=True)
class Entry:
    maps: tuple[MapDef, ...]
    programs: tuple[ProgDef, ...]


def cache_dir() -> Path:
    """Where entries live: bpf/ beside the unwind and BTF caches (the one cache directory setting)."""
    from symbolizer.unwind_cache import cache_dir as caches  # noqa: PLC0415  (keeps start-up imports small)

    return caches().parent / "bpf"


def key_digest(parts: dict[str, Any]) -> str:
    """The entry name for everything that decides what the compiler produces."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# -- describing compiled programs (the compile child) -------------------------------------------------


def map_references(insns: bytes) -> list[tuple[int, int, int]]:
    """(instruction index, fd, src_reg) of every map reference; NotCacheable for other pseudo loads."""
    if len(insns) % INSN_BYTES:
        raise NotCacheable(f"{len(insns)} bytes of instructions is not a whole number of instructions")
    refs = []
    n = len(insns) // INSN_BYTES
    i = 0
    while i < n:
        code, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * INSN_BYTES)
        if code == BPF_LD_IMM64:
            src = regs >> 4
            if src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                refs.append((i, imm, src))
            elif src != 0:
                raise NotCacheable(f"instruction {i}: ld_imm64 with src_reg {src} (not a map reference)")
            i += 2
        else:
            i += 1
    return refs


def describe(programs: dict[str, tuple[int, bytes, str, int, int]], named_maps: dict[str, int]) -> Entry:
    """The entry for loaded programs: name -> (fd, instructions, license, kern_version, expected attach
    type: the kernel does not report it); map name -> fd.

    Runs where the fds in the instructions are valid (the compile child).
    """
    maps: list[MapDef] = []
    index_of_id: dict[int, int] = {}
    names_of_id = {libbpf.map_info(fd).id: name for name, fd in named_maps.items()}

    def map_index(fd: int) -> int:
        info = libbpf.map_info(fd)
        if info.id not in index_of_id:
            if info.type in _UNCACHEABLE_MAP_TYPES:
                raise NotCacheable(f"map {info.name.decode()!r} is a {_UNCACHEABLE_MAP_TYPES[info.type]}")
            index_of_id[info.id] = len(maps)
            maps.append(MapDef(info.type, info.key_size, info.value_size, info.max_entries, info.map_flags,
                               info.name.decode(errors="replace"), info.map_extra, names_of_id.get(info.id, "")))
        return index_of_id[info.id]

    progs = []
    for name, (fd, insns, license_, kern_version, attach_type) in programs.items():
        code = bytearray(insns)
        relocs = []
        for i, map_fd, _src in map_references(insns):
            relocs.append((i, map_index(map_fd)))
            struct.pack_into("<i", code, i * INSN_BYTES + 4, 0)  # the child's fd means nothing later
        info = libbpf.prog_info(fd)
        progs.append(ProgDef(name, info.name.decode(errors="replace"), info.type, license_, kern_version,
                             bytes(code), tuple(relocs), attach_type))
    for fd in named_maps.values():
        map_index(fd)  # a named map no program refers to is still created
    return Entry(tuple(maps), tuple(progs))


# -- the entry format ------------------------------------------------------------------------------------


def encode(key: str, entry: Entry) -> bytes:
    """The bytes of an entry file for `key` (a key_digest)."""
    blob = bytearray()
    progs = []
    for p in entry.programs:
        progs.append({"name": p.name, "kernel_name": p.kernel_name, "type": p.type, "license": p.license,
                      "kern_version": p.kern_version, "attach_type": p.attach_type,
                      "offset": len(blob), "length": len(p.insns),
                      "relocs": [list(r) for r in p.relocs]})
        blob += p.insns
    maps = [{"type": m.type, "key_size": m.key_size, "value_size": m.value_size, "max_entries": m.max_entries,
             "flags": m.flags, "name": m.name, "map_extra": m.map_extra, "named": m.named} for m in entry.maps]
    meta = json.dumps({"maps": maps, "programs": progs}, sort_keys=True).encode()
    payload = _META_LEN.pack(len(meta)) + meta + bytes(blob)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, bytes(6), bytes.fromhex(key), hashlib.sha256(payload).digest(),
                        len(payload)) + payload


def _field(d: dict[str, Any], name: str, kind: type, lo: int = 0, hi: int = (1 << 64) - 1) -> Any:
    v = d.get(name)
    if type(v) is not kind or (kind is int and not lo <= v <= hi):
        raise CacheEntryError(f"field {name!r} is {v!r}")
    return v


def decode(key: str, data: bytes) -> Entry:
    """The entry in `data`, checked whole; CacheEntryError says what is wrong with it."""
    if len(data) < _HEADER.size:
        raise CacheEntryError(f"{len(data)} bytes: shorter than the header")
    magic, version, reserved, digest, checksum, length = _HEADER.unpack_from(data)
    if magic != MAGIC or any(reserved):
        raise CacheEntryError("not a bpfprof BPF cache entry (magic)")
    if version != FORMAT_VERSION:
        raise CacheEntryError(f"format version {version}, this bpfprof writes {FORMAT_VERSION}")
    if digest != bytes.fromhex(key):
        raise CacheEntryError("written for another key")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise CacheEntryError(f"payload of {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != checksum:
        raise CacheEntryError("checksum mismatch")
    try:
        (meta_len,) = _META_LEN.unpack_from(payload)
        meta = json.loads(payload[_META_LEN.size:_META_LEN.size + meta_len])
        blob = payload[_META_LEN.size + meta_len:]
        maps = tuple(MapDef(_field(m, "type", int, 1, 1 << 16), _field(m, "key_size", int, 0, 1 << 31),
                            _field(m, "value_size", int, 0, 1 << 31), _field(m, "max_entries", int, 0, (1 << 32) - 1),
                            _field(m, "flags", int, 0, (1 << 32) - 1), _field(m, "name", str),
                            _field(m, "map_extra", int), _field(m, "named", str)) for m in meta["maps"])
        progs = []
        for p in meta["programs"]:
            off, size = _field(p, "offset", int, 0, len(blob)), _field(p, "length", int, INSN_BYTES, len(blob))
            if off + size > len(blob) or size % INSN_BYTES:
                raise CacheEntryError(f"program {p.get('name')!r}: instructions out of bounds")
            insns = blob[off:off + size]
            relocs = tuple((i, m) for i, m in p["relocs"] if type(i) is int and type(m) is int)
            if len(relocs) != len(p["relocs"]):
                raise CacheEntryError(f"program {p.get('name')!r}: a map reference that is not two integers")
            refs = {i for i, _fd, _src in map_references(insns)}
            if {i for i, _m in relocs} != refs or any(not 0 <= m < len(maps) for _i, m in relocs):
                raise CacheEntryError(f"program {p.get('name')!r}: map references do not match its instructions")
            progs.append(ProgDef(_field(p, "name", str), _field(p, "kernel_name", str), _field(p, "type", int, 1, 1 << 16),
                                 _field(p, "license", str), _field(p, "kern_version", int, 0, (1 << 32) - 1),
                                 insns, relocs, _field(p, "attach_type", int, 0, 1 << 16)))
    except CacheEntryError:
        raise
    except (ValueError, KeyError, TypeError, struct.error, NotCacheable) as e:
        raise CacheEntryError(f"malformed description: {e}") from e
    if any(len(n) > _MAX_NAME for n in [*(m.name for m in maps), *(p.kernel_name for p in progs)]):
        raise CacheEntryError("an object name longer than the kernel allows")
    return Entry(maps, tuple(progs))


# -- the directory ----------------------------------------------------------------------------------------


def entry_path(key: str, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"{key[:48]}.bpfc"


def read(key: str, directory: Path | None = None) -> Entry | None:
    """The entry for `key`; None if absent. A bad entry is removed with one log line, and None."""
    from symbolizer.unwind_cache import NotPrivate, read_private  # noqa: PLC0415  (keeps start-up imports small)

    path = entry_path(key, directory)
    try:
        data = read_private(path, MAX_ENTRY_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:
        return _discard(path, f"cannot read: {e.strerror}")
    except NotPrivate as e:
        return _discard(path, str(e))
    try:
        return decode(key, data)
    except CacheEntryError as e:
        return _discard(path, str(e))


def _discard(path: Path, why: str) -> None:
    log.warning("BPF cache entry %s discarded (%s): compiling again", path, why)
    discard(path)


def discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write(key: str, data: bytes, directory: Path | None = None) -> Path | None:
    """Store encoded entry bytes atomically; the path, or None (logged) when it cannot be written."""
    return write_file(entry_path(key, directory), data)


def write_file(path: Path, data: bytes) -> Path | None:
    """Write a file of the cache directory atomically (mode 0600); None (logged) when it cannot be."""
    from symbolizer.unwind_cache import write_private  # noqa: PLC0415  (keeps start-up imports small)

    why = write_private(path, data)
    if why is not None:
        log.warning("BPF cache file %s not written (%s): compiling every start", path, why)
        return None
    return path


# -- loading an entry (no BCC) --------------------------------------------------------------------------


def _load_programs(entry: Entry, map_fds: list[int], prog_fds: dict[str, int]) -> None:
    """Load every program with its map references patched, into `prog_fds` (also those loaded when
    another fails, for the caller to close); the first error raised.

    One thread per program: the kernel's verifier is most of a start (0.15-0.25 s for each of the
    sampler and the unwinder here), and the bpf() call runs without the GIL, so they verify side by side.
    """
    errors: list[BaseException] = []

    def one(p: ProgDef) -> None:
        code = bytearray(p.insns)
        for i, m in p.relocs:
            struct.pack_into("<i", code, i * INSN_BYTES + 4, map_fds[m])
        try:
            prog_fds[p.name] = libbpf.prog_load(p.type, p.kernel_name, p.license, bytes(code), p.kern_version,
                                                p.attach_type)
        except BaseException as e:  # noqa: BLE001  (raised again by the caller's thread)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(p,), name=f"bpf-load-{p.name}") for p in entry.programs[1:]]
    for t in threads:
        t.start()
    if entry.programs:
        one(entry.programs[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def load(entry: Entry, map_entries: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Create the maps, patch the instructions, load the programs: (program fds, named map fds).

    `map_entries`: max_entries of named maps chosen at load time, not compile
    time (the ring buffer's size): one entry then serves every size, as long
    as no instruction depends on it. BpfLoadError if the kernel refuses
    anything; nothing stays open then.
    """
    sizes = map_entries or {}
    map_fds: list[int] = []
    prog_fds: dict[str, int] = {}
    try:
        for m in entry.maps:
            max_entries = sizes.get(m.named, m.max_entries) if m.named else m.max_entries
            map_fds.append(libbpf.map_create(m.type, m.name, m.key_size, m.value_size, max_entries,
                                             m.flags, m.map_extra))
        _load_programs(entry, map_fds, prog_fds)
    except BaseException:
        for fd in (*map_fds, *prog_fds.values()):
            os.close(fd)
        raise
    named = {}
    for m, fd in zip(entry.maps, map_fds, strict=True):
        if m.named:
            named[m.named] = fd
        else:
            os.close(fd)  # the programs hold their own references
    return prog_fds, named
