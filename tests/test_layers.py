"""The package's layers: no import cycle, and a bottom layer (errors, progress, runs, config, languages, signals) that
imports nothing of graftlm above it. Imports under `if TYPE_CHECKING:` are types only and do not count."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "graftlm"
BOTTOM = {"graftlm.errors", "graftlm.progress", "graftlm.runs", "graftlm.config", "graftlm.languages",
          "graftlm.signals"}


def _modules() -> dict[str, Path]:
    return {".".join(p.with_suffix("").relative_to(REPO).parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else \
                    [child.module or ""] + [f"{child.module}.{a.name}" for a in child.names]
                for name in names:
                    while name and name not in modules:
                        name = name.rpartition(".")[0]
                    if name and name != "graftlm":
                        found.add(name)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_the_bottom_layer_imports_nothing_above_it():
    graph = _graph()
    upward = {(m, d) for m in BOTTOM if m in graph for d in graph[m] if d not in BOTTOM}
    assert upward == set()


def test_no_import_cycle():
    graph = _graph()
    cycles, path, done = [], [], set()

    def walk(module: str) -> None:
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph.get(module, ())):
            walk(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        walk(module)
    assert cycles == []
