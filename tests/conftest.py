"""Shared test set-up: fixture builders and the CI rule that BPF tests never skip."""

from __future__ import annotations

import os

import pytest

from fixtures.builder import build_c, build_go  # noqa: F401  (re-exported for tests)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (BPFPROF_REQUIRE_BPF=1, set by .ci/run) a skipped BPF test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("BPFPROF_REQUIRE_BPF") == "1" and report.skipped and item.get_closest_marker("bpf"):
        report.outcome = "failed"
        report.longrepr = f"BPF test skipped in CI, which must run it: {report.longrepr}"
