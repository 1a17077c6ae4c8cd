"""`bpfprof serve`: OTLP receiver (traces + profiles) into SQLite, and the web UI from a span to its flame graph."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from symbolizer.errors import ConfigError
from viewer.config import (
    DEFAULT_DB,
    DEFAULT_GRPC,
    DEFAULT_HTTP,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_UI,
    ENV_DB,
    ENV_RETENTION_AGE,
    ENV_RETENTION_BYTES,
    ServeConfig,
    parse_addr,
    parse_duration_s,
    parse_size_bytes,
)
from viewer.server import Server


@click.command()
@click.option("--grpc", "grpc_addr", default=DEFAULT_GRPC, show_default=True, metavar="HOST:PORT",
              help="OTLP/gRPC listen address (0.0.0.0:4317 to take other hosts' data).")
@click.option("--http", "http_addr", default=DEFAULT_HTTP, show_default=True, metavar="HOST:PORT",
              help="OTLP/HTTP listen address (/v1/traces, /v1development/profiles).")
@click.option("--ui", "ui_addr", default=DEFAULT_UI, show_default=True, metavar="HOST:PORT",
              help="Web UI listen address.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"SQLite file to store into [env {ENV_DB}; default {DEFAULT_DB}].")
@click.option("--retention", default=None, metavar="DURATION",
              help=f"Drop data received longer ago than this: 90m, 24h, 7d [env {ENV_RETENTION_AGE}; default 24h].")
@click.option("--max-db-size", default=None, metavar="SIZE",
              help=f"Drop the oldest data while the store is bigger: 512MB, 2G [env {ENV_RETENTION_BYTES}; "
                   "default 1G].")
@click.option("--max-request-size", default=f"{DEFAULT_MAX_REQUEST_BYTES >> 20}MB", show_default=True, metavar="SIZE",
              help="Largest OTLP request taken, before and after decompression.")
def serve(grpc_addr: str, http_addr: str, ui_addr: str, db_path: Path | None, retention: str | None,
          max_db_size: str | None, max_request_size: str) -> None:
    """Receive OTLP traces and profiles; open a slow span and see what ran during it."""
    config = ServeConfig(
        grpc_addr=parse_addr(grpc_addr, "--grpc"), http_addr=parse_addr(http_addr, "--http"),
        ui_addr=parse_addr(ui_addr, "--ui"),
        db_path=db_path or Path(os.environ.get(ENV_DB) or DEFAULT_DB),
        retention_age_s=parse_duration_s(retention or os.environ.get(ENV_RETENTION_AGE) or "24h", "--retention"),
        retention_bytes=parse_size_bytes(max_db_size or os.environ.get(ENV_RETENTION_BYTES) or "1G", "--max-db-size"),
        max_request_bytes=parse_size_bytes(max_request_size, "--max-request-size"),
    )
    if config.db_path.parent and not config.db_path.parent.is_dir():
        raise ConfigError(f"--db {config.db_path}: directory {config.db_path.parent} does not exist")
    server = Server(config)
    try:
        server.start()
    except OSError as e:
        server.store.close()
        raise ConfigError(f"cannot listen: {e}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"bpfprof serve: OTLP gRPC on {config.grpc_addr[0]}:{server.receiver.grpc_port}, "
               f"OTLP HTTP on {config.http_addr[0]}:{server.receiver.http_port}, store {config.db_path}", err=True)
    click.echo(f"bpfprof serve: web UI at {server.ui_url}", err=True)
    try:
        stop.wait()
    finally:
        server.stop()
