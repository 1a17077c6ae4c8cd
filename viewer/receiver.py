"""OTLP receivers: gRPC (TraceService, ProfilesService) and HTTP (/v1/traces, /v1development/profiles).

Both hand the raw request bytes to viewer.ingest, so one parser and one set of
rules serve both transports. Answers follow the OTLP spec:

    malformed / invalid request   gRPC INVALID_ARGUMENT    HTTP 400 + google.rpc.Status
    over the size limit           gRPC RESOURCE_EXHAUSTED  HTTP 413 (compressed or not)
    store failed                  gRPC UNAVAILABLE         HTTP 503 (retryable: nothing was stored)
    some spans rejected           OK + partial_success     200 + partial_success

A bad request never stops a receiver. HTTP is served within HttpLimits
(exporters/http_server.py: deadlines, a connection cap, a few worker
threads); gRPC by its own core with a bounded pool, an idle-connection
age and a cap on concurrent calls.
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from google.rpc import code_pb2, status_pb2

from exporters.bounded_input import gunzip_limited as gunzip
from exporters.http_server import BoundedHttpServer, HttpLimits, serve_in_thread
from symbolizer.errors import ExportError, InputTooLarge
from viewer.ingest import InvalidRequest, ingest_profiles, ingest_traces
from viewer.store import Store

log = logging.getLogger(__name__)

TRACES_HTTP_PATH = "/v1/traces"
PROFILES_HTTP_PATHS = ("/v1development/profiles", "/v1/profiles")
TRACES_GRPC_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
PROFILES_GRPC_SERVICE = "opentelemetry.proto.collector.profiles.v1development.ProfilesService"
PROTOBUF = "application/x-protobuf"
GRPC_MAX_CONCURRENT_RPCS = 64  # calls running or waiting for one of the 4 workers
GRPC_MAX_IDLE_MS = 60_000  # a gRPC connection with no call for this long is sent GOAWAY
DRAIN_FACTOR = 8  # oversized bodies up to this many times the limit are read and dropped before the 413

Ingest = Callable[[Store, bytes], tuple]


class TooLarge(Exception):
    """The request, or what it decompresses to, is over the limit."""


def gunzip_limited(data: bytes, limit: int) -> bytes:
    """exporters.bounded_input.gunzip_limited in the receiver's terms: TooLarge (413) or InvalidRequest (400)."""
    try:
        return gunzip(data, limit)
    except InputTooLarge as e:
        raise TooLarge(str(e)) from None
    except ExportError as e:
        raise InvalidRequest(str(e)) from None


class _Counters:
    """Requests by outcome, for `serve`'s status line and the tests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, name: str) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1


# --- gRPC ---------------------------------------------------------------------------


def _grpc_handler(store: Store, ingest: Ingest, kind: str, counters: _Counters):  # noqa: ANN202
    def export(data: bytes, context: grpc.ServicerContext):  # noqa: ANN202
        try:
            result, response = ingest(store, data)
        except InvalidRequest as e:
            counters.add(f"{kind}.invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except sqlite3.Error as e:
            counters.add(f"{kind}.store_failed")
            log.warning("storing %s failed: %s", kind, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store failed: {e}")
        counters.add(f"{kind}.ok")
        return response

    # Raw bytes in (no deserializer): ingest parses, as for HTTP.
    return grpc.unary_unary_rpc_method_handler(export, request_deserializer=None,
                                               response_serializer=lambda m: m.SerializeToString())


def start_grpc(store: Store, host: str, port: int, max_bytes: int, counters: _Counters) -> tuple[grpc.Server, int]:
    """A started gRPC server and its port. Messages over `max_bytes` get RESOURCE_EXHAUSTED from grpc itself."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"),
                         maximum_concurrent_rpcs=GRPC_MAX_CONCURRENT_RPCS,  # past it: RESOURCE_EXHAUSTED
                         options=[("grpc.max_receive_message_length", max_bytes),
                                  ("grpc.max_connection_idle_ms", GRPC_MAX_IDLE_MS)])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(TRACES_GRPC_SERVICE, {
            "Export": _grpc_handler(store, ingest_traces, "traces", counters)}),
        grpc.method_handlers_generic_handler(PROFILES_GRPC_SERVICE, {
            "Export": _grpc_handler(store, ingest_profiles, "profiles", counters)}),
    ))
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port} (gRPC)")
    server.start()
    return server, bound


# --- HTTP -----------------------------------------------------------------------------


def _status_body(code: int, message: str) -> bytes:
    return status_pb2.Status(code=code, message=message).SerializeToString()


def make_http_handler(store: Store, max_bytes: int, counters: _Counters) -> type[http.server.BaseHTTPRequestHandler]:
    routes: dict[str, tuple[str, Ingest]] = {TRACES_HTTP_PATH: ("traces", ingest_traces)}
    routes.update({p: ("profiles", ingest_profiles) for p in PROFILES_HTTP_PATHS})

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "bpfprof-serve"

        def _answer(self, status: int, body: bytes, close: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", PROTOBUF)
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def _fail(self, status: int, code: int, message: str, close: bool = False) -> None:
            self._answer(status, _status_body(code, message), close)

        def do_POST(self) -> None:  # noqa: N802  (BaseHTTPRequestHandler's name)
            path = self.path.split("?", 1)[0]
            route = routes.get(path)
            if route is None:
                self._fail(404, code_pb2.NOT_FOUND, f"no OTLP endpoint at {path}: use {TRACES_HTTP_PATH} "
                           f"or {PROFILES_HTTP_PATHS[0]}", close=True)
                return
            kind, ingest = route
            ctype = self.headers.get("Content-Type", PROTOBUF).split(";")[0].strip().lower()
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._fail(411, code_pb2.INVALID_ARGUMENT, "Content-Length is required", close=True)
                return
            if int(length) > max_bytes:
                counters.add(f"{kind}.too_large")
                # Drain (not keep) a moderately large body so the client reads our 413 instead of a
                # broken pipe; past DRAIN_FACTOR x the limit, just close.
                if int(length) <= DRAIN_FACTOR * max_bytes:
                    left = int(length)
                    while left > 0:
                        chunk = self.rfile.read(min(left, 1 << 16))
                        if not chunk:
                            break
                        left -= len(chunk)
                self._fail(413, code_pb2.RESOURCE_EXHAUSTED, f"body of {length} bytes is over the "
                           f"{max_bytes}-byte limit", close=True)
                return
            body = self.rfile.read(int(length))
            if ctype != PROTOBUF:
                counters.add(f"{kind}.invalid")
                self._fail(415, code_pb2.INVALID_ARGUMENT, f"Content-Type {ctype!r} is not supported: "
                           f"send {PROTOBUF}")
                return
            try:
                encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding == "gzip":
                    body = gunzip_limited(body, max_bytes)
                elif encoding not in ("", "identity"):
                    raise InvalidRequest(f"Content-Encoding {encoding!r} is not supported: use gzip or none")
                _, response = ingest(store, body)
            except TooLarge as e:
                counters.add(f"{kind}.too_large")
                self._fail(413, code_pb2.RESOURCE_EXHAUSTED, str(e))
                return
            except InvalidRequest as e:
                counters.add(f"{kind}.invalid")
                self._fail(400, code_pb2.INVALID_ARGUMENT, str(e))
                return
            except sqlite3.Error as e:
                counters.add(f"{kind}.store_failed")
                log.warning("storing %s failed: %s", kind, e)
                self._fail(503, code_pb2.UNAVAILABLE, f"store failed: {e}")
                return
            counters.add(f"{kind}.ok")
            self._answer(200, response.SerializeToString())

        def do_GET(self) -> None:  # noqa: N802
            self._fail(405, code_pb2.UNIMPLEMENTED, "OTLP/HTTP takes POST", close=True)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("otlp-http: " + fmt, *args)

    return Handler


def start_http(handler: type[http.server.BaseHTTPRequestHandler], host: str, port: int, name: str,
               limits: HttpLimits) -> BoundedHttpServer:
    """An HTTP server within `limits` serving on its own thread (IPv6 hosts included); OSError if it cannot bind."""
    return serve_in_thread(handler, host, port, limits, name)


class OtlpReceiver:
    """Both OTLP receivers writing into one store: `start()`, then the ports, then `stop()`."""

    def __init__(self, store: Store, grpc_addr: tuple[str, int], http_addr: tuple[str, int], max_bytes: int,
                 limits: HttpLimits | None = None) -> None:
        self.store = store
        self.grpc_addr, self.http_addr, self.max_bytes = grpc_addr, http_addr, max_bytes
        # Bodies up to the request limit are held (a few at once), larger ones drained for the 413.
        self.limits = dataclasses.replace(limits or HttpLimits(), max_body_bytes=max_bytes,
                                          drain_body_bytes=DRAIN_FACTOR * max_bytes,
                                          max_buffered_bytes=4 * max_bytes)
        self.counters = _Counters()
        self._grpc: grpc.Server | None = None
        self.http: BoundedHttpServer | None = None
        self.grpc_port = self.http_port = 0

    def start(self) -> None:
        """Raises OSError when an address cannot be bound."""
        self._grpc, self.grpc_port = start_grpc(self.store, *self.grpc_addr, self.max_bytes, self.counters)
        try:
            self.http = start_http(make_http_handler(self.store, self.max_bytes, self.counters),
                                   *self.http_addr, name="otlp-http", limits=self.limits)
        except OSError:
            self._grpc.stop(grace=None)
            raise
        self.http_port = self.http.port

    def stop(self, grace_s: float = 2.0) -> None:
        """Finish requests in flight (up to `grace_s`), then close."""
        if self.http is not None:
            self.http.close()
        if self._grpc is not None:
            self._grpc.stop(grace=grace_s).wait()
