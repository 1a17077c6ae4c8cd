"""Send OTLP profiles requests: gRPC `ProfilesService/Export` or HTTP `POST /v1development/profiles`.

The exporter contract (as opentelemetry-python's span exporters):
`export(request) -> ExportResult`, `shutdown(timeout_s)`, `force_flush()`.
`export` never raises for a delivery problem: it returns FAILURE with a
message naming the endpoint and the reason, after retrying what is worth
retrying. Misconfiguration (bad URL, unreadable CA file, bad header) raises
ConfigError when the exporter is built, before any capture.

Endpoint URL -> protocol, target and TLS (`resolve_endpoint`):

    http://host:4318[/path]    HTTP, plaintext   (path empty or "/": /v1development/profiles)
    https://host:4318[/path]   HTTP, TLS
    grpc://host:4317           gRPC, plaintext
    grpcs://host:4317          gRPC, TLS
    host:4317                  gRPC, TLS unless insecure=True (OTEL_EXPORTER_OTLP_INSECURE's rule)

An explicit `protocol` overrides the scheme's choice: `--otlp-protocol grpc`
with http://host:4317 is plaintext gRPC to host:4317. Missing ports default
to 4317 (gRPC) and 4318 (HTTP). `ca_file` is a PEM bundle to verify the
server with (system roots otherwise).

HTTP goes through the standard library's http.client: one POST per attempt
needs no connection pool or session, and an agent that runs as root on
every host is better off without another dependency for it. A socket
timeout bounds each read, not the whole answer (a collector that sends its
headers, then a byte a second, would hold an export for ever), so a
watchdog shuts the attempt's socket down at its deadline: connect, send and
the whole response all fit in what remains of `timeout_s`. gRPC's own
deadline does the same for gRPC.

Retry-After (seconds or an HTTP date) and gRPC RetryInfo are obeyed up to
`max_retry_after_s`, even past `timeout_s`: an export that may not wait
that long inside its deadline fails with the hint in its result
(`ExportResult.retry_after_s`), and the caller's queue waits it out.
"""

from __future__ import annotations

import email.utils
import enum
import gzip
import http.client
import os
import random
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)

from symbolizer.errors import ConfigError

DEFAULT_GRPC_PORT = 4317
DEFAULT_HTTP_PORT = 4318
HTTP_PATH = "/v1development/profiles"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRY_AFTER_S = 300.0  # a server's Retry-After/RetryInfo is obeyed up to this
# An ExportProfilesServiceResponse is a few bytes (a partial success message at most); more is not read.
MAX_RESPONSE_BYTES = 1 << 20
USER_AGENT = "bpfprof-otlp-exporter/0.1"

# grpc's status details trailer: a serialized google.rpc.Status whose details may hold a RetryInfo.
_GRPC_STATUS_DETAILS = "grpc-status-details-bin"


class Protocol(enum.StrEnum):
    GRPC = "grpc"
    HTTP = "http"


class ExportStatus(enum.StrEnum):
    SUCCESS = "success"
    PARTIAL_SUCCESS = "partial_success"  # accepted, but the server rejected `rejected_profiles`
    FAILURE = "failure"


@dataclass(frozen=True)
class ExportResult:
    """What became of one export. `message` is for users: the server's or ours."""

    status: ExportStatus
    message: str = ""
    rejected_profiles: int = 0
    attempts: int = 0
    retryable: bool = True  # False: the server refused this request for good (bad request, auth)
    retry_after_s: float | None = None  # FAILURE: the server asked to wait this long (capped) before a retry
    timed_out_attempts: int = 0  # attempts that got no complete answer within their deadline

    @property
    def ok(self) -> bool:
        """True when the server took the request (partial success included)."""
        return self.status != ExportStatus.FAILURE


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: `target` is host:port for gRPC, the full URL for HTTP."""

    protocol: Protocol
    target: str
    secure: bool

    def __str__(self) -> str:
        if self.protocol == Protocol.HTTP:
            return self.target
        return f"{'grpcs' if self.secure else 'grpc'}://{self.target}"


def resolve_endpoint(url: str, protocol: str | None = None, insecure: bool = False) -> Endpoint:
    """Protocol, target and TLS from an endpoint URL (the table in the module docstring).

    Raises ConfigError for a URL that names no host or has an unknown scheme.
    """
    if protocol is not None and protocol not in Protocol.__members__.values():
        raise ConfigError(f"OTLP protocol {protocol!r} is unknown: use grpc or http")
    has_scheme = "://" in url
    parts = urlsplit(url if has_scheme else f"//{url}")
    scheme = parts.scheme.lower()
    if scheme not in ("", "http", "https", "grpc", "grpcs"):
        raise ConfigError(f"OTLP endpoint {url!r}: unknown scheme {scheme!r} (use http, https, grpc, grpcs)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ConfigError(f"OTLP endpoint {url!r}: {e}") from None
    if not host:
        raise ConfigError(f"OTLP endpoint {url!r} names no host")
    chosen = Protocol(protocol) if protocol else (Protocol.HTTP if scheme in ("http", "https") else Protocol.GRPC)
    secure = scheme in ("https", "grpcs") or (scheme == "" and not insecure)
    host_port = f"[{host}]" if ":" in host else host
    if chosen == Protocol.GRPC:
        return Endpoint(chosen, f"{host_port}:{port or DEFAULT_GRPC_PORT}", secure)
    path = parts.path if parts.path not in ("", "/") else HTTP_PATH
    query = f"?{parts.query}" if parts.query else ""
    return Endpoint(chosen, f"{'https' if secure else 'http'}://{host_port}:{port or DEFAULT_HTTP_PORT}{path}{query}",
                    secure)


def parse_headers(items: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE strings (as --otlp-header takes them) as a dict. Raises ConfigError."""
    headers = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"OTLP header {item!r} is not KEY=VALUE")
        headers[key.strip()] = value.strip()
    return headers


@dataclass(frozen=True)
class Attempt:
    """One try's outcome: a result, or a reason and whether (and when) to try again."""

    result: ExportResult | None = None
    reason: str = ""
    retryable: bool = False
    retry_after_s: float | None = None  # the server's hint (Retry-After, RetryInfo)
    timed_out: bool = False  # no complete answer within the attempt's deadline


class RetryPolicy:
    """Exponential backoff with jitter under one overall deadline, server hints first.

    A server hint (Retry-After, RetryInfo) is waited as given, up to
    `max_retry_after_s`; a hint of 0 gets the usual backoff (no hammering).
    A wait that would pass the deadline ends the run with FAILURE, the wait
    in `retry_after_s` when the server asked for it. `clock` (seconds,
    monotonic), `sleep(seconds) -> interrupted` and `jitter() -> factor` are
    injectable for tests; the exporter's sleep waits on its shutdown Event so
    shutdown() interrupts a backoff.
    """

    # Retryable per the OTLP spec; RESOURCE_EXHAUSTED only when the server sends RetryInfo.
    RETRYABLE_GRPC = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
                                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})
    RETRYABLE_HTTP = frozenset({429, 502, 503, 504})

    def __init__(self, initial_backoff_s: float = 1.0, max_backoff_s: float = 32.0, multiplier: float = 2.0,
                 max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None,
                 jitter: Callable[[], float] = lambda: random.uniform(0.8, 1.2)) -> None:
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.multiplier = multiplier
        self.max_retry_after_s = max_retry_after_s
        self.clock = clock
        self.sleep = sleep
        self.jitter = jitter

    def backoff_s(self, retry: int) -> float:
        """Delay before retry number `retry` (1-based), jitter applied."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * self.jitter()

    def run(self, attempt: Callable[[float], Attempt], deadline_s: float,
            sleep: Callable[[float], bool]) -> ExportResult:
        """Call `attempt(remaining_s)` until it gives a result, is not retryable, or time runs out."""
        sleep = self.sleep or sleep
        deadline = self.clock() + deadline_s
        n = timeouts = 0
        while True:
            n += 1
            out = attempt(max(deadline - self.clock(), 0.001))
            timeouts += out.timed_out
            if out.result is not None:
                return replace(out.result, attempts=n, timed_out_attempts=timeouts)
            if not out.retryable:
                return ExportResult(ExportStatus.FAILURE, f"{out.reason} (not retryable)", attempts=n,
                                    retryable=False, timed_out_attempts=timeouts)
            hint = None
            if out.retry_after_s is not None and out.retry_after_s > 0:
                hint = min(out.retry_after_s, self.max_retry_after_s)
            delay = hint if hint is not None else self.backoff_s(n)
            remaining = deadline - self.clock()
            if delay >= remaining:
                told = f"; the server asked to wait {hint:g}s" if hint is not None else ""
                return ExportResult(ExportStatus.FAILURE, f"{out.reason}; gave up after {n} attempt(s) "
                                    f"within the {deadline_s:g}s timeout{told}", attempts=n, retry_after_s=hint,
                                    timed_out_attempts=timeouts)
            if sleep(delay):
                return ExportResult(ExportStatus.FAILURE, f"{out.reason}; shut down while waiting to retry",
                                    attempts=n, timed_out_attempts=timeouts)


def _partial(response: ExportProfilesServiceResponse) -> ExportResult:
    ps = response.partial_success
    if response.HasField("partial_success") and (ps.rejected_profiles or ps.error_message):
        return ExportResult(ExportStatus.PARTIAL_SUCCESS, ps.error_message, rejected_profiles=ps.rejected_profiles)
    return ExportResult(ExportStatus.SUCCESS)


def _grpc_retry_info_s(error: grpc.RpcError) -> float | None:
    """The server's RetryInfo delay from the status details trailer, if any."""
    for key, value in error.trailing_metadata() or ():
        if key != _GRPC_STATUS_DETAILS:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.ToTimedelta().total_seconds()
    return None


MAX_CA_FILE_BYTES = 4 * 1024 * 1024  # a bundle of every public root is ~250 KB


def _read_ca(ca_file: str | None) -> bytes | None:
    """The CA bundle's bytes; ConfigError for an unreadable file, not a regular file (a FIFO would
    hang the reader) or one over MAX_CA_FILE_BYTES (/dev/zero)."""
    if ca_file is None:
        return None
    try:
        with open(ca_file, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"OTLP CA file {ca_file} is not a regular file")
            data = f.read(MAX_CA_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read OTLP CA file {ca_file}: {e.strerror}") from None
    if len(data) > MAX_CA_FILE_BYTES:
        raise ConfigError(f"OTLP CA file {ca_file} is larger than {MAX_CA_FILE_BYTES >> 20} MiB")
    return data


class _GrpcTransport:
    def __init__(self, endpoint: Endpoint, headers: dict[str, str], ca: bytes | None, compression: str | None):
        # grpc's own retries off: RetryPolicy is the only one.
        options = [("grpc.enable_retries", 0), ("grpc.primary_user_agent", USER_AGENT)]
        if endpoint.secure:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self._channel = grpc.secure_channel(endpoint.target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(endpoint.target, options=options)
        self._stub = profiles_service_pb2_grpc.ProfilesServiceStub(self._channel)
        self._metadata = [(k.lower(), v) for k, v in headers.items()]
        self._compression = grpc.Compression.Gzip if compression == "gzip" else grpc.Compression.NoCompression

    def send(self, request: ExportProfilesServiceRequest, timeout_s: float) -> Attempt:
        try:
            response = self._stub.Export(request, timeout=timeout_s, metadata=self._metadata,
                                         compression=self._compression)
        except grpc.RpcError as e:
            code = e.code()
            reason = f"gRPC {code.name}: {e.details()}"
            hint = _grpc_retry_info_s(e)
            retryable = code in RetryPolicy.RETRYABLE_GRPC or (
                code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None)
            return Attempt(reason=reason, retryable=retryable, retry_after_s=hint,
                           timed_out=code == grpc.StatusCode.DEADLINE_EXCEEDED)
        return Attempt(result=_partial(response))

    def close(self) -> None:
        self._channel.close()


def retry_after_s(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


def _http_error_message(status: int, reason: str, body: bytes) -> str:
    """The server's google.rpc.Status message if the body is one, else its text (trimmed)."""
    text = ""
    if body:
        st = status_pb2.Status()
        try:
            st.ParseFromString(body)
            text = st.message
        except DecodeError:
            pass
        if not text:
            text = body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status} {reason}" + (f": {text}" if text else "")


def _abort(conn: http.client.HTTPConnection) -> None:
    """Shut an attempt's socket down from another thread: a read or write blocked on it returns at once."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected yet, or closed already


@dataclass(frozen=True)
class HttpReply:
    """A complete HTTP answer: status, reason, the body (at most the poster's cap) and its Retry-After."""

    status: int
    reason: str
    body: bytes
    retry_after: str | None


class HttpPoster:
    """POSTs bytes to one URL, each POST bounded end to end: connect, send and the whole answer fit in
    its `timeout_s` (a watchdog shuts the socket down at the deadline). Shared by the OTLP/HTTP
    exporter and the OpAMP client. Thread-safe; close() aborts the POSTs in flight."""

    def __init__(self, url: str, headers: dict[str, str], ca: bytes | None, gzip_body: bool = False,
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "", parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._context = None
        if parts.scheme == "https":
            self._context = ssl.create_default_context(cadata=ca.decode() if ca else None)
        self._gzip = gzip_body
        self._max_response_bytes = max_response_bytes
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": USER_AGENT, **headers}
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()  # attempts in flight, aborted by close()
        self._closed = False

    def post(self, body: bytes, timeout_s: float) -> HttpReply | Attempt:
        """The server's complete answer, or an Attempt saying why there is none (and whether to retry)."""
        if self._gzip:
            body = gzip.compress(body, compresslevel=6)
        if self._context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout_s, context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _abort(conn)

        with self._lock:
            if self._closed:
                return Attempt(reason="exporter is shut down")
            self._open.add(conn)
        watchdog = threading.Timer(timeout_s, expire)
        watchdog.daemon = True
        watchdog.start()
        timed_out = Attempt(reason=f"no complete response within {timeout_s:.3g}s", retryable=True, timed_out=True)
        aborted = Attempt(reason="shut down during the attempt", retryable=True)  # kept, for shutdown to count
        try:
            conn.connect()
            if expired.is_set():  # connected after the watchdog looked for a socket to shut
                return timed_out
            conn.request("POST", self._path, body=body, headers=self._headers)
            resp = conn.getresponse()
            data = resp.read(self._max_response_bytes)
        except ssl.SSLError as e:
            if expired.is_set() or self._closed:
                return timed_out if expired.is_set() else aborted
            return Attempt(reason=f"TLS: {e.reason or e}")
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or isinstance(e, TimeoutError):
                return timed_out
            if self._closed:
                return aborted
            # Connection refused/reset: the server may be restarting.
            return Attempt(reason=f"{type(e).__name__}: {e}", retryable=True)
        finally:
            watchdog.cancel()
            with self._lock:
                self._open.discard(conn)
            conn.close()
        if expired.is_set():  # the shut socket ended the body early: what was read is not the answer
            return timed_out
        if self._closed:
            return aborted
        if resp.length and len(data) < self._max_response_bytes:  # the server closed before its Content-Length
            return Attempt(reason=f"HTTP {resp.status}: the response was cut short", retryable=True)
        return HttpReply(resp.status, resp.reason, data, resp.getheader("Retry-After"))

    def close(self) -> None:
        """Refuse new attempts and abort those in flight (shutdown after the flush window)."""
        with self._lock:
            self._closed = True
            open_now = list(self._open)
        for conn in open_now:
            _abort(conn)


class _HttpTransport:
    def __init__(self, endpoint: Endpoint, headers: dict[str, str], ca: bytes | None, compression: str | None):
        self._poster = HttpPoster(endpoint.target, headers, ca, gzip_body=compression == "gzip")

    def send(self, request: ExportProfilesServiceRequest, timeout_s: float) -> Attempt:
        """One POST whose connect, send and whole response fit in `timeout_s` (the watchdog's deadline)."""
        reply = self._poster.post(request.SerializeToString(), timeout_s)
        if isinstance(reply, Attempt):
            return reply
        if 200 <= reply.status < 300:
            response = ExportProfilesServiceResponse()
            try:
                response.ParseFromString(reply.body)
            except DecodeError:
                return Attempt(result=ExportResult(ExportStatus.SUCCESS, "response body was not protobuf"))
            return Attempt(result=_partial(response))
        retryable = reply.status in RetryPolicy.RETRYABLE_HTTP
        return Attempt(reason=_http_error_message(reply.status, reply.reason, reply.body), retryable=retryable,
                       retry_after_s=retry_after_s(reply.retry_after) if retryable else None)

    def close(self) -> None:
        self._poster.close()


class OtlpExporter:
    """Exports OTLP profiles requests to one endpoint, synchronously, with retries.

    `timeout_s` bounds one export, retries included; each attempt gets what
    remains of it, connect to the last byte of the answer. A server's
    Retry-After is obeyed up to `max_retry_after_s` (past the deadline: in
    the FAILURE result, for the caller to wait). `headers` go as gRPC
    metadata or HTTP headers (auth tokens).
    `compression` is "gzip" or None. Thread-safe: export() may be called from
    several threads; shutdown() interrupts a backoff wait and makes later
    exports fail at once.
    """

    def __init__(self, endpoint: str, protocol: str | None = None, headers: dict[str, str] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, insecure: bool = False, ca_file: str | None = None,
                 compression: str | None = "gzip", retry: RetryPolicy | None = None,
                 max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S) -> None:
        if not 0 < timeout_s < float("inf"):
            raise ConfigError(f"OTLP timeout must be positive and finite, got {timeout_s:g}s")
        if not 0 <= max_retry_after_s < float("inf"):
            raise ConfigError(f"OTLP max Retry-After must be >= 0 and finite, got {max_retry_after_s:g}s")
        if compression not in ("gzip", None):
            raise ConfigError(f"OTLP compression {compression!r} is unknown: use gzip or none")
        self.endpoint = resolve_endpoint(endpoint, protocol, insecure)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy(max_retry_after_s=max_retry_after_s)
        self._shutdown = threading.Event()
        transport = _GrpcTransport if self.endpoint.protocol == Protocol.GRPC else _HttpTransport
        self._transport = transport(self.endpoint, dict(headers or {}), _read_ca(ca_file), compression)

    def export(self, request: ExportProfilesServiceRequest) -> ExportResult:
        """Send one request; FAILURE (never an exception) when it cannot be delivered."""
        if self._shutdown.is_set():
            return ExportResult(ExportStatus.FAILURE, f"{self.endpoint}: exporter is shut down")
        result = self.retry.run(lambda t: self._transport.send(request, t), self.timeout_s, self._shutdown.wait)
        if result.status == ExportStatus.FAILURE:
            return replace(result, message=f"{self.endpoint}: {result.message}")
        return result

    def force_flush(self, timeout_s: float | None = None) -> bool:
        """Nothing is buffered here (export is synchronous): always True."""
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Interrupt any backoff wait and any attempt in flight, refuse later exports, close the channel."""
        self._shutdown.set()
        self._transport.close()


class InMemoryOtlpExporter:
    """Keeps every exported request; answers with scripted results, then SUCCESS. For tests."""

    def __init__(self, results: Iterable[ExportResult] = ()) -> None:
        self.requests: list[ExportProfilesServiceRequest] = []
        self._results = list(results)
        self._lock = threading.Lock()
        self.is_shutdown = False

    def export(self, request: ExportProfilesServiceRequest) -> ExportResult:
        with self._lock:
            if self.is_shutdown:
                return ExportResult(ExportStatus.FAILURE, "exporter is shut down")
            copy = ExportProfilesServiceRequest()
            copy.CopyFrom(request)
            self.requests.append(copy)
            result = self._results.pop(0) if self._results else ExportResult(ExportStatus.SUCCESS)
            return replace(result, attempts=result.attempts or 1)

    def force_flush(self, timeout_s: float | None = None) -> bool:
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.is_shutdown = True
