"""ServeConfig: one frozen dataclass, built from flags and environment by the CLI, validated here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from exporters.http_server import HttpLimits
from exporters.otlp_sender import ConfigError  # the one error root lives below exporters

# Environment variables `bpfprof serve` reads (flags win over them).
ENV_DB = "BPFPROF_SERVE_DB"
ENV_RETENTION_AGE = "BPFPROF_SERVE_RETENTION"
ENV_RETENTION_BYTES = "BPFPROF_SERVE_MAX_DB_BYTES"

DEFAULT_GRPC = "127.0.0.1:4317"
DEFAULT_HTTP = "127.0.0.1:4318"
DEFAULT_UI = "127.0.0.1:4040"
DEFAULT_DB = Path("bpfprof-serve.sqlite")
DEFAULT_RETENTION_AGE_S = 24 * 3600.0
DEFAULT_RETENTION_BYTES = 1 << 30
# OTLP's usual receiver default (the Collector's max_recv_msg_size_mib is 4);
# profiles of a busy host are bigger, so 16 MiB, compressed and decompressed alike.
DEFAULT_MAX_REQUEST_BYTES = 16 << 20


@dataclass(frozen=True)
class ServeConfig:
    """Where `serve` listens and what it keeps. Port 0 picks a free port (tests)."""

    grpc_addr: tuple[str, int] = ("127.0.0.1", 4317)
    http_addr: tuple[str, int] = ("127.0.0.1", 4318)
    ui_addr: tuple[str, int] = ("127.0.0.1", 4040)
    db_path: Path = DEFAULT_DB
    retention_age_s: float = DEFAULT_RETENTION_AGE_S
    retention_bytes: int = DEFAULT_RETENTION_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    retention_interval_s: float = 60.0  # the age limit; the size limit holds at every write (Store)
    # Deadlines and caps of the web UI and OTLP/HTTP servers (the receiver's body sizes follow max_request_bytes).
    http_limits: HttpLimits = HttpLimits(request_timeout_s=60.0)


def parse_addr(value: str, flag: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (loopback) as (host, port). Raises ConfigError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {value!r}: expected HOST:PORT with a port from 0 to 65535")
    host = host.strip("[]") or "127.0.0.1"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{flag} {value!r}: {host!r} is not an IP address (or localhost)") from None
    return host, int(port)


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_UNITS_BYTES = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}


def parse_duration_s(value: str, flag: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds. Raises ConfigError."""
    v = value.strip().lower()
    unit = v[-1] if v and v[-1] in _UNITS_S else "s"
    number = v[:-1] if v and v[-1] in _UNITS_S else v
    try:
        seconds = float(number) * _UNITS_S[unit]
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: expected a duration such as 90s, 30m, 24h, 7d") from None
    if seconds <= 0:
        raise ConfigError(f"{flag} {value!r}: must be more than 0")
    return seconds


def parse_size_bytes(value: str, flag: str) -> int:
    """'512MB', '2G', '100k' or plain bytes. Raises ConfigError."""
    v = value.strip().lower()
    i = len(v)
    while i and not v[i - 1].isdigit():
        i -= 1
    unit = v[i:].strip()
    if unit not in _UNITS_BYTES or not v[:i]:
        raise ConfigError(f"{flag} {value!r}: expected a size such as 512MB or 2G")
    size = int(float(v[:i]) * _UNITS_BYTES[unit])
    if size <= 0:
        raise ConfigError(f"{flag} {value!r}: must be more than 0")
    return size
