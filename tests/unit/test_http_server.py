"""The bounded HTTP server (exporters/http_server.py) and the agent's metrics endpoint on it, against hostile clients.

Real loopback sockets: hundreds of idle connections, a client that drips its
request, clients that leave mid-request and mid-answer. Judged by state (the
server's counters, the process's thread count, what the client reads), with
bounded polls; the deadlines under test are set short so the run stays quick.
"""

from __future__ import annotations

import http.server
import socket
import struct
import threading
import time
import urllib.request

import pytest

from agent.daemon.metrics import METRICS_LIMITS, AgentCollector, AgentStats, MetricsServer, make_registry
from exporters.http_server import BoundedHttpServer, HttpLimits, serve_in_thread
from symbolizer.file_symbols import SymbolCache

IDLE_CLIENTS = 300
BIG = b"x" * (8 << 20)  # an answer larger than the socket buffers: the client can leave halfway


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        body = BIG if self.path == "/big" else b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def wait_for(cond, what: str, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {timeout_s:g}s")
        time.sleep(0.02)


def connect_idle(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


def closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed `s` (EOF or reset), False while it is open."""
    s.setblocking(False)
    try:
        return s.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def reset(s: socket.socket) -> None:
    """Leave abruptly: an RST, not a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.read()


@pytest.fixture
def serve():
    servers: list[BoundedHttpServer] = []

    def start(limits: HttpLimits, handler=Handler) -> BoundedHttpServer:  # noqa: ANN001
        servers.append(serve_in_thread(handler, "127.0.0.1", 0, limits, name="test-http"))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_hundreds_of_idle_connections_cost_no_threads_and_a_request_still_gets_through(serve):
    server = serve(HttpLimits(max_connections=256, workers=2, idle_timeout_s=120))
    threads_before = threading.active_count()
    idle = connect_idle(server.port, IDLE_CLIENTS)
    try:
        wait_for(lambda: server.stats.accepted == IDLE_CLIENTS, "every connection to be accepted")
        assert get(server.port) == (200, b"ok\n")  # long before any idle deadline
        assert threading.active_count() <= threads_before + 2  # the two workers, no thread per connection
        st = server.stats
        assert st.open <= 256 and st.evicted_idle >= IDLE_CLIENTS + 1 - 256  # the oldest idle made room
        assert st.refused == 0
    finally:
        for s in idle:
            s.close()


def test_idle_connections_are_closed_after_the_deadline(serve):
    server = serve(HttpLimits(idle_timeout_s=0.5))
    idle = connect_idle(server.port, 50)
    try:
        wait_for(lambda: server.stats.idle_closed == 50, "the idle connections to be closed")
        wait_for(lambda: all(closed_by_server(s) for s in idle), "the clients to see the close")
        assert server.stats.open == 0
    finally:
        for s in idle:
            s.close()


def test_a_client_dripping_its_request_gets_408_and_is_closed(serve):
    server = serve(HttpLimits(request_timeout_s=0.5))
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    answer = b""
    try:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 1000:  # 100 s at this pace
            s.sendall(bytes([byte]))
            if server.stats.timed_out:
                break
            time.sleep(0.1)
        while chunk := s.recv(4096):
            answer += chunk
    except ConnectionError:
        pass
    finally:
        s.close()
    assert server.stats.timed_out == 1 and server.stats.requests == 0
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_past_the_cap_with_every_connection_busy_a_client_gets_503(serve):
    server = serve(HttpLimits(max_connections=2, request_timeout_s=60))
    busy = connect_idle(server.port, 2)
    for s in busy:
        s.sendall(b"GET / HTTP/1.1\r\n")  # mid-request: not idle, not evictable
    try:
        wait_for(lambda: server.stats.open == 2, "two connections mid-request")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")
        assert server.stats.refused == 1
    finally:
        for s in busy:
            s.close()


def test_clients_leaving_mid_request_or_mid_answer_are_counted_without_a_traceback(serve, capfd, caplog):
    server = serve(HttpLimits(write_timeout_s=10))
    caplog.set_level("INFO")
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\nhalf")  # a body never finished
        reset(s)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1000)  # the answer has begun
        reset(s)
    wait_for(lambda: server.stats.client_gone >= 25 and server.stats.open == 0, "the 25 departures to be counted")
    assert get(server.port) == (200, b"ok\n")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.levelno >= 30 or r.exc_info], caplog.records
    assert server.stats.handler_errors == 0


def test_keep_alive_pipelining_and_a_body_too_large(serve):
    server = serve(HttpLimits(max_body_bytes=10))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            data += s.recv(4096)
        assert data.endswith(b"abc") and b"hello" in data
        s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")  # over max_body_bytes: not read, then closed
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.1 4")  # the handler's answer, then EOF


# --- the agent's metrics endpoint --------------------------------------------------------


def test_metrics_endpoint_under_hundreds_of_idle_connections():
    stats = AgentStats(samples=7)
    collector = AgentCollector(stats, lambda: [], SymbolCache())
    threads_before = threading.active_count()
    server = MetricsServer("127.0.0.1:0", make_registry(collector), stats, collector=collector)
    try:
        assert server._server.server_address[0] == "127.0.0.1"
        idle = connect_idle(server.port, IDLE_CLIENTS)
        try:
            wait_for(lambda: server.http_stats.accepted == IDLE_CLIENTS, "every connection to be accepted")
            status, body = get(server.port, "/metrics")
            assert status == 200 and b"bpfprof_samples_total 7.0" in body
            text = body.decode()
            assert 'bpfprof_metrics_http_connections_total{outcome="evicted_idle"}' in text
            assert "bpfprof_metrics_http_open_connections" in text
            # its loop thread and at most METRICS_LIMITS.workers handler threads
            assert threading.active_count() <= threads_before + 1 + METRICS_LIMITS.workers
            assert server.http_stats.open <= METRICS_LIMITS.max_connections
        finally:
            for s in idle:
                reset(s)
        wait_for(lambda: server.http_stats.open == 0, "the connections to go")
    finally:
        server.close()
    wait_for(lambda: threading.active_count() <= threads_before, "the server's threads to end")
