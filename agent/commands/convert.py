"""`bpfprof convert IN OUT`: OTLP profiles file to pprof and back, so `go tool pprof` can read any OTLP output."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from exporters.bounded_input import read_bounded
from exporters.otlp import decode_otlp, encode_otlp_bytes
from exporters.pprof import MAX_PPROF_BYTES, encode_pprof
from exporters.pprof_reader import profile_from_pprof
from exporters.profile import Profile
from symbolizer.errors import ConfigError, ExportError

# File name endings that say the format; anything else needs --to (output) or is sniffed (input).
_SUFFIXES = {".otlp.pb": "otlp", ".otlp": "otlp", ".pb.gz": "pprof", ".pprof": "pprof", ".pprof.gz": "pprof"}
_EXTENSION = {"otlp": ".otlp.pb", "pprof": ".pb.gz"}
# Most bytes of IN read (OTLP files are not compressed, so this is also their decoded size).
MAX_INPUT_BYTES = MAX_PPROF_BYTES


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((fmt for suffix, fmt in _SUFFIXES.items() if name.endswith(suffix)), None)


def _read(path: Path) -> tuple[str, list[Profile]]:
    """The profiles of IN; ExportError/ConfigError with one line naming the file for anything wrong."""
    try:
        data = read_bounded(path, MAX_INPUT_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except ExportError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    fmt = _format_of(path) or ("pprof" if data[:2] == b"\x1f\x8b" else "otlp")
    try:
        if fmt == "otlp":
            profiles = decode_otlp(data)
            if not profiles:
                raise ExportError("it holds no OTLP profiles")
            return fmt, profiles
        return fmt, [profile_from_pprof(data)]
    except ExportError as e:
        raise ExportError(f"{path} is not a {'pprof' if fmt == 'pprof' else 'OTLP profiles'} file: {e}") from None


@click.command()
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Choice(["pprof", "otlp"]), default=None,
              help="Output format. Default: from OUT's extension (.pb.gz/.pprof, .otlp.pb), else the other one.")
@click.option("--host-name", default=None, help="host.name of OTLP output. Default: this host's name.")
def convert(src: Path, dst: Path, to: str | None, host_name: str | None) -> None:
    """Convert an OTLP profiles file (.otlp.pb) to pprof (.pb.gz), or pprof to OTLP.

    \b
    The input format comes from IN's extension, else its content (gzip is
    pprof). An OTLP file with several profile types gives OUT.TYPE.EXT each.
    """
    src_fmt, profiles = _read(src)
    fmt = to or _format_of(dst) or ("pprof" if src_fmt == "otlp" else "otlp")
    if fmt == "otlp":
        outputs = [(dst, encode_otlp_bytes(profiles, host_name or socket.gethostname()))]
    elif len(profiles) == 1:
        outputs = [(dst, encode_pprof(profiles[0]))]
    else:
        stem = dst.name.removesuffix(_EXTENSION["pprof"])
        outputs = [(dst.with_name(f"{stem}.{p.kind or i}{_EXTENSION['pprof']}"), encode_pprof(p))
                   for i, p in enumerate(profiles)]
    for path, data in outputs:
        try:
            path.write_bytes(data)
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {e.strerror}") from None
        samples = sum(len(p.samples) for p in profiles)
        click.echo(f"wrote {path} ({fmt}, {samples} samples)")
