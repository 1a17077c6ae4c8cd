"""A user truncates a shared library the agent is reading: the agent lives on (no SIGBUS).

The agent runs as root and reads files other users own. It never memory-maps
them (symbolizer/elf.py): a file truncated under a shared mapping would kill
the reader with SIGBUS at its next touch of the lost pages.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from fixtures.builder import build_c
from recording import BPFPROF, read_pprof
from symbolizer.elf import ElfFile

NOBODY = 65534
PAGE = 4096


def _loaded_end(path: Path) -> tuple[int, int]:
    """(end of the last PT_LOAD's bytes rounded up to a page, offset of .symtab)."""
    with ElfFile(path) as elf:
        end = max(s.offset + s.filesz for s in elf.load_segments)
        symtab = elf.headers.section(".symtab")
        assert symtab is not None
        return -(-end // PAGE) * PAGE, symtab.offset


def test_library_truncated_by_its_user_leaves_frames_unresolved(tmp_path):
    lib = build_c("trunc_lib", flags=("-O1", "-g", "-shared", "-fPIC"))
    prog = build_c("trunc_self", flags=("-O1", "-g"))
    keep, symtab_at = _loaded_end(lib)
    assert symtab_at >= keep, "the truncation must cut the symbol table off"
    home = Path(tempfile.mkdtemp(prefix="bpfprof-trunc-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        copy, exe = home / "libtrunc.so", home / "trunc_self"
        shutil.copy(lib, copy)
        shutil.copy(prog, exe)
        os.chown(copy, NOBODY, NOBODY)  # the user's own file: they may truncate it
        victim = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                   "--inh-caps=-all", str(exe), str(copy), str(keep), "30"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert victim.stdout.readline().strip() == "ready"
            out = tmp_path / "trunc.pb.gz"
            rec = subprocess.Popen([str(BPFPROF), "record", "--pid", str(victim.pid), "--duration", "5",
                                    "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                started = ""
                while not started.startswith("sampling") and rec.poll() is None:
                    started = rec.stderr.readline()
                assert started.startswith("sampling pid"), started
                time.sleep(1.5)  # the agent has seen the process and opened its library
                victim.send_signal(signal.SIGUSR1)
                assert victim.stdout.readline().strip() == "truncated"
                assert copy.stat().st_size == keep
                stdout, stderr = rec.communicate(timeout=60)
            finally:
                if rec.poll() is None:
                    rec.kill()
                    rec.wait()
        finally:
            victim.kill()
            victim.wait()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert rec.returncode == 0, (rec.returncode, stderr)  # -7 (SIGBUS) before
    assert "Traceback" not in stderr
    prof = read_pprof(out)
    in_lib = [s for s in prof.samples if any(k.endswith("libtrunc.so") for k in s.kinds)]
    assert len(in_lib) > 0
    for s in in_lib:
        names = [n for loc, k in zip(s.locations, s.kinds, strict=True) if k.endswith("libtrunc.so") for n in loc]
        # Resolved before the cut (a copy the agent owns), or unresolved after it: libtrunc.so+0x...
        assert all(n == "trunc_lib_spin" or "+0x" in n for n in names), names
