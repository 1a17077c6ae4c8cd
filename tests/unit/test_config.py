"""Agent config: precedence, ${ENV}, key-path errors, and the example file documents every key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.daemon.config import (
    ENV_EXPORT_INTERVAL_S,
    ENV_NODE_NAME_FALLBACK,
    ENV_OTLP_ENDPOINT,
    AgentConfig,
    config_keys,
    load_config,
)
from symbolizer.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "config.example.yaml"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_without_a_file(tmp_path):
    cfg = load_config(None, environ={"BPFPROF_CONFIG_UNUSED": ""})
    assert cfg.export.interval_s == 60 and cfg.metrics.listen == "127.0.0.1:9464"


def test_example_file_is_valid_and_all_defaults():
    assert load_config(str(EXAMPLE), environ={}) == AgentConfig()


def test_example_file_documents_every_key():
    tree = yaml.safe_load(EXAMPLE.read_text())
    text = EXAMPLE.read_text()
    for key in config_keys():
        if key.startswith("relabel[]."):
            assert key.removeprefix("relabel[].") in text.split("Fields of a rule:")[1], key
            continue
        node = tree
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not in {EXAMPLE.name}"
            node = node[part]


def test_precedence_flags_over_env_over_file(tmp_path):
    path = write(tmp_path, "export:\n  interval_s: 30\n  otlp:\n    endpoint: http://file:4318\n")
    env = {ENV_EXPORT_INTERVAL_S: "20", ENV_OTLP_ENDPOINT: "http://env:4318"}
    cfg = load_config(path, {"export.interval_s": 5.0}, environ=env)
    assert cfg.export.interval_s == 5.0
    assert cfg.export.otlp.endpoint == "http://env:4318"
    assert load_config(path, environ={}).export.interval_s == 30


def test_env_expansion_and_node_name_fallback(tmp_path):
    path = write(tmp_path, 'export:\n  otlp:\n    endpoint: "http://c:4318"\n    headers:\n'
                           '      Authorization: "Bearer ${TOKEN}"\n      X-Tenant: "${TENANT:-default}"\n'
                           '      X-Price: "$$5"\n')
    cfg = load_config(path, environ={"TOKEN": "s3cret", ENV_NODE_NAME_FALLBACK: "node-7"})
    assert cfg.export.otlp.headers == {"Authorization": "Bearer s3cret", "X-Tenant": "default", "X-Price": "$5"}
    assert cfg.node_name == "node-7"


BAD = [
    ("exprt:\n  interval_s: 5\n", "exprt: unknown key (expected one of: log_level,"),
    ("export:\n  intervl_s: 5\n", "export.intervl_s: unknown key"),
    ("export:\n  interval_s: soon\n", "export.interval_s: expected a number, got 'soon'"),
    ("export:\n  interval_s: 0.2\n", "export.interval_s: expected a number of seconds >= 1, got 0.2"),
    ("export:\n  interval_s: .inf\n", "export.interval_s: expected a number, got inf"),
    ("export:\n  timeout_s: .nan\n", "export.timeout_s: expected a number, got nan"),
    ("export:\n  max_retry_after_s: 7200\n", "export.max_retry_after_s: expected a number of seconds from 0 to 3600"),
    ("export:\n  max_retry_after_s: -1\n", "export.max_retry_after_s: expected a number of seconds from 0 to 3600"),
    ("export:\n  max_retry_after_s: .inf\n", "export.max_retry_after_s: expected a number, got inf"),
    ("profiling:\n  unwind: dwarf\n", "profiling.unwind: expected one of cfi, copy, fp"),
    ("profiling:\n  heap_sample_bytes: 0\n", "profiling.heap_sample_bytes: expected an integer >= 1"),
    ("profiling:\n  frequency_hz: true\n", "profiling.frequency_hz: expected an integer, got True"),
    ("profiling:\n  frequency_hz: 100000\n", "profiling.frequency_hz: expected 1 to 20000"),
    ("limits:\n  cpu_percent: -1\n", "limits.cpu_percent: expected a percentage from 0 (off) to 100, got -1.0"),
    ("limits:\n  cpu_percent: lots\n", "limits.cpu_percent: expected a number, got 'lots'"),
    ("limits:\n  min_frequency_hz: 0\n", "limits.min_frequency_hz: expected 1 to 20000, got 0"),
    ("profiling:\n  profiles: [cpu, gpu]\n", "profiling.profiles[1]: expected one of"),
    ("profiling:\n  debuginfod_urls: ['ftp://x']\n", "profiling.debuginfod_urls[0]: expected an http:// or https"),
    ("profiling:\n  debuginfod_timeout_s: 0\n", "profiling.debuginfod_timeout_s: expected a number of seconds"),
    ("profiling:\n  debuginfod_cache_bytes: 10\n", "profiling.debuginfod_cache_bytes: expected an integer >= 1048576"),
    ("selection:\n  exe_regex: ['([']\n", "selection.exe_regex[0]: invalid regular expression"),
    ("selection:\n  container_ids: [XYZ]\n", "selection.container_ids[0]: expected 12 to 64 lowercase hex"),
    ("selection:\n  pids: 12\n", "selection.pids: expected a list of integers, got 12"),
    ("export:\n  otlp:\n    endpoint: 'ftp://x'\n", "export.otlp: OTLP endpoint 'ftp://x': unknown scheme"),
    ("export:\n  otlp:\n    headers: [a]\n", "export.otlp.headers: expected a mapping of strings to strings"),
    ("metrics:\n  listen: localhost\n", "metrics.listen: expected host:port"),
    ("relabel:\n  - action: explode\n", "relabel[0].action: expected one of drop, keep"),
    ("relabel:\n  - action: mask\n    label: x\n", "relabel[0].regex: expected a non-empty string (action mask)"),
    ("relabel:\n  - regex: x\n", "relabel[0].action: required key is missing"),
    ("host_proc: /nonexistent\n", "host_proc: expected a mounted procfs directory"),
    ("export:\n  otlp:\n    endpoint: '${NOPE}'\n", "export.otlp.endpoint: environment variable NOPE is not set"),
    ("export: [1, 2]\n", "export: expected a mapping"),
    ("export:\n  interval_s: [\n", "not valid YAML at line"),
    ("- 1\n", "expected a mapping at the top"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_config_names_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    msg = str(err.value)
    assert msg.startswith(f"config {path}: ")
    assert message in msg, msg
    assert "\n" not in msg


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(str(tmp_path / "nope.yaml"), environ={})


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, "export:\n  interval_s: -1\n")
    bpfprof = Path(sys.executable).parent / "bpfprof"
    proc = subprocess.run([str(bpfprof), "agent", "--config", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bpfprof: error: config {path}: export.interval_s: expected a number of seconds >= 1, got -1.0"]


def test_check_config_redacts_headers(tmp_path):
    path = write(tmp_path, "export:\n  otlp:\n    endpoint: http://c:4318\n    headers: {Authorization: '${T}'}\n")
    bpfprof = Path(sys.executable).parent / "bpfprof"
    proc = subprocess.run([str(bpfprof), "agent", "--config", path, "--check-config", "--interval", "15"],
                          capture_output=True, text=True, timeout=60, env={"T": "Bearer xyz", "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr
    effective = yaml.safe_load(proc.stdout)
    assert effective["export"]["interval_s"] == 15
    assert effective["export"]["otlp"]["headers"] == {"Authorization": "<redacted>"}
    assert "xyz" not in proc.stdout
