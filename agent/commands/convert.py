"""`bpfprof convert IN OUT`: OTLP profiles file to pprof and back, so `go tool pprof` can read any OTLP output."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from exporters.otlp import encode_otlp_bytes
from exporters.pprof import encode_pprof
from exporters.profile_files import format_of, read_profiles
from symbolizer.errors import ConfigError

_EXTENSION = {"otlp": ".otlp.pb", "pprof": ".pb.gz"}


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
    src_fmt, profiles = read_profiles(src)
    fmt = to or format_of(dst) or ("pprof" if src_fmt == "otlp" else "otlp")
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
