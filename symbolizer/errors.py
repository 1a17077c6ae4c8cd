"""The one error hierarchy of bpfprof.

It lives in the lowest package of the import graph (agent -> exporters ->
symbolizer) so that every package can raise a subclass of one root and the
CLI can turn any of them into a one-line message. Only the CLI does that.
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


class TargetError(BpfprofError):
    """The process to profile does not exist or cannot be started."""


class PrivilegeError(BpfprofError):
    """The agent lacks the privileges BPF needs (root or CAP_BPF+CAP_PERFMON)."""


class BpfLoadError(BpfprofError):
    """A BPF program could not be compiled, loaded or attached."""


class KernelHeadersError(BpfLoadError):
    """No kernel headers BCC could compile against were found."""
