"""The top-level folders are the architecture's layers, and imports only run downwards:

    protos, cluster  <  actors  <  routing  <  deploy  <  tools  <  the `specserve` command (specserve_pkg/cli.py)

cluster/ is the control plane's state and services every process reads (config schema, KV block store and its event
stream, metrics, embedded Redis); actors/ hold models (the engine at the bottom); routing/ is the ingress and the
router; deploy/ turns a config into a running application; tools/ (benchmarks, fault injection, a client) use all
of it and nothing at run time uses them. Every import counts, including those inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["protos", "cluster", "actors", "routing", "deploy", "tools", "cli"]
RANK = {"protos": 0, "cluster": 0, "actors": 1, "routing": 2, "deploy": 3, "tools": 4, "cli": 5}


def _layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "specserve" or len(parts) < 2:
        return None
    top = "protos" if parts[1] == "v1" else parts[1]
    return top if top in RANK else None


def _source_files():
    for folder in ("protos", "cluster", "actors", "routing", "deploy", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            yield folder, path
    yield "cli", ROOT / "specserve_pkg" / "cli.py"


def import_edges() -> list[tuple[str, str, str]]:
    """(importing layer, imported layer, 'file: module') for every specserve import in the runtime folders."""
    edges = []
    for layer, path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                target = _layer_of_module(name)
                if target is not None and target != layer:
                    edges.append((layer, target, f"{path.relative_to(ROOT)}: {name}"))
    return edges


def test_relative_imports_are_not_used():
    """Absolute imports only, so the graph above sees every edge."""
    relative = [str(p.relative_to(ROOT)) for _, p in _source_files()
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert relative == []


def test_imports_only_run_down_the_layers():
    upward = [f"{src} -> {dst} ({where})" for src, dst, where in import_edges() if RANK[dst] >= RANK[src]]
    assert upward == [], "imports that run up (or across cluster/protos):\n" + "\n".join(upward)


def test_no_cycles_between_top_level_folders():
    graph: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for src, dst, _ in import_edges():
        graph[src].add(dst)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert [layer for layer in LAYERS if reaches(layer, layer, {layer})] == []


@pytest.mark.parametrize("module, forbidden", [
    ("actors/engine", "specserve.routing"),  # the engine owns block hashing; routing imports it, not the reverse
    ("actors/engine", "specserve.cluster"),  # the engine is plain torch: no Redis, config files or Ray Serve
])
def test_the_engine_stands_alone(module, forbidden):
    found = [f"{p.relative_to(ROOT)}: {forbidden}" for p in (ROOT / module).rglob("*.py")
             if forbidden in p.read_text()]
    assert found == []


def test_the_edges_are_real():
    """The graph is not empty by accident (a wrong root would pass every test above)."""
    layers = {(src, dst) for src, dst, _ in import_edges()}
    assert {("actors", "cluster"), ("routing", "actors"), ("deploy", "routing"), ("tools", "deploy")} <= layers
