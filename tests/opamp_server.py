"""A loopback OpAMP server for the tests, on the protocol's own protobufs (opentelemetry-opamp-client's opamp.proto).

Run as a process: `python tests/opamp_server.py [--cert PEM --key PEM]`
listens on 127.0.0.1 (a free port; TLS with a cert) and prints `PORT <n>`
on stdout. OpAMP over HTTP at /v1/opamp;
the tests steer it and read what agents reported through /control/:

    POST /control/offer?type=text/yaml   body: the remote config to offer every agent (empty: none)
    POST /control/offer?withdraw=1        offer an empty config map: "no remote config" (the local one)
    POST /control/mode?mode=M[&delay_s=S]  normal | garbage (200, not protobuf) | unavailable (503,
                                           Retry-After: 1) | server_error (ServerErrorResponse) | slow
                                           (answers after delay_s)
    GET  /control/state                   JSON: per instance uid what it last reported

`OpampServer` starts the process and wraps the control calls.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

from google.protobuf.message import DecodeError
from opentelemetry._opamp.proto import opamp_pb2

MAX_BODY_BYTES = 4 << 20


def _value(v: object) -> object:
    kind = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, kind) if kind else None


class State:
    """What agents reported, and what the server offers and how it behaves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.agents: dict[str, dict] = {}
        self.offer: opamp_pb2.AgentRemoteConfig | None = None
        self.mode = "normal"
        self.delay_s = 0.0

    def record(self, msg: opamp_pb2.AgentToServer, authorization: str) -> None:
        uid = str(uuid.UUID(bytes=msg.instance_uid)) if len(msg.instance_uid) == 16 else msg.instance_uid.hex()
        with self.lock:
            a = self.agents.setdefault(uid, {"messages": 0, "full_states": 0, "sequence": [], "statuses": []})
            a["messages"] += 1
            a["authorization"] = authorization
            a["sequence"].append(msg.sequence_num)
            a["capabilities"] = msg.capabilities
            if msg.HasField("agent_description"):
                a["full_states"] += 1
                d = msg.agent_description
                a["identifying"] = {kv.key: _value(kv.value) for kv in d.identifying_attributes}
                a["non_identifying"] = {kv.key: _value(kv.value) for kv in d.non_identifying_attributes}
            if msg.HasField("health"):
                h = msg.health
                a["health"] = {"healthy": h.healthy, "status": h.status, "last_error": h.last_error}
            if msg.HasField("effective_config"):
                a["effective_config"] = {k: f.body.decode() for k, f in msg.effective_config.config_map.config_map.items()}
            if msg.HasField("remote_config_status"):
                s = msg.remote_config_status
                status = {"hash": s.last_remote_config_hash.hex(),
                          "status": opamp_pb2.RemoteConfigStatuses.Name(s.status).split("_")[-1],
                          "error": s.error_message}
                a["remote_config_status"] = status
                a["statuses"].append(status)
            a["disconnected"] = msg.HasField("agent_disconnect")


STATE = State()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(min(n, MAX_BODY_BYTES))

    def _reply(self, code: int, body: bytes, ctype: str = "application/x-protobuf", extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        if urlsplit(self.path).path == "/control/state":
            with STATE.lock:
                body = json.dumps({"agents": STATE.agents, "mode": STATE.mode}).encode()
            self._reply(200, body, "application/json")
        else:
            self._reply(404, b"")

    def do_POST(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        body = self._body()
        if parts.path == "/control/offer":
            with STATE.lock:
                if query.get("withdraw"):
                    STATE.offer = opamp_pb2.AgentRemoteConfig(config_hash=hashlib.sha256(b"").digest())
                elif body:
                    rc = opamp_pb2.AgentRemoteConfig(config_hash=hashlib.sha256(body).digest())
                    rc.config.config_map[query.get("name", "")].CopyFrom(
                        opamp_pb2.AgentConfigFile(body=body, content_type=query.get("type", "text/yaml")))
                    STATE.offer = rc
                else:
                    STATE.offer = None
                offered = STATE.offer.config_hash.hex() if STATE.offer else ""
            self._reply(200, offered.encode(), "text/plain")
        elif parts.path == "/control/mode":
            with STATE.lock:
                STATE.mode = query.get("mode", "normal")
                STATE.delay_s = float(query.get("delay_s", "0"))
            self._reply(200, b"ok", "text/plain")
        elif parts.path == "/v1/opamp":
            self._opamp(body)
        else:
            self._reply(404, b"")

    def _opamp(self, body: bytes) -> None:
        msg = opamp_pb2.AgentToServer()
        try:
            msg.ParseFromString(body)
        except DecodeError:
            self._reply(400, b"not an AgentToServer")
            return
        STATE.record(msg, self.headers.get("Authorization", ""))
        with STATE.lock:
            mode, delay_s, offer = STATE.mode, STATE.delay_s, STATE.offer
        if mode == "slow":
            time.sleep(delay_s)
        if mode == "garbage":
            self._reply(200, b"\x0a\xff\xff\xff\xff\x0fthis is not protobuf")
            return
        if mode == "unavailable":
            self._reply(503, b"", "text/plain", {"Retry-After": "1"})
            return
        answer = opamp_pb2.ServerToAgent(instance_uid=msg.instance_uid,
                                         capabilities=opamp_pb2.ServerCapabilities_AcceptsStatus
                                         | opamp_pb2.ServerCapabilities_OffersRemoteConfig
                                         | opamp_pb2.ServerCapabilities_AcceptsEffectiveConfig)
        if mode == "server_error":
            answer.error_response.type = opamp_pb2.ServerErrorResponseType_Unavailable
            answer.error_response.error_message = "try later"
            answer.error_response.retry_info.retry_after_nanoseconds = 2_000_000_000
        elif offer is not None:
            answer.remote_config.CopyFrom(offer)
        self._reply(200, answer.SerializeToString())

    def log_message(self, *args: object) -> None:
        pass


class OpampServer:
    """The server as a child process; a context manager. `endpoint` is its /v1/opamp URL."""

    def __init__(self, cert: str | None = None, key: str | None = None) -> None:
        tls = ["--cert", cert, "--key", key] if cert and key else []
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *tls], stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"opamp test server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/v1/opamp"

    def _call(self, method: str, path: str, body: bytes = b"") -> bytes:
        if self.endpoint.startswith("https"):
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=10, context=ssl._create_unverified_context())  # noqa: S323
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.read()
        finally:
            conn.close()

    def offer(self, text: str, content_type: str = "text/yaml", name: str = "") -> str:
        """Offer `text` as the remote config (\"\" withdraws it); returns its hash in hex."""
        return self._call("POST", f"/control/offer?type={content_type}&name={name}", text.encode()).decode()

    def withdraw(self) -> str:
        """Offer an empty remote config (the agent goes back to its local file); returns its hash in hex."""
        return self._call("POST", "/control/offer?withdraw=1").decode()

    def mode(self, mode: str, delay_s: float = 0.0) -> None:
        self._call("POST", f"/control/mode?mode={mode}&delay_s={delay_s}")

    def state(self) -> dict:
        return json.loads(self._call("GET", "/control/state"))["agents"]

    def agent(self) -> dict:
        """The one agent that reported (AssertionError if not exactly one)."""
        agents = self.state()
        assert len(agents) == 1, agents
        return next(iter(agents.values()))

    def wait_for(self, predicate, timeout_s: float = 30.0) -> dict:  # noqa: ANN001
        """Poll the state until `predicate(agent)` holds; the agent's state (AssertionError at the timeout)."""
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            agents = self.state()
            for a in agents.values():
                last = a
                if predicate(a):
                    return a
            time.sleep(0.1)
        raise AssertionError(f"not reached in {timeout_s}s; last state {json.dumps(last)[:2000]}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> OpampServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--key", help="PEM private key of --cert")
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
