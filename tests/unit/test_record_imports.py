"""`bpfprof record` starts without importing what only some of its options need."""

from __future__ import annotations

import subprocess
import sys


def test_record_otlp_timeout_default_is_the_exporters():
    """`record` spells the default out so that it need not import the OTLP sender at every start."""
    from agent.commands import record  # noqa: PLC0415
    from exporters.otlp_sender import DEFAULT_TIMEOUT_S  # noqa: PLC0415

    assert record.OTLP_TIMEOUT_S == DEFAULT_TIMEOUT_S


def test_record_does_not_import_grpc_or_the_protobufs():
    """Neither OTLP's (only for --otlp-endpoint) nor pprof's (only once the capture is written)."""
    code = ("import sys, agent.cli, agent.commands.record; print(sorted(m for m in ('grpc', 'exporters.otlp', "
            "'exporters.otlp_sender', 'exporters.pprof', 'google.protobuf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
