"""Core never names a method: no module of platform/core (nor eval/accuracy, nor the Ray
layers' serve/ and tune/) imports a method module, at the top or inside a function. They
may import the registry package itself (``ray_unlearn.platform.methods``: its registry
and base interface)."""

from __future__ import annotations

import ast
from pathlib import Path

import ray_unlearn

ROOT = Path(ray_unlearn.__file__).parent
ALLOWED = {
    "ray_unlearn.platform.methods",
    "ray_unlearn.platform.methods.registry",
    "ray_unlearn.platform.methods.base",
}
CHECKED = [
    *sorted((ROOT / "platform" / "core").glob("*.py")),
    ROOT / "platform" / "eval" / "accuracy.py",
    *sorted((ROOT / "serve").glob("*.py")),
    *sorted((ROOT / "tune").glob("*.py")),
]


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (ROOT / rel).is_dir() or (ROOT / rel).with_suffix(".py").is_file()


def method_imports(path: Path) -> list[str]:
    """Every method module ``path`` imports (``import x``, ``from x import y``, anywhere)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module in ALLOWED:  # ``from ...methods import s3t`` names a module too
                names = [f"{node.module}.{a.name}" for a in node.names]
                names = [n for n in names if _is_module(n)]
        else:
            continue
        found += [
            n for n in names if n.startswith("ray_unlearn.platform.methods") and n not in ALLOWED
        ]
    return found


def test_core_imports_no_method_module():
    assert len(CHECKED) > 15
    bad = {str(p.relative_to(ROOT)): m for p in CHECKED if (m := method_imports(p))}
    assert bad == {}


def test_the_scan_sees_function_level_and_from_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text(
        "from ray_unlearn.platform.methods import registry, ShardState\n"
        "def f():\n"
        "    from ray_unlearn.platform.methods.s3t import runtime\n"
        "    from ray_unlearn.platform.methods import hybrid\n"
        "    import ray_unlearn.platform.methods.rum.strategy\n"
    )
    assert method_imports(p) == [
        "ray_unlearn.platform.methods.s3t",
        "ray_unlearn.platform.methods.hybrid",
        "ray_unlearn.platform.methods.rum.strategy",
    ]
