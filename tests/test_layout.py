"""The package's shape: a few modules at the top, layered packages that say what they own, and
front doors that never reach into each other."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import gateway

ROOT = Path(gateway.__file__).resolve().parent
DOORS = ("native", "openai", "anthropic")


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
