"""Kernel header resolution follows DESIGN.md's order and names the fix."""

from __future__ import annotations

import pytest

from agent.bpfload import kernel_headers as kh
from agent.errors import KernelHeadersError

RELEASE = "6.18.0-test"


@pytest.fixture(autouse=True)
def _no_host_state(monkeypatch, tmp_path):
    monkeypatch.delenv(kh.ENV_KERNEL_SOURCE, raising=False)
    monkeypatch.setattr(kh, "KHEADERS_ARCHIVE", tmp_path / "no-kheaders.tar.xz")


def _debian_pair(usr_src, version="6.1.0-56"):
    common = usr_src / f"linux-headers-{version}-common"
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").write_text("")
    build = usr_src / f"linux-headers-{version}-amd64"
    (build / "include" / "config").mkdir(parents=True)
    (build / "include" / "config" / "kernel.release").write_text(f"{version}-amd64\n")
    (build / "Makefile").write_text(f"include {common}/Makefile\n".replace(str(common), f"/usr/src/{common.name}"))
    return build, common


def test_running_kernel_headers_come_first(tmp_path, monkeypatch):
    build = tmp_path / "modules" / RELEASE / "build"
    (build / "include").mkdir(parents=True)
    monkeypatch.setenv(kh.ENV_KERNEL_SOURCE, str(tmp_path / "elsewhere"))
    h = kh.resolve(RELEASE, modules_root=tmp_path / "modules", usr_src=tmp_path / "src")
    assert h.source is kh.HeaderSource.RUNNING_KERNEL and h.path == build


def test_environment_next(tmp_path, monkeypatch):
    src = tmp_path / "ksrc"
    (src / "include").mkdir(parents=True)
    monkeypatch.setenv(kh.ENV_KERNEL_SOURCE, str(src))
    h = kh.resolve(RELEASE, modules_root=tmp_path / "modules", usr_src=tmp_path / "src")
    assert h.source is kh.HeaderSource.ENVIRONMENT


def test_environment_pointing_nowhere_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(kh.ENV_KERNEL_SOURCE, str(tmp_path / "empty"))
    with pytest.raises(KernelHeadersError, match=kh.ENV_KERNEL_SOURCE):
        kh.resolve(RELEASE, modules_root=tmp_path / "modules", usr_src=tmp_path / "src")


def test_kheaders_archive(tmp_path, monkeypatch):
    archive = tmp_path / "kheaders.tar.xz"
    archive.write_bytes(b"")
    monkeypatch.setattr(kh, "KHEADERS_ARCHIVE", archive)
    h = kh.resolve(RELEASE, modules_root=tmp_path / "modules", usr_src=tmp_path / "src")
    assert h.source is kh.HeaderSource.KHEADERS


def test_newest_installed_is_linked_with_a_warning(tmp_path):
    usr_src = tmp_path / "src"
    _debian_pair(usr_src, "6.1.0-50")
    build, common = _debian_pair(usr_src, "6.1.0-56")
    modules = tmp_path / "modules"
    with pytest.raises(KernelHeadersError, match="doctor --fix"):
        kh.resolve(RELEASE, modules_root=modules, usr_src=usr_src)
    h = kh.resolve(RELEASE, modules_root=modules, usr_src=usr_src, link=True)
    assert h.source is kh.HeaderSource.NEWEST_INSTALLED and h.warning
    assert (modules / RELEASE / "build").resolve() == build
    assert (modules / RELEASE / "source").resolve() == common
    again = kh.resolve(RELEASE, modules_root=modules, usr_src=usr_src, link=True)  # idempotent
    assert again.source is kh.HeaderSource.RUNNING_KERNEL


def test_newest_pair_is_found_by_version(tmp_path):
    usr_src = tmp_path / "src"
    for v in ("6.1.0-9", "6.1.0-56", "6.1.0-10"):
        _debian_pair(usr_src, v)
    found = kh._newest_installed(usr_src)
    assert found is not None and found[0].name == "linux-headers-6.1.0-56-amd64"


def test_nothing_installed_names_the_package(tmp_path):
    with pytest.raises(KernelHeadersError, match="apt-get install linux-headers"):
        kh.resolve(RELEASE, modules_root=tmp_path / "modules", usr_src=tmp_path / "src")
