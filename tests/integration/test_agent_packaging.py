"""Packaging checks, offline: systemd-analyze verify, hadolint, kubernetes-validate, a Helm render.

No helm binary is installable here (not on PyPI, npm or Debian), so the
chart is rendered by `render_chart` below, which implements the subset of
Go templates the chart uses, and nothing else (an unknown construct fails):

  {{ .Values.a.b }} {{ .Release.Name }} {{ .Release.Namespace }} {{ .Chart.Name }}
  {{ X | quote }}   {{ toYaml X | nindent N }}   {{- and -}} whitespace trimming
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recording import BPFPROF

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) is needed"
    unit = tmp_path / "bpfprof.service"
    unit.write_text((PACKAGING / "systemd" / "bpfprof.service").read_text()
                    .replace("/opt/bpfprof/venv/bin/bpfprof", str(BPFPROF)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(BIN / "hadolint"), str(PACKAGING / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _validate(paths: list[Path]) -> None:
    proc = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_manifests_validate():
    _validate(sorted((PACKAGING / "kubernetes").glob("*.yaml")))


def test_configmap_holds_a_valid_agent_config(tmp_path):
    cm = yaml.safe_load((PACKAGING / "kubernetes" / "configmap.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"].replace("/host/proc", "/proc"))
    proc = subprocess.run([str(BPFPROF), "agent", "--config", str(path), "--check-config"], capture_output=True,
                          text=True, timeout=60, env={"NODE_IP": "10.0.0.1", "NODE_NAME": "n1"})
    assert proc.returncode == 0, proc.stderr
    assert "grpc://10.0.0.1:4317" in proc.stdout


_TAG = re.compile(r"(\s*)\{\{(-?)\s*(.*?)\s*(-?)\}\}")


def _lookup(expr: str, scope: dict):
    if not expr.startswith("."):
        raise ValueError(f"unsupported template expression {expr!r}")
    node = scope
    for part in expr[1:].split("."):
        node = node[part]
    return node


def _evaluate(expr: str, scope: dict) -> str:
    stages = [s.strip() for s in expr.split("|")]
    head = stages[0].split()
    if head[0] == "toYaml":
        value: object = yaml.safe_dump(_lookup(head[1], scope), sort_keys=False).rstrip("\n")
    elif len(head) == 1:
        value = _lookup(head[0], scope)
    else:
        raise ValueError(f"unsupported template function {head[0]!r}")
    for stage in stages[1:]:
        fn, *args = stage.split()
        if fn == "quote":
            value = '"' + str(value).replace('"', '\\"') + '"'
        elif fn == "nindent":
            pad = " " * int(args[0])
            value = "\n" + "\n".join(pad + line if line else line for line in str(value).splitlines())
        else:
            raise ValueError(f"unsupported template function {fn!r}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_chart(chart: Path, release: str = "bpfprof", namespace: str = "bpfprof") -> dict[str, str]:
    """templates/*.yaml rendered with values.yaml (the subset in the module docstring)."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    scope = {"Values": yaml.safe_load((chart / "values.yaml").read_text()),
             "Release": {"Name": release, "Namespace": namespace},
             "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]}}
    out = {}
    for tpl in sorted((chart / "templates").glob("*.yaml")):
        text = tpl.read_text()

        def sub(m: re.Match[str]) -> str:
            lead, trim_left, expr, _trim_right = m.groups()
            return ("" if trim_left else lead) + _evaluate(expr, scope)

        rendered = _TAG.sub(sub, text)
        assert "{{" not in rendered, f"{tpl.name}: unrendered template"
        out[tpl.name] = rendered
    return out


def test_helm_chart_renders_and_validates(tmp_path):
    rendered = render_chart(PACKAGING / "helm" / "bpfprof")
    assert set(rendered) == {"configmap.yaml", "daemonset.yaml", "serviceaccount.yaml"}
    paths = []
    for name, text in rendered.items():
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    _validate(paths)
    ds = yaml.safe_load(rendered["daemonset.yaml"])
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/host/proc", "/sys/kernel/tracing", "/sys/kernel/debug", "/lib/modules", "/usr/src",
            "/sys/fs/cgroup"} <= mounts
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    cfg = yaml.safe_load(yaml.safe_load(rendered["configmap.yaml"])["data"]["config.yaml"])
    assert cfg["host_proc"] == "/host/proc"


def test_renderer_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError):
        _evaluate('include "x" .', {})


def test_uninstall_is_idempotent(tmp_path):
    env = {"PREFIX": str(tmp_path / "opt"), "ETC": str(tmp_path / "etc"), "UNIT_DIR": str(tmp_path / "units"),
           "PATH": "/usr/bin:/bin", "SYSTEMCTL": "/bin/false"}
    (tmp_path / "opt" / "venv").mkdir(parents=True)
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "bpfprof.service").write_text("")
    for _ in range(2):
        proc = subprocess.run(["bash", str(PACKAGING / "uninstall.sh")], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "units" / "bpfprof.service").exists()
