"""The OpAMP client against the loopback OpAMP server process (tests/opamp_server.py): identity, health,
effective config, remote configs and their status, and a server that is down, slow or answers garbage."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from opamp_server import OpampServer
from opentelemetry._opamp.proto import opamp_pb2
from otlp_collector import closed_port

from agent.daemon.config import OpampConfig
from agent.daemon.opamp import (
    CAPABILITIES,
    INITIAL_BACKOFF_S,
    Health,
    OpampClient,
    Outcome,
    RemoteStatus,
    load_instance_uid,
    read_offer,
    uuid7,
)


@pytest.fixture(scope="module")
def server():
    with OpampServer() as s:
        yield s


@pytest.fixture
def fresh(server):
    server.mode("normal")
    server.offer("")
    yield server


def client_for(endpoint: str, tmp_path, **kw) -> OpampClient:
    cfg = OpampConfig(endpoint=endpoint, instance_uid_file=str(tmp_path / "uid"), **kw)
    return OpampClient(cfg, load_instance_uid(cfg.instance_uid_file), "host-a", "node-1", jitter=lambda: 1.0)


def test_first_message_is_the_full_state(fresh, tmp_path):
    c = client_for(fresh.endpoint, tmp_path)
    c.set_health(Health(True, start_time_unix_nano=1))
    c.set_effective_config("profiling:\n  frequency_hz: 99\n")
    assert c.exchange() == Outcome.OK
    a = fresh.state()[str(uuid.UUID(bytes=c.uid))]
    assert a["identifying"]["service.name"] == "bpfprof"
    assert a["identifying"]["service.instance.id"] == str(uuid.UUID(bytes=c.uid))
    assert a["identifying"]["service.version"]
    assert a["non_identifying"]["host.name"] == "host-a" and a["non_identifying"]["k8s.node.name"] == "node-1"
    assert a["capabilities"] == CAPABILITIES and CAPABILITIES & opamp_pb2.AgentCapabilities_ReportsHealth
    assert a["health"] == {"healthy": True, "status": "healthy", "last_error": ""}
    assert a["effective_config"] == {"": "profiling:\n  frequency_hz: 99\n"}
    # a heartbeat carries only what changed: nothing, then the new health
    c.exchange()
    c.set_health(Health(False, "exporter otlp failing: refused"))
    c.exchange()
    a = fresh.state()[str(uuid.UUID(bytes=c.uid))]
    assert a["full_states"] == 1 and a["sequence"] == [0, 1, 2]
    assert a["health"] == {"healthy": False, "status": "degraded", "last_error": "exporter otlp failing: refused"}
    assert c.stats.requests[Outcome.OK] == 3 and c.stats.connected


def test_remote_config_is_offered_once_and_its_status_reported(fresh, tmp_path):
    c = client_for(fresh.endpoint, tmp_path)
    h = fresh.offer("profiling:\n  frequency_hz: 199\n")
    c.exchange()
    offer = c.take_offer()
    assert offer is not None and offer.tree == {"profiling": {"frequency_hz": 199}} and offer.config_hash.hex() == h
    c.exchange()
    assert c.take_offer() is None  # the same hash again is no news
    c.report_remote_status(offer.config_hash, RemoteStatus.APPLIED)
    c.exchange()
    assert fresh.state()[str(uuid.UUID(bytes=c.uid))]["remote_config_status"] == {
        "hash": h, "status": "APPLIED", "error": ""}
    bad = fresh.offer("profiling: [unclosed\n")
    c.exchange()
    offer = c.take_offer()
    assert offer is not None and offer.tree is None and "not valid YAML" in offer.error
    c.report_remote_status(offer.config_hash, RemoteStatus.FAILED, offer.error)
    c.exchange()
    status = fresh.state()[str(uuid.UUID(bytes=c.uid))]["remote_config_status"]
    assert status["hash"] == bad and status["status"] == "FAILED" and "not valid YAML" in status["error"]
    assert c.stats.remote_configs == {RemoteStatus.APPLIED: 1, RemoteStatus.FAILED: 1}


def test_offer_shapes():
    def offer(files: dict[str, tuple[bytes, str]]) -> opamp_pb2.AgentRemoteConfig:
        rc = opamp_pb2.AgentRemoteConfig(config_hash=b"h")
        for name, (body, ctype) in files.items():
            rc.config.config_map[name].CopyFrom(opamp_pb2.AgentConfigFile(body=body, content_type=ctype))
        return rc

    assert read_offer(offer({})).tree == {}  # no file: back to the local config
    assert read_offer(offer({"a.json": (b'{"log_level": "debug"}', "application/json")})).tree == {
        "log_level": "debug"}
    assert "expected one config file, got 2" in read_offer(offer({"a": (b"x: 1", ""), "b": (b"y: 1", "")})).error
    assert "is not YAML or JSON" in read_offer(offer({"c": (b"x", "application/toml")})).error


@pytest.mark.parametrize("mode, outcome, hint_s", [
    ("garbage", Outcome.BAD_RESPONSE, None),
    ("unavailable", Outcome.HTTP_ERROR, 1.0),  # Retry-After: 1
    ("server_error", Outcome.SERVER_ERROR, 2.0),  # RetryInfo 2 s
])
def test_a_bad_server_is_counted_and_backed_off(fresh, tmp_path, mode, outcome, hint_s):
    c = client_for(fresh.endpoint, tmp_path)
    fresh.mode(mode)
    assert c.exchange() == outcome
    assert c.exchange() == outcome
    assert c.stats.requests[outcome] == 2 and not c.stats.connected and c.stats.failures_in_a_row == 2
    assert c.last_delay_s == (hint_s if hint_s is not None else INITIAL_BACKOFF_S * 2)
    fresh.mode("normal")
    assert c.exchange() == Outcome.OK
    a = fresh.state()[str(uuid.UUID(bytes=c.uid))]
    assert a["full_states"] == 3  # after each failure the full state again (the server may have lost it)


def test_slow_and_down_servers(fresh, tmp_path):
    c = client_for(fresh.endpoint, tmp_path, timeout_s=0.3)
    fresh.mode("slow", delay_s=2.0)
    assert c.exchange() == Outcome.TIMEOUT
    fresh.mode("normal")
    down = client_for(f"http://127.0.0.1:{closed_port()}/v1/opamp", tmp_path)
    assert [down.exchange() for _ in range(3)] == [Outcome.UNREACHABLE] * 3
    assert down.last_delay_s == 4 * INITIAL_BACKOFF_S  # 1, 2, 4


def test_backoff_is_capped():
    c = OpampClient(OpampConfig(endpoint="http://127.0.0.1:1/v1/opamp"), uuid7(), "h", "", jitter=lambda: 1.0)
    for _ in range(30):
        c._failed(Outcome.UNREACHABLE, None)
    assert c.last_delay_s == 300.0


def test_instance_uid_is_kept_across_restarts(tmp_path):
    path = str(tmp_path / "state" / "instance_uid")
    first = load_instance_uid(path)
    assert load_instance_uid(path) == first and uuid.UUID(bytes=first).version == 7
    (tmp_path / "state" / "instance_uid").write_bytes(b"\xff not a uuid")
    replaced = load_instance_uid(path)
    assert replaced != first and load_instance_uid(path) == replaced


def test_a_thread_reports_news_at_once_and_disconnects(fresh, tmp_path):
    c = client_for(fresh.endpoint, tmp_path, heartbeat_interval_s=3600)
    c.start()
    try:
        fresh.wait_for(lambda a: a["identifying"]["service.instance.id"] == str(uuid.UUID(bytes=c.uid)))
        c.set_health(Health(False, "probes not attached"))
        fresh.wait_for(lambda a: a.get("health", {}).get("last_error") == "probes not attached")
    finally:
        c.stop()
    assert fresh.state()[str(uuid.UUID(bytes=c.uid))]["disconnected"]


def test_https_with_a_ca_file_and_headers(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with OpampServer(str(cert), str(key)) as server:
        assert server.endpoint.startswith("https://")
        trusted = client_for(server.endpoint, tmp_path, ca_file=str(cert), headers={"Authorization": "Bearer t0k"})
        assert trusted.exchange() == Outcome.OK
        assert server.agent()["authorization"] == "Bearer t0k"
        untrusted = client_for(server.endpoint, tmp_path / "other")
        assert untrusted.exchange() == Outcome.UNREACHABLE and "CERTIFICATE_VERIFY_FAILED" in \
            untrusted.stats.last_error
