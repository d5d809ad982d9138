"""Import edges: the configuration loads light, and no module reaches back up to one that imports it.

`import gateway.config` (what the CLI and every check of the environment need) loads neither the
web server, nor the metrics library, nor the database driver. And the import graph of gateway/,
counting every import wherever it sits (module level, `if TYPE_CHECKING:`, inside a function),
has no circle, apart from those through `gateway.state`, whose typed keys name the types of
every layer they hold.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gateway

pytestmark = pytest.mark.processes  # imports in a fresh interpreter (see pyproject.toml)

ROOT = Path(gateway.__file__).resolve().parent
HEAVY = ("aiohttp.web", "prometheus_client", "asyncpg")


def test_importing_the_configuration_loads_no_web_server_metrics_or_database_driver():
    code = ("import sys, gateway.config\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, list[str]]:
    """Each gateway module and the gateway modules it imports (a `from a.b import c` names a.b.c
    when that is a module, else a.b); the package `gateway` itself (a docstring) is left out."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, list[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = sorted(m for m in found if m in modules and m not in (name, "gateway"))
    return graph


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module, as a path a -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:  # a shortest way back to the component's first module
        start = min(component)
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in graph[v]:
                if w == start:
                    found.append([*paths[v], start])
                    queue.clear()
                    break
                if w in component and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return found


def test_the_cycle_finder_names_a_circle_by_its_path():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": []}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_module_imports_back_up_except_through_the_state_keys():
    graph = import_graph()
    assert "gateway.state" in graph and "gateway.config" in graph
    without_state = {m: [i for i in imports if i != "gateway.state"]
                     for m, imports in graph.items() if m != "gateway.state"}
    circles = [" -> ".join(c) for c in cycles(without_state)]
    assert circles == [], "\n".join(circles)


def test_observability_is_told_things_and_never_reaches_up():
    """Metrics, traces and logs import nothing of the gateway's but the configuration, errors and vocabulary
    (the store's usage record aside, named for its type only)."""
    graph = import_graph()
    allowed = {"gateway.config", "gateway.errors", "gateway.vocabulary", "gateway.store.usage"}
    for name, imports in graph.items():
        if name.startswith("gateway.observability."):
            reached = sorted(i for i in imports if not i.startswith("gateway.observability") and i not in allowed)
            assert reached == [], f"{name} imports {reached}"


def test_the_policy_and_replay_import_no_layer_above_them():
    graph = import_graph()
    assert "gateway.edge.auth" not in graph["gateway.policy.admission"]  # Principal is a value type below both
    assert "gateway.providers.chain" not in graph["gateway.generation.replay"]  # Attempt is a record in base
