"""Profile files users name on the command line (`convert`, `view`, `diff`): read bounded, format sniffed.

One home for what those commands share: the extension table, the bounded
read, the decode, and one-line errors that name the file.
"""

from __future__ import annotations

from pathlib import Path

from exporters.bounded_input import read_bounded
from exporters.otlp import decode_otlp
from exporters.pprof import MAX_PPROF_BYTES
from exporters.pprof_reader import profile_from_pprof
from exporters.profile import Profile
from symbolizer.errors import ConfigError, ExportError

# File name endings that say the format; anything else is sniffed (gzip is pprof).
SUFFIXES = {".otlp.pb": "otlp", ".otlp": "otlp", ".pb.gz": "pprof", ".pprof": "pprof", ".pprof.gz": "pprof"}
# Most bytes read (OTLP files are not compressed, so this is also their decoded size).
MAX_INPUT_BYTES = MAX_PPROF_BYTES


def format_of(path: Path) -> str | None:
    """'pprof' or 'otlp' from the file name's ending; None when it does not say."""
    name = path.name.lower()
    return next((fmt for suffix, fmt in SUFFIXES.items() if name.endswith(suffix)), None)


def read_profiles(path: Path) -> tuple[str, list[Profile]]:
    """The format and profiles of a pprof or OTLP file.

    Raises ConfigError (cannot read) or ExportError (not a profile file),
    each one line naming the file.
    """
    try:
        data = read_bounded(path, MAX_INPUT_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except ExportError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    fmt = format_of(path) or ("pprof" if data[:2] == b"\x1f\x8b" else "otlp")
    try:
        if fmt == "otlp":
            profiles = decode_otlp(data)
            if not profiles:
                raise ExportError("it holds no OTLP profiles")
            return fmt, profiles
        return fmt, [profile_from_pprof(data)]
    except ExportError as e:
        raise ExportError(f"{path} is not a {'pprof' if fmt == 'pprof' else 'OTLP profiles'} file: {e}") from None


def read_one(path: Path, kind: str = "") -> Profile:
    """The one profile of a file (of `kind` when given and the file holds several); ExportError otherwise."""
    _, profiles = read_profiles(path)
    if kind:
        chosen = [p for p in profiles if p.kind == kind]
        if not chosen:
            have = ", ".join(sorted({p.kind or "?" for p in profiles}))
            raise ExportError(f"{path} holds no {kind} profile (it holds: {have})")
        return chosen[0]
    if len(profiles) > 1:
        have = ", ".join(p.kind or "?" for p in profiles)
        raise ExportError(f"{path} holds {len(profiles)} profiles ({have}): choose one with --type")
    return profiles[0]
