"""The layout's rules, checked on the source (AST), not by importing it.

* ``ray_unlearn/platform/`` imports no Ray anywhere (function-level and ``TYPE_CHECKING``
  imports included): the platform is the plain-Python half that Ray layers
  (``ray_unlearn/train``, ``serve``, ``tune``) drive.
* No import circle in ``platform/`` other than the method registry's own registration
  (``methods/__init__.py`` imports each built-in method, whose modules import
  ``methods.base``, which runs ``methods/__init__.py``). The graph has one edge per
  ``import`` that runs when the module is loaded. It leaves out imports inside functions
  (they run after every module is loaded, so they cannot meet a half-initialised module)
  and ``if TYPE_CHECKING:`` blocks (type hints only: many modules name the run's context,
  ``core.run.RunContext``, in signatures while ``core.run`` builds on them). Importing
  ``a.b.c`` counts as an edge to ``a.b.c`` only (not to the packages above it), so the
  registry's package ``__init__`` is not on every path.
* No module in ``platform/`` over :data:`MAX_LINES` lines, except the few listed in
  :data:`OVERSIZE` with the reason each is still there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "ray_unlearn" / "platform"
PACKAGE = "ray_unlearn.platform"

MAX_LINES = 500
#: Modules still over MAX_LINES, path relative to platform/ -> why. Remove an entry when its
#: module is split; the test fails on an entry that no longer applies.
OVERSIZE: dict[str, str] = {}
#: The registry's own registration: the one package allowed on an import circle.
REGISTRY = f"{PACKAGE}.methods"


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of platform/ (a package is its __init__)."""
    out = {}
    for path in sorted(PLATFORM.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement loads (``from a import b``: ``a.b`` if that is a
    module, else ``a``); relative imports resolved against ``module``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is loaded: top-level statements and those nested in
    top-level ``if`` / ``try`` / ``with`` blocks; not those inside functions or classes, nor
    under ``if TYPE_CHECKING:`` (its ``else`` branch does run)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, ast.If | ast.Try | ast.With):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _module_level(tree):
            edges.update(t for t in _imported(node, name, is_package) if t in modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_platform_imports_no_ray():
    found = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # every import, at any depth
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                for target in _imported(node, name, path.name == "__init__.py"):
                    if target == "ray" or target.startswith("ray."):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not found, "ray_unlearn/platform/ must not import Ray:\n" + "\n".join(found)


def test_no_import_circle_in_platform_but_the_registry():
    graph = _graph(_modules())
    # The registration circle: the registry package imports the methods it registers, and
    # they import methods.base, which loads the package first. Drop the registry's own
    # edges to its methods, then nothing may be left on a circle.
    graph[REGISTRY] = {t for t in graph[REGISTRY] if not t.startswith(REGISTRY + ".")}
    circles = _circles(graph)
    assert not circles, "import circles in platform/ (module-level imports):\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_at_module_level_only():
    tree = ast.parse(
        "import x\nif TYPE_CHECKING:\n    import y\nelse:\n    import t\ntry:\n    import z\n"
        "except ImportError:\n    import w\ndef f():\n    import v\nclass C:\n    import u\n"
        "if typing.TYPE_CHECKING:\n    import s\n"
    )
    names = sorted(n.names[0].name for n in _module_level(tree))
    assert names == ["t", "w", "x", "z"]
    rel = ast.parse("from ..core import data").body[0]
    assert _imported(rel, f"{PACKAGE}.methods.sisa", False) == [
        f"{PACKAGE}.core",
        f"{PACKAGE}.core.data",
    ]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_platform_modules_are_small(name):
    path = _modules()[name]
    rel = path.relative_to(PLATFORM).as_posix()
    lines = len(path.read_text().splitlines())
    if rel in OVERSIZE:
        assert lines > MAX_LINES, f"{rel} is {lines} lines now: remove it from OVERSIZE"
    else:
        assert lines <= MAX_LINES, (
            f"{rel} has {lines} lines (at most {MAX_LINES}): split it by concern, or list it "
            "in OVERSIZE with the reason"
        )
