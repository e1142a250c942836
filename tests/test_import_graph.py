"""The import graph keeps its direction (Note [planning core] in modelparallel/__init__.py).

Every ``import`` of the package, at module level or inside a function (``if TYPE_CHECKING:``
blocks excluded: they never run), is read with :mod:`ast` and put in a networkx graph of modules.
The rules:

- layers: ``ir <- tracer, cost_model <- plan <- partitioner <- codegen <- runtime <- front ends``
  (``api``, ``modelparallel.torch``, ``modelparallel.tensorflow``, ``cli``), with the pieces that
  everything reads (errors, units, the schedule vocabulary...) below them all: a module imports
  only modules of its own unit or of a lower layer;
- codegen and runtime never import the partitioner (a plan is all they need);
- the planning core imports no deep-learning framework, and neither does ``import modelparallel``
  (the modules it imports at module level, transitively);
- ``errors`` imports nothing of ours; no cycle among module-level imports.

A new top-level module or subpackage needs a layer in ``_LAYERS`` below.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "modelparallel"
FRAMEWORKS = ("torch", "tensorflow", "keras", "tf_keras", "jax", "transformers")

#: Layer of every unit (a top-level module or subpackage; the measuring half of cost_model is a
#: unit of its own). A unit may import units of lower layers only (or itself).
_LAYERS: dict[str, int] = {
    "errors": 0,
    "_version": 1, "_jsonfile": 1, "units": 1, "_notes": 1, "schedule": 1, "placement": 1,
    "step_trace": 1,
    "ir": 2,
    "tracer": 3, "cost_model": 3, "plan_config": 3,
    "plan": 4, "cost_model.measure": 4,
    "partitioner": 5, "report": 5, "parallel": 5, "planning_options": 5,
    "codegen": 6, "report_html": 6, "models": 6,
    "runtime": 7,
    "pipeline_state": 8,
    "api": 9,
    "__init__": 10,  # the package root: planning names eagerly, the API lazily (by name)
    "torch": 11, "tensorflow": 11, "cli": 11,
}
#: Modules of cost_model that measure on a device (torch code), whatever their folder.
_MEASURE = ("modelparallel.cost_model.measure", "modelparallel.cost_model.profile",
            "modelparallel.cost_model.calibrate")
#: The planning core: plans and reports from an IR file without a framework.
_CORE = ("errors", "_version", "_jsonfile", "units", "schedule", "ir", "plan_config", "plan",
         "cost_model", "partitioner", "report", "_notes", "planning_options")
#: Units that never import the partitioner.
_NO_PARTITIONER = ("codegen", "runtime")


@dataclass(frozen=True)
class _Import:
    """One import statement's target, where it is and whether it runs at import time."""

    target: str
    path: str
    line: int
    module_level: bool

    def where(self) -> str:
        kind = "module level" if self.module_level else "inside a function"
        return f"{self.path}:{self.line} ({kind})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "__pycache__" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, rel: str) -> Iterator[_Import]:
    """Every import in ``tree``, with relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, module_level: bool) -> Iterator[_Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from visit(sub, module_level)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield _Import(alias.name, rel, child.lineno, module_level)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for alias in child.names:
                    # ``from pkg import sub`` imports module pkg.sub when there is one
                    yield _Import(f"{mod}.{alias.name}", rel, child.lineno, module_level)
            inner = module_level and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from visit(child, inner)

    yield from visit(tree, True)


def _resolve(target: str, modules: dict[str, str]) -> str | None:
    """The module of ours or the framework ``target`` names; None for anything else."""
    top = target.split(".")[0]
    if top in FRAMEWORKS:
        return top
    if top != "modelparallel":
        return None
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _unit(module: str) -> str:
    if module.startswith(_MEASURE):
        return "cost_model.measure"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> nx.MultiDiGraph:
    """Modules (and frameworks) as nodes; one edge per import, attribute ``imp``."""
    files = _modules()
    names = {m: m for m in files}
    g = nx.MultiDiGraph()
    for module, path in files.items():
        g.add_node(module, unit=_unit(module))
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(ROOT).as_posix()
        for imp in _imports(tree, module, path.name == "__init__.py", rel):
            target = _resolve(imp.target, names)
            if target is not None and target != module:
                g.add_edge(module, target, imp=imp)
    return g


@pytest.fixture(scope="module")
def graph() -> nx.MultiDiGraph:
    return _graph()


def _edges(graph: nx.MultiDiGraph) -> Iterator[tuple[str, str, _Import]]:
    yield from graph.edges(data="imp")


def test_every_unit_has_a_layer(graph: nx.MultiDiGraph) -> None:
    units = {graph.nodes[m]["unit"] for m in graph if m not in FRAMEWORKS}
    missing = sorted(units - set(_LAYERS))
    assert not missing, (f"units {missing} have no layer: add each to _LAYERS in "
                         "tests/test_import_graph.py, below every unit that imports it")
    assert {"ir", "tracer", "partitioner", "codegen", "runtime", "api"} <= units


def test_imports_point_down_the_layers(graph: nx.MultiDiGraph) -> None:
    bad = []
    for a, b, imp in _edges(graph):
        if b in FRAMEWORKS:
            continue
        ua, ub = graph.nodes[a]["unit"], graph.nodes[b]["unit"]
        if ua != ub and _LAYERS.get(ub, 99) >= _LAYERS.get(ua, -1):
            bad.append(f"{imp.where()}: {a} imports {b}, but {ua} (layer {_LAYERS.get(ua)}) may "
                       f"import only lower layers and {ub} is layer {_LAYERS.get(ub)}")
    assert not bad, "imports against the layers (ir <- tracer, cost_model <- plan <- " \
        "partitioner <- codegen <- runtime <- front ends):\n" + "\n".join(bad)


def test_codegen_and_runtime_never_import_the_partitioner(graph: nx.MultiDiGraph) -> None:
    bad = [f"{imp.where()}: {a} imports {b}; a stage is built and run from the plan alone"
           for a, b, imp in _edges(graph)
           if graph.nodes[a]["unit"] in _NO_PARTITIONER and b not in FRAMEWORKS
           and graph.nodes[b]["unit"] == "partitioner"]
    assert not bad, "\n".join(bad)


def test_the_planning_core_imports_no_framework(graph: nx.MultiDiGraph) -> None:
    bad = [f"{imp.where()}: {a} imports {imp.target}; the planning core ({', '.join(_CORE)}) "
           "must run without a deep-learning framework (Note [planning core])"
           for a, b, imp in _edges(graph)
           if b in FRAMEWORKS and graph.nodes[a]["unit"] in _CORE]
    assert not bad, "\n".join(bad)


def test_importing_the_package_imports_no_framework(graph: nx.MultiDiGraph) -> None:
    eager = nx.DiGraph()
    eager.add_nodes_from(graph)
    for a, b, imp in _edges(graph):
        if imp.module_level:
            eager.add_edge(a, b, imp=imp)
    for fw in FRAMEWORKS:
        if fw in eager and nx.has_path(eager, "modelparallel", fw):
            path = nx.shortest_path(eager, "modelparallel", fw)
            steps = [eager.edges[x, y]["imp"].where() + f": {x} imports {y}"
                     for x, y in itertools.pairwise(path)]
            pytest.fail(f"`import modelparallel` imports {fw}:\n" + "\n".join(steps))


def test_errors_import_nothing_of_ours(graph: nx.MultiDiGraph) -> None:
    ours = [f"{imp.where()}: imports {b}" for _, b, imp in graph.out_edges("modelparallel.errors",
                                                                           data="imp")
            if b not in FRAMEWORKS]
    assert not ours, "modelparallel/errors.py must import nothing of ours:\n" + "\n".join(ours)


def test_module_level_imports_have_no_cycle(graph: nx.MultiDiGraph) -> None:
    eager = nx.DiGraph((a, b) for a, b, imp in _edges(graph)
                       if imp.module_level and b not in FRAMEWORKS)
    cycles = list(nx.simple_cycles(eager))
    assert not cycles, "module-level import cycles:\n" + "\n".join(
        " -> ".join([*c, c[0]]) for c in cycles[:10])


def test_the_reader_finds_imports_in_functions_and_skips_type_checking() -> None:
    source = ("from typing import TYPE_CHECKING\nimport torch\nfrom . import b\n"
              "if TYPE_CHECKING:\n    from modelparallel.api import Pipeline\n"
              "def f():\n    from ..partitioner import solve\n")
    found = [(i.target, i.line, i.module_level)
             for i in _imports(ast.parse(source), "modelparallel.codegen.a", False, "a.py")]
    assert found == [("typing.TYPE_CHECKING", 1, True), ("torch", 2, True),
                     ("modelparallel.codegen.b", 3, True),
                     ("modelparallel.partitioner.solve", 7, False)]
    modules = {"modelparallel.partitioner": "", "modelparallel.partitioner.solve": ""}
    assert _resolve("modelparallel.partitioner.solve.partition", modules) == \
        "modelparallel.partitioner.solve"
    assert _resolve("modelparallel.partitioner.METHODS", modules) == "modelparallel.partitioner"
    assert _resolve("torch.nn", modules) == "torch" and _resolve("numpy", modules) is None
