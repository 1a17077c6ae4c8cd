"""Bounded HTTP/1.1 serving: the agent's /metrics and `bpfprof serve`'s OTLP/HTTP receiver and web UI.

http.server's ThreadingHTTPServer gives every connection a thread for its
whole life and reads without a deadline: 400 idle clients are 400 threads
(and their stacks), a client that sends a byte a second holds one for ever,
and a client that leaves mid-answer prints a traceback. Here one asyncio
loop, on one thread, holds every connection while it is idle or sending its
request, under deadlines; only a request read whole goes to a small pool of
worker threads, which run the unchanged BaseHTTPRequestHandler subclass over
in-memory files (so handlers stay plain http.server code). Bounds, HttpLimits:

    max_connections    open at once. At the cap a new client evicts the
                       longest-idle connection; if none is idle (all are
                       mid-request) it gets 503 and is closed. Counted.
    idle_timeout_s     waiting for a request's first byte (keep-alive too);
                       then the connection is closed quietly
    request_timeout_s  from that first byte to the last of head and body;
                       then 408 and closed
    write_timeout_s    for the client to take the answer
    max_head_bytes     request line and headers; past it 431 and closed
    max_body_bytes     a larger body is not kept: the handler sees the
                       headers alone (and answers 413), then the connection
                       closes; bodies up to drain_body_bytes are read and
                       thrown away first, so the client reads that answer
    max_buffered_bytes bodies held at once, all connections together
    workers            handler threads

A client that leaves, stalls or sends garbage is a counter
(HttpServerStats) and a debug line, never a traceback. This lives in
exporters/ because both the agent (its metrics endpoint, a Prometheus
exporter) and the viewer serve through it, and exporters is the package
both may import.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


@dataclass(frozen=True)
class HttpLimits:
    """What one server allows (module docstring). The defaults suit a loopback endpoint."""

    max_connections: int = 256
    workers: int = 4
    idle_timeout_s: float = 30.0
    request_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    max_head_bytes: int = 64 << 10
    max_body_bytes: int = 1 << 20
    drain_body_bytes: int = 0
    max_buffered_bytes: int = 64 << 20


@dataclass
class HttpServerStats:
    """Connections and requests by outcome; `open` is a gauge, the rest only grow."""

    accepted: int = 0
    requests: int = 0
    open: int = 0
    refused: int = 0  # at max_connections with none idle: 503
    evicted_idle: int = 0  # idle connections closed to make room for a new client
    idle_closed: int = 0  # no request within idle_timeout_s
    timed_out: int = 0  # a request or an answer not done within its deadline
    client_gone: int = 0  # the client closed or reset the connection mid-request or mid-answer
    bad_requests: int = 0  # a head too long or not HTTP
    handler_errors: int = 0  # a handler raised (a bug): 500


def _plain(status: str, text: str) -> bytes:
    body = text.encode() + b"\n"
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


_REFUSED = _plain("503 Service Unavailable", "too many connections").replace(
    b"Connection: close\r\n", b"Connection: close\r\nRetry-After: 1\r\n")
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")


class _Closed(Exception):
    """The connection is done (the client left, or it is being closed); nothing more to say on it."""


@dataclass
class _Head:
    raw: bytes
    method: bytes
    version: bytes
    length: int | None  # Content-Length; None when absent
    unreadable_body: bool  # chunked, a bad Content-Length, or a body method without one: not read, then close
    expect_continue: bool


def _parse_head(raw: bytes) -> _Head:
    lines = raw.split(b"\r\n")
    words = lines[0].split()
    method = words[0].upper() if words else b""
    version = words[2] if len(words) == 3 else b"HTTP/0.9"
    length: int | None = None
    unreadable = expect = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if value.isdigit():
                length = int(value)
            else:
                unreadable = True
        elif name == b"transfer-encoding":
            unreadable = True
        elif name == b"expect" and value.lower() == b"100-continue":
            expect = True
    if length is None and method in _BODY_METHODS:
        unreadable = True
    return _Head(raw, method, version, length, unreadable, expect)


def _finish(writer: asyncio.StreamWriter) -> None:
    """Close a connection: gracefully if what we wrote has left, else at once (a client not reading)."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


class BoundedHttpServer:
    """Serve `handler` (a BaseHTTPRequestHandler subclass) on host:port within `limits`.

    The constructor binds (OSError if it cannot); start() begins serving on
    a thread of its own; close() stops it, closing every connection.
    `server_address` is (host, port) as bound (port 0 picks one).
    """

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], host: str, port: int,
                 limits: HttpLimits | None = None, name: str = "http") -> None:
        self.handler = handler
        self.limits = limits or HttpLimits()
        self.name = name
        self.stats = HttpServerStats()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=128)
        self.server_address: tuple[str, int] = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix=f"{name}-worker")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._conns: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._idle: dict[asyncio.Task, float] = {}  # connections waiting for a request -> since (monotonic)
        self._buffered = 0
        self._budget: asyncio.Condition | None = None
        self._server: asyncio.Server | None = None
        self._started = threading.Event()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def close(self) -> None:
        """Stop accepting, close every connection, wait for the loop's thread (idempotent)."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
            self._thread.join(timeout=10)
        elif not self._loop.is_closed():
            self._sock.close()
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(lambda _loop, ctx: log.debug("%s: %s", self.name, ctx.get("message")))
        try:
            self._loop.run_until_complete(self._begin())
            self._started.set()
            self._loop.run_forever()
        finally:
            self._started.set()
            self._loop.close()

    async def _begin(self) -> None:
        self._budget = asyncio.Condition()
        self._server = await asyncio.start_server(self._connection, sock=self._sock,
                                                  limit=self.limits.max_head_bytes)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=5)
        self._loop.stop()

    # -- one connection --------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        st = self.stats
        st.accepted += 1
        if len(self._conns) >= self.limits.max_connections and not self._evict_idle():
            st.refused += 1
            log.debug("%s: %d connections open, refused one", self.name, len(self._conns))
            writer.write(_REFUSED)
            _finish(writer)
            return
        self._conns[task] = writer
        st.open = len(self._conns)
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            await self._serve(reader, writer, task, peer)
        except _Closed:
            pass
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            st.client_gone += 1
            log.debug("%s: %s left: %s", self.name, peer[0], type(e).__name__)
        except asyncio.CancelledError:
            pass  # close()
        except Exception:  # noqa: BLE001  (one connection must never end the server)
            log.debug("%s: connection from %s failed", self.name, peer[0], exc_info=True)
        finally:
            self._idle.pop(task, None)
            self._conns.pop(task, None)
            st.open = len(self._conns)
            _finish(writer)

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection to make room; False if every connection is mid-request."""
        if not self._idle:
            return False
        victim = min(self._idle, key=self._idle.__getitem__)
        del self._idle[victim]
        self.stats.evicted_idle += 1
        self._conns[victim].transport.abort()  # its read sees the end of the stream
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task,
                     peer: tuple) -> None:
        lim, st = self.limits, self.stats
        while True:
            self._idle[task] = time.monotonic()
            try:
                async with asyncio.timeout(lim.idle_timeout_s):
                    first = await reader.read(1)
            except TimeoutError:
                st.idle_closed += 1
                raise _Closed from None
            finally:
                evicted = task not in self._idle
                self._idle.pop(task, None)
            if not first or evicted:
                raise _Closed  # the client closed between requests, or we made room with it
            reserved = 0
            try:
                try:
                    async with asyncio.timeout(lim.request_timeout_s):
                        head, body, must_close, reserved = await self._read_request(first, reader, writer)
                except TimeoutError:
                    st.timed_out += 1
                    log.debug("%s: %s sent no whole request in %gs", self.name, peer[0], lim.request_timeout_s)
                    await self._say(writer, _plain("408 Request Timeout", "request not received in time"))
                    raise _Closed from None
                st.requests += 1
                answer, close = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._handle, head + body, peer)
            finally:
                if reserved:
                    await self._release(reserved)
            await self._say(writer, answer)
            if close or must_close:
                raise _Closed

    async def _read_request(self, first: bytes, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> tuple[bytes, bytes, bool, int]:
        """(head, body kept, close after answering, body bytes reserved) of one request."""
        lim = self.limits
        try:
            head = _parse_head(first + await reader.readuntil(b"\r\n\r\n"))
        except (asyncio.LimitOverrunError, ValueError):
            self.stats.bad_requests += 1
            await self._say(writer, _plain("431 Request Header Fields Too Large", "request head too long"))
            raise _Closed from None
        n = head.length or 0
        if head.unreadable_body:
            return head.raw, b"", True, 0  # a body we will not read: the handler answers, then we close
        if n <= lim.max_body_bytes:
            if n and head.expect_continue and head.version == b"HTTP/1.1":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            reserved = await self._reserve(n) if n else 0
            try:
                body = await reader.readexactly(n) if n else b""
            except BaseException:
                if reserved:
                    await self._release(reserved)
                raise
            return head.raw, body, False, reserved
        if n <= lim.drain_body_bytes:  # thrown away, so the client is reading when the 413 comes
            left = n
            while left:
                chunk = await reader.read(min(left, _CHUNK))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
        return head.raw, b"", True, 0

    async def _reserve(self, n: int) -> int:
        """Wait until `n` more body bytes fit in max_buffered_bytes (one body alone always fits)."""
        assert self._budget is not None
        async with self._budget:
            await self._budget.wait_for(lambda: self._buffered == 0 or
                                        self._buffered + n <= self.limits.max_buffered_bytes)
            self._buffered += n
        return n

    async def _release(self, n: int) -> None:
        assert self._budget is not None
        async with self._budget:
            self._buffered -= n
            self._budget.notify_all()

    async def _say(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        try:
            async with asyncio.timeout(self.limits.write_timeout_s):
                await writer.drain()
        except TimeoutError:
            self.stats.timed_out += 1
            raise _Closed from None

    # -- the handler, on a worker thread ----------------------------------------------------

    def _handle(self, raw: bytes, peer: tuple) -> tuple[bytes, bool]:
        """Run the handler over one whole request held in memory: (its answer, close after it?)."""
        h = self.handler.__new__(self.handler)
        h.server, h.client_address, h.request, h.connection = self, peer, None, None
        h.rfile, h.wfile = io.BytesIO(raw), io.BytesIO()
        h.close_connection = True
        h.handle_expect_100 = lambda: True  # answered (or not needed) before the body was read
        try:
            h.handle_one_request()
        except Exception:  # noqa: BLE001  (a handler bug: one 500, logged once with its traceback)
            self.stats.handler_errors += 1
            log.exception("%s: handler failed on %r", self.name, raw[:200])
            return _plain("500 Internal Server Error", "internal error"), True
        return h.wfile.getvalue(), bool(h.close_connection)


def serve_in_thread(handler: type[http.server.BaseHTTPRequestHandler], host: str, port: int,
                    limits: HttpLimits | None = None, name: str = "http") -> BoundedHttpServer:
    """A started BoundedHttpServer (OSError if the address cannot be bound)."""
    server = BoundedHttpServer(handler, host, port, limits, name)
    server.start()
    return server
