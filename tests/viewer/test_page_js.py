"""The page's JS has its own tests (viewer/js_tests, node's test runner); this runs them under pytest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

VIEWER = Path(__file__).resolve().parents[2] / "viewer"


def test_flame_js_under_node():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (packaging/setup.sh installs it)")
    proc = subprocess.run([node, "--test", str(VIEWER / "js_tests")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# fail 0" in proc.stdout


def test_page_inlines_every_asset():
    from viewer.assets import render_page  # noqa: PLC0415

    page = render_page().decode()
    assert "/*{{" not in page and "bpfflame" in page and "bpfdom" in page and "d3-flame-graph" in page
    assert page.count("<script>") == page.count("</script>") == 6
