"""Integration tests load real BPF programs into the running kernel.

Every test here is marked `bpf`. Without root they skip, which the top-level
conftest turns into a failure when BPFPROF_REQUIRE_BPF=1 (set by CI).
"""

from __future__ import annotations

import os

import pytest

from recording import kill_leftover_groups


def pytest_collection_modifyitems(items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.bpf)


@pytest.fixture(autouse=True)
def _needs_root(request):
    if request.node.get_closest_marker("bpf") and os.geteuid() != 0:
        pytest.skip("loads BPF programs: needs root")


@pytest.fixture(autouse=True)
def _no_leftover_agents():
    """An agent a failed test did not stop is killed before the next test starts."""
    yield
    kill_leftover_groups()
