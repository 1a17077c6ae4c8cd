"""Which processes the agent profiles: pid, executable name/regex, cgroup path, container id.

BPF filters only by pid (its target map), so every other selector is applied
in user space, once per process at its first sample: the decision reads
/proc/PID/exe, comm and cgroup through `host_proc` (cheap: no maps, no ELF
files), and records of unselected processes are dropped and counted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from agent.daemon.config import SelectionConfig
from agent.processes.containers import ContainerInfo, read_container_info


@dataclass(frozen=True)
class ProcessIdentity:
    """What selection and relabelling look at, read once per process."""

    pid: int
    comm: str
    exe: str  # path inside the process's mount namespace, "" if unreadable
    container: ContainerInfo


def read_identity(pid: int, host_proc: str = "/proc") -> ProcessIdentity | None:
    """None if the process is gone."""
    base = f"{host_proc}/{pid}"
    try:
        with open(f"{base}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    try:
        exe = os.readlink(f"{base}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = ""  # kernel threads, or no permission
    return ProcessIdentity(pid, comm, exe, read_container_info(pid, host_proc))


class Selector:
    """matches(identity): True when no selector is set, else when any one matches."""

    def __init__(self, cfg: SelectionConfig) -> None:
        self.pids = frozenset(cfg.pids)
        self.names = frozenset(cfg.exe_names)
        self.regexes = [re.compile(r) for r in cfg.exe_regex]
        self.cgroups = tuple(p.rstrip("/") for p in cfg.cgroup_paths)
        self.containers = tuple(cfg.container_ids)
        self.select_all = not (self.pids or self.names or self.regexes or self.cgroups or self.containers)

    @property
    def pid_only(self) -> bool:
        """True when BPF's pid filter alone implements the selection."""
        return bool(self.pids) and not (self.names or self.regexes or self.cgroups or self.containers)

    def matches(self, ident: ProcessIdentity) -> bool:
        if self.select_all or ident.pid in self.pids:
            return True
        base = ident.exe.rsplit("/", 1)[-1]
        if self.names and (base in self.names or ident.comm in self.names):
            return True
        if any(r.search(ident.exe) for r in self.regexes):
            return True
        path = ident.container.cgroup_path
        if path and any(path == c or path.startswith(c + "/") for c in self.cgroups):
            return True
        cid = ident.container.container_id
        return bool(cid) and any(cid.startswith(c) for c in self.containers)
