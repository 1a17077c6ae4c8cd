"""OpAMP client over HTTP: the agent's identity, health and effective config to a fleet server; remote configs back.

One thread exchanges an AgentToServer for a ServerToAgent (POST, protobuf)
every `opamp.heartbeat_interval_s`, at once when something it reports
changes. The first message, one after a failed exchange and one the server
asks for (ReportFullState) carry the full state: description, capabilities,
health, effective config, remote config status; the others only what
changed since the server last took it. A remote config is handed to the
daemon (take_offer), which validates and applies it through its reload path
and answers with report_remote_status (APPLIED, or FAILED with the key and
the reason). Server down, slow, or answering garbage: counted by outcome,
retried with exponential backoff and jitter (a server's Retry-After or
RetryInfo obeyed up to MAX_RETRY_AFTER_S), and profiling goes on untouched:
nothing here runs on the sampling thread.

Messages are opentelemetry-opamp-client's opamp.proto classes. Its client
is not used: it draws a new instance uid at every start (the spec's uid is
kept across restarts), builds no health, sends through `requests`, whose
timeout bounds each socket read rather than the whole exchange (a server
dripping a byte a second would hold it for ever), and its worker gives up a
message after a few retries without counting it. The exchange here is
exporters.otlp_sender.HttpPoster, with one deadline from connect to the
last byte. WebSocket: that package has no WebSocket transport and the
standard library has none either; over HTTP a remote config reaches the
agent within one heartbeat, which is what fleet rollouts need.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.metadata
import json
import logging
import os
import platform
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError, Message
from opentelemetry._opamp.proto import anyvalue_pb2, opamp_pb2

from agent.daemon.config import OpampConfig, parse_remote_config
from exporters.bounded_input import read_bounded
from exporters.otlp_sender import Attempt, HttpPoster, HttpReply, retry_after_s
from symbolizer.errors import BpfprofError, ConfigError

log = logging.getLogger(__name__)

CAPABILITIES = (opamp_pb2.AgentCapabilities_ReportsStatus | opamp_pb2.AgentCapabilities_AcceptsRemoteConfig
                | opamp_pb2.AgentCapabilities_ReportsEffectiveConfig | opamp_pb2.AgentCapabilities_ReportsHealth
                | opamp_pb2.AgentCapabilities_ReportsRemoteConfig | opamp_pb2.AgentCapabilities_ReportsHeartbeat)
USER_AGENT = "bpfprof-opamp/0.1"
INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0  # a server down for long is asked every five minutes
MAX_RETRY_AFTER_S = 600.0  # a server's Retry-After/RetryInfo is obeyed up to this
MAX_RESPONSE_BYTES = 2 << 20  # a ServerToAgent carries at most a config (config.MAX_CONFIG_BYTES) and a few fields
STOP_DISCONNECT_S = 2.0  # at shutdown, the AgentDisconnect may take this long
# Exchanges are at least this far apart, news or not: a server asking for the full state in every
# answer must not make the agent spin.
MIN_GAP_S = 0.5
EFFECTIVE_CONFIG_TYPE = "text/yaml"
YAML_TYPES = ("", "text/yaml", "application/yaml", "application/x-yaml", "text/x-yaml", "application/json",
              "text/json")
UID_FILE_MAX_BYTES = 256
REMOTE_FILE_MAX_BYTES = 8 << 20  # a kept remote config: one config (MAX_CONFIG_BYTES of YAML) as JSON


class Outcome(enum.StrEnum):
    """What became of one exchange (bpfprof_opamp_requests_total{outcome})."""

    OK = "ok"
    UNREACHABLE = "unreachable"  # refused, reset, TLS
    TIMEOUT = "timeout"  # no complete answer within opamp.timeout_s
    HTTP_ERROR = "http_error"  # a status other than 2xx
    BAD_RESPONSE = "bad_response"  # 2xx, but not a ServerToAgent
    SERVER_ERROR = "server_error"  # a ServerToAgent with error_response


class RemoteStatus(enum.StrEnum):
    APPLIED = "applied"
    FAILED = "failed"


_STATUS_PB = {RemoteStatus.APPLIED: opamp_pb2.RemoteConfigStatuses_APPLIED,
              RemoteStatus.FAILED: opamp_pb2.RemoteConfigStatuses_FAILED}


@dataclass(frozen=True)
class Health:
    """The agent's health as OpAMP reports it: healthy, or degraded with the reason."""

    healthy: bool
    reason: str = ""  # why not healthy ("" when healthy)
    start_time_unix_nano: int = 0

    @property
    def status(self) -> str:
        return "healthy" if self.healthy else "degraded"


@dataclass(frozen=True)
class RemoteOffer:
    """A remote config the server offered: its tree (config.parse_remote_config), or why it cannot be read."""

    config_hash: bytes
    tree: dict | None
    error: str = ""


@dataclass
class OpampStats:
    """Counters read by the metrics endpoint."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    remote_configs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RemoteStatus, 0))
    connected: bool = False  # the last exchange got a good answer
    failures_in_a_row: int = 0
    last_error: str = ""


# --- identity -------------------------------------------------------------------------


def uuid7(now_ms: int | None = None) -> bytes:
    """A UUIDv7 (RFC 9562: 48 bits of Unix milliseconds, then random), the instance uid OpAMP asks for."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return bytes(raw)


def load_instance_uid(path: str) -> bytes:
    """The uid kept in `path` (a UUID as text), else a new one written there (atomically, 0644).

    A file that cannot be read or holds no UUID is replaced with one log
    line; a directory that cannot be written leaves the uid for this run only.
    """
    try:
        text = read_bounded(path, UID_FILE_MAX_BYTES).decode("ascii").strip()
        return uuid.UUID(text).bytes
    except FileNotFoundError:
        pass
    except (OSError, ValueError, UnicodeDecodeError, BpfprofError) as e:
        log.warning("opamp: instance uid file %s unreadable (%s): making a new uid", path, e)
    uid = uuid7()
    save_instance_uid(path, uid)
    return uid


def save_instance_uid(path: str, uid: bytes) -> None:
    """Write `uid` to `path` atomically; a failure is logged and the uid lives for this run only."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{uuid.UUID(bytes=uid)}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("opamp: cannot keep the instance uid in %s (%s): it changes at the next start", path,
                    e.strerror)


def _any(value: str | int | bool) -> anyvalue_pb2.AnyValue:
    if isinstance(value, bool):
        return anyvalue_pb2.AnyValue(bool_value=value)
    if isinstance(value, int):
        return anyvalue_pb2.AnyValue(int_value=value)
    return anyvalue_pb2.AnyValue(string_value=value)


def _attributes(attrs: Mapping[str, str | int | bool]) -> list[anyvalue_pb2.KeyValue]:
    return [anyvalue_pb2.KeyValue(key=k, value=_any(v)) for k, v in attrs.items() if v != ""]


def agent_version() -> str:
    try:
        return importlib.metadata.version("bpfprof")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def describe_agent(uid: bytes, host_name: str, node_name: str) -> opamp_pb2.AgentDescription:
    """Identifying attributes (service.name bpfprof, its version, instance id) and where it runs."""
    identifying = {"service.name": "bpfprof", "service.version": agent_version(),
                   "service.instance.id": str(uuid.UUID(bytes=uid))}
    where = {"host.name": host_name, "os.type": "linux", "host.arch": platform.machine(),
             "os.version": platform.release(), "k8s.node.name": node_name, "process.pid": os.getpid()}
    return opamp_pb2.AgentDescription(identifying_attributes=_attributes(identifying),
                                      non_identifying_attributes=_attributes(where))


# --- remote configs ----------------------------------------------------------------------


def read_offer(remote: opamp_pb2.AgentRemoteConfig) -> RemoteOffer:
    """The config a server offers. Its map holds one file (YAML or JSON, any name); none at all means
    "no remote config" (the local one again)."""
    files = {name: f for name, f in remote.config.config_map.items() if f.body}
    h = remote.config_hash
    if not files:
        return RemoteOffer(h, {})
    if len(files) > 1:
        return RemoteOffer(h, None, f"remote config: expected one config file, got {len(files)} "
                                    f"({', '.join(sorted(files))})")
    ((name, f),) = files.items()
    if f.content_type.split(";")[0].strip().lower() not in YAML_TYPES:
        return RemoteOffer(h, None, f"remote config: {name or '(unnamed)'}: content type {f.content_type!r} "
                                    "is not YAML or JSON")
    try:
        return RemoteOffer(h, parse_remote_config(f.body))
    except ConfigError as e:
        return RemoteOffer(h, None, str(e))


def save_remote_config(path: str, offer: RemoteOffer, endpoint: str) -> None:
    """Keep the remote config just applied, from the server at `endpoint`, in `path` (JSON: the endpoint,
    the hash and the tree; atomically, 0600: it may carry export headers), so the next start runs it
    before the server answers; an empty one (the server's "no remote config") removes the file. A failure
    is logged: the config lives for this run."""
    if not path:
        return
    try:
        if not offer.tree:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"endpoint": endpoint, "config_hash": offer.config_hash.hex(), "config": offer.tree}, f)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as e:
        log.warning("opamp: cannot keep the remote config in %s (%s): the next start begins with the local one",
                    path, e)


def load_remote_config(path: str, endpoint: str) -> RemoteOffer | None:
    """The remote config kept by save_remote_config from the server at `endpoint`, or None (none kept, or
    one from another server: left for a start that reports there again; one unreadable is logged and
    removed, never half-used). The caller validates it against the local file like any offer."""
    if not path:
        return None
    try:
        data = json.loads(read_bounded(path, REMOTE_FILE_MAX_BYTES))
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not data["config"]:
            raise ValueError("not a kept remote config")
        if data.get("endpoint") != endpoint:
            log.info("opamp: the remote config kept in %s came from %s, not %s: starting with the local config",
                     path, data.get("endpoint"), endpoint)
            return None
        return RemoteOffer(bytes.fromhex(data.get("config_hash", "")), data["config"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError, BpfprofError) as e:
        log.warning("opamp: kept remote config %s unreadable (%s): removed; starting with the local config",
                    path, e)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


# --- the client ----------------------------------------------------------------------------


class OpampClient:
    """Talks to one OpAMP server on a thread of its own; see the module docstring.

    `poster` (tests) replaces the HTTP exchange: `post(body, timeout_s) ->
    HttpReply | Attempt`. `jitter() -> factor` is injectable too.
    """

    def __init__(self, cfg: OpampConfig, uid: bytes, host_name: str, node_name: str,
                 poster: HttpPoster | None = None, jitter: Callable[[], float] = lambda: random.uniform(0.8, 1.2)
                 ) -> None:
        self.cfg = cfg
        self.uid = uid
        self.host_name, self.node_name = host_name, node_name
        self.stats = OpampStats()
        self.jitter = jitter
        if poster is None:
            ca = None
            if cfg.ca_file:
                try:
                    with open(cfg.ca_file, "rb") as f:
                        ca = f.read(1 << 20)
                except OSError as e:
                    raise ConfigError(f"opamp.ca_file {cfg.ca_file}: {e.strerror}") from None
            poster = HttpPoster(cfg.endpoint, {"User-Agent": USER_AGENT, **cfg.headers}, ca,
                                max_response_bytes=MAX_RESPONSE_BYTES)
        self._poster = poster
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._full = True  # the next message carries the full state
        # What the agent reports now, and what the server last took (serialized), by AgentToServer field.
        self._current: dict[str, bytes] = {"agent_description": describe_agent(uid, host_name, node_name)
                                           .SerializeToString()}
        self._news: dict[str, bytes] = {}  # what makes a field news (a health's timestamp alone does not)
        self._taken: dict[str, bytes] = {}
        self._offer: RemoteOffer | None = None
        self._seen_hash: bytes | None = None  # the last remote config hash handed to the daemon
        self._backoff_until = 0.0
        self.last_delay_s = 0.0  # the last backoff chosen (tests)

    # --- what the daemon tells -----------------------------------------------------------

    def set_health(self, health: Health) -> None:
        msg = opamp_pb2.ComponentHealth(healthy=health.healthy, status=health.status, last_error=health.reason,
                                        start_time_unix_nano=health.start_time_unix_nano,
                                        status_time_unix_nano=time.time_ns())
        self._set("health", msg, compare=opamp_pb2.ComponentHealth(healthy=health.healthy, status=health.status,
                                                                   last_error=health.reason))

    def set_effective_config(self, text: str) -> None:
        """The running config as YAML (secrets redacted by the caller)."""
        cm = opamp_pb2.AgentConfigMap()
        cm.config_map[""].CopyFrom(opamp_pb2.AgentConfigFile(body=text.encode(), content_type=EFFECTIVE_CONFIG_TYPE))
        self._set("effective_config", opamp_pb2.EffectiveConfig(config_map=cm))

    def report_remote_status(self, config_hash: bytes, status: RemoteStatus, error: str = "") -> None:
        """The daemon applied (or could not apply) the offer with `config_hash`; sent at once."""
        self.stats.remote_configs[status] += 1
        self._set("remote_config_status", opamp_pb2.RemoteConfigStatus(
            last_remote_config_hash=config_hash, status=_STATUS_PB[status], error_message=error))

    def restored(self, offer: RemoteOffer) -> None:
        """The daemon started with `offer`, kept from the last run: reported APPLIED, and the server's
        offer of the same hash is not taken again."""
        self._seen_hash = offer.config_hash
        self.report_remote_status(offer.config_hash, RemoteStatus.APPLIED)

    def take_offer(self) -> RemoteOffer | None:
        """The newest remote config not yet taken (None: nothing new). Called from the daemon's loop."""
        with self._lock:
            offer, self._offer = self._offer, None
            return offer

    def _set(self, name: str, msg: Message, compare: Message | None = None) -> None:
        data = msg.SerializeToString()
        key = (compare or msg).SerializeToString()
        with self._lock:
            if self._news.get(name) == key:
                return
            self._current[name] = data
            self._news[name] = key
        self._wake.set()

    # --- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        log.info("opamp: reporting to %s as %s", self.cfg.endpoint, uuid.UUID(bytes=self.uid))
        self._thread = threading.Thread(target=self._run, name="opamp", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = STOP_DISCONNECT_S) -> None:
        """End the thread (an exchange in flight is aborted after `timeout_s`); if the server was
        reachable, tell it the agent goes (AgentDisconnect, best effort, within `timeout_s`)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                self._poster.close()
                thread.join(timeout_s)
        if self.stats.connected and not (thread is not None and thread.is_alive()):
            msg = self._message({})
            msg.agent_disconnect.SetInParent()
            self._poster.post(msg.SerializeToString(), timeout_s)
        self._poster.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.exchange()
            except Exception as e:  # noqa: BLE001  (a bug here must not end remote control: counted, backed off)
                log.exception("opamp: exchange failed")
                self.stats.requests[Outcome.BAD_RESPONSE] += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                self._failed(Outcome.BAD_RESPONSE, None)
            with self._lock:
                pending = self._full or any(v != self._taken.get(k) for k, v in self._current.items())
            backoff_s = self._backoff_until - time.monotonic()
            if backoff_s > 0:  # news or not, the server is given its pause
                self._stop.wait(backoff_s)
            elif pending:
                self._stop.wait(MIN_GAP_S)
            else:
                self._wake.wait(self.cfg.heartbeat_interval_s)  # a heartbeat, or news at once
            self._wake.clear()  # what woke it goes in the next message, built after this

    def _message(self, fields: Mapping[str, bytes]) -> opamp_pb2.AgentToServer:
        msg = opamp_pb2.AgentToServer(instance_uid=self.uid, sequence_num=self._seq, capabilities=CAPABILITIES)
        for name, data in fields.items():
            getattr(msg, name).ParseFromString(data)
        return msg

    def exchange(self) -> Outcome:
        """One message and its answer (the thread's step; tests call it directly)."""
        with self._lock:
            full = self._full
            fields = {k: v for k, v in self._current.items() if full or v != self._taken.get(k)}
        msg = self._message(fields)
        self._seq += 1
        reply = self._poster.post(msg.SerializeToString(), self.cfg.timeout_s)
        outcome, hint, answer = self._read_reply(reply)
        self.stats.requests[outcome] += 1
        if outcome != Outcome.OK:
            self._failed(outcome, hint)
            return outcome
        with self._lock:
            self._taken.update(fields)
            self._full = False
        if self.stats.failures_in_a_row or not self.stats.connected:
            log.info("opamp: connected to %s", self.cfg.endpoint)
        self.stats.connected, self.stats.failures_in_a_row, self.stats.last_error = True, 0, ""
        self._backoff_until = 0.0
        assert answer is not None
        self._handle(answer)
        return outcome

    def _read_reply(self, reply: HttpReply | Attempt) -> tuple[Outcome, float | None, opamp_pb2.ServerToAgent | None]:
        """The outcome, a server's hint of how long to wait, and the answer when the outcome is OK."""
        if isinstance(reply, Attempt):
            self.stats.last_error = reply.reason
            return (Outcome.TIMEOUT if reply.timed_out else Outcome.UNREACHABLE), None, None
        if not 200 <= reply.status < 300:
            self.stats.last_error = f"HTTP {reply.status} {reply.reason}"
            return Outcome.HTTP_ERROR, retry_after_s(reply.retry_after), None
        answer = opamp_pb2.ServerToAgent()
        try:
            answer.ParseFromString(reply.body)
        except DecodeError:
            self.stats.last_error = "the answer is not a ServerToAgent message"
            return Outcome.BAD_RESPONSE, None, None
        if answer.instance_uid and answer.instance_uid != self.uid:
            self.stats.last_error = "the answer is for another instance uid"
            return Outcome.BAD_RESPONSE, None, None
        if answer.HasField("error_response"):
            err = answer.error_response
            self.stats.last_error = f"server error: {err.error_message or opamp_pb2.ServerErrorResponseType.Name(err.type)}"
            hint = err.retry_info.retry_after_nanoseconds / 1e9 if err.HasField("retry_info") else None
            return Outcome.SERVER_ERROR, hint, None
        return Outcome.OK, None, answer

    def _failed(self, outcome: Outcome, hint: float | None) -> None:
        st = self.stats
        st.failures_in_a_row += 1
        if st.connected or st.failures_in_a_row == 1:
            log.warning("opamp: %s: %s (%s); retrying with backoff, profiling goes on", self.cfg.endpoint,
                        st.last_error, outcome)
        st.connected = False
        with self._lock:
            self._full = True  # the server may have lost what it knew: tell it all again
        if hint is not None and hint > 0:
            delay = min(hint, MAX_RETRY_AFTER_S)
        else:
            delay = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2 ** min(st.failures_in_a_row - 1, 30)) * self.jitter()
        self.last_delay_s = delay
        self._backoff_until = time.monotonic() + delay

    def _handle(self, answer: opamp_pb2.ServerToAgent) -> None:
        if answer.HasField("agent_identification") and len(answer.agent_identification.new_instance_uid) == 16:
            new = answer.agent_identification.new_instance_uid
            log.info("opamp: the server assigned instance uid %s", uuid.UUID(bytes=new))
            self.uid = new
            save_instance_uid(self.cfg.instance_uid_file, new)
            with self._lock:
                self._current["agent_description"] = describe_agent(new, self.host_name, self.node_name) \
                    .SerializeToString()
        if answer.flags & opamp_pb2.ServerToAgentFlags_ReportFullState:
            with self._lock:
                self._full = True
        if answer.HasField("remote_config") and answer.remote_config.config_hash != self._seen_hash:
            offer = read_offer(answer.remote_config)
            self._seen_hash = offer.config_hash
            log.info("opamp: remote config %s offered", offer.config_hash.hex()[:16] or "(no hash)")
            with self._lock:
                self._offer = offer

