"""The one error hierarchy of bpfprof.

Its root lives in the lowest package of the import graph (agent -> exporters ->
symbolizer) so that every package can raise a subclass of one root and the
CLI can turn any of them into a one-line message. Only the CLI does that.
Errors only the agent raises (targets, privileges, BPF loading) are in
agent/errors.py.
"""


class BpfprofError(Exception):
    """Root of every error bpfprof raises on purpose; the message is for users."""


class ElfParseError(BpfprofError):
    """A file is not a well-formed ELF file, or a section of it is corrupt."""


class PclntabError(BpfprofError):
    """A Go .gopclntab is missing, of an unknown version, or corrupt."""


class ExportError(BpfprofError):
    """A profile could not be encoded or delivered."""


class ConfigError(BpfprofError):
    """A flag, config key or value is invalid."""


class InputTooLarge(ExportError):
    """An input, or what it decompresses to, is over its size limit (a gzip bomb stops here)."""
