"""Each module's ``__all__`` is its public surface (as httpx tests its own).

* every name a module lists in ``__all__`` exists in it, once;
* a package's ``__init__`` exports exactly its public names: whatever it
  binds without a leading underscore (other than its submodules) is listed.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import smtp_tracker


def _modules() -> list[tuple[str, bool]]:
    """(dotted name, is a package) for every module, found without importing any."""
    found = [("smtp_tracker", True)]
    for info in pkgutil.walk_packages(smtp_tracker.__path__, "smtp_tracker."):
        if not info.name.endswith("__main__"):
            found.append((info.name, info.ispkg))
    return sorted(found)


MODULES = [name for name, _ in _modules()]
PACKAGES = [name for name, is_package in _modules() if is_package]


@pytest.mark.parametrize("name", MODULES)
def test_every_listed_name_exists_once(name: str) -> None:
    module = importlib.import_module(name)
    listed = getattr(module, "__all__", None)
    if listed is None:
        pytest.skip(f"{name} has no __all__")
    assert len(listed) == len(set(listed)), f"{name}.__all__ lists a name twice"
    missing = [n for n in listed if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ lists names it does not define"


def _bound_here(package: types.ModuleType) -> set[str]:
    """Public names the package's ``__init__`` defines or takes from its own submodules.

    Names it imports from elsewhere (``typing``, a sibling package) are its
    tools, not its surface.
    """
    name = package.__name__
    source = Path(package.__file__ or "").read_text(encoding="utf-8")
    bound: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Assign):
            bound.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            bound.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module == name or module.startswith(name + "."):
                bound.update(a.asname or a.name for a in node.names)
    return {n for n in bound if not n.startswith("_") and n not in {"annotations"}}


@pytest.mark.parametrize("name", PACKAGES)
def test_a_package_exports_exactly_its_public_names(name: str) -> None:
    package = importlib.import_module(name)
    listed = {n for n in getattr(package, "__all__", []) if not n.startswith("__")}
    public = {
        n
        for n in _bound_here(package)
        if not isinstance(getattr(package, n, None), types.ModuleType)
    }
    assert listed == public
