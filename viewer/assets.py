"""The page: one template with every asset inlined, so it works with no other request and offline.

The flame graph library comes from the npm registry (viewer/package.json,
installed into viewer/node_modules by packaging/setup.sh's `npm ci`); our own
JS and CSS sit in viewer/static. BPFPROF_VIEWER_NODE_MODULES points elsewhere
(an installed package that has no node_modules beside it).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from exporters.otlp_sender import ConfigError

HERE = Path(__file__).resolve().parent
ENV_NODE_MODULES = "BPFPROF_VIEWER_NODE_MODULES"

# Placeholder in the template -> file, relative to node_modules ("npm:") or to viewer/.
ASSETS = {
    "d3_flamegraph_css": "npm:d3-flame-graph/dist/d3-flamegraph.css",
    "d3_selection_js": "npm:d3-selection/dist/d3-selection.min.js",
    "d3_flamegraph_js": "npm:d3-flame-graph/dist/d3-flamegraph.min.js",
    "d3_flamegraph_colormapper_js": "npm:d3-flame-graph/dist/d3-flamegraph-colorMapper.min.js",
    "app_css": "static/app.css",
    "flame_js": "static/flame.js",
    "dom_js": "static/dom.js",
    "app_js": "static/app.js",
    "report_js": "static/report.js",
}
_PLACEHOLDER = re.compile(r"/\*\{\{(\w+)\}\}\*/|\{\{(\w+)\}\}")


def node_modules() -> Path:
    return Path(os.environ.get(ENV_NODE_MODULES) or HERE / "node_modules")


def _read(spec: str) -> str:
    if spec.startswith("npm:"):
        path = node_modules() / spec.removeprefix("npm:")
        if not path.is_file():
            raise ConfigError(f"web UI asset {path} is missing: run `npm ci` in {HERE} "
                              f"(packaging/setup.sh does), or set {ENV_NODE_MODULES}")
    else:
        path = HERE / spec
    return path.read_text(encoding="utf-8")


def _inline(name: str, text: str) -> str:
    # Inside <script>/<style>, only a closing tag can end the element early.
    if name.endswith("_js"):
        return text.replace("</script", "<\\/script")
    return text.replace("</style", "<\\/style")


def render_template(name: str, values: dict[str, str] | None = None) -> bytes:
    """A template of viewer/templates with every asset inlined and `values` put in its `/*{{key}}*/` and
    `{{key}}` places (the caller escapes them for where they go). ConfigError when npm assets are missing."""
    values = values or {}
    template = (HERE / "templates" / name).read_text(encoding="utf-8")

    def fill(m: re.Match) -> str:
        key = m.group(1) or m.group(2)
        return values[key] if key in values else _inline(key, _read(ASSETS[key]))

    return _PLACEHOLDER.sub(fill, template).encode()


@functools.cache
def render_page() -> bytes:
    """The one HTML page of serve, assets inlined. Raises ConfigError when the npm assets are not installed."""
    return render_template("index.html")


def check_assets() -> None:
    """Read every asset once: ConfigError now, before a capture, rather than when its page is written."""
    for spec in ASSETS.values():
        _read(spec)
