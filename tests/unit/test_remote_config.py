"""Remote configs (OpAMP): validated as a file is, bounded by the local opamp.allow_remote, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon.config import (
    DEFAULT_ALLOW_REMOTE,
    MAX_CONFIG_BYTES,
    check_remote,
    load_config,
    parse_remote_config,
    remote_allowed,
)
from symbolizer.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return str(p)


def test_remote_keys_win_and_the_rest_stays_local(tmp_path):
    path = write(tmp_path, "profiling:\n  frequency_hz: 49\n  profiles: [cpu]\nexport:\n  interval_s: 30\n")
    remote = parse_remote_config(b"profiling:\n  frequency_hz: 199\nselection:\n  exe_names: [app]\n")
    cfg = load_config(path, environ={}, remote=remote)
    assert cfg.profiling.frequency_hz == 199
    assert cfg.selection.exe_names == ("app",)
    assert cfg.profiling.profiles == ("cpu",) and cfg.export.interval_s == 30
    assert load_config(path, environ={}, remote={}).profiling.frequency_hz == 49  # an empty one: the file again


def test_json_body_is_accepted():
    assert parse_remote_config(b'{"profiling": {"frequency_hz": 19}}') == {"profiling": {"frequency_hz": 19}}


@pytest.mark.parametrize("body, message", [
    (b"profiling:\n  frequency_hz: 0\n", "remote config: profiling.frequency_hz: expected 1 to 20000, got 0"),
    (b"profiling:\n  frequncy_hz: 10\n", "remote config: profiling.frequncy_hz: unknown key"),
    (b"selection:\n  exe_regex: ['(']\n", "remote config: selection.exe_regex[0]: invalid regular expression"),
    (b"export:\n  otlp:\n    endpoint: http://elsewhere:4318\n",
     "remote config: export.otlp.endpoint: not allowed to be changed remotely"),
    (b"export:\n  otlp:\n    headers: {Authorization: x}\n", "remote config: export.otlp.headers: not allowed"),
    (b"opamp:\n  endpoint: http://other:4320/v1/opamp\n", "remote config: opamp.endpoint: not allowed"),
    (b"metrics:\n  listen: 0.0.0.0:9464\n", "remote config: metrics.listen: not allowed"),
    (b"profiling: 3\n", "remote config: profiling: expected a mapping"),
])
def test_bad_remote_config_names_the_key(tmp_path, body, message):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={}, remote=parse_remote_config(body))
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("body, message", [
    (b"[1, 2]", "remote config: expected a mapping at the top, got list"),
    (b"\xff\xfe", "remote config: not UTF-8 text"),
    (b"a: &x [1]\nb: *x\n", "aliases"),
    (b"a: [", "not valid YAML"),
    (b"x" * (MAX_CONFIG_BYTES + 1), "remote config: larger than"),
])
def test_unreadable_remote_body_is_one_config_error(body, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_remote_config(body)


def test_env_is_not_expanded_in_a_remote_config(tmp_path):
    path = write(tmp_path, "opamp:\n  allow_remote: [relabel]\n")
    remote = parse_remote_config(b"relabel:\n  - {action: drop_label, label: '${SECRET}'}\n")
    cfg = load_config(path, environ={"SECRET": "hunter2"}, remote=remote)
    assert cfg.relabel[0].label == "${SECRET}"


def test_export_endpoint_only_when_the_local_file_names_it(tmp_path):
    body = b"export:\n  otlp:\n    endpoint: http://collector:4318\n"
    section = write(tmp_path, "opamp:\n  allow_remote: [export]\n")
    with pytest.raises(ConfigError, match="export.otlp.endpoint: not allowed"):
        load_config(section, environ={}, remote=parse_remote_config(body))
    named = write(tmp_path, "opamp:\n  allow_remote: [export.otlp.endpoint]\n")
    assert load_config(named, environ={}, remote=parse_remote_config(body)).export.otlp.endpoint == \
        "http://collector:4318"


def test_allow_rules():
    assert remote_allowed("profiling.frequency_hz", DEFAULT_ALLOW_REMOTE)
    assert remote_allowed("selection.exe_names", DEFAULT_ALLOW_REMOTE)
    assert not remote_allowed("profiling.unwind", DEFAULT_ALLOW_REMOTE)
    assert not remote_allowed("export.otlp.headers", ("export", "export.otlp"))
    assert remote_allowed("export.otlp.headers", ("export.otlp.headers",))
    assert not remote_allowed("opamp.allow_remote", ("opamp", "opamp.allow_remote"))
    check_remote({"selection": {"pids": [1]}}, DEFAULT_ALLOW_REMOTE)


@pytest.mark.parametrize("text, message", [
    ("opamp:\n  endpoint: ws://server:4320/v1/opamp\n", "opamp.endpoint: WebSocket is not supported"),
    ("opamp:\n  endpoint: server:4320\n", "opamp.endpoint: expected an http:// or https:// URL"),
    ("opamp:\n  heartbeat_interval_s: 0\n", "opamp.heartbeat_interval_s: expected 1 to 86400"),
    ("opamp:\n  allow_remote: [profiling.nope]\n", r"opamp.allow_remote\[0\]: expected a config key"),
    ("opamp:\n  allow_remote: [opamp.endpoint]\n", r"opamp.allow_remote\[0\]: expected a config key"),
    ("opamp:\n  instance_uid_file: uid\n", "opamp.instance_uid_file: expected an absolute path"),
])
def test_bad_opamp_section_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), environ={})
