"""Files and processes other users control, read by the root agent: every read is bounded.

A user owns their files and processes: a program with a multi-gigabyte sparse
tail, a compressed debug section that claims a terabyte, a process with
thousands of mappings under a 3,500-character path. The agent reads each
with a bound; past it the file or process is left out with one line, and the
agent goes on.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.go.goroutines import MAX_LABEL_BYTES, read_labels
from agent.probes import heap_sampler
from agent.processes.memory import ProcessMemory
from agent.processes.tracker import ProcessTracker
from exporters.otlp_sender import MAX_CA_FILE_BYTES, OtlpExporter
from fixtures.builder import build_c, build_go
from symbolizer.elf import MAX_DECOMPRESSED_BYTES, ElfFile
from symbolizer.errors import ConfigError, ElfParseError
from symbolizer.file_symbols import SymbolCache
from symbolizer.proc_maps import MAX_MAPS_BYTES

NOBODY = 65534
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
SPARSE_TAIL = 2 << 30  # what a whole read of the file would have taken

# reader -> (module, function, the file it is meant for)
READERS = {
    "go_sema_sites": ("agent.probes.lock", "go_sema_sites", "go"),
    "go_heap_target": ("agent.go.heap", "go_heap_target", "go"),
    "libc_probe_points": ("agent.probes.heap", "libc_probe_points", "libc"),
    "sampler_sites": ("agent.probes.heap_sampler", "sampler_sites", "sampler"),
}
PROBE = ("import resource, sys\nfrom {module} import {function}\n"
         "try:\n    print(repr({function}(sys.argv[1])))\n"
         "except Exception as e:\n    print(f'{{type(e).__name__}}: {{e}}')\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")


@pytest.fixture
def home():
    """A directory of the user's own (world-readable, as under /home)."""
    d = Path(tempfile.mkdtemp(prefix="bpfprof-hostile-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _probe(module: str, function: str, path: Path) -> tuple[str, int]:
    """(repr of what the reader found, or its error, peak RSS in MB of the process that ran it)."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, function=function), str(path)],
                         capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    return out[0], int(out[1])


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_file_with_a_huge_sparse_tail_is_read_within_bounds(reader, home, tmp_path, monkeypatch):
    """Go readers once read the whole file; the others let pyelftools walk a symbol table the file
    says is 1.5 GiB (an object per entry). The user's file grows by 2 GiB of holes (no disk)."""
    module, function, kind = READERS[reader]
    if kind == "go":
        source = build_go("cpusplit")
    elif kind == "libc":
        source = Path(LIBC)
    else:
        monkeypatch.setenv("BPFPROF_CACHE_DIR", str(tmp_path))
        source = heap_sampler.library()
    path = home / source.name
    shutil.copy(source, path)
    os.chown(path, NOBODY, NOBODY)  # the user's own file: they may grow it as they like
    found, rss_mb = _probe(module, function, path)
    assert found not in ("None", "[]") and "Error" not in found, f"{reader} must find its sites in {source}"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + SPARSE_TAIL)
    if kind != "go":
        with ElfFile(path) as elf:
            dynsym = elf.headers.section(".dynsym")
            index = elf.headers.section_index(".dynsym")
            at = elf.headers.shoff + index * elf.headers.shentsize + 32  # Elf64_Shdr.sh_size
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(struct.pack("<Q", SPARSE_TAIL - SPARSE_TAIL % 24 - 24 * 1024))  # ~2 GiB: 89 M symbols
        assert dynsym is not None
    found_again, rss_again_mb = _probe(module, function, path)
    if kind == "go":
        assert found_again == found
    else:
        assert found_again.startswith("ElfParseError: ") and "MiB a file may take" in found_again, found_again
    assert rss_again_mb < rss_mb + 64, f"{reader} read the tail: {rss_mb} -> {rss_again_mb} MB"


def _compressed_debug_info_claiming(size: int, home: Path) -> Path:
    """A program built with compressed DWARF whose .debug_info header claims `size` bytes inflated."""
    exe = home / "zdebug"
    shutil.copy(build_c("symtest", flags=("-O1", "-g", "-gz=zlib")), exe)
    with ElfFile(exe) as elf:
        sec = elf.headers.section(".debug_info")
        assert sec is not None and sec.flags & 0x800, "gcc -gz=zlib must compress .debug_info"
        at = sec.offset + 8  # Elf64_Chdr: ch_type, ch_reserved, then ch_size
    with open(exe, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<Q", size))
    os.chown(exe, NOBODY, NOBODY)
    return exe


def test_a_compressed_section_claiming_a_terabyte_is_refused_and_symbols_still_resolve(home, caplog):
    exe = _compressed_debug_info_claiming(1 << 40, home)
    with ElfFile(exe) as elf, pytest.raises(ElfParseError, match="inflates to 1099511627776 bytes"):
        elf.section_bytes(".debug_info")
    fs = SymbolCache().get(ElfFile(exe))
    sym = fs.symbols.find("loop_sum")
    assert sym is not None
    frames = fs.symbolize(sym.start)
    assert frames[-1].function == "loop_sum" and frames[-1].line == 0  # named by .symtab, no lines
    assert [e for e in fs.errors if f"{MAX_DECOMPRESSED_BYTES >> 20} MiB" in e] == fs.errors and len(fs.errors) == 1
    assert [r.getMessage() for r in caplog.records] == fs.errors  # one line, logged


def test_a_process_with_more_maps_than_the_cap_is_a_counted_snapshot_failure(home, caplog):
    deep = home
    for i in range(14):  # a 3,500-character path: each mapping of it is a 3.6 kB line of maps
        deep = deep / (chr(ord("a") + i) * 250)
    deep.mkdir(parents=True)
    for d in [deep, *deep.parents]:
        if d == home.parent:
            break
        os.chmod(d, 0o755)
    data = deep / "data"
    data.write_bytes(bytes(4096))
    os.chown(data, NOBODY, NOBODY)
    code = ("import mmap, sys, time\nf = open(sys.argv[1], 'rb')\n"
            "maps = [mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ) for _ in range(6000)]\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    user = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3.11",
                             "-c", code, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout.readline().strip() == "ready"
        assert os.path.getsize(f"/proc/{user.pid}/maps") == 0  # procfs: the size is known only by reading
        with open(f"/proc/{user.pid}/maps", "rb") as f:
            assert len(f.read()) > MAX_MAPS_BYTES
        tracker = ProcessTracker(cache=SymbolCache())
        assert tracker.observe(user.pid) is None
        assert tracker.stats.snapshot_failures == 1
    finally:
        user.kill()
        user.wait()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"pid {user.pid}: not snapshotted, its stacks stay unresolved: /proc/{user.pid}/maps is "
                     f"larger than 16 MiB"], lines


@pytest.mark.parametrize("kind", ["fifo", "too_big"])
def test_a_ca_file_that_is_no_certificate_bundle_is_one_line(kind, tmp_path):
    ca = tmp_path / "ca.pem"
    if kind == "fifo":
        os.mkfifo(ca)  # a reader of a FIFO with no writer waits for ever
        words = "is not a regular file"
    else:
        ca.write_bytes(b"#" * (MAX_CA_FILE_BYTES + 1))
        words = "is larger than 4 MiB"
    with pytest.raises(ConfigError, match=words) as err:
        OtlpExporter("https://127.0.0.1:4318", protocol="http", ca_file=str(ca))
    assert "\n" not in str(err.value)


def test_a_goroutine_label_claiming_a_terabyte_is_cut_at_1_kib():
    """Label lengths are the profiled program's words: read at most MAX_LABEL_BYTES of each.

    The label map is laid out in this process's own memory, as Go 1.24+ lays out
    g.labels (a *labelMap: a slice of {key, value string}), and read back through
    /proc/self/mem as the agent reads another process's.
    """
    key = ctypes.create_string_buffer(b"tenant")
    value = ctypes.create_string_buffer(b"v" * 4096)
    items = (ctypes.c_uint64 * 4)(ctypes.addressof(key), 6, ctypes.addressof(value), 1 << 40)
    label_map = (ctypes.c_uint64 * 2)(ctypes.addressof(items), 1)
    with ProcessMemory(os.getpid()) as mem:
        labels = read_labels(mem, ctypes.addressof(label_map))
    assert labels == (("tenant", "v" * MAX_LABEL_BYTES),)
