"""`bpfprof view FILE...`: open pprof and OTLP files recorded elsewhere in the flame graph pages, on loopback."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from exporters.profile_files import read_profiles
from symbolizer.errors import ConfigError
from viewer.config import parse_addr
from viewer.file_view import start_view


@click.command()
@click.argument("files", metavar="FILE...", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ui", "ui_addr", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Listen address (port 0: any free port).")
def view(files: tuple[Path, ...], ui_addr: str) -> None:
    """Serve the flame graph pages of pprof/OTLP FILEs; prints the URL, runs until Ctrl-C.

    \b
    An OTLP file with several profile types gives one page each.
    """
    profiles = []
    for path in files:
        _, found = read_profiles(path)
        for p in found:
            if not p.samples:
                raise ConfigError(f"{path}: the {p.kind or 'profile'} profile has no samples")
            profiles.append((f"{path}" + (f" ({p.kind})" if len(found) > 1 else ""), p))
    host, port = parse_addr(ui_addr, "--ui")
    try:
        server = start_view(profiles, host, port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {ui_addr}: {e.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"bpfprof view: {len(profiles)} profile(s) at http://{shown}:{server.port}/", err=True)
    try:
        stop.wait()
    finally:
        server.close()
