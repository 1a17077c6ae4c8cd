"""`bpfprof record`: one capture to a file, with a live progress line."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.capture.session import CaptureStats, RecordOptions, RecordSession
from agent.probes.registry import PROBES
from agent.processes.stack_resolver import DEFAULT_UNWIND, UnwindMode
from agent.processes.targets import validate_command, validate_pids
from exporters.formats import FORMATS, OutputFormat
from exporters.profile import Profile
from exporters.summary import top_functions
from symbolizer.debuginfod import DebuginfodClient, check_url, urls_from
from symbolizer.errors import ConfigError
from symbolizer.file_symbols import DEFAULT_CACHE

if TYPE_CHECKING:
    from exporters.otlp_sender import OtlpExporter

MAX_FREQUENCY_HZ = 20_000
# exporters.otlp_sender.DEFAULT_TIMEOUT_S (a unit test keeps them equal): that module, gRPC and the
# OTLP protobufs (~70 ms) are imported only when --otlp-endpoint is given, not at every start.
OTLP_TIMEOUT_S = 10.0
MAX_SAMPLE_RATE = Path("/proc/sys/kernel/perf_event_max_sample_rate")
# The exporters' formats, and html: the viewer's page, imported only when it is asked for.
FORMAT_NAMES = (*FORMATS, "html")


def _extension(name: str) -> str:
    return ".html" if name == "html" else FORMATS[name].extension


def _check_frequency(hz: int) -> int:
    limit = MAX_FREQUENCY_HZ
    try:
        limit = min(limit, int(MAX_SAMPLE_RATE.read_text()))
    except (OSError, ValueError):
        pass
    if not 1 <= hz <= limit:
        raise ConfigError(f"--frequency {hz} is out of range: use 1 to {limit} Hz (default 99)")
    return hz


def _check_output(path: Path) -> Path:
    """Fail before recording, not after, if the file cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        if path.is_dir():
            raise ConfigError(f"cannot write {path}: it is a directory")
        if not parent.is_dir():
            raise ConfigError(f"cannot write {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"cannot write {path}: permission denied")
    except PermissionError:
        raise ConfigError(f"cannot write {path}: permission denied") from None
    return path


class _Progress:
    """The live line on a terminal; silent when stderr is not one."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, st: CaptureStats) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.25:
            return
        self._last = now
        sys.stderr.write(f"\rrecording {st.elapsed_s:6.1f}s  samples {st.samples:8d}  processes {st.processes:5d} ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--pid", "pids", type=int, multiple=True, help="Process to profile (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Profile the whole system (the default).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds to record. Default: until Ctrl-C, or until COMMAND exits.")
@click.option("--frequency", type=int, default=99, show_default=True, help="Samples per second per CPU.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Output file. Default: bpfprof-<timestamp> with the format's extension.")
@click.option("--format", "fmt", default="pprof", show_default=True, metavar="FORMATS",
              help=f"Comma-separated: {', '.join(sorted(FORMAT_NAMES))}. html is a flame graph page that opens "
                   "from disk. With several, OUTPUT gets each format's extension.")
@click.option("--no-kernel", is_flag=True, help="Leave kernel frames out.")
@click.option("--profile", "profile_types", default="cpu", show_default=True, metavar="TYPES",
              help=f"Comma-separated profile types: {', '.join(PROBES)}. Several write one file each.")
@click.option("--offcpu-min-us", type=click.IntRange(min=0), default=0, show_default=True,
              help="Off-CPU: ignore blocks shorter than this (microseconds).")
@click.option("--heap-sample-bytes", type=click.IntRange(min=1), default=512 * 1024, show_default=True,
              help="Heap (native): mean bytes between sampled allocations, like Go's MemProfileRate.")
@click.option("--unwind", type=click.Choice([m.value for m in UnwindMode]), default=DEFAULT_UNWIND.value,
              show_default=True,
              help="CPU user stacks: cfi walks a copy of the stack top with each binary's unwind tables "
                   "(leaf callers, code without frame pointers); fp follows frame pointers only.")
@click.option("--otlp-endpoint", metavar="URL", default=None,
              help="Send the profiles to an OTLP collector: http(s)://host:4318 (HTTP), "
                   "grpc://host:4317 or host:4317 (gRPC, TLS unless --otlp-insecure).")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http"]), default=None,
              help="Override the protocol the endpoint's scheme implies.")
@click.option("--otlp-header", "otlp_headers", metavar="KEY=VALUE", multiple=True,
              help="Header (gRPC metadata) to send, e.g. an auth token (repeatable).")
@click.option("--otlp-insecure", is_flag=True, help="Plaintext gRPC to a host:port endpoint.")
@click.option("--otlp-ca-file", type=click.Path(dir_okay=False), default=None,
              help="PEM CA bundle to verify the collector's certificate with.")
@click.option("--otlp-timeout", type=click.FloatRange(min=0, min_open=True), default=OTLP_TIMEOUT_S,
              show_default=True, help="Seconds one export may take, retries included.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(pids: tuple[int, ...], all_: bool, duration: float | None, frequency: int, output: Path | None,
           fmt: str, no_kernel: bool, profile_types: str, offcpu_min_us: int, heap_sample_bytes: int,
           unwind: str, otlp_endpoint: str | None,
           otlp_protocol: str | None, otlp_headers: tuple[str, ...], otlp_insecure: bool, otlp_ca_file: str | None,
           otlp_timeout: float, command: tuple[str, ...]) -> None:
    """Record stacks (CPU by default) to a pprof (folded, OTLP) file or an OTLP collector.

    \b
    Targets: --pid PID (repeatable), --all (default), or -- COMMAND ARGS
    (start it, profile it and its children, stop when it exits).
    With a COMMAND, bpfprof exits with the command's exit status (128+N if
    signal N ended it), as a shell would; 0 if it is still running at the end.
    With several --profile types, OUTPUT.TYPE.EXT is written for each.
    With --otlp-endpoint the profiles are sent in one export, and written to
    --output only if it is given; if sending fails they are saved to the file
    instead and the exit code is 1.
    """
    chosen = sum(bool(x) for x in (pids, all_, command))
    if chosen > 1:
        raise ConfigError("choose one target: --pid, --all or -- COMMAND")
    _check_frequency(frequency)
    names = parse_formats(fmt)
    write_files = output is not None or otlp_endpoint is None
    if output is None:
        output = Path(f"bpfprof-{time.strftime('%Y%m%d-%H%M%S')}{_extension(names[0])}")
    outputs = format_outputs(output, names)
    for path in outputs.values():
        _check_output(path)
    if "html" in names:
        from viewer.assets import check_assets  # noqa: PLC0415  (the viewer: only when asked for)

        check_assets()  # the page's library missing is said before recording, not after
    exporter = None
    if otlp_endpoint is not None:  # built now, so that a bad endpoint fails before the capture
        from exporters.otlp_sender import OtlpExporter, parse_headers  # noqa: PLC0415  (see OTLP_TIMEOUT_S)

        exporter = OtlpExporter(otlp_endpoint, protocol=otlp_protocol, headers=parse_headers(otlp_headers),
                                timeout_s=otlp_timeout, insecure=otlp_insecure, ca_file=otlp_ca_file)
    _debuginfod_from_environment()
    types = tuple(t.strip() for t in profile_types.split(",") if t.strip())
    for t in types:
        if t not in PROBES:
            raise ConfigError(f"--profile {t!r} is not a profile type: choose from {', '.join(PROBES)}")
    options = RecordOptions(
        frequency_hz=frequency, duration_s=duration,
        pids=tuple(validate_pids(pids)) if pids else None,
        command=tuple(validate_command(command)) if command else None,
        with_kernel=not no_kernel, profiles=types or ("cpu",),
        offcpu_min_ns=offcpu_min_us * 1000, heap_sample_bytes=heap_sample_bytes, unwind=UnwindMode(unwind))
    if options.pids:
        what = "pid " + ", ".join(map(str, options.pids))
    elif command:
        what = command[0] + " and its children"
    else:
        what = "all processes"
    until = f"for {duration:g}s" if duration else ("until it exits" if command else "until Ctrl-C")

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    session = RecordSession(options)
    progress = _Progress()
    try:
        stats = session.run(stop, progress, on_start=lambda: click.echo(
            f"sampling {what} at {frequency} Hz {until}", err=True))
    finally:
        progress.done()
        for s, h in previous.items():
            signal.signal(s, h)
    profiles = session.build_profiles()
    first = f", first after {stats.first_sample_s:.2f}s" if stats.first_sample_s is not None else ""
    click.echo(f"{stats.samples} samples of {stats.processes} processes in {stats.elapsed_s:.1f}s{first}")
    if stats.unwind:
        click.echo(f"unwind: {stats.unwind}")
    for line in stats.drop_lines():
        click.echo(f"dropped: {line}")
    for profile in profiles:
        _print_top(profile, len(profiles) > 1)
    facts = _facts(what, command, stats, frequency)
    written = _write_all(profiles, outputs, facts) if write_files else []
    if exporter is not None:
        _send(exporter, profiles, lambda: written or _write_all(profiles, outputs, facts))
    if stats.command_status:
        raise click.exceptions.Exit(stats.command_status)


def _debuginfod_from_environment() -> None:
    """Let the capture's symbolizer ask the debuginfod servers DEBUGINFOD_URLS names (as gdb and perf do)."""
    urls = urls_from(())
    for url in urls:
        if not check_url(url):
            raise ConfigError(f"DEBUGINFOD_URLS: {url!r} is not an http:// or https:// URL with a host")
    if urls and DEFAULT_CACHE.debuginfod is None:
        DEFAULT_CACHE.debuginfod = DebuginfodClient(urls)


def parse_formats(text: str) -> list[str]:
    """`--format pprof,html` -> ['pprof', 'html'] (ConfigError naming a format that is not one)."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    for n in names:
        if n not in FORMAT_NAMES:
            raise ConfigError(f"--format {n!r} is not a format: choose from {', '.join(sorted(FORMAT_NAMES))}")
    if not names:
        raise ConfigError("--format is empty: choose from " + ", ".join(sorted(FORMAT_NAMES)))
    return names


def format_outputs(output: Path, names: list[str]) -> dict[str, Path]:
    """The file of each format: OUTPUT itself for one format; else OUTPUT without a known extension + each's."""
    if len(names) == 1:
        return {names[0]: output}
    stem = output.name
    for ext in sorted({_extension(n) for n in FORMAT_NAMES}, key=len, reverse=True):
        if stem.endswith(ext):
            stem = stem.removesuffix(ext)
            break
    return {n: output.with_name(stem + _extension(n)) for n in names}


def _facts(what: str, command: tuple[str, ...], stats: CaptureStats, frequency: int) -> list[tuple[str, str]]:
    """The capture's facts for the HTML page: what ran, for how long, at what rate, what was lost."""
    facts = [("command", shlex.join(command) if command else what), ("duration", f"{stats.elapsed_s:.1f} s"),
             ("frequency", f"{frequency} Hz"), ("samples", f"{stats.samples:,}"),
             ("processes", str(stats.processes))]
    facts.extend(("lost", line) for line in stats.drop_lines())
    if not stats.losses:
        facts.append(("lost", "nothing"))
    return facts


def _write_all(profiles: list[Profile], outputs: dict[str, Path], facts: list[tuple[str, str]]) -> list[Path]:
    written = []
    for name, output in outputs.items():
        if name == "html":
            from viewer.report import encode_html  # noqa: PLC0415  (the viewer: only when asked for)

            fmt = OutputFormat("html", ".html", lambda p: encode_html(p, facts))
        else:
            fmt = FORMATS[name]
        written.extend(_write(profiles, output, fmt))
    return written


def _write(profiles: list[Profile], output: Path, out_format: OutputFormat) -> list[Path]:
    paths = []
    for profile in profiles:
        path = output if len(profiles) == 1 else per_type_path(output, profile.kind, out_format.extension)
        path.write_bytes(out_format.encode(profile))
        click.echo(f"wrote {path}")
        paths.append(path)
    return paths


def _send(exporter: OtlpExporter, profiles: list[Profile], save: Callable[[], list[Path]]) -> None:
    """One export of all profiles; on failure save them (unless written already), say so in one line, exit 1."""
    from exporters.otlp import encode_otlp  # noqa: PLC0415  (see OTLP_TIMEOUT_S)
    from exporters.otlp_sender import ExportStatus  # noqa: PLC0415

    try:
        result = exporter.export(encode_otlp(profiles, socket.gethostname()))
    finally:
        exporter.shutdown()
    if result.ok:
        rejected = (f"; the collector rejected {result.rejected_profiles} profile(s): {result.message}"
                    if result.status == ExportStatus.PARTIAL_SUCCESS else "")
        click.echo(f"sent to {exporter.endpoint} in {result.attempts} attempt(s){rejected}")
        return
    saved = save()
    where = f"; capture saved to {', '.join(map(str, saved))}" if saved else ""
    click.echo(f"bpfprof: error: could not export to {result.message}{where}", err=True)
    raise click.exceptions.Exit(1)


def per_type_path(output: Path, kind: str, extension: str) -> Path:
    """OUTPUT.TYPE.EXT: 'app.pb.gz' -> 'app.heap.pb.gz', 'app' -> 'app.heap.pb.gz'."""
    name = output.name.removesuffix(extension)
    return output.with_name(f"{name}.{kind}{extension}")


def _print_top(profile, titled: bool) -> None:
    index = next((i for i, t in enumerate(profile.sample_types) if t.type == profile.default_sample_type), 0)
    total = profile.total(index)
    if not total:
        return
    unit = profile.sample_types[index]
    if titled:
        click.echo(f"{profile.kind}: {unit.type}/{unit.unit}")
    click.echo(f"{'flat%':>7} {'cum%':>7}  function")
    for f in top_functions(profile, 10, value_index=index):
        click.echo(f"{100 * f.flat / total:6.2f}% {100 * f.cum / total:6.2f}%  {f.name}")
