"""The data package imports one way (shapes <- splits <- loaders / throughput), with no
function-level import hiding a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import fastmlp.data

DATA = Path(fastmlp.data.__file__).parent


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """``(module, at_top_level)`` for every ``fastmlp.data.*`` import in ``tree``."""
    top = {id(n) for n in getattr(tree, "body", [])}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("fastmlp.data."):
                out.append((name.removeprefix("fastmlp.data."), id(node) in top))
    return out


def test_data_modules_import_one_way_at_top_level() -> None:
    graph: dict[str, set[str]] = {}
    for path in sorted(DATA.glob("*.py")):
        imports = _imports(ast.parse(path.read_text()))
        nested = [m for m, top in imports if not top]
        assert not nested, f"{path.name} imports {nested} inside a function"
        graph[path.stem] = {m for m, _ in imports}

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join((*stack, node))}"
        for nxt in graph.get(node, ()):
            visit(nxt, (*stack, node))

    for module in graph:
        visit(module, ())
