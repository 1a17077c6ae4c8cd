"""The agent's configuration: one frozen dataclass per component, one loader, one validator.

Precedence is flags > environment > file > defaults (`load_config`). The
file is YAML; every string value in it may use `${VAR}` or `${VAR:-default}`
(expanded after parsing, so a secret can never inject YAML) and `$$` for a
literal `$`. Every key is documented in packaging/config.example.yaml, and a
test checks that file against these dataclasses.

Errors are ConfigError with the key's path and what was expected, on one
line: `config /etc/bpfprof/config.yaml: export.interval_s: expected a number,
got 'soon'`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from agent.processes.stack_resolver import UnwindMode
from agent.unwind.tables import DEFAULT_TABLE_BYTES, MAX_TABLE_BYTES, MIN_TABLE_BYTES
from exporters.bounded_input import read_bounded
from symbolizer.debuginfod import check_url
from symbolizer.errors import ConfigError, ExportError, InputTooLarge

DEFAULT_CONFIG_PATH = "/etc/bpfprof/config.yaml"

# Environment variables: each sets one key (a flag still wins over it).
ENV_CONFIG = "BPFPROF_CONFIG"
ENV_LOG_LEVEL = "BPFPROF_LOG_LEVEL"
ENV_HOST_PROC = "BPFPROF_HOST_PROC"
ENV_NODE_NAME = "BPFPROF_NODE_NAME"
ENV_NODE_NAME_FALLBACK = "NODE_NAME"  # what most DaemonSets already set from spec.nodeName (containers.NODE_NAME_VARS)
ENV_OTLP_ENDPOINT = "BPFPROF_OTLP_ENDPOINT"
ENV_EXPORT_INTERVAL_S = "BPFPROF_EXPORT_INTERVAL_S"
ENV_PPROF_DIR = "BPFPROF_PPROF_DIR"
ENV_METRICS_LISTEN = "BPFPROF_METRICS_LISTEN"

ENV_KEYS: dict[str, str] = {
    ENV_LOG_LEVEL: "log_level",
    ENV_HOST_PROC: "host_proc",
    ENV_NODE_NAME: "node_name",
    ENV_OTLP_ENDPOINT: "export.otlp.endpoint",
    ENV_EXPORT_INTERVAL_S: "export.interval_s",
    ENV_PPROF_DIR: "export.pprof_dir.path",
    ENV_METRICS_LISTEN: "metrics.listen",
}

LOG_LEVELS = ("debug", "info", "warning", "error")
RELABEL_ACTIONS = ("drop", "keep", "drop_label", "rename_label", "mask")
MAX_FREQUENCY_HZ = 20_000
MAX_DEBUGINFOD_TIMEOUT_S = 60.0  # profiling.debuginfod_timeout_s: the interval's build waits at most this
MIN_SYMBOL_CACHE_BYTES = 16 * 1024 * 1024  # limits.max_symbol_cache_bytes: below it libc and one program thrash
MAX_RETRY_AFTER_S = 3600.0  # export.max_retry_after_s: an hour of silence is the most a collector may ask
UNWIND_MODES = tuple(m.value for m in UnwindMode)


@dataclass(frozen=True)
class ProfilingConfig:
    profiles: tuple[str, ...] = ("cpu",)
    frequency_hz: int = 99
    kernel_stacks: bool = True
    offcpu_min_us: int = 0
    heap_sample_bytes: int = 512 * 1024  # heap: mean bytes between sampled allocations (as `record`)
    unwind: str = "cfi"  # user stacks: "cfi" (walked in BPF with each binary's CFI/pclntab), "copy" or "fp"
    unwind_table_bytes: int = DEFAULT_TABLE_BYTES  # kernel memory for the BPF walker's rows (cfi)
    debug_dirs: tuple[str, ...] = ()  # more directories of separate debug info, after /usr/lib/debug
    debuginfod_urls: tuple[str, ...] = ()  # debuginfod servers; empty: $DEBUGINFOD_URLS, else none (off)
    debuginfod_timeout_s: float = 5.0  # the most one lookup (all servers) may take
    debuginfod_cache_bytes: int = 1 << 30  # disk budget of downloaded debug files


@dataclass(frozen=True)
class SelectionConfig:
    """Which processes to profile; all of them when every list is empty, else those matching any."""

    pids: tuple[int, ...] = ()
    exe_names: tuple[str, ...] = ()  # basename of /proc/PID/exe, or comm
    exe_regex: tuple[str, ...] = ()  # re.search on the executable path
    cgroup_paths: tuple[str, ...] = ()  # prefixes of the cgroup path (v2, else first v1)
    container_ids: tuple[str, ...] = ()  # full ids or prefixes of at least 12 characters


@dataclass(frozen=True)
class OtlpConfig:
    endpoint: str = ""  # "" = off
    protocol: str = ""  # "" = from the URL's scheme; grpc or http
    headers: dict[str, str] = field(default_factory=dict)
    insecure: bool = False
    ca_file: str = ""
    compression: str = "gzip"  # gzip or none


@dataclass(frozen=True)
class PprofDirConfig:
    path: str = ""  # "" = off
    max_files: int = 1000
    max_total_bytes: int = 512 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class ViewerConfig:
    endpoint: str = ""  # the OTLP/HTTP receiver of `bpfprof serve`; "" = off


@dataclass(frozen=True)
class ExportConfig:
    interval_s: float = 60.0
    timeout_s: float = 10.0  # one export, retries included; also bounds the flush at SIGTERM
    max_retry_after_s: float = 300.0  # a collector's Retry-After is obeyed up to this, even past timeout_s
    queue_max_batches: int = 10  # per exporter; past it the oldest interval is dropped and counted
    otlp: OtlpConfig = field(default_factory=OtlpConfig)
    pprof_dir: PprofDirConfig = field(default_factory=PprofDirConfig)
    viewer: ViewerConfig = field(default_factory=ViewerConfig)


@dataclass(frozen=True)
class LimitsConfig:
    max_processes: int = 8192  # process table; least recently sampled exited processes go first
    max_symbol_files: int = 512  # symbol cache (files by build id), LRU
    # Copies of files (and inflated DWARF) the symbol cache holds; past it the least recently used are released.
    max_symbol_cache_bytes: int = 256 * 1024 * 1024
    max_interval_samples: int = 2_000_000  # records kept per interval; more are dropped and counted
    cpu_percent: float = 1.0  # the agent's CPU budget (its process + its BPF programs), % of all CPUs; 0 = off
    min_frequency_hz: int = 19  # the governor never samples slower than this to hold cpu_percent


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"  # host:port of /metrics, /healthz, /readyz; "" = off


# What a remote config (OpAMP) may change unless opamp.allow_remote says otherwise: what is sampled, how
# often, of which processes, and how it is relabelled; not where profiles go nor the agent's own endpoints.
DEFAULT_ALLOW_REMOTE = ("log_level", "profiling.profiles", "profiling.frequency_hz", "profiling.kernel_stacks",
                        "profiling.offcpu_min_us", "profiling.heap_sample_bytes", "selection", "relabel",
                        "export.interval_s", "limits.cpu_percent", "limits.min_frequency_hz")
# Keys a remote config may change only when opamp.allow_remote names them one by one (a parent such as
# "export" does not cover them): where profiles are sent and the credentials sent along, what the agent
# listens on, and where it reads the host's processes.
GUARDED_REMOTE_KEYS = ("export.otlp.endpoint", "export.otlp.protocol", "export.otlp.headers", "export.otlp.insecure",
                       "export.otlp.ca_file", "export.viewer.endpoint", "export.pprof_dir.path", "metrics.listen",
                       "host_proc")
# Never from a remote config: the control channel itself (and so the bounds set on it).
NEVER_REMOTE = "opamp"
OPAMP_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class OpampConfig:
    """The OpAMP client (agent/daemon/opamp.py): remote configuration, health and effective config."""

    endpoint: str = ""  # http(s)://host:port/v1/opamp; "" = off
    headers: dict[str, str] = field(default_factory=dict)  # sent with every message (auth tokens)
    ca_file: str = ""  # PEM bundle to verify an https server with; system roots otherwise
    heartbeat_interval_s: float = 30.0  # a message at least this often (HTTP: the server answers only then)
    timeout_s: float = 10.0  # one exchange, connect to the last byte of the answer
    instance_uid_file: str = "/var/lib/bpfprof/instance_uid"  # the agent's OpAMP id, kept across restarts
    # The last remote config applied, kept so a restart runs it before (or without) the server: "" = not kept
    remote_config_file: str = "/var/lib/bpfprof/remote_config.json"
    allow_remote: tuple[str, ...] = DEFAULT_ALLOW_REMOTE  # key paths (or sections) a remote config may set


@dataclass(frozen=True)
class RelabelRule:
    """One rule; which fields apply depends on `action` (packaging/config.example.yaml)."""

    action: str
    attribute: str = ""  # drop/keep: process.pid, process.executable.name, ..., label.NAME
    regex: str = ""  # drop/keep: full match on the attribute; mask: the part of the value to replace
    label: str = ""  # drop_label/rename_label/mask: the label name (a regex, full match)
    target: str = ""  # rename_label: the new name
    replacement: str = "***"  # mask


@dataclass(frozen=True)
class AgentConfig:
    log_level: str = "info"
    host_proc: str = "/proc"
    node_name: str = ""  # k8s.node.name; from BPFPROF_NODE_NAME or NODE_NAME when unset
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    relabel: tuple[RelabelRule, ...] = ()
    opamp: OpampConfig = field(default_factory=OpampConfig)


# --- ${ENV} expansion ---------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


def expand_env(value: str, path: str, environ: Mapping[str, str]) -> str:
    """`${VAR}`, `${VAR:-default}` and `$$` in one string; ConfigError for an unset VAR."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable {name} is not set")

    return _VAR.sub(sub, value)


def _expand_tree(node: Any, path: str, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return expand_env(node, path, environ)
    if isinstance(node, dict):
        return {k: _expand_tree(v, _join(path, str(k)), environ) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, f"{path}[{i}]", environ) for i, v in enumerate(node)]
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- dict -> dataclasses, with key paths ---------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping of strings to strings"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _scalar(tp: type, value: Any, path: str) -> Any:
    """Strings are parsed for typed keys: environment values are always strings."""
    bad = ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int or tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise bad
        if isinstance(value, str):
            try:
                value = tp(value.strip())
            except ValueError:
                raise bad from None
        elif tp is int and not isinstance(value, int):
            raise bad  # 2.5 where a count is wanted
        value = tp(value)
        if not math.isfinite(value):  # .inf / .nan: no interval or timeout is endless
            raise bad
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # a port or an id written unquoted
        raise bad
    raise AssertionError(f"unsupported config type {tp}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str) and not dataclasses.is_dataclass(item_tp):
            value = [v.strip() for v in value.split(",") if v.strip()]  # "cpu,offcpu" from env or a flag
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
        return tuple(_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
        return {_scalar(str, k, path): _scalar(str, v, _join(path, str(k))) for k, v in value.items()}
    return _scalar(tp, value, path)


def _build(cls: Any, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{_join(path, str(key))}: unknown key (expected one of: {', '.join(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], _join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, f.name)}: required key is missing")
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[last] = value


# --- validation -----------------------------------------------------------------


def _check(ok: bool, path: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{path}: expected {expected}, got {value!r}")


def _check_regex(pattern: str, path: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{path}: invalid regular expression {pattern!r}: {e}") from None


def parse_listen(listen: str, path: str = "metrics.listen") -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{path}: expected host:port (e.g. 127.0.0.1:9464), got {listen!r}")
    return host.strip("[]"), int(port)


def validate(cfg: AgentConfig) -> AgentConfig:
    """Every value check in one place; ConfigError names the key. Returns `cfg`."""
    from agent.probes.registry import PROBES  # noqa: PLC0415  (the probe registry pulls in bcc-free but heavy modules)
    from exporters.otlp_sender import resolve_endpoint  # noqa: PLC0415

    _check(cfg.log_level in LOG_LEVELS, "log_level", f"one of {', '.join(LOG_LEVELS)}", cfg.log_level)
    _check(os.path.isdir(cfg.host_proc) and os.path.exists(os.path.join(cfg.host_proc, "stat")),
           "host_proc", "a mounted procfs directory", cfg.host_proc)
    p = cfg.profiling
    _check(bool(p.profiles), "profiling.profiles", f"at least one of {', '.join(PROBES)}", list(p.profiles))
    for i, name in enumerate(p.profiles):
        _check(name in PROBES, f"profiling.profiles[{i}]", f"one of {', '.join(PROBES)}", name)
    _check(1 <= p.frequency_hz <= MAX_FREQUENCY_HZ, "profiling.frequency_hz", f"1 to {MAX_FREQUENCY_HZ}",
           p.frequency_hz)
    _check(p.offcpu_min_us >= 0, "profiling.offcpu_min_us", "an integer >= 0", p.offcpu_min_us)
    _check(p.heap_sample_bytes >= 1, "profiling.heap_sample_bytes", "an integer >= 1", p.heap_sample_bytes)
    _check(p.unwind in UNWIND_MODES, "profiling.unwind", f"one of {', '.join(UNWIND_MODES)}", p.unwind)
    for i, d in enumerate(p.debug_dirs):
        _check(d.startswith("/"), f"profiling.debug_dirs[{i}]", "an absolute path", d)
    for i, u in enumerate(p.debuginfod_urls):
        _check(check_url(u), f"profiling.debuginfod_urls[{i}]", "an http:// or https:// URL with a host", u)
    _check(0 < p.debuginfod_timeout_s <= MAX_DEBUGINFOD_TIMEOUT_S, "profiling.debuginfod_timeout_s",
           f"a number of seconds above 0, at most {MAX_DEBUGINFOD_TIMEOUT_S:g}", p.debuginfod_timeout_s)
    _check(p.debuginfod_cache_bytes >= 1 << 20, "profiling.debuginfod_cache_bytes", "an integer >= 1048576",
           p.debuginfod_cache_bytes)
    _check(MIN_TABLE_BYTES <= p.unwind_table_bytes <= MAX_TABLE_BYTES, "profiling.unwind_table_bytes",
           f"{MIN_TABLE_BYTES} to {MAX_TABLE_BYTES}", p.unwind_table_bytes)
    s = cfg.selection
    for i, pid in enumerate(s.pids):
        _check(pid > 0, f"selection.pids[{i}]", "a pid > 0", pid)
    for i, rx in enumerate(s.exe_regex):
        _check_regex(rx, f"selection.exe_regex[{i}]")
    for i, cid in enumerate(s.container_ids):
        _check(re.fullmatch(r"[0-9a-f]{12,64}", cid) is not None, f"selection.container_ids[{i}]",
               "12 to 64 lowercase hex digits", cid)
    for i, cg in enumerate(s.cgroup_paths):
        _check(cg.startswith("/"), f"selection.cgroup_paths[{i}]", "an absolute cgroup path", cg)
    e = cfg.export
    _check(e.interval_s >= 1, "export.interval_s", "a number of seconds >= 1", e.interval_s)
    _check(e.timeout_s > 0, "export.timeout_s", "a number of seconds > 0", e.timeout_s)
    _check(0 <= e.max_retry_after_s <= MAX_RETRY_AFTER_S, "export.max_retry_after_s",
           f"a number of seconds from 0 to {MAX_RETRY_AFTER_S:g}", e.max_retry_after_s)
    _check(e.queue_max_batches >= 1, "export.queue_max_batches", "an integer >= 1", e.queue_max_batches)
    for key, endpoint, protocol, insecure in (
            ("export.otlp", e.otlp.endpoint, e.otlp.protocol or None, e.otlp.insecure),
            ("export.viewer", e.viewer.endpoint, "http", True)):
        if endpoint:
            try:
                resolve_endpoint(endpoint, protocol, insecure)
            except ConfigError as err:
                raise ConfigError(f"{key}: {err}") from None
    _check(e.otlp.protocol in ("", "grpc", "http"), "export.otlp.protocol", "grpc, http or empty", e.otlp.protocol)
    _check(e.otlp.compression in ("gzip", "none"), "export.otlp.compression", "gzip or none", e.otlp.compression)
    _check(not e.otlp.ca_file or os.path.isfile(e.otlp.ca_file), "export.otlp.ca_file", "a readable file",
           e.otlp.ca_file)
    d = e.pprof_dir
    _check(d.max_files >= 1, "export.pprof_dir.max_files", "an integer >= 1", d.max_files)
    _check(d.max_total_bytes >= 1024, "export.pprof_dir.max_total_bytes", "an integer >= 1024", d.max_total_bytes)
    _check(d.max_age_s > 0, "export.pprof_dir.max_age_s", "a number > 0", d.max_age_s)
    if d.path:
        parent = Path(d.path)
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        _check(parent.is_dir() and os.access(parent, os.W_OK), "export.pprof_dir.path",
               "a writable directory (created if missing)", d.path)
    lim = cfg.limits
    _check(lim.max_processes >= 16, "limits.max_processes", "an integer >= 16", lim.max_processes)
    _check(lim.max_symbol_files >= 8, "limits.max_symbol_files", "an integer >= 8", lim.max_symbol_files)
    _check(lim.max_symbol_cache_bytes >= MIN_SYMBOL_CACHE_BYTES, "limits.max_symbol_cache_bytes",
           f"an integer >= {MIN_SYMBOL_CACHE_BYTES}", lim.max_symbol_cache_bytes)
    _check(lim.max_interval_samples >= 1000, "limits.max_interval_samples", "an integer >= 1000",
           lim.max_interval_samples)
    _check(0 <= lim.cpu_percent <= 100, "limits.cpu_percent", "a percentage from 0 (off) to 100",
           lim.cpu_percent)
    _check(1 <= lim.min_frequency_hz <= MAX_FREQUENCY_HZ, "limits.min_frequency_hz", f"1 to {MAX_FREQUENCY_HZ}",
           lim.min_frequency_hz)
    if cfg.metrics.listen:
        parse_listen(cfg.metrics.listen)
    for i, rule in enumerate(cfg.relabel):
        _validate_rule(rule, f"relabel[{i}]")
    _validate_opamp(cfg.opamp)
    return cfg


def _validate_opamp(o: OpampConfig) -> None:
    if o.endpoint:
        parts = urlsplit(o.endpoint)
        if parts.scheme in ("ws", "wss"):
            raise ConfigError(f"opamp.endpoint: WebSocket is not supported, use http:// or https://, got "
                              f"{o.endpoint!r}")
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        _check(parts.scheme in OPAMP_SCHEMES and bool(parts.hostname) and port_ok, "opamp.endpoint",
               "an http:// or https:// URL with a host", o.endpoint)
    _check(1 <= o.heartbeat_interval_s <= 86400, "opamp.heartbeat_interval_s", "1 to 86400 seconds",
           o.heartbeat_interval_s)
    _check(0 < o.timeout_s <= 300, "opamp.timeout_s", "a number of seconds above 0, at most 300", o.timeout_s)
    _check(not o.ca_file or os.path.isfile(o.ca_file), "opamp.ca_file", "a readable file", o.ca_file)
    _check(o.instance_uid_file.startswith("/"), "opamp.instance_uid_file", "an absolute path", o.instance_uid_file)
    _check(not o.remote_config_file or o.remote_config_file.startswith("/"), "opamp.remote_config_file",
           "an absolute path, or empty not to keep remote configs", o.remote_config_file)
    keys = config_keys()
    for i, key in enumerate(o.allow_remote):
        known = any(k == key or k.startswith(key + ".") or k.startswith(key + "[]") for k in keys)
        _check(known and not _under(key, NEVER_REMOTE), f"opamp.allow_remote[{i}]",
               "a config key or section (not opamp)", key)


def _validate_rule(rule: RelabelRule, path: str) -> None:
    _check(rule.action in RELABEL_ACTIONS, f"{path}.action", f"one of {', '.join(RELABEL_ACTIONS)}", rule.action)
    needs = {"drop": ("attribute", "regex"), "keep": ("attribute", "regex"), "drop_label": ("label",),
             "rename_label": ("label", "target"), "mask": ("label", "regex")}[rule.action]
    for name in needs:
        _check(bool(getattr(rule, name)), f"{path}.{name}", f"a non-empty string (action {rule.action})", "")
    for name in ("regex", "label"):
        if getattr(rule, name):
            _check_regex(getattr(rule, name), f"{path}.{name}")


# --- the loader -------------------------------------------------------------------


# A config is a few KiB; this bounds what one read may take (/dev/zero, a log file named by mistake).
MAX_CONFIG_BYTES = 1024 * 1024
# Deeper than any real config; bounds the YAML composer's recursion (50,000 "[" is a RecursionError).
MAX_CONFIG_DEPTH = 64


class _ConfigYamlError(yaml.MarkedYAMLError):
    """A YAML construct the config loader refuses (an alias, nesting past MAX_CONFIG_DEPTH)."""


class ConfigYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and with a depth limit.

    Aliases are refused outright: a config has no use for them, and expanded
    they make "billion laughs" (a few hundred bytes that build gigabytes).
    Nesting past MAX_CONFIG_DEPTH is refused before it can recurse further.
    """

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _ConfigYamlError(None, None, f"aliases (*{event.anchor}) are not accepted in a config",
                                   event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _ConfigYamlError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels",
                                       self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_config_text(path: str) -> str:
    """The text of a config file of at most MAX_CONFIG_BYTES, read without blocking.

    ConfigError for a FIFO, a socket, a directory, a bigger file (/dev/zero
    too) or one that is not UTF-8. /dev/null is an empty config.
    """
    try:
        data = read_bounded(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read: {e.strerror}") from None
    except InputTooLarge:
        raise ConfigError(f"config {path}: larger than {MAX_CONFIG_BYTES >> 10} KiB") from None
    except ExportError as e:
        raise ConfigError(f"config {path}: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path}: not UTF-8 text (byte {e.start})") from None


def parse_config_yaml(text: str, path: str) -> Any:
    """yaml.safe_load with ConfigYamlLoader; ConfigError naming the file and the place for any problem."""
    try:
        return yaml.load(text, Loader=ConfigYamlLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {path}: not valid YAML{where}: {problem}") from None


def read_config_file(path: str, environ: Mapping[str, str]) -> dict:
    """The file's mapping with ${ENV} expanded; ConfigError naming the file for any problem."""
    data = parse_config_yaml(read_config_text(path), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top, got {type(data).__name__}")
    try:
        return _expand_tree(data, "", environ)
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None


def load_config(path: str | None = None, flags: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None, remote: Mapping[str, Any] | None = None) -> AgentConfig:
    """Build and validate the config: remote > flags (key path -> value) > environment > file > defaults.

    `path` None means $BPFPROF_CONFIG, else DEFAULT_CONFIG_PATH if it exists
    (a missing default file is fine: defaults plus flags). A path that was
    named explicitly must exist. `remote` is a remote config's tree
    (parse_remote_config): its keys win, within the local opamp.allow_remote
    (check_remote). Raises ConfigError; one caused by `remote` starts with
    "remote config: " and names the key.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or ENV_CONFIG in environ
    path = path if path is not None else environ.get(ENV_CONFIG, DEFAULT_CONFIG_PATH)
    tree: dict = {}
    if explicit or os.path.exists(path):
        tree = read_config_file(path, environ)
    for var, key in ENV_KEYS.items():
        if environ.get(var):
            _set_path(tree, key, environ[var])
    for key, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, key, value)
    if not tree.get("node_name"):
        from agent.processes.containers import node_name  # noqa: PLC0415

        if node_name(environ):
            tree["node_name"] = node_name(environ)
    prefix = f"config {path}: " if (explicit or os.path.exists(path)) else "config: "
    try:
        local = validate(_build(AgentConfig, tree, ""))
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    if not remote:
        return local
    try:
        check_remote(remote, local.opamp.allow_remote)
        return validate(_build(AgentConfig, _merge(tree, remote), ""))
    except ConfigError as e:
        raise ConfigError(f"remote config: {e}") from None


# --- remote configs (OpAMP) -------------------------------------------------------


def parse_remote_config(body: bytes) -> dict:
    """A remote config's body (YAML or JSON, the file's schema) as a tree; ConfigError for any problem.

    Bounded as a file is (MAX_CONFIG_BYTES, no aliases, MAX_CONFIG_DEPTH).
    `${VAR}` is not expanded: a server must not read the agent's environment.
    """
    if len(body) > MAX_CONFIG_BYTES:
        raise ConfigError(f"remote config: larger than {MAX_CONFIG_BYTES >> 10} KiB")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"remote config: not UTF-8 text (byte {e.start})") from None
    data = parse_config_yaml(text, "(remote)")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"remote config: expected a mapping at the top, got {type(data).__name__}")
    return data


def _under(key: str, parent: str) -> bool:
    return key == parent or key.startswith(parent + ".")


def remote_allowed(key: str, allow: tuple[str, ...]) -> bool:
    """Whether a remote config may set the leaf key path `key` under the local `allow` list.

    A section allows the keys under it, except GUARDED_REMOTE_KEYS, which only
    an entry naming them (or a part of them) allows; NEVER_REMOTE nothing allows.
    """
    if _under(key, NEVER_REMOTE):
        return False
    guarded = next((g for g in GUARDED_REMOTE_KEYS if _under(key, g)), None)
    if guarded is not None:
        return any(_under(key, a) and _under(a, guarded) for a in allow)
    return any(_under(key, a) for a in allow)


def _leaf_keys(cls: Any, data: Mapping[str, Any], path: str) -> list[str]:
    """The key paths `data` sets, down to the fields that are not sections (a list or a mapping is one key)."""
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in data.items():
        sub = _join(path, str(key))
        tp = hints.get(str(key))
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out += _leaf_keys(tp, value, sub)
        else:
            out.append(sub)
    return out


def check_remote(remote: Mapping[str, Any], allow: tuple[str, ...]) -> None:
    """ConfigError naming the first key `remote` may not set, or an unknown key or a bad type in it."""
    _build(AgentConfig, dict(remote), "")  # unknown keys and types first: their message is the useful one
    for key in _leaf_keys(AgentConfig, remote, ""):
        if not remote_allowed(key, allow):
            raise ConfigError(f"{key}: not allowed to be changed remotely (opamp.allow_remote in the local config)")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """`over` on top of `base`, mappings merged key by key (lists and values replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_keys(cls: Any = AgentConfig, prefix: str = "") -> list[str]:
    """Every leaf key path (relabel rule fields as relabel[].FIELD), for the docs test."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, path)
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += config_keys(typing.get_args(tp)[0], f"{path}[]")
        else:
            out.append(path)
    return out


def effective_config_text(cfg: AgentConfig) -> str:
    """The config as YAML, header values redacted (--check-config prints it; OpAMP reports it)."""
    effective = as_dict(cfg)
    effective["export"]["otlp"]["headers"] = {k: "<redacted>" for k in cfg.export.otlp.headers}
    effective["opamp"]["headers"] = {k: "<redacted>" for k in cfg.opamp.headers}
    return yaml.safe_dump(effective, sort_keys=False)


def as_dict(cfg: Any) -> Any:
    """The config as plain data (for logging the effective config)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: as_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [as_dict(v) for v in cfg]
    if isinstance(cfg, dict | types.MappingProxyType):
        return dict(cfg)
    return cfg
