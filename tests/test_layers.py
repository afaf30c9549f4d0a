"""The package's layering: no import circle, and no module imports upward.

Every ``import`` and ``from ... import`` naming ``smtp_tracker`` is read with
:mod:`ast`, module-level and function-level alike (a lazy import is still a
dependency), from the source files themselves, so nothing needs importing.

The layers, lowest first, read as the pipeline: the basic vocabulary (errors,
logs, the URL scheme, TLS), the message rewrite (``mime``), the store and the
classification of events, the SMTP side, the tracking stage that joins them,
the web listeners and the events sent out, the long-running tasks beside
them, the configuration that selects all of these and its reload, and at the
top the composition root, the other process shapes built from its parts
(milter, workers) and the command line.  A module may import its own layer and any layer below.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "smtp_tracker"

#: Lowest first; each entry is one layer of top-level names under smtp_tracker.
LAYERS: list[set[str]] = [
    {"", "errors", "logs", "__version__"},
    {"tokens", "tls"},
    {"mime", "dkim"},
    {"store"},
    {"classification"},
    {"smtp"},
    {"tracking"},
    {"web", "webhooks"},
    {"metrics", "pruner"},
    {"config"},
    {"reload"},
    {"app"},
    {"milter", "workers"},
    {"cli", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """The smtp_tracker modules (or module attributes) that *path* imports."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "smtp_tracker")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")
                if not is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            if module.split(".")[0] != "smtp_tracker":
                continue
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(path, name):
            # "from pkg import sub" names a module; "from mod import attr" an attribute.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def _layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module}: smtp_tracker.{top} is in no layer of tests/test_layers.py")


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        _layer_of(module)


def test_no_module_imports_upward() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer_of(target) > _layer_of(module)
    )
    assert upward == []


def test_no_import_circle() -> None:
    graph = _graph()
    # Package __init__ files re-export their own submodules: an edge from a
    # submodule to its package's __init__ is how "from pkg import x" reads
    # and is not a circle of responsibilities.
    edges = {
        module: {t for t in targets if not module.startswith(t + ".")}
        for module, targets in graph.items()
    }
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert circles == []


@pytest.mark.parametrize(
    ("module", "target", "upward"),
    [("smtp_tracker.store.sqlite", "smtp_tracker.web.site", True), ("x.web.a", "x.store", False)],
)
def test_the_check_itself_sees_an_upward_import(module: str, target: str, upward: bool) -> None:
    assert (_layer_of(target) > _layer_of(module)) is upward
