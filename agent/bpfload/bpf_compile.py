"""Compiling and loading bpfprof's C programs with BCC, in a throwaway child.

BCC compiles with an in-process clang/LLVM: importing it and compiling one
small program leaves ~150 MB of RSS that a long-lived agent would carry for
nothing. So a forked child compiles and loads the programs, hands the program
and map file descriptors to the agent over a Unix socket (SCM_RIGHTS) and
exits; the kernel objects live on through those descriptors. The agent then
talks to them with agent/bpfload/libbpf.py only. The cost is one fork (~10 ms).

Call this before the agent starts threads: it forks.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from agent.bpfload import kernel_headers
from agent.errors import BpfLoadError, PrivilegeError
from bpf import BPF_DIR

log = logging.getLogger(__name__)

_MAX_FDS = 64
_MAX_MESSAGE = 1 << 16


class ProgType(enum.StrEnum):
    """BPF program types, by BCC's names; uprobes are KPROBE programs."""

    PERF_EVENT = "PERF_EVENT"
    TRACEPOINT = "TRACEPOINT"
    KPROBE = "KPROBE"


def import_bcc() -> Any:
    """Import bcc, or explain where it comes from."""
    try:
        import bcc  # noqa: PLC0415  (only the compile child pays for libbcc/LLVM)
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


@dataclass
class LoadedObjects:
    """File descriptors of loaded programs and maps, owned by this process."""

    programs: dict[str, int] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in (*self.programs.values(), *self.maps.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.programs.clear()
        self.maps.clear()


def _compile_and_send(sock: socket.socket, text: str, cflags: list[str],
                      programs: dict[str, ProgType], maps: list[str]) -> None:
    """Child side: compile, load, send the fds, wait for the parent to hold them."""
    try:
        bcc = import_bcc()
        b = bcc.BPF(text=text.encode(), cflags=cflags)
        names, fds = [], []
        for name, ptype in programs.items():
            fn = b.load_func(name.encode(), getattr(bcc.BPF, ptype.value))
            names.append(f"prog:{name}")
            fds.append(fn.fd)
        for name in maps:
            names.append(f"map:{name}")
            fds.append(b[name.encode()].map_fd)
        socket.send_fds(sock, [json.dumps({"ok": True, "names": names}).encode()], fds)
        sock.recv(1)  # the parent has its own references now
    except BaseException as e:  # noqa: BLE001  (everything goes back to the parent as a message)
        msg = str(e) or type(e).__name__
        try:
            sock.sendall(json.dumps({"ok": False, "error": msg}).encode())
        except OSError:
            pass


def load_programs(text: str, defines: dict[str, int], programs: dict[str, ProgType],
                  maps: list[str]) -> LoadedObjects:
    """Compile C `text` (it #includes files of bpf/) with `-D` defines in a child.

    Returns the fds of the loaded `programs` and `maps`; BpfLoadError with the
    compiler's message if anything fails (clang's own output goes to stderr).
    """
    check_privileges()
    headers = kernel_headers.resolve(link=True)
    if headers.warning:
        log.warning("%s", headers.warning)
    log.info("kernel headers: %s", headers.describe())
    # an undeclared function is an error, not a call BPF cannot make (a helper hidden by a header guard)
    cflags = [f"-D{k}={int(v)}" for k, v in sorted(defines.items())] + [f"-I{BPF_DIR}", "-Werror=implicit-function-declaration"]
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child
        parent.close()
        _compile_and_send(child, text, cflags, programs, maps)
        os._exit(0)
    child.close()
    try:
        data, fds, _flags, _addr = socket.recv_fds(parent, _MAX_MESSAGE, _MAX_FDS)
        reply = json.loads(data or b'{"ok": false, "error": "the compile process died"}')
        if not reply["ok"]:
            for fd in fds:
                os.close(fd)
            raise BpfLoadError(f"could not compile or load the BPF programs: {reply['error']}")
        loaded = LoadedObjects()
        for name, fd in zip(reply["names"], fds, strict=True):
            kind, _, short = name.partition(":")
            (loaded.programs if kind == "prog" else loaded.maps)[short] = fd
        parent.send(b"x")
        return loaded
    finally:
        parent.close()
        os.waitpid(pid, 0)
