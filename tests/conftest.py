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


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Caches that outlive a process (unwind tables) go to a directory of this run's own.

    A table cached by another checkout's code must never answer a test;
    child bpfprof processes inherit the variable.
    """
    os.environ["BPFPROF_CACHE_DIR"] = str(tmp_path_factory.mktemp("bpfprof-cache"))
    yield
