"""Shared test set-up: fixture builders, the CI rule that BPF tests never skip, and the machine
shared between the suite's parallel workers (pytest-xdist)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

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
    child bpfprof processes inherit the variable. The run's parallel workers share it (entries are
    written atomically), so each program selection is compiled once a run, not once a worker.
    """
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the workers' directories are side by side in the run's
    path = root / "bpfprof-cache"
    path.mkdir(mode=0o700, exist_ok=True)
    os.environ["BPFPROF_CACHE_DIR"] = str(path)
    yield


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone: no other test runs beside it (pytest-xdist): it judges the machine's CPU (a cost "
        "budget), or its fixtures run for a wall time and need the CPU they ask for")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist every test holds the machine lock shared, an `alone` test holds it exclusive.

    Around the whole protocol, so the module fixtures a test sets up (a capture several tests read) are
    inside it too. A turnstile in front keeps waiting `alone` tests from being starved by the others.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"bpfprof-suite-{os.environ['PYTEST_XDIST_TESTRUNUID']}"  # the run's
    alone = item.get_closest_marker("alone") is not None
    with open(f"{base}.turnstile", "w") as turnstile, open(f"{base}.machine", "w") as machine:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if alone:
            fcntl.flock(machine, fcntl.LOCK_EX)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        else:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            fcntl.flock(machine, fcntl.LOCK_SH)
        yield
