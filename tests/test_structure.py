"""The shape of the package: no import cycles (function-level imports included), leaves that stay leaves,
and no module over ~600 lines without a reason in its docstring."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import slimlm

ROOT = Path(slimlm.__file__).parent
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: slimlm modules it imports anywhere in its body} (``from slimlm.x import y`` counts as an
    import of ``slimlm.x.y`` when that is a module, else of ``slimlm.x``; relative imports resolved)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # slimlm.x.y.attr -> the module that holds it
                    t = t.rpartition(".")[0]
                if t and t != name and t != "slimlm":  # the package root holds only the error types
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "slimlm.evaluate" in graph["slimlm.cli"]  # imported inside a command function
    assert "slimlm.loading" in graph["slimlm.pipeline"]


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_leaves_stay_leaves():
    graph = import_graph()

    def reach(m: str) -> set[str]:
        seen, todo = set(), [m]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    for leaf in ("slimlm.models", "slimlm.io", "slimlm.config"):
        bad = {m for m in reach(leaf) if m.startswith(("slimlm.assets", "slimlm.quantize", "slimlm.pipeline",
                                                        "slimlm.report", "slimlm.serve", "slimlm.distill"))}
        assert not bad, f"{leaf} reaches {sorted(bad)}"
    assert "slimlm.report" not in reach("slimlm.pipeline")
    # and at run time: importing models loads neither the assets nor the quantized runtime
    code = ("import sys, slimlm.models; bad = [m for m in sys.modules if m.startswith(('slimlm.assets', "
            "'slimlm.quantize'))]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_module_is_long_without_a_reason():
    """A module over MAX_LINES lines says why in its docstring (a line containing 'long because')."""
    long = []
    for p in ROOT.rglob("*.py"):
        n = len(p.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        if n > MAX_LINES and "long because" not in doc:
            long.append(f"{p.relative_to(ROOT.parent)} ({n} lines)")
    assert not long, "modules over ~600 lines with no reason given: " + ", ".join(long)
