"""The house keeps its shape: imports run one way between folders, and no module imports in a circle.

Read from the sources (ast), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "symbolizer", "exporters", "viewer")
# Each agent folder may import only those listed after it (and itself); README "How it works" draws this.
AGENT_LAYERS = ("commands", "daemon", "capture", "probes", "tracectx", "go", "unwind", "processes", "bpfload",
                "errors")
# Between top-level packages (DESIGN.md): agent -> viewer (serve's command only), exporters, symbolizer.
ALLOWED = {"agent": {"viewer", "exporters", "symbolizer", "bpf"}, "viewer": {"exporters", "symbolizer"},
           "exporters": {"symbolizer"}, "symbolizer": set()}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "node_modules" in path.parts or path.name.endswith("_pb2.py"):
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in (*PACKAGES, "bpf")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "agent" and len(parts) > 1 and parts[1] in AGENT_LAYERS else None


def test_imports_run_one_way():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        top = name.split(".")[0]
        for target in _imports(path, modules):
            other = target.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                wrong.append(f"{name} -> {target}")
            if other == top == "agent" and _layer(name) and _layer(target) and _layer(name) != _layer(target):
                if AGENT_LAYERS.index(_layer(target)) < AGENT_LAYERS.index(_layer(name)):
                    wrong.append(f"{name} -> {target} (upward)")
            if other == "viewer" and top == "agent" and _layer(name) != "commands":
                wrong.append(f"{name} -> {target} (only `bpfprof serve`'s command may)")
    assert not wrong, wrong


def test_no_import_circles_and_no_module_imports_its_own_package():
    modules = _modules()
    graph = {name: {t for t in _imports(path, modules) if t in modules} for name, path in modules.items()}
    own = [f"{n} -> {t}" for n, ts in graph.items() for t in ts if n.startswith(t + ".")]
    assert not own, own
    # Tarjan-free check: a depth-first search that meets a module on its own path found a circle.
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles
