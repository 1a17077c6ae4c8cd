"""Checks that say whether a capture can run here, each with the fix.

Each check really tries the thing (a BPF map is created, a perf event is
opened) instead of guessing from config files.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.bpfload import bpf_cache, bpf_compile, kernel_headers, libbpf
from agent.probes.family import ProbeConfig
from symbolizer.errors import BpfprofError

TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
MIN_KERNEL = (5, 8)  # BPF ring buffer

_SYS_BPF = 321  # x86_64 syscall numbers
_SYS_PERF_EVENT_OPEN = 298
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2


@dataclass(frozen=True)
class Check:
    """Outcome of one check. `required` checks gate the exit code."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def check_privileges() -> Check:
    try:
        bpf_compile.check_privileges()
        return Check("privileges", True, "root" if os.geteuid() == 0 else "CAP_BPF+CAP_PERFMON")
    except BpfprofError as e:
        return Check("privileges", False, str(e), "run as root (sudo) or grant CAP_BPF,CAP_PERFMON")


def check_bpf_syscall() -> Check:
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3] = _BPF_MAP_TYPE_ARRAY, 4, 4, 1  # type, key, value size, entries
    fd = _libc().syscall(_SYS_BPF, _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        return Check("bpf syscall", False, f"creating a BPF map failed: {os.strerror(err)}",
                     "needs CONFIG_BPF_SYSCALL and root; in a container: privileged or CAP_BPF")
    os.close(fd)
    return Check("bpf syscall", True, "a BPF map was created")


def check_perf_events() -> Check:
    attr = (ctypes.c_uint8 * 128)()
    ctypes.c_uint32.from_buffer(attr, 0).value = 1  # PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(attr, 4).value = 128  # size
    # config 0 = PERF_COUNT_SW_CPU_CLOCK; pid -1, cpu 0: system-wide like the sampler
    fd = _libc().syscall(_SYS_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, 0)
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    level = paranoid.read_text().strip() if paranoid.exists() else "?"
    if fd < 0:
        err = ctypes.get_errno()
        return Check("perf events", False, f"perf_event_open failed: {os.strerror(err)} (perf_event_paranoid={level})",
                     "run as root, or sysctl kernel.perf_event_paranoid=-1 with CAP_PERFMON")
    os.close(fd)
    return Check("perf events", True, f"cpu-clock event opened (perf_event_paranoid={level})")


def _mounted(path: Path) -> bool:
    return (path / "events").is_dir() or (path / "tracing" / "events").is_dir()


def check_tracefs() -> Check:
    for p in (TRACEFS, DEBUGFS / "tracing"):
        if (p / "events").is_dir():
            return Check("tracefs", True, f"mounted at {p}")
    return Check("tracefs", False, "not mounted (tracepoint probes cannot attach)",
                 f"mount -t tracefs tracefs {TRACEFS}  (or bpfprof doctor --fix)")


def check_kernel_headers(link: bool = False) -> Check:
    try:
        h = kernel_headers.resolve(link=link)
    except BpfprofError as e:
        return Check("kernel headers", False, str(e), kernel_headers.PACKAGE_HINT)
    detail = h.describe() + (f"; {h.warning}" if h.warning else "")
    return Check("kernel headers", True, detail)


def check_btf() -> Check:
    if BTF_VMLINUX.exists():
        return Check("btf", True, f"{BTF_VMLINUX} present", required=False)
    return Check("btf", False, f"{BTF_VMLINUX} missing: Go trace links need struct offsets from BTF",
                 "a kernel built with CONFIG_DEBUG_INFO_BTF=y", required=False)


def check_kernel_version() -> Check:
    release = os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return Check("kernel version", False, f"cannot parse {release}")
    ok = (major, minor) >= MIN_KERNEL
    return Check("kernel version", ok, f"{release} (needs >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} for the BPF ring buffer)",
                 "" if ok else "upgrade the kernel")


def check_bcc() -> Check:
    try:
        bcc = bpf_compile.import_bcc()
    except BpfprofError as e:
        return Check("bcc", False, str(e), "apt-get install python3-bpfcc; packaging/setup.sh")
    version = getattr(bcc, "__version__", "?")
    return Check("bcc", True, f"bcc {version} from {Path(bcc.__file__).parent}")


def check_uprobes() -> Check:
    """How uprobes attach: uprobe_multi links, or one perf event per probe point (slow to remove)."""
    if libbpf.uprobe_links():
        return Check("uprobes", True, "BPF uprobe_multi links (one per program and process)", required=False)
    why = f"{libbpf.UPROBE_PERF_EVENTS_ENV} is set" if os.environ.get(libbpf.UPROBE_PERF_EVENTS_ENV, "") not in (
        "", "0") else "no uprobe_multi links before Linux 6.6"
    return Check("uprobes", True, f"perf events ({why}): each uprobe takes "
                 "~0.1 s to remove, so captures of many short Go processes end slowly", required=False)


def check_heap_sampler() -> Check:
    """The in-process heap sampler builds (it is compiled here on first use): its path, to preload into services."""
    from agent.probes import heap_sampler  # noqa: PLC0415  (pulls pyelftools: only when doctor runs)

    lib = heap_sampler.library()
    if lib is None:
        return Check("heap sampler", False, "cannot be built: native heap profiles fall back to malloc uprobes "
                     "(a trap per call)", "apt-get install gcc", required=False)
    return Check("heap sampler", True, f"{lib} (LD_PRELOAD it into a service for cheap native heap profiles)",
                 required=False)


@dataclass(frozen=True)
class Selection:
    """A probe selection a start compiles (what `record` or the agent would load), by the command that loads it."""

    label: str
    config: ProbeConfig
    profiles: tuple[str, ...]
    filter_pids: bool
    follow_children: bool


def default_selections() -> list[Selection]:
    """What `bpfprof record` loads with its default options, for each kind of target."""
    return [Selection("record --all", ProbeConfig(), ("cpu",), False, False),
            Selection("record -- COMMAND", ProbeConfig(own_command=True), ("cpu",), True, True),
            Selection("record --pid", ProbeConfig(), ("cpu",), True, False)]


def check_bpf_cache(selections: list[Selection], warm: bool = False) -> Check:
    """Whether these selections start without a compile; with `warm`, compile the missing ones now (root)."""
    from agent.capture.pipeline import DRAIN_INTERVAL_S  # noqa: PLC0415  (the probes: only when doctor runs)
    from agent.probes.probe_set import compile_plan  # noqa: PLC0415
    from agent.probes.registry import PROBES  # noqa: PLC0415
    from agent.processes.tracker import ProcessTracker  # noqa: PLC0415

    plans = {}
    try:
        for s in selections:
            families = [PROBES[n](s.config, ProcessTracker()) for n in PROBES if n in s.profiles]
            plans[s.label] = compile_plan(families, s.filter_pids, s.follow_children, s.config.with_kernel,
                                          DRAIN_INTERVAL_S)
        cold = [label for label, plan in plans.items() if not plan.is_cached()]
        if warm:
            for label in cold:
                plans[label].load().close()
            cold = [label for label, plan in plans.items() if not plan.is_cached()]
    except BpfprofError as e:
        return Check("bpf cache", False, f"cannot tell or fill: {e}", required=False)
    where = f"{bpf_cache.cache_dir()}, kernel {os.uname().release}"
    if not cold:
        return Check("bpf cache", True, f"warm for {', '.join(plans)} ({where}): starts compile nothing",
                     required=False)
    return Check("bpf cache", False, f"cold for {', '.join(cold)} ({where}): those starts compile with clang "
                 "(~1 s of CPU, ~150 MB)", "bpfprof doctor --fix (compiles them once)", required=False)


def fix_mounts() -> list[str]:
    """Mount tracefs and debugfs if missing (root); returns what was done."""
    done = []
    for fs, path in (("tracefs", TRACEFS), ("debugfs", DEBUGFS)):
        if path.is_dir() and not os.path.ismount(path):
            r = subprocess.run(["mount", "-t", fs, fs, str(path)], capture_output=True, text=True)
            done.append(f"mount {fs} at {path}: {'ok' if r.returncode == 0 else r.stderr.strip()}")
    return done


# Interpreters looked at by `doctor` (what a user's services are likely to run).
PYTHON_GLOBS = ("/usr/bin/python3.*", "/usr/local/bin/python3.*", "/root/.pyenv/versions/*/bin/python3.*")


def check_python(globs: tuple[str, ...] = PYTHON_GLOBS) -> Check:
    """Which CPython interpreters on this host get Python frames, and which keep native ones (by version)."""
    import glob

    from agent.python.registry import examine_file

    good: list[str] = []
    bad: list[str] = []
    import re

    for path in sorted({p for g in globs for p in glob.glob(g) if re.search(r"python3\.\d+$", p)}):
        real = os.path.realpath(path)
        lib = [str(p) for p in Path(real).parent.parent.glob("lib/libpython3*.so*")]
        found = next((b for b in (examine_file(f) for f in [real, *lib]) if b is not None), None)
        if found is None:
            continue
        reason = found.reason
        label = reason.split(":")[0] if reason else "CPython {}.{}".format(*found.version)
        (bad if reason else good).append(f"{path} ({label})")
    detail = "Python frames for " + (", ".join(good) or "no interpreter found")
    if bad:
        detail += "; native frames only for " + ", ".join(bad)
    return Check("python frames", bool(good) or not bad, detail, required=False)


def run_checks(fix: bool = False, selections: list[Selection] | None = None) -> list[Check]:
    """All checks in the order a user would fix them; the BPF cache for `selections` (default: record's)."""
    checks: list[Callable[[], Check]] = [
        check_privileges, check_kernel_version, check_bpf_syscall, check_perf_events,
        check_tracefs, lambda: check_kernel_headers(link=fix), check_btf, check_bcc, check_uprobes, check_heap_sampler,
        check_python,
    ]
    results = [c() for c in checks]
    if all(c.ok for c in results if c.required):  # a compile needs all of them
        results.append(check_bpf_cache(default_selections() if selections is None else selections, warm=fix))
    return results
