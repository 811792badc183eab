"""The package's shape: no import cycle, no module that holds more than one concept.

Both checks read the source (``ast``), so they see every import, including the ones
inside functions and under ``if TYPE_CHECKING:``, without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import link_kernel

PACKAGE = Path(link_kernel.__file__).parent
MAX_LINES = 800
#: Shipped to hosts whole (they import nothing of link_kernel), so one file each.
SHIPPED_WHOLE = {"link_kernel/agent.py", "link_kernel/bootstrap.py"}


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` names in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``, anywhere in its source."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # ``import a.b.c`` of a name that is not a module: its nearest module
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "link_kernel.transports.ssh" in graph["link_kernel.transports.factory"]  # in a function
    assert "link_kernel.errors" in graph["link_kernel.slurm"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_over_800_lines():
    too_long = {}
    for path in module_files().values():
        rel = path.relative_to(PACKAGE.parent).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in SHIPPED_WHOLE:
            too_long[rel] = lines
    assert not too_long, f"modules over {MAX_LINES} lines hold more than one concept; split them: {too_long}"


def test_every_module_says_what_it_holds():
    """A newcomer reads the docstring to know where a change goes."""
    silent = [
        path.relative_to(PACKAGE.parent).as_posix()
        for path in module_files().values()
        if not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert not silent, f"modules without a docstring: {silent}"
