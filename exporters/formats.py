"""The output formats a profile can be written as, by name (`--format pprof`)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from exporters.folded import encode_folded
from exporters.profile import Profile


@dataclass(frozen=True)
class OutputFormat:
    """A file format: its name, the extension files get, and its pure encoder."""

    name: str
    extension: str
    encode: Callable[[Profile], bytes]


def _pprof_bytes(profile: Profile) -> bytes:
    # the pprof protobufs (~15 ms) imported when the file is written, not before the first sample
    from exporters.pprof import encode_pprof  # noqa: PLC0415

    return encode_pprof(profile)


def _otlp_bytes(profile: Profile) -> bytes:
    from exporters.otlp import encode_otlp_bytes  # noqa: PLC0415  (the OTLP protobufs: only when asked for)

    return encode_otlp_bytes([profile], socket.gethostname())


FORMATS: dict[str, OutputFormat] = {
    "pprof": OutputFormat("pprof", extension=".pb.gz", encode=_pprof_bytes),
    "folded": OutputFormat("folded", extension=".folded", encode=encode_folded),
    # The binary ExportProfilesServiceRequest, as sent to a collector; host.name is this host's.
    "otlp": OutputFormat("otlp", extension=".otlp.pb", encode=_otlp_bytes),
}
