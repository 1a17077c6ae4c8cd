"""The in-process heap sampler (agent/probes/heap_sampler.c): building it, and finding it in processes.

`bpfprof record --profile heap -- COMMAND` preloads it into the command
(LD_PRELOAD, with BPFPROF_HEAP_RATE = the sampling rate), so a native
program's allocations are sampled in the process at the cost of a
thread-local subtraction, and only sampled objects trap into bpfprof's
uprobes (see heap_sampler.c for why). A service can preload it too (the path
`bpfprof doctor` prints); a process that has it mapped is probed there,
one without it on its libc (a trap per call).

The library is compiled from the source shipped with the agent, once per
source version, into the cache directory (root-owned under /var/cache), with
the system C compiler: no binary is shipped or committed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.go.heap import read_rate_at
from agent.probes.uprobes import function_offsets
from symbolizer.elf import ElfFile, defined_symbols
from symbolizer.proc_maps import open_mapped_file, read_maps
from symbolizer.unwind_cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("heap_sampler.c")
LIB_NAME = "libbpfprof_heap.so"
ALLOC_FUNCTION = "bpfprof_heap_alloc"
FREE_FUNCTION = "bpfprof_heap_free"
RATE_VARIABLE = "bpfprof_heap_rate"
RATE_ENV = "BPFPROF_HEAP_RATE"
CFLAGS = ("-O2", "-g", "-fPIC", "-shared", "-fno-omit-frame-pointer", "-fvisibility=hidden", "-pthread")


def library() -> Path | None:
    """The built library (building it on first use); None, logged, when it cannot be built here."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out_dir = cache_dir().parent / "heap_sampler" / digest
    lib = out_dir / LIB_NAME
    if lib.exists():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("heap: no C compiler to build the in-process sampler: malloc is probed instead (slower)")
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = out_dir / f".{LIB_NAME}.{os.getpid()}"
        subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE), "-ldl", "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        tmp.chmod(0o755)
        tmp.rename(lib)  # atomic: a concurrent bpfprof sees the whole file or none
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("heap: building the in-process sampler failed (%s): malloc is probed instead (slower)",
                    detail.strip().splitlines()[-1] if detail.strip() else e)
        return None
    return lib


def preload_env(lib: Path, rate_bytes: int) -> dict[str, str]:
    """What a command's environment gets to load the sampler: LD_PRELOAD (ours first, theirs kept) and the rate."""
    theirs = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{lib} {theirs}" if theirs else str(lib), RATE_ENV: str(rate_bytes)}


@dataclass(frozen=True)
class SamplerSites:
    """Where to probe a copy of the sampler library: file offsets of its two functions."""

    path: str  # a host path to the file (through the process's map_files or root)
    alloc_offset: int
    free_offset: int
    rate_vaddr: int  # bpfprof_heap_rate's link-time address (0: not found)


def sampler_sites(path: str) -> SamplerSites | None:
    """The probe points of the sampler library at `path`; None if it is not one."""
    offsets = function_offsets(path, [ALLOC_FUNCTION, FREE_FUNCTION])
    if len(offsets) < 2:
        return None
    with ElfFile(path) as elf:  # a data symbol: ElfSymbols keeps functions only
        rate_vaddr = defined_symbols(elf, (RATE_VARIABLE,), tables=(".dynsym",)).get(RATE_VARIABLE, 0)
    return SamplerSites(path, offsets[ALLOC_FUNCTION], offsets[FREE_FUNCTION], rate_vaddr)


def sampler_in(pid: int) -> tuple[SamplerSites, int] | None:
    """The sampler library process `pid` has mapped and its load bias; None if it has none."""
    for entry in read_maps(pid):
        if entry.is_file and os.path.basename(entry.path) == LIB_NAME and entry.offset == 0:
            path = open_mapped_file(pid, entry)
            sites = sampler_sites(path) if path is not None else None
            if sites is not None:
                return sites, entry.start
    return None


def read_rate(pid: int, sites: SamplerSites, bias: int, default: int) -> int:
    """bpfprof_heap_rate of a live process (it may have been started with another rate than ours)."""
    return read_rate_at(pid, bias + sites.rate_vaddr, default) if sites.rate_vaddr else default
