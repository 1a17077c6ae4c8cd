"""In-test OTLP profiles collectors on port 0: a gRPC ProfilesService and an HTTP endpoint.

Each answers from a script, one entry per call, then OK; every request that
arrives is kept (decoded), with its headers, for the test to inspect.
BadCollector misbehaves below HTTP: it drips its answer a byte a second, or
never answers at all.
"""

from __future__ import annotations

import gzip
import http.server
import socket
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)


@dataclass(frozen=True)
class Reply:
    """One scripted answer. gRPC: `code` (None = OK); HTTP: `http_status`."""

    code: grpc.StatusCode | None = None
    details: str = ""
    retry_delay_s: float | None = None  # gRPC RetryInfo
    http_status: int = 200
    retry_after: str | None = None  # HTTP Retry-After header
    body: bytes | None = None  # HTTP error body
    rejected: int = 0  # partial_success
    message: str = ""
    hang: bool = False  # gRPC: answer nothing until the collector stops (the client's deadline must end the call)


@dataclass
class Received:
    requests: list[ExportProfilesServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def _response(reply: Reply) -> ExportProfilesServiceResponse:
    response = ExportProfilesServiceResponse()
    if reply.rejected or reply.message:
        response.partial_success.rejected_profiles = reply.rejected
        response.partial_success.error_message = reply.message
    return response


class _Servicer(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self, script: list[Reply], received: Received) -> None:
        self.script, self.received = script, received
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def Export(self, request, context):  # noqa: N802  (the generated servicer's name)
        with self.lock:
            self.received.requests.append(request)
            self.received.headers.append(dict(context.invocation_metadata()))
            reply = self.script.pop(0) if self.script else Reply()
        if reply.hang:
            self.stopping.wait()
            return ExportProfilesServiceResponse()
        if reply.code is not None:
            if reply.retry_delay_s is not None:
                info = error_details_pb2.RetryInfo(retry_delay=Duration(
                    seconds=int(reply.retry_delay_s), nanos=int(reply.retry_delay_s % 1 * 1e9)))
                status = status_pb2.Status(code=reply.code.value[0], message=reply.details)
                status.details.add().Pack(info)
                context.set_trailing_metadata([("grpc-status-details-bin", status.SerializeToString())])
            context.set_code(reply.code)
            context.set_details(reply.details)
            return ExportProfilesServiceResponse()
        return _response(reply)


class GrpcCollector:
    """`with GrpcCollector([Reply(...)]) as c:` then export to f"grpc://127.0.0.1:{c.port}"."""

    def __init__(self, script: list[Reply] | None = None) -> None:
        self.received = Received()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._servicer = _Servicer(list(script or []), self.received)
        profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(self._servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def __enter__(self) -> GrpcCollector:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._servicer.stopping.set()
        self._server.stop(grace=None).wait()


class HttpCollector:
    """`with HttpCollector([Reply(http_status=503, retry_after="1")]) as c:` then POST to c.url."""

    def __init__(self, script: list[Reply] | None = None) -> None:
        self.received = Received()
        script = list(script or [])
        received = self.received
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802  (BaseHTTPRequestHandler's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportProfilesServiceRequest()
                request.ParseFromString(body)
                with lock:
                    received.requests.append(request)
                    received.headers.append({k.lower(): v for k, v in self.headers.items()})
                    received.paths.append(self.path)
                    reply = script.pop(0) if script else Reply()
                if reply.http_status == 200:
                    data = _response(reply).SerializeToString()
                else:
                    data = reply.body or b""
                self.send_response(reply.http_status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                if reply.retry_after is not None:
                    self.send_header("Retry-After", reply.retry_after)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HttpCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class BadCollector:
    """A loopback server for exporters to time out on. `mode`:

    drip_body     reads the request, sends 200 headers (a 3600-byte body), then one body byte a second
    drip_headers  reads the request, then sends its status line and headers one byte a second
    hang          accepts and reads, never answers

    `connections` counts accepted connections; `closed_by_client` those the
    client closed (or shut down) while we still had something to send or wait for.
    """

    def __init__(self, mode: str, byte_every_s: float = 1.0) -> None:
        assert mode in ("drip_body", "drip_headers", "hang")
        self.mode, self.byte_every_s = mode, byte_every_s
        self.connections = 0
        self.closed_by_client = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        try:
            self._read_request(conn)
            if self.mode == "hang":
                while not self._stop.is_set():
                    try:
                        if conn.recv(1) == b"":  # the client gave up
                            self._gone()
                            return
                    except TimeoutError:
                        continue
                return
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 3600\r\n\r\n"
            if self.mode == "drip_body":
                conn.sendall(head)
                self._drip(conn, b"\0" * 3600)
            else:
                self._drip(conn, head)
        except OSError:
            self._gone()
        finally:
            conn.close()

    def _read_request(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data and not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionResetError("client left before its request was whole")
            data += chunk
        length = 0
        for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = len(data.split(b"\r\n\r\n", 1)[1])
        while body < length and not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionResetError("client left before its body was whole")
            body += len(chunk)

    def _drip(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self._stop.wait(self.byte_every_s):
                return
            conn.sendall(data[i:i + 1])  # OSError once the client has shut its side

    def _gone(self) -> None:
        with self._lock:
            self.closed_by_client += 1

    def __enter__(self) -> BadCollector:
        t = threading.Thread(target=self._accept, daemon=True)
        self._threads.append(t)
        t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._threads:
            t.join(timeout=5)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
