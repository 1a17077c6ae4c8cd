"""Hostile inputs to `bpfprof convert` (a real CLI process each): one clear line, exit 2, no hang.

A gzip bomb stops at MAX_PPROF_BYTES (by the bounded gunzip serve's receiver uses too, in
exporters/bounded_input.py); a FIFO, socket or directory is refused before any read, /dev/zero stops at the cap;
pprof whose ids point nowhere names what is wrong instead of a Python message.
"""

from __future__ import annotations

import gzip
import os
import socket
import zlib

import pytest

from exporters.bounded_input import gunzip_limited
from exporters.pprof import MAX_PPROF_BYTES
from exporters.proto import profile_pb2
from recording import run_bpfprof
from symbolizer.errors import ExportError, InputTooLarge


def _one_line_error(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _gzip_bomb(size: int) -> bytes:
    """`size` zero bytes as gzip, compressed in 1 MiB pieces (never all in memory)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    piece = bytes(1 << 20)
    return b"".join([*(c.compress(piece) for _ in range(size >> 20)), c.flush()])


def test_gzip_bomb_stops_at_the_limit(tmp_path):
    bomb = tmp_path / "bomb.pb.gz"
    bomb.write_bytes(_gzip_bomb(2 * MAX_PPROF_BYTES))  # ~260 KiB on disk
    # The timeout only catches a hang.
    proc = run_bpfprof("convert", str(bomb), str(tmp_path / "out.otlp.pb"), check=False, timeout=60)
    _one_line_error(proc, str(bomb), f"over the {MAX_PPROF_BYTES}-byte limit")
    assert not (tmp_path / "out.otlp.pb").exists()


@pytest.mark.parametrize(("kind", "words"), [("fifo", "not a regular file"), ("dev_zero", "larger than"),
                                             ("directory", "is a directory"), ("socket", "cannot read")])  # click says that one
def test_not_a_regular_file_is_refused(tmp_path, kind, words):
    src = tmp_path / "in.pb.gz"
    if kind == "fifo":
        os.mkfifo(src)  # no writer: a plain open() would block forever
    elif kind == "dev_zero":
        src.symlink_to("/dev/zero")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(src))
    else:
        src.mkdir()
    proc = run_bpfprof("convert", str(src), str(tmp_path / "out.otlp.pb"), check=False, timeout=60)
    _one_line_error(proc, words)


def _pprof(**broken) -> bytes:
    p = profile_pb2.Profile()
    p.string_table.extend(["", "samples", "count", "main"])
    p.sample_type.add(type=1, unit=2)
    p.function.add(id=1, name=3)
    loc = p.location.add(id=1)
    loc.line.add(function_id=broken.get("function_id", 1))
    p.sample.add(location_id=[broken.get("location_id", 1)], value=broken.get("value", [1]))
    if "name" in broken:
        p.function[0].name = broken["name"]
    return gzip.compress(p.SerializeToString())


@pytest.mark.parametrize(("broken", "words"), [
    ({}, None),
    ({"location_id": 7}, ("location id 7 is not in its table",)),
    ({"function_id": 9}, ("function id 9 is not in its table",)),
    ({"name": 99}, ("string index 99 is not in its table (4 entries)",)),
    ({"value": [1, 2, 3]}, ("sample 0 has 3 values for 1 sample types",)),
])
def test_malformed_pprof_names_the_problem(tmp_path, broken, words):
    src = tmp_path / "in.pb.gz"
    src.write_bytes(_pprof(**broken))
    proc = run_bpfprof("convert", str(src), str(tmp_path / "out.otlp.pb"), check=False, timeout=60)
    if words is None:  # the well-formed one converts
        assert proc.returncode == 0, proc.stderr
        return
    line = _one_line_error(proc, f"{src} is not a pprof file: malformed pprof:", *words)
    assert "list index out of range" not in line


def test_gunzip_limited_contract():
    data = gzip.compress(b"x" * 1000)
    assert gunzip_limited(data, 1000) == b"x" * 1000
    with pytest.raises(InputTooLarge):
        gunzip_limited(data, 999)
    with pytest.raises(ExportError, match="truncated gzip"):
        gunzip_limited(data[:-10], 2000)
    with pytest.raises(ExportError, match="not valid gzip"):
        gunzip_limited(b"\x1f\x8bnot gzip at all", 2000)
