"""The package's shape: a few modules at the top, layered packages that say what they own, and
front doors that never reach into each other."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import gateway

ROOT = Path(gateway.__file__).resolve().parent
DOORS = ("native", "openai", "anthropic", "aisdk")


def packages() -> list[Path]:
    return sorted(p.parent for p in ROOT.rglob("__init__.py")
                  if p.parent != ROOT and "__pycache__" not in p.parts and p.parent.name != "sql")


def dotted(path: Path) -> str:
    return ".".join(("gateway", *path.relative_to(ROOT).parts))


def test_at_most_ten_modules_sit_at_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 10, top


@pytest.mark.parametrize("package", packages(), ids=dotted)
def test_each_package_says_what_it_owns_and_exports_its_modules(package: Path):
    module = importlib.import_module(dotted(package))
    assert module.__doc__ and len(module.__doc__.strip()) > 40, f"{dotted(package)} has no docstring"
    members = sorted([p.stem for p in package.glob("*.py") if p.name != "__init__.py"]
                     + [p.name for p in package.iterdir() if (p / "__init__.py").exists()])
    assert sorted(module.__all__) == members
    for name in members:  # each module named in the docstring's map
        assert name in module.__doc__, f"{dotted(package)}'s docstring does not say what {name} holds"


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("door", DOORS)
def test_a_front_door_imports_no_other_door(door: str):
    others = tuple(f"gateway.api.{d}" for d in DOORS if d != door)
    for path in (ROOT / "api" / door).glob("*.py"):
        reached = sorted(m for m in imports(path) if m.startswith(others))
        assert reached == [], f"{path.relative_to(ROOT)} imports {reached}"


def test_no_layer_below_the_doors_imports_a_door():
    for path in ROOT.rglob("*.py"):
        part = path.relative_to(ROOT).parts
        if part[0] in ("api", "app.py", "cli") or "__pycache__" in part:
            continue
        reached = sorted(m for m in imports(path) if m.startswith("gateway.api"))
        assert reached == [], f"{path.relative_to(ROOT)} imports {reached}"


# --- the tests' own shape: they mirror the package, share helpers only through tests/support/ and
# conftest.py, and say which of them start processes

TESTS = Path(__file__).resolve().parent
SUPPORT = TESTS / "support"


def modules_under_test() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)


def test_each_test_folder_mirrors_a_package_of_gateway():
    folders = sorted(p.parent.relative_to(TESTS) for p in TESTS.rglob("__init__.py")
                     if p.parent not in (TESTS, SUPPORT) and "__pycache__" not in p.parts)
    assert folders, "the tests sit in one flat folder"
    for folder in folders:
        assert (ROOT / folder / "__init__.py").exists(), f"tests/{folder} mirrors no gateway package"
    assert not list(SUPPORT.rglob("test_*.py")), "tests/support/ holds helpers, not tests"


def imported_parts(path: Path) -> set[str]:
    """The modules of tests/ a file imports, split into their parts: `tests.x.y`, or relative."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "tests"):
            names.add(node.module or "")
            names.update(f"{node.module or ''}.{a.name}" for a in node.names)  # also a module imported from a package
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "tests")
    return {part for name in names for part in name.split(".")}


def test_no_test_module_imports_another_or_conftest():
    """What test modules share lives in tests/support/ (imported) or conftest.py (fixtures, requested
    by name); a test module is never imported, so running one never runs or re-registers another."""
    wrong = []
    for path in [*modules_under_test(), *SUPPORT.glob("*.py"), TESTS / "conftest.py"]:
        parts = imported_parts(path)
        wrong += [f"{path.relative_to(TESTS)} imports {p}" for p in sorted(parts) if p.startswith("test_")]
        if "conftest" in parts and path.parent != SUPPORT:
            wrong.append(f"{path.relative_to(TESTS)} imports conftest: request its fixtures by name")
    assert wrong == []


# what starts a process: a subprocess (the CLI, `serve`, redis-server, nginx, pgbouncer), a browser
STARTS = {"subprocess", "Popen", "create_subprocess_exec", "create_subprocess_shell", "async_playwright",
          "start_embedded", "fork"}
OWN_SERVER = {"pg_dir"}  # a directory for an embedded PostgreSQL of the test's own


def mentions(node: ast.AST) -> set[str]:
    """The names and attributes a node uses, leaving out annotations (a type names no process)."""
    found: set[str] = set()
    todo = [node]
    while todo:
        item = todo.pop()
        if isinstance(item, ast.Name):
            found.add(item.id)
        elif isinstance(item, ast.Attribute):
            found.add(item.attr)
        for field, value in ast.iter_fields(item):
            if field in ("annotation", "returns"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    todo.append(child)
    return found


def parameters(node: ast.AST) -> set[str]:
    return {a.arg for f in ast.walk(node) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs}


def process_starters() -> set[str]:
    """The helpers, classes and fixtures in tests/support/ that start a process, directly or through
    another of them (a fixture through a fixture it requests)."""
    defs: dict[str, ast.AST] = {}
    for path in SUPPORT.glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs[node.name] = node
    starters = set(OWN_SERVER)
    while True:
        more = {name for name, node in defs.items() if name not in starters
                and (mentions(node) | parameters(node)) & (STARTS | starters)}
        if not more:
            return starters
        starters |= more


def marked(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return "processes" in {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute)}
    return False


def test_every_module_that_starts_processes_is_marked_and_no_other():
    """`pytest -m "not processes"` runs only what stays in this process (plus the session's database)."""
    starters = process_starters()
    assert {"GatewayProcess", "RedisServer", "Nginx", "redis_url", "browser", "tab", "run_cli"} <= starters
    wrong = []
    for path in modules_under_test():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        starts = bool(mentions(tree) & STARTS or imported & starters or parameters(tree) & starters)
        if starts != marked(tree):
            wrong.append(f"{path.relative_to(TESTS)}: {'starts' if starts else 'starts no'} processes")
    assert wrong == []
