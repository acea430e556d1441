"""The layering of the source tree, pinned (as httpx pins its exported members).

Read from the source with ``ast``, so a rule holds whether or not a module is
imported by some test: an import inside a function counts as much as one at
the top, and so does ``importlib.import_module("name")``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATABASE_LIBRARIES = ("sqlalchemy", "alembic")


def _modules(*folders: str) -> list[Path]:
    paths = []
    for folder in folders:
        base = ROOT / folder
        assert base.is_dir(), f"{base} is missing: the layering test reads the source tree"
        paths += sorted(base.rglob("*.py"))
    return paths


def _imports(path: Path) -> set[str]:
    """Every top-level package ``path`` imports."""
    return {name.split(".")[0] for name in _imported_modules(path)}


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, by its full dotted name (``from a import b`` gives
    both ``a`` and ``a.b``: ``b`` may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_walk_sees_imports_of_every_kind(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import a.b\nfrom c.d import e\nfrom . import f\n"
        "def g():\n    import h\n    importlib.import_module('i.j')\n    __import__('k')\n"
    )
    assert _imports(module) == {"a", "c", "h", "i", "k"}


@pytest.mark.parametrize("path", _modules("scire_client", "schema"), ids=lambda path: _name(path))
def test_the_agent_and_the_contract_import_no_server_code(path: Path) -> None:
    assert "scire_server" not in _imports(path)


def _may_use_the_database(path: Path) -> bool:
    name = _name(path)
    return name in (
        "scire_server/store.py",
        "scire_server/models.py",
        "scire_server/migrations.py",
    ) or name.startswith(("scire_server/store/", "schema/migrations/"))


@pytest.mark.parametrize(
    "path",
    _modules("scire_server", "scire_client", "schema"),
    ids=lambda path: _name(path),
)
def test_only_the_store_models_and_migrations_import_the_database_libraries(path: Path) -> None:
    used = _imports(path) & set(DATABASE_LIBRARIES)
    assert not used or _may_use_the_database(path), f"{_name(path)} imports {sorted(used)}"


def test_the_listener_talks_to_the_api_only() -> None:
    """rpc.py identifies callers and records refusals through the API, never the store."""
    used = _imported_modules(ROOT / "scire_server" / "rpc.py")
    assert not {m for m in used if m == "scire_server.store" or m.startswith("scire_server.store.")}
    assert "scire_server.api" in used
