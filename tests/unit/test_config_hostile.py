"""Hostile config files through `bpfprof agent --check-config`: one clear line, exit 2, quickly, no hang.

A real CLI process each (no root needed: the config is checked before any BPF).
"""

from __future__ import annotations

import subprocess

import pytest
from hostile_configs import HOSTILE, put

from agent.daemon.config import ConfigYamlLoader, parse_config_yaml
from recording import BPFPROF
from symbolizer.errors import ConfigError


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_check_config_refuses_hostile_file(tmp_path, name):
    path = tmp_path / "agent.yaml"
    words = put(name, path)
    # The timeout only catches a hang (a FIFO without a writer, an alias bomb expanding).
    proc = subprocess.run([str(BPFPROF), "agent", "--check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(f"bpfprof: error: config {path}: ")
    for w in words:
        assert w in lines[0], lines[0]


def test_anchors_without_aliases_and_plain_nesting_still_load():
    assert parse_config_yaml("a: &x 1\nb: [[[{c: 2}]]]\n", "t.yaml") == {"a": 1, "b": [[[{"c": 2}]]]}


def test_alias_refused_with_its_place():
    with pytest.raises(ConfigError, match=r"line 2, column 4: aliases \(\*x\) are not accepted"):
        parse_config_yaml("a: &x 1\nb: *x\n", "t.yaml")
    assert issubclass(ConfigYamlLoader, __import__("yaml").SafeLoader)


def test_dev_null_is_an_empty_config():
    """`--config /dev/null` (defaults only, as bench/agent_churn.py runs) still works: only a cap, not a type."""
    proc = subprocess.run([str(BPFPROF), "agent", "--check-config", "--config", "/dev/null"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "export:" in proc.stdout
