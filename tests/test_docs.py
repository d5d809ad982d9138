"""What a user reads first: a README read in minutes, and docs that speak of the product, not of how
it was made."""

from __future__ import annotations

import importlib
import re
import textwrap

from tests.support.common import REPO_ROOT

USER_DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# "issue 12", "item 3", "seed-004", a commit hash in parentheses
PROCESS_WORDS = re.compile(r"\b(issue|item|seed)[ -]?\d+|\([0-9a-f]{7,40}\)", re.IGNORECASE)


def test_the_readme_is_at_most_300_lines():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_readme_and_docs_name_no_work_items_or_commits():
    found = [f"{path.name}: {m.group(0)}" for path in USER_DOCS for m in PROCESS_WORDS.finditer(path.read_text())]
    assert found == []


def test_the_readmes_test_command_installs_what_the_tests_start():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "scripts/install-test-deps.sh && python3 -m venv .venv" in readme
    script = (REPO_ROOT / "scripts" / "install-test-deps.sh").read_text()
    for package in ("chromium", "redis-server", "nginx", "pgbouncer", "nodejs"):
        assert package in script and package.removesuffix("js") in readme.lower(), package
    assert "bash scripts/install-test-deps.sh" in (REPO_ROOT / ".ci" / "run").read_text()


def test_the_architecture_page_shows_each_packages_map_as_it_is():
    """docs/architecture.md's module-by-module section is each package's docstring map: a module added
    to a package (and so to its map, which tests/test_layout.py checks) shows here too."""
    page = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    packages = sorted(p.parent for p in (REPO_ROOT / "gateway").rglob("__init__.py")
                      if p.parent != REPO_ROOT / "gateway" and "__pycache__" not in p.parts and p.parent.name != "sql")
    for package in packages:
        rel = package.relative_to(REPO_ROOT / "gateway").as_posix()
        doc = importlib.import_module("gateway." + rel.replace("/", ".")).__doc__ or ""
        title = " ".join(doc.strip().partition("\n\n")[0].split())
        block = textwrap.dedent("\n".join(line for line in doc.partition("\n\n")[2].splitlines()
                                          if line.startswith("    ")))
        assert f"`gateway/{rel}/` — {title}\n\n```\n{block}\n```\n" in page, f"gateway/{rel}/ is not shown as it is"
