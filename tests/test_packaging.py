"""What an install ships: the migrations read through the package `gateway.sql` (the top-level sql/
mapped into the wheel), and every subpackage listed for the wheel. `.ci/wheel-smoke` checks a real
wheel end to end; these catch the same mistakes in the editable checkout, in a second."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from gateway.store import db

ROOT = Path(__file__).resolve().parent.parent


def test_migrations_come_from_the_package_in_the_order_of_the_files_in_top_level_sql():
    expected = sorted(p.name for p in (ROOT / "sql").glob("*.sql"))
    assert expected and expected[0] == "0001_init.sql"

    migrations = db.migration_files()

    assert [m.name for m in migrations] == expected
    # the same text, not just the same names: an editable install maps gateway.sql onto this sql/
    assert {m.name: m.read_bytes() for m in migrations} == {n: (ROOT / "sql" / n).read_bytes() for n in expected}


def test_the_migration_list_follows_the_package_not_a_path_next_to_the_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # a stand-in package: only NNNN_*.sql files count, sorted by name whatever the listing order
    package = tmp_path / "standin_migrations"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("0002_second.sql", "0010_tenth.sql", "0001_first.sql", "notes.sql", "0003_draft.txt"):
        (package / name).write_text("SELECT 1;\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(db, "MIGRATIONS_PACKAGE", "standin_migrations")
    try:
        assert [m.name for m in db.migration_files()] == ["0001_first.sql", "0002_second.sql", "0010_tenth.sql"]
    finally:
        sys.modules.pop("standin_migrations", None)


def test_every_subpackage_of_gateway_is_listed_for_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gateway").rglob("__init__.py")}

    assert set(config["packages"]) == on_disk | {"gateway.sql"}
    assert config["package-dir"] == {"gateway.sql": "sql"}
    assert config["package-data"] == {"gateway": ["static/*"], "gateway.sql": ["*.sql"]}
