"""Each module and package of ``smtp_tracker.web`` says what it offers: its ``__all__``.

As httpx checks its exports: ``__all__`` is sorted (as ruff's RUF022 sorts
it) and every name in it exists; every public class and function a module
defines is in it (nothing public by accident); a package re-exports only names
its modules export.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import smtp_tracker.web


def web_modules() -> list[str]:
    names = ["smtp_tracker.web"]
    for info in pkgutil.walk_packages(smtp_tracker.web.__path__, "smtp_tracker.web."):
        names.append(info.name)
    return sorted(names)


def isort_style(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return kind, name


def load(name: str) -> ModuleType:
    return importlib.import_module(name)


def test_the_layout_is_the_one_documented() -> None:
    assert set(web_modules()) >= {
        "smtp_tracker.web.site",
        "smtp_tracker.web.client_address",
        "smtp_tracker.web.public",
        "smtp_tracker.web.public.pixel",
        "smtp_tracker.web.public.click",
        "smtp_tracker.web.public.gif",
        "smtp_tracker.web.public.limits",
        "smtp_tracker.web.reports",
        "smtp_tracker.web.reports.app",
        "smtp_tracker.web.reports.api",
        "smtp_tracker.web.reports.auth",
        "smtp_tracker.web.reports.dashboard",
        "smtp_tracker.web.reports.users",
        "smtp_tracker.web.reports.openapi",
        "smtp_tracker.web.reports.templating",
    }


@pytest.mark.parametrize("name", web_modules())
def test_all_is_sorted_and_names_what_exists(name: str) -> None:
    module = load(name)
    exported = module.__all__
    assert list(exported) == sorted(exported, key=isort_style), name
    assert len(set(exported)) == len(exported), name
    missing = [item for item in exported if not hasattr(module, item)]
    assert missing == [], f"{name}.__all__ names what it lacks: {missing}"


@pytest.mark.parametrize("name", web_modules())
def test_every_public_class_and_function_defined_is_exported(name: str) -> None:
    module = load(name)
    defined = {
        item
        for item, value in vars(module).items()
        if not item.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    assert defined <= set(module.__all__), (
        f"{name}: public but not in __all__: {defined - set(module.__all__)}"
    )


@pytest.mark.parametrize(
    "name", [name for name in web_modules() if hasattr(load(name), "__path__")]
)
def test_a_package_re_exports_only_what_its_modules_export(name: str) -> None:
    package = load(name)
    for item in package.__all__:
        value = getattr(package, item)
        owner = getattr(value, "__module__", None)
        sources = [
            load(module)
            for module in web_modules()
            if module.startswith(name + ".") and item in getattr(load(module), "__all__", ())
        ]
        assert sources, f"{name}.{item} is exported by none of its modules ({owner})"
        assert all(getattr(source, item) is value for source in sources), (name, item)
