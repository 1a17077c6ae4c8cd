"""The output formats a profile can be written as, by name (`--format pprof`)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from exporters.folded import encode_folded
from exporters.pprof import encode_pprof
from exporters.profile import Profile


@dataclass(frozen=True)
class OutputFormat:
    """A file format: its name, the extension files get, and its pure encoder."""

    name: str
    extension: str
    encode: Callable[[Profile], bytes]


def _otlp_bytes(profile: Profile) -> bytes:
    from exporters.otlp import encode_otlp_bytes  # noqa: PLC0415  (the OTLP protobufs: only when asked for)

    return encode_otlp_bytes([profile], socket.gethostname())


FORMATS: dict[str, OutputFormat] = {
    "pprof": OutputFormat("pprof", extension=".pb.gz", encode=encode_pprof),
    "folded": OutputFormat("folded", extension=".folded", encode=encode_folded),
    # The binary ExportProfilesServiceRequest, as sent to a collector; host.name is this host's.
    "otlp": OutputFormat("otlp", extension=".otlp.pb", encode=_otlp_bytes),
}
