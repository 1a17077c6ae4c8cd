"""Errors only the agent raises: its targets, its privileges, loading BPF.

They share the root of symbolizer/errors.py, so the CLI turns every one of
them into a one-line message the same way.
"""

from symbolizer.errors import BpfprofError


class TargetError(BpfprofError):
    """The process to profile does not exist or cannot be started."""


class PrivilegeError(BpfprofError):
    """The agent lacks the privileges BPF needs (root or CAP_BPF+CAP_PERFMON)."""


class BpfLoadError(BpfprofError):
    """A BPF program could not be compiled, loaded or attached."""


class KernelHeadersError(BpfLoadError):
    """No kernel headers BCC could compile against were found."""
