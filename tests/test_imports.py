"""The import graph of `runner/`: no circle anywhere, leaves stay leaves, executors stay peers below the job.

The graph is read from the source (ast), not from a running interpreter, so it holds every import a
module can make: an import inside a function (a lazy import) is an edge like any other, because a
circle through a lazy import is still a circle in the design. Imports under `if TYPE_CHECKING:` are
not edges: they are never executed and only name types for annotations. An edge goes to the module
an import statement names (`from .x import y` -> x; `from . import z` -> the submodule z when there is
one, else the package); the package `__init__` Python also runs on the way is not an extra edge, so
the usual "a package re-exports its submodules" stays legal.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "runner"


def _module_names(root: Path, package: str) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those inside an `if TYPE_CHECKING:` body."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (see the module docstring for what counts)."""
    modules = _module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
                targets = submodules if len(submodules) == len(node.names) else [target, *submodules]
            for target in targets:
                # `import runner.a.b` names runner.a.b; keep the longest prefix that is a module of ours.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(RUNNER, "runner")


def test_no_import_circle_anywhere_in_runner(graph):
    """Every module under runner/ is in an acyclic import graph (lazy imports count, TYPE_CHECKING ones do not)."""
    assert len(graph) > 40 and "runner.job" in graph and "runner.executors.online" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_records_and_errors_are_leaves(graph):
    """runner.records and runner.errors import nothing from runner."""
    assert graph["runner.errors"] == set()
    assert graph["runner.records"] == set()


def _executor_of(module: str) -> str | None:
    """The executor a module belongs to: runner.executors.ray.limiter -> runner.executors.ray."""
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 and parts[:2] == ["runner", "executors"] else None


def test_executors_are_peers_below_the_job(graph):
    """No executor (nor the protocol module) imports the job, the engine shim, the CLI or another executor; an
    executor that is a package (ray) may import its own modules."""
    executors = {name for name in graph if name.startswith("runner.executors.")}
    assert {"runner.executors.online", "runner.executors.batch", "runner.executors.ray",
            "runner.executors.ray.limiter", "runner.executors.ray.sender"} <= executors
    above = {"runner.job", "runner.engine", "runner.cli"}
    for name in executors | {"runner.executors"}:
        bad = {target for target in graph[name]
               if target in above or (_executor_of(target) is not None and _executor_of(target) != _executor_of(name))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_job_runs_every_executor_and_the_cli_goes_through_the_job(graph):
    """runner.job imports every executor; the CLI imports the job, never an executor."""
    assert {"runner.executors.online", "runner.executors.batch", "runner.executors.ray"} <= graph["runner.job"]
    assert "runner.job" in graph["runner.cli"]
    assert not {t for t in graph["runner.cli"] if t.startswith("runner.executors")}


def test_ray_is_imported_only_by_the_ray_executor():
    """`import ray` appears only under runner/executors/ray/, and neither `import runner`, `runner --help` nor
    loading the job module (what every local run imports) imports Ray."""
    for path in RUNNER.rglob("*.py"):
        names = {alias.name.split(".")[0] for node in _imports(ast.parse(path.read_text(), str(path)))
                 for alias in (node.names if isinstance(node, ast.Import) else [])}
        names |= {node.module.split(".")[0] for node in _imports(ast.parse(path.read_text(), str(path)))
                  if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        if "ray" in names:
            assert path.relative_to(RUNNER).parts[:2] == ("executors", "ray"), path
    probe = ("import sys, runner, runner.job, runner.spec\n"
             "from click.testing import CliRunner\n"
             "from runner.cli import main\n"
             "assert CliRunner().invoke(main, ['--help']).exit_code == 0\n"
             "assert CliRunner().invoke(main, ['run', '--help']).exit_code == 0\n"
             "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_walk_sees_lazy_and_relative_imports_and_skips_type_checking(tmp_path):
    """The checker finds a circle closed by a lazy `from . import x` in a function, and ignores TYPE_CHECKING ones."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
                              "else:\n    import pkg.sub.b\n")
    found = import_graph(pkg, "pkg")
    assert found["pkg.a"] == {"pkg.sub.b"}
    assert found["pkg.sub.b"] == {"pkg.a"}
    assert found["pkg.c"] == {"pkg.sub.b"}
    assert find_cycle(found) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n")
    found = import_graph(pkg, "pkg")
    assert found["pkg.sub.b"] == set()
    assert find_cycle(found) is None
