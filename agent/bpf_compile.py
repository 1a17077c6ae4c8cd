"""Compiling and loading bpfprof's C programs with BCC. The only bcc import site.

Errors become BpfLoadError / KernelHeadersError / PrivilegeError with one
line a user can act on; BCC's own compiler output goes to the log.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bpf import BPF_DIR, source_path
from symbolizer.errors import BpfLoadError, PrivilegeError

from agent import kernel_headers

log = logging.getLogger(__name__)


def import_bcc() -> Any:
    """Import bcc, or explain where it comes from."""
    try:
        import bcc  # noqa: PLC0415  (import here: loading libbcc costs 0.25 s and LLVM memory)
    except ImportError as e:
        raise BpfLoadError(
            "the bcc Python module is not importable: apt-get install python3-bpfcc, "
            "then run packaging/setup.sh (it makes bcc reachable from the venv)") from e
    return bcc


def check_privileges() -> None:
    """Raise PrivilegeError unless we may load BPF programs and open perf events."""
    if os.geteuid() == 0:
        return
    try:
        with open("/proc/self/status") as f:
            cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    cap_sys_admin, cap_perfmon, cap_bpf = 21, 38, 39
    if cap_eff & (1 << cap_sys_admin) or (cap_eff & (1 << cap_perfmon) and cap_eff & (1 << cap_bpf)):
        return
    raise PrivilegeError("bpfprof needs root (or CAP_BPF and CAP_PERFMON) to load BPF programs: run it with sudo")


def compile_program(file_name: str, defines: dict[str, int]) -> Any:
    """Compile bpf/<file_name> with `-D` defines; return the loaded bcc.BPF object."""
    check_privileges()
    headers = kernel_headers.resolve(link=True)
    if headers.warning:
        log.warning("%s", headers.warning)
    log.info("kernel headers: %s", headers.describe())
    bcc = import_bcc()
    text = source_path(file_name).read_text()
    cflags = [f"-D{k}={int(v)}" for k, v in sorted(defines.items())] + [f"-I{BPF_DIR}"]
    try:
        return bcc.BPF(text=text.encode(), cflags=cflags)
    except Exception as e:  # bcc raises plain Exception on compile/load failure
        raise BpfLoadError(f"could not compile or load {file_name}: {e}") from e
