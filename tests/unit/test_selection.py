"""Process selection (pid, exe name/regex, cgroup path, container id) and container metadata."""

from __future__ import annotations

import os

from agent.daemon.config import SelectionConfig
from agent.daemon.selection import ProcessIdentity, Selector, read_identity
from agent.processes.containers import ContainerInfo, node_name, parse_cgroup

CID = "3f1c0e4b9d2a7c8e5f6a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abcde"


def ident(pid=10, comm="nginx", exe="/usr/sbin/nginx", cgroup="/system.slice/nginx.service", cid=""):
    return ProcessIdentity(pid, comm, exe, ContainerInfo(cid, "", cgroup))


def test_empty_selection_selects_all():
    s = Selector(SelectionConfig())
    assert s.select_all and s.matches(ident())


def test_pid_only_goes_to_bpf():
    assert Selector(SelectionConfig(pids=(1, 2))).pid_only
    assert not Selector(SelectionConfig(pids=(1,), exe_names=("x",))).pid_only


def test_each_selector_matches_and_others_do_not():
    assert Selector(SelectionConfig(pids=(10,))).matches(ident())
    assert not Selector(SelectionConfig(pids=(11,))).matches(ident())
    assert Selector(SelectionConfig(exe_names=("nginx",))).matches(ident(comm="other"))
    assert Selector(SelectionConfig(exe_names=("worker",))).matches(ident(comm="worker"))  # comm counts too
    assert Selector(SelectionConfig(exe_regex=(r"/sbin/",))).matches(ident())
    assert not Selector(SelectionConfig(exe_regex=(r"^/opt/",))).matches(ident())
    assert Selector(SelectionConfig(cgroup_paths=("/system.slice",))).matches(ident())
    assert Selector(SelectionConfig(cgroup_paths=("/system.slice/nginx.service",))).matches(ident())
    assert not Selector(SelectionConfig(cgroup_paths=("/system.sl",))).matches(ident())  # whole components
    assert Selector(SelectionConfig(container_ids=(CID[:12],))).matches(ident(cid=CID))
    assert not Selector(SelectionConfig(container_ids=(CID[:12],))).matches(ident())


def test_read_identity_of_self():
    me = read_identity(os.getpid())
    assert me is not None and me.exe and me.comm
    assert read_identity(2 ** 22 + 1) is None


def test_crio_conmon_is_not_a_container():
    info = parse_cgroup(f"0::/kubepods.slice/crio-conmon-{CID}.scope\n")
    assert info.container_id == ""
    assert parse_cgroup(f"0::/kubepods.slice/crio-{CID}.scope\n").container_id == CID


def test_node_name_from_environment():
    assert node_name({"NODE_NAME": "n1"}) == "n1"
    assert node_name({"BPFPROF_NODE_NAME": "n0", "NODE_NAME": "n1"}) == "n0"
    assert node_name({}) == ""
