"""Compiling and loading bpfprof's C programs with BCC, in a throwaway child, once.

BCC compiles with an in-process clang/LLVM: importing it and compiling one
small program leaves ~150 MB of RSS that a long-lived agent would carry for
nothing. So a forked child compiles and loads the programs, hands the program
and map file descriptors to the agent over a Unix socket (SCM_RIGHTS) and
exits; the kernel objects live on through those descriptors. The agent then
talks to them with agent/bpfload/libbpf.py only. The cost is one fork (~10 ms).

The child also describes what it loaded (instructions, map definitions) and
the agent keeps that in the compiled-BPF cache (agent/bpfload/bpf_cache.py):
the next start with the same source, flags, kernel, BCC and selection loads
it with libbpf and forks nothing.

Call this before the agent starts threads: it may fork.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bpfload import bpf_cache, kernel_headers, libbpf, preload
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


def expected_attach_type(ptype: ProgType) -> int:
    """What a program of `ptype` is loaded for: uprobe programs (KPROBE: this project has no kprobes) for
    uprobe_multi links where the kernel has them (libbpf.attach_uprobes); decided before the compile
    child forks, so both sides agree."""
    return libbpf.uprobe_attach_type() if ptype == ProgType.KPROBE else 0


# How many times this process forked the compiler: a start from a warm cache leaves it alone.
compiles = 0
# The compile child's reply: the description may be large; the child is ours, still a bound and a deadline.
_DESCRIPTION_TIMEOUT_S = 60.0


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


def _describe(bcc: Any, b: Any, key: str, loaded: dict[str, tuple[int, int]],
              map_fds: dict[str, int]) -> tuple[bytes, str]:
    """Child side: the cache entry for what was loaded, or (b"", why not)."""
    try:
        license_ = bcc.lib.bpf_module_license(b.module).decode()
        kern_version = int(bcc.lib.bpf_module_kern_version(b.module))
        programs = {name: (fd, b.dump_func(name.encode()), license_, kern_version, attach_type)
                    for name, (fd, attach_type) in loaded.items()}
        return bpf_cache.encode(key, bpf_cache.describe(programs, map_fds)), ""
    except Exception as e:  # noqa: BLE001  (a description that fails costs the cache, never the capture)
        return b"", str(e) or type(e).__name__


def _compile_and_send(sock: socket.socket, text: str, cflags: list[str],
                      programs: dict[str, ProgType], maps: list[str], key: str) -> None:
    """Child side: compile, load, send the fds and the cache entry, wait for the parent to hold them."""
    try:
        bcc = import_bcc()
        b = bcc.BPF(text=text.encode(), cflags=cflags)
        names, fds = [], []
        loaded, map_fds = {}, {}
        for name, ptype in programs.items():
            attach_type = expected_attach_type(ptype)
            fn = b.load_func(name.encode(), getattr(bcc.BPF, ptype.value), attach_type=attach_type or -1)
            names.append(f"prog:{name}")
            fds.append(fn.fd)
            loaded[name] = (fn.fd, attach_type)
        for name in maps:
            names.append(f"map:{name}")
            fds.append(b[name.encode()].map_fd)
            map_fds[name] = fds[-1]
        entry, why = _describe(bcc, b, key, loaded, map_fds) if key else (b"", "")
        reply = {"ok": True, "names": names, "entry_bytes": len(entry), "not_cached": why}
        socket.send_fds(sock, [json.dumps(reply).encode()], fds)
        sock.sendall(entry)
        sock.recv(1)  # the parent has its own references now
    except BaseException as e:  # noqa: BLE001  (everything goes back to the parent as a message)
        msg = str(e) or type(e).__name__
        try:
            sock.sendall(json.dumps({"ok": False, "error": msg}).encode())
        except OSError:
            pass


def _cflags(defines: dict[str, int]) -> list[str]:
    # an undeclared function is an error, not a call BPF cannot make (a helper hidden by a header guard)
    return [f"-D{k}={int(v)}" for k, v in sorted(defines.items())] + [f"-I{BPF_DIR}", "-Werror=implicit-function-declaration"]


def _bcc_identity() -> str:
    """BCC's version without importing it (0.25 s): its version.py and the libbcc it loads."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.origin:
        return "absent"
    package = Path(spec.origin).parent
    try:
        version = (package / "version.py").read_text(errors="replace")
    except OSError:
        version = "?"
    libs = []
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        p = Path(d) / "libbcc.so.0"
        try:
            st = p.stat()
            libs.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            continue
    return f"{package.resolve()}\0{version}\0{','.join(libs)}"


def _bpf_dir_digest() -> str:
    """Every file under bpf/ (the sources #include one another): a change to any is another entry."""
    h = hashlib.sha256()
    for p in sorted(Path(BPF_DIR).rglob("*")):
        if p.is_file() and p.suffix in (".c", ".h"):
            h.update(p.relative_to(BPF_DIR).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(text: str, defines: dict[str, int], programs: dict[str, ProgType], maps: list[str],
              headers: kernel_headers.KernelHeaders) -> str:
    """The cache entry name of this compile: source, flags, headers, kernel, BCC and the probe selection."""
    u = os.uname()
    return bpf_cache.key_digest({
        "source": hashlib.sha256(text.encode()).hexdigest(),
        "bpf_dir": _bpf_dir_digest(),
        "cflags": _cflags(defines),
        "kernel": [u.release, u.version, u.machine],
        # not describe(): the first start links the headers and names their source differently from later ones
        "headers": [str(headers.path), str(headers.path.resolve()), headers.version],
        "bcc": _bcc_identity(),
        "programs": sorted([name, str(t), expected_attach_type(t)] for name, t in programs.items()),
        "maps": list(maps),
    })


def is_cached(text: str, defines: dict[str, int], programs: dict[str, ProgType], maps: list[str]) -> bool:
    """Whether a start with this selection would load from the cache (for `bpfprof doctor`)."""
    key = cache_key(text, defines, programs, maps, kernel_headers.resolve(link=False))
    return bpf_cache.read(key) is not None


def load_programs(text: str, defines: dict[str, int], programs: dict[str, ProgType],
                  maps: list[str], use_cache: bool = True, map_entries: dict[str, int] | None = None) -> LoadedObjects:
    """The loaded `programs` and `maps` of C `text` (it #includes files of bpf/) with `-D` defines.

    From the compiled-BPF cache when it holds this compile (no fork, no
    clang); else compiled in a child, and the cache filled. `map_entries`:
    sizes of named maps set at load time (bpf_cache.load), not part of the
    key, so that captures that differ only in them share one compile.
    BpfLoadError with the compiler's message if anything fails (clang's own
    output goes to stderr).
    """
    check_privileges()
    headers = kernel_headers.resolve(link=True)
    if headers.warning:
        log.warning("%s", headers.warning)
    key = cache_key(text, defines, programs, maps, headers) if use_cache else ""
    if key:
        t0 = time.monotonic()
        ahead = preload.take(key, map_entries)
        if ahead is not None:
            log.info("BPF programs loaded from the cache ahead of the start (%s)", bpf_cache.entry_path(key))
            preload.remember(key, map_entries)
            return LoadedObjects(*ahead)
        entry = bpf_cache.read(key)
        if entry is not None:
            try:
                progs, map_fds = bpf_cache.load(entry, map_entries)
            except BpfLoadError as e:
                log.warning("BPF cache entry %s does not load (%s): discarded, compiling again",
                            bpf_cache.entry_path(key), e)
                bpf_cache.discard(bpf_cache.entry_path(key))
            else:
                if set(progs) == set(programs) and set(map_fds) == set(maps):
                    log.info("BPF programs loaded from the cache in %.0f ms (%s)", (time.monotonic() - t0) * 1000,
                             bpf_cache.entry_path(key))
                    preload.remember(key, map_entries)
                    return LoadedObjects(progs, map_fds)
                LoadedObjects(progs, map_fds).close()
                log.warning("BPF cache entry %s holds another selection: discarded, compiling again",
                            bpf_cache.entry_path(key))
                bpf_cache.discard(bpf_cache.entry_path(key))
    log.info("kernel headers: %s", headers.describe())
    loaded, entry = _compile_in_child(text, _cflags(defines), programs, maps, key)
    if entry is not None:  # cached: the next start with these options loads it ahead
        preload.remember(key, map_entries)
    if map_entries and any(libbpf.map_info(loaded.maps[name]).max_entries != n for name, n in map_entries.items()):
        # the child made them at their compiled size: made again from the description, at the asked one
        if entry is None:
            log.warning("BPF maps %s kept at their compiled sizes: the compile could not be described",
                        ", ".join(sorted(map_entries)))
            return loaded
        progs, map_fds = bpf_cache.load(entry, map_entries)
        loaded.close()
        return LoadedObjects(progs, map_fds)
    return loaded


def _compile_in_child(text: str, cflags: list[str], programs: dict[str, ProgType], maps: list[str],
                      key: str) -> tuple[LoadedObjects, bpf_cache.Entry | None]:
    """The child's objects, and the description of them (None when it has none)."""
    global compiles
    compiles += 1
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child
        parent.close()
        _compile_and_send(child, text, cflags, programs, maps, key)
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
        entry = _receive(parent, int(reply.get("entry_bytes", 0)))
        parent.send(b"x")
        return loaded, _store(key, entry, reply.get("not_cached", "")) if key else None
    finally:
        parent.close()
        os.waitpid(pid, 0)


def _receive(sock: socket.socket, size: int) -> bytes:
    if not 0 < size <= bpf_cache.MAX_ENTRY_BYTES:
        return b""
    sock.settimeout(_DESCRIPTION_TIMEOUT_S)
    buf = bytearray()
    try:
        while len(buf) < size and (chunk := sock.recv(min(size - len(buf), 1 << 20))):
            buf += chunk
    except OSError:
        return b""
    finally:
        sock.settimeout(None)
    return bytes(buf) if len(buf) == size else b""


def _store(key: str, entry: bytes, why_not: str) -> bpf_cache.Entry | None:
    """Keep the child's description, once it decodes here too; the decoded entry (None: there is none)."""
    if not entry:
        log.warning("compiled BPF programs not cached: %s", why_not or "no description from the compile child")
        return None
    try:
        decoded = bpf_cache.decode(key, entry)
    except bpf_cache.CacheEntryError as e:
        log.warning("compiled BPF programs not cached: the description is bad (%s)", e)
        return None
    path = bpf_cache.write(key, entry)
    if path is not None:
        log.info("compiled BPF programs cached in %s", path)
    return decoded
