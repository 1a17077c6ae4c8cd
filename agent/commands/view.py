"""`bpfprof view FILE...`: pprof and OTLP files recorded elsewhere, in serve's web UI on loopback."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from exporters.profile import Profile
from exporters.profile_files import read_profiles
from symbolizer.errors import ConfigError, ExportError
from viewer.config import parse_addr
from viewer.server import FileViewer


def _has_samples(p: Profile) -> bool:
    return any(any(s.values) for s in p.samples)


def _named_profiles(files: tuple[Path, ...], kind: str) -> list[tuple[str, Profile]]:
    """(name, profile) of every profile to show: one per file, or one per type of a file holding several.

    ExportError naming the file when one holds nothing to show (no such type, or no samples).
    """
    named: list[tuple[str, Profile]] = []
    for path in files:
        _, found = read_profiles(path)
        if kind:
            have = ", ".join(sorted({p.kind or "?" for p in found}))
            found = [p for p in found if p.kind == kind]
            if not found:
                raise ExportError(f"{path} holds no {kind} profile (it holds: {have})")
        shown = [p for p in found if _has_samples(p)]
        if not shown:
            what = f"the {found[0].kind} profile" if len(found) == 1 and found[0].kind else "the profile"
            raise ExportError(f"{path}: {what} is empty (no samples)")
        for p in shown:
            name = f"{path} ({p.kind})" if len(found) > 1 else str(path)
            taken = {n for n, _ in named}
            unique, n = name, 2
            while unique in taken:  # the same file named twice still gives two entries
                unique, n = f"{name} #{n}", n + 1
            named.append((unique, p))
    return named


@click.command()
@click.argument("files", metavar="FILE...", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--type", "kind", default="", metavar="KIND",
              help="Show only this profile type (cpu, heap...) of files holding several; a file without it is an error.")
@click.option("--ui", "ui_addr", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Listen address (port 0: any free port).")
def view(files: tuple[Path, ...], kind: str, ui_addr: str) -> None:
    """Open pprof/OTLP FILEs in the web UI of `bpfprof serve`; prints the URL, runs until Ctrl-C.

    \b
    Each profile gets a page (an OTLP file with several types: one each):
    flame graph, top table, time range, pprof download, and a diff against
    any other profile given.
    """
    named = _named_profiles(files, kind)
    host, port = parse_addr(ui_addr, "--ui")
    viewer = FileViewer(named)
    try:
        url = viewer.start(host, port)
    except OSError as e:
        viewer.stop()
        raise ConfigError(f"cannot listen on {ui_addr}: {e.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"bpfprof view: {len(named)} profile(s) at {url}", err=True)
    try:
        stop.wait()
    finally:
        viewer.stop()
