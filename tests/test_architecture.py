"""The package's layering (docs/ARCHITECTURE.md), checked from the source: no import cycles
anywhere, every import points down the layers, and the kernels know only the buffer layout.

Imports are read with ``ast`` from every module, including imports inside functions (a
function-level import that dodges a cycle is still a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed name -> source folder (pyproject.toml's package-dir mapping).
PACKAGES = {"fastmlp": ROOT / "fastmlp", "fastmlp.kernels": ROOT / "kernels"}


# Lowest first. A module may import modules of its own layer's lower layers only (a module
# of the same layer only where listed in SAME_LAYER). Package __init__ modules re-export
# and are not part of the layers.
def _kernel_modules() -> list[str]:
    folder = ROOT / "kernels"
    return sorted(f"fastmlp.kernels.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


KERNELS = _kernel_modules()
LAYERS = [
    ["fastmlp.activations", "fastmlp.init"],
    ["fastmlp.stats.layout", "fastmlp.stats.config"],
    ["fastmlp.stats.buffers", "fastmlp.stats.algebra", "fastmlp.stats.diagnosis"],
    ["fastmlp.stats.snapshot"],
    ["fastmlp.stats.ranks"],
    KERNELS,  # the @triton.jit code: it imports nothing of fastmlp but the buffer layout
    ["fastmlp.backends.determinism", "fastmlp.backends.reference"],
    ["fastmlp.backends.cpu", "fastmlp.backends.launch"],
    ["fastmlp.backends.fused"],
    ["fastmlp.op"],
    ["fastmlp.tensor_parallel"],
    ["fastmlp.layers"],
    ["fastmlp.model_stats"],
    [
        "fastmlp.mlp",
        "fastmlp.probe",
        "fastmlp.jacobian",
        "fastmlp.distributed",
        "fastmlp.instrument",
        "fastmlp.tripwire",
    ],
    # The writers read snapshots; the monitor drives instrument, ModelStats and the
    # tripwire and hands snapshots to writers. (fastmlp.integrations: above the layers.)
    [
        "fastmlp.writers.base",
        "fastmlp.writers.jsonl",
        "fastmlp.writers.mlflow",
        "fastmlp.writers.tensorboard",
        "fastmlp.writers.wandb",
    ],
    ["fastmlp.monitor"],
]
# Above the layers: the run directory, the trainer, the reports, the CLI and the
# integrations (Lightning, HF Trainer). They use the public API; among themselves only the
# cycle check applies.
WRITERS = LAYERS[-2]
SAME_LAYER = {(a, b) for a in KERNELS for b in KERNELS} | {
    (a, "fastmlp.writers.base") for a in WRITERS if a != "fastmlp.writers.base"
}
# Imports of a package's public interface (its __init__) allowed inside the layers: the
# Triton backend imports the kernels package.
PACKAGE_IMPORTS = {("fastmlp.backends.fused", "fastmlp.kernels")}
# The only parts of fastmlp the kernels may import.
KERNELS_MAY_IMPORT = {"fastmlp.stats.layout"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name.startswith("fastmlp.kernels") and pkg == "fastmlp":
                continue  # not a source folder of fastmlp.kernels
            out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The fastmlp modules that module ``name`` imports (anywhere in its body, except in
    ``if TYPE_CHECKING:`` blocks, which never run)."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    base = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                mod = f"{parent}.{node.module}" if node.module else parent
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` where there is one.
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [mod, *subs]
        else:
            continue
        for t in targets:
            # ``import a.b.c`` runs a.b.c: keep the longest known module name.
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_module_map_is_complete():
    assert "fastmlp.op" in MODULES and KERNELS
    listed = {m for layer in LAYERS for m in layer}
    assert listed <= set(MODULES), listed - set(MODULES)


def test_no_import_cycles():
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_imports_point_down_the_layers(layer):
    rank = {m: i for i, ms in enumerate(LAYERS) for m in ms}
    bad = []
    for m in LAYERS[layer]:
        for n in GRAPH[m]:
            if (m, n) in PACKAGE_IMPORTS:
                continue
            if _is_package(n):
                bad.append(f"{m} imports the package {n} (import the module instead)")
            elif n not in rank:
                bad.append(f"{m} imports {n}, which sits above every layer")
            elif rank[n] > layer or (rank[n] == layer and (m, n) not in SAME_LAYER):
                bad.append(f"{m} (layer {layer}) imports {n} (layer {rank[n]})")
    assert not bad, "\n".join(bad)


# Modules above the layers that tests pin there: they use the model level's public API and
# nothing below it (no op, backend or kernel).
ABOVE = ["fastmlp.coordcheck", "fastmlp.commands.coordcheck"]


def test_modules_above_the_layers_use_the_public_api():
    listed = {m for layer in LAYERS for m in layer}
    low = {m for m in MODULES if m.startswith(("fastmlp.backends", "fastmlp.kernels"))}
    low |= {"fastmlp.op"}
    for m in ABOVE:
        assert m in MODULES and m not in listed, m
        assert not GRAPH[m] & low, (m, GRAPH[m] & low)
        # nothing in the layers imports it
        assert not [n for n in listed if m in GRAPH[n]], m


def test_kernels_know_only_the_buffer_layout():
    for m, deps in GRAPH.items():
        if m.startswith("fastmlp.kernels"):
            outside = {d for d in deps if not d.startswith("fastmlp.kernels")}
            assert outside <= KERNELS_MAY_IMPORT, (m, outside)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The checker itself: a function-level import is an edge."""
    src = "def f():\n    from fastmlp.layers import InstrumentedLinear\n"
    tree = ast.parse(src)
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    assert "fastmlp.layers" in GRAPH["fastmlp.model_stats"]
    assert any("fastmlp.stats.layout" in GRAPH[k] for k in KERNELS)


def test_each_backend_has_one_home():
    """The reference imports neither fast path nor the kernels; the launch module is
    private to the Triton backend; only the op picks a backend."""
    backends = {m for m in MODULES if m.startswith("fastmlp.backends.")}
    assert not {d for d in GRAPH["fastmlp.backends.reference"] if d in backends or "kernels" in d}
    for m, deps in GRAPH.items():
        if "fastmlp.backends.launch" in deps:
            assert m == "fastmlp.backends.fused", m
        if m not in backends and m != "fastmlp.op" and not m.startswith("fastmlp.kernels"):
            assert not deps & backends, (m, deps & backends)
