"""raybench's imports run one way: no module imports, at its top or inside a function, a module that imports it
back (directly or around a longer circle). Read from the source with `ast`, so an import inside a function
counts as much as one at the top."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raybench"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str], package_dir: Path = PACKAGE) -> set[str]:
    """The raybench modules `path` imports anywhere in its body. `from raybench.x import y` is module
    raybench.x.y when that is a module, else raybench.x (y is a name defined there)."""
    this = module_name(path, package_dir)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in modules else base)
    return (out & modules) - {this}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = sorted(package.rglob("*.py"))
    modules = {module_name(f, package) for f in files}
    return {module_name(f, package): imported(f, modules, package) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph as [a, b, ..., a], or None when the imports run one way."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is walked
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # a diamond runs one way
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_function_level_imports_are_read(tmp_path):
    (tmp_path / "raybench").mkdir()
    for name in ("__init__", "a", "b"):
        (tmp_path / "raybench" / f"{name}.py").write_text("")
    (tmp_path / "raybench" / "a.py").write_text("def f():\n    from raybench.b import g\n")
    (tmp_path / "raybench" / "b.py").write_text("from raybench import a\n")
    graph = import_graph(tmp_path / "raybench")
    assert graph["raybench.a"] == {"raybench.b"} and graph["raybench.b"] == {"raybench.a"}
    assert find_cycle(graph) == ["raybench.a", "raybench.b", "raybench.a"]


def test_raybench_imports_run_one_way():
    graph = import_graph()
    assert "raybench.configs" in graph and graph["raybench.train"]  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["raybench.configs"])
def test_configs_import_nothing_of_raybench(module):
    assert import_graph()[module] == set()
