"""The package's import graph: layers that import only downwards, and no cycle.

Every import of a ``pyro_bll`` module is read from the source (lazy imports inside
functions included, ``if TYPE_CHECKING:`` blocks excluded) and checked against the layer
table below, which docs/api.md describes.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = {
    "pyro_bll.seed": 0,
    "pyro_bll.config": 0,
    "pyro_bll.families": 0,
    "pyro_bll.data": 0,
    "pyro_bll.measure": 0,
    "pyro_bll.core": 1,
    "pyro_bll.guides": 2,
    "pyro_bll.models": 2,
    "pyro_bll.methods": 3,
    "pyro_bll.tasks": 4,
    "pyro_bll.run": 5,
    "pyro_bll.distributed": 6,
    "pyro_bll.analysis": 7,
    "pyro_bll.testing": 7,
    "pyro_bll.cli": 8,
    "pyro_bll": 9,  # the package's __init__: re-exports only
}


def _modules() -> dict[str, Path]:
    """Module name -> source file; models/ and guides/ are pyro_bll.models / .guides."""
    found = {}
    files = [p for d in ("pyro_bll", "models", "guides") for p in (ROOT / d).rglob("*.py")]
    for path in sorted(files):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] != "pyro_bll":
            parts = ["pyro_bll", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` are for annotations
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "pyro_bll" or n.startswith("pyro_bll.")}


def test_every_import_runs_downwards():
    upward = []
    for module, path in _modules().items():
        for target in _imports(path):
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports into a higher layer:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle through them
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_package_root_holds_at_most_eight_modules():
    root = [p.name for p in (ROOT / "pyro_bll").glob("*.py")]
    assert len(root) <= 8, root
