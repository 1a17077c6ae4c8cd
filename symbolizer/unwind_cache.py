"""Unwind tables (and the BPF walker's packed rows) kept on disk.

Building libc's table takes ~50 ms and a large binary's ~0.8 s, which a
5-second capture pays again every run; read back from disk it is a few
hundred microseconds. Files are keyed by a digest of what they are built
from (the CFI sections' bytes: symbolizer/cfi.py CfiInputs; the rows' inputs:
agent/unwind/tables.py), never by path or build id alone, which a copy of a
binary keeps whatever else it changes; written atomically, they carry a format
version and the byte order: anything that does not match is ignored and
rebuilt, never trusted.

The directory: $BPFPROF_CACHE_DIR, else /var/cache/bpfprof/unwind when
writable (the agent runs as root), else ~/.cache/bpfprof/unwind.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys
import tempfile
from array import array
from pathlib import Path

from symbolizer.cfi import UnwindTable

ENV_CACHE_DIR = "BPFPROF_CACHE_DIR"
SYSTEM_CACHE_DIR = Path("/var/cache/bpfprof")
MAGIC = b"BPFUNW"
FORMAT_VERSION = 1  # bump whenever symbolizer/cfi.py changes what a row means
_HEADER = struct.Struct("<6sHBxQQQ")  # magic, version, little-endian?, rows, fde_count, unsupported_fdes
_TYPECODES = ("Q", "B", "i", "i")  # pcs, kinds, cfa_offs, rbp_offs (as cfi.UnwindTable builds them)
ROWS_MAGIC = b"BPFROW"
# magic, the rows format's version (symbolizer/unwind_rows.py), row size, base, payload length, payload sha256
_ROWS_HEADER = struct.Struct("<6sHIQQ32s")
MAX_ROWS_BYTES = 1 << 30  # a bound on what is read; libxul's rows are tens of MB
MAX_TABLE_BYTES = 4 << 30  # a table is ~17 bytes a row: libLLVM's 949k rows are 16 MB


def cache_dir() -> Path:
    """unwind/ in the one cache root ($BPFPROF_CACHE_DIR, else /var/cache/bpfprof, else ~/.cache/bpfprof);
    the BPF and debuginfod caches sit beside it."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env) / "unwind"
    if os.access(SYSTEM_CACHE_DIR.parent, os.W_OK) or os.access(SYSTEM_CACHE_DIR, os.W_OK):
        return SYSTEM_CACHE_DIR / "unwind"
    return Path.home() / ".cache" / "bpfprof" / "unwind"


def private_dir(path: Path) -> str | None:
    """Create `path` 0700 (parents as needed). None when it is a real directory of this user that no one
    else can write (made so if it was not), else why it cannot be used."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return "not a directory of this user"
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:
        return str(e)
    return None


class NotPrivate(ValueError):
    """A cache file that is not a regular file of this user closed to others, or is too big to read."""


def read_private(path: Path, max_bytes: int) -> bytes:
    """The bytes of a cache file that only this user can have written: no symlink followed, at most
    `max_bytes`. FileNotFoundError if absent, another OSError if unreadable, NotPrivate otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise NotPrivate("not a private file of this user")
        if st.st_size > max_bytes:
            raise NotPrivate(f"{st.st_size} bytes, over {max_bytes}")
        chunks, left = [], st.st_size + 1  # one more byte: a file growing under us is refused by the caller
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_private(path: Path, *parts: bytes) -> str | None:
    """Write a cache file atomically, mode 0600, in a directory only this user can write (made so);
    None when written, else why not."""
    why = private_dir(path.parent)
    if why is not None:
        return why
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")  # mode 0600
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
        return None
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return str(e)


def _path(key: str, kind: str, directory: Path, suffix: str = ".unw") -> Path:
    # keys of any length and alphabet: hash them into a file name
    return directory / (hashlib.sha256(f"{kind}:{key}".encode()).hexdigest()[:40] + suffix)


def load(key: str, kind: str, directory: Path | None = None) -> UnwindTable | None:
    """The cached table of `key` (CfiInputs.digest), or None (absent, other version, corrupt)."""
    if not key:
        return None
    path = _path(key, kind, directory or cache_dir())
    try:
        data = read_private(path, MAX_TABLE_BYTES)
        magic, version, little, rows, fdes, unsupported = _HEADER.unpack_from(data)
        if magic != MAGIC or version != FORMAT_VERSION or bool(little) != (sys.byteorder == "little"):
            return None
        off = _HEADER.size
        arrays = []
        for code in _TYPECODES:
            a = array(code)
            end = off + rows * a.itemsize
            if end > len(data):
                return None
            a.frombytes(data[off:end])
            arrays.append(a)
            off = end
        if off != len(data):
            return None
        return UnwindTable(*arrays, fde_count=fdes, unsupported_fdes=unsupported, sources=("cache",))
    except (OSError, struct.error, ValueError):  # NotPrivate is a ValueError
        return None


def store(key: str, kind: str, table: UnwindTable, directory: Path | None = None) -> bool:
    """Write the table for `key`; False (and nothing written) if the directory is not usable."""
    arrays = (table.pcs, table.kinds, table.cfa_offs, table.rbp_offs)
    if not key or tuple(a.typecode for a in arrays) != _TYPECODES:
        return False
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, sys.byteorder == "little", len(table.pcs), table.fde_count,
                        table.unsupported_fdes)
    return write_private(_path(key, kind, directory or cache_dir()), head, *(a.tobytes() for a in arrays)) is None


def load_rows(key: str, kind: str, version: int, row_bytes: int,
              directory: Path | None = None) -> tuple[int, bytes] | None:
    """(base, packed rows) of `key` as the BPF unwinder reads them, or None (absent, another rows
    format, corrupt: the checksum covers every byte, since the rows go into the kernel's map)."""
    if not key:
        return None
    path = _path(key, kind, directory or cache_dir(), ".rows")
    try:
        data = read_private(path, _ROWS_HEADER.size + MAX_ROWS_BYTES)
    except (OSError, NotPrivate):
        return None
    try:
        magic, got_version, got_row, base, length, digest = _ROWS_HEADER.unpack_from(data)
    except struct.error:
        return None
    payload = data[_ROWS_HEADER.size:]
    if (magic, got_version, got_row) != (ROWS_MAGIC, version, row_bytes) or length != len(payload) \
            or length % row_bytes or hashlib.sha256(payload).digest() != digest:
        return None
    return base, payload


def store_rows(key: str, kind: str, version: int, row_bytes: int, base: int, rows: bytes,
               directory: Path | None = None) -> bool:
    """Keep a file's packed rows for the next capture; False (nothing written) if it cannot be."""
    if not key or len(rows) > MAX_ROWS_BYTES:
        return False
    head = _ROWS_HEADER.pack(ROWS_MAGIC, version, row_bytes, base, len(rows), hashlib.sha256(rows).digest())
    return write_private(_path(key, kind, directory or cache_dir(), ".rows"), head, rows) is None
