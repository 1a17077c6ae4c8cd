"""Container ids and pod UIDs from real-world /proc/PID/cgroup layouts."""

from __future__ import annotations

import os

import pytest

from agent.processes.containers import parse_cgroup, read_environ_var

CID = "3f1c0e4b9d2a7c8e5f6a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abcde"
UID = "0b7a3c1e-2f4d-4e6a-8b9c-1d2e3f4a5b6c"


@pytest.mark.parametrize("text,container,pod", [
    (f"0::/system.slice/docker-{CID}.scope\n", CID, ""),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
     f"cri-containerd-{CID}.scope\n", CID, UID),
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
     f"crio-{CID}.scope\n", CID, UID),
    (f"0::/kubepods/burstable/pod{UID}/{CID}\n", CID, UID),
    (f"12:memory:/docker/{CID}\n11:cpu,cpuacct:/docker/{CID}\n", CID, ""),
    (f"0::/machine.slice/libpod-{CID}.scope/container\n", CID, ""),
    (f"0::/default/{CID}\n", CID, ""),
    ("0::/user.slice/user-0.slice/session-1.scope\n", "", ""),
    ("0::/\n", "", ""),
    ("", "", ""),
])
def test_parse_cgroup(text, container, pod):
    info = parse_cgroup(text)
    assert (info.container_id, info.pod_uid) == (container, pod)


def test_environ_of_this_process(monkeypatch):
    assert read_environ_var(os.getpid(), "PATH") == os.environ.get("PATH", "")  # initial environment
    assert read_environ_var(os.getpid(), "BPFPROF_SURELY_UNSET") == ""
    assert read_environ_var(2**22 + 7, "PATH") == ""


def test_cgroup_path_on_a_hybrid_host_is_the_v1_one():
    text = "12:memory:/system.slice/nginx.service\n1:name=systemd:/system.slice/nginx.service\n0::/\n"
    assert parse_cgroup(text).cgroup_path == "/system.slice/nginx.service"
    assert parse_cgroup("0::/user.slice\n").cgroup_path == "/user.slice"
