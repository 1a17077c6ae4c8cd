"""`bpfprof serve` under a flood of idle connections and clients that leave: bounded threads, no tracebacks.

Hundreds of idle TCP connections to each of its three ports (web UI,
OTLP/HTTP, OTLP/gRPC) must not add a thread each, must not keep a normal
request out, and are closed after the idle deadline; clients that reset
mid-request or mid-answer are counted, never printed.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
import time

import pytest

from exporters.http_server import HttpLimits
from tests.viewer.conftest import get, get_json, post
from tests.viewer.data import SpanSpec, trace_request
from tests.viewer.test_receiver import T0, TRACE, good_profiles
from viewer.config import ServeConfig
from viewer.server import Server

IDLE_PER_PORT = 200
MS = 1_000_000


def wait_for(cond, what: str, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {timeout_s:g}s")
        time.sleep(0.02)


def reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.fixture
def short_server(tmp_path):
    """serve with a short idle deadline, so that 'closed after the deadline' is seen within the test."""
    config = ServeConfig(grpc_addr=("127.0.0.1", 0), http_addr=("127.0.0.1", 0), ui_addr=("127.0.0.1", 0),
                         db_path=tmp_path / "serve.sqlite", max_request_bytes=1 << 20, retention_interval_s=3600,
                         http_limits=dataclasses.replace(ServeConfig().http_limits, idle_timeout_s=2.0))
    s = Server(config)
    s.start()
    yield s
    s.stop()


def test_idle_floods_on_every_port_cost_no_threads_and_requests_get_through(short_server, capfd):
    server = short_server
    ports = [server.ui_port, server.receiver.http_port, server.receiver.grpc_port]
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", p), timeout=10) for p in ports for _ in range(IDLE_PER_PORT)]
    try:
        wait_for(lambda: server.ui.stats.accepted >= IDLE_PER_PORT
                 and server.receiver.http.stats.accepted >= IDLE_PER_PORT, "the HTTP floods to be accepted")
        span = SpanSpec(TRACE, b"\x02" * 8, "during-the-flood", T0, T0 + MS)
        assert post(f"http://127.0.0.1:{server.receiver.http_port}/v1/traces", trace_request([span]))[0] == 200
        assert post(f"http://127.0.0.1:{server.receiver.http_port}/v1development/profiles", good_profiles())[0] == 200
        assert get_json(f"{server.ui_url}api/status")["counts"]["spans"] == 1
        limits: HttpLimits = server.config.http_limits
        # each HTTP server: its loop thread (started before) and at most its workers; gRPC: its fixed pool
        assert threading.active_count() <= threads_before + 2 * limits.workers + 4
        assert server.ui.stats.open <= limits.max_connections
        wait_for(lambda: server.ui.stats.open == 0 and server.receiver.http.stats.open == 0,
                 "the idle deadline to close the HTTP connections")
        assert server.ui.stats.idle_closed + server.ui.stats.evicted_idle >= IDLE_PER_PORT
    finally:
        for s in idle:
            reset(s)
    _, err = capfd.readouterr()
    assert "Traceback" not in err


def test_clients_that_leave_are_counted_not_printed(server, capfd):
    for http, request in ((server.ui, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                          (server.receiver.http, b"POST /v1/traces HTTP/1.1\r\nContent-Length: 5000\r\n\r\nab")):
        for i in range(30):
            s = socket.create_connection(("127.0.0.1", http.port), timeout=10)
            s.sendall(request)
            wait_for(lambda: http.stats.accepted == i + 1, "the server to take the connection")  # noqa: B023
            reset(s)
    wait_for(lambda: server.ui.stats.open == 0 and server.receiver.http.stats.open == 0, "the departures")
    assert server.receiver.http.stats.client_gone == 30  # left mid-body
    assert get(server.ui_url)[0] == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
