"""Container identity of a process from its cgroup path (v1 and v2).

Covers the layouts of Docker, containerd (plain and CRI), CRI-O, Podman and
Kubernetes pods with either cgroup driver:

  0::/system.slice/docker-<id>.scope                       docker, systemd driver
  0::/kubepods.slice/.../kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
  0::/kubepods/burstable/pod<uid>/<id>                      cgroupfs driver
  12:memory:/docker/<id>                                   cgroup v1
  0::/machine.slice/libpod-<id>.scope                      podman
  0::/kubepods.slice/.../crio-<id>.scope                   CRI-O (crio-conmon-<id> is its monitor, not the container)

k8s.node.name is not in any cgroup: node_name() takes it from the
environment, where a DaemonSet puts it with the downward API.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

_CONTAINER = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")
_NOT_CONTAINER = re.compile(r"conmon-[0-9a-f]{64}")  # CRI-O/podman's monitor process, outside the container
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True)
class ContainerInfo:
    container_id: str = ""
    pod_uid: str = ""  # Kubernetes pod UID, dashed
    cgroup_path: str = ""  # the unified (v2) path, else the first v1 path that is not "/"


def parse_cgroup(text: str) -> ContainerInfo:
    """ContainerInfo from the text of /proc/PID/cgroup; empty fields if not in a container."""
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.append((parts[0] == "0" and parts[1] == "", parts[2]))
    paths.sort(key=lambda p: not p[0])  # the v2 line first
    container = pod = ""
    for _, path in paths:
        for component in reversed(path.rstrip("/").split("/")):
            m = _CONTAINER.search(component)
            if m and not container and not _NOT_CONTAINER.search(component):
                container = m.group(1)
            p = _POD.search(component)
            if p and not pod:
                pod = p.group(1).replace("_", "-")
        if container:
            break
    # On hybrid hosts the unified line is often just "/" while the v1
    # controllers hold the real path: take the first path that says something.
    path = next((p for _, p in paths if p != "/"), paths[0][1] if paths else "")
    return ContainerInfo(container, pod, path)


def read_container_info(pid: int, proc_root: str = "/proc") -> ContainerInfo:
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            return parse_cgroup(f.read())
    except OSError:
        return ContainerInfo()


def read_environ_var(pid: int, name: str, proc_root: str = "/proc") -> str:
    """One variable of the process's initial environment, "" if absent or unreadable."""
    prefix = name.encode() + b"="
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(prefix):
                    return item[len(prefix):].decode(errors="replace")
    except OSError:
        pass
    return ""


NODE_NAME_VARS = ("BPFPROF_NODE_NAME", "NODE_NAME", "KUBE_NODE_NAME")


def node_name(environ: Mapping[str, str] | None = None) -> str:
    """k8s.node.name from the first of NODE_NAME_VARS that is set, "" outside Kubernetes."""
    env = os.environ if environ is None else environ
    return next((env[v] for v in NODE_NAME_VARS if env.get(v)), "")
