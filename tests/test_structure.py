"""The shape of the code (issue 23): the ``vdsr`` modules import one another without circles, and
no function in ``vdsr/`` or ``stages/`` is longer than :data:`MAX_FUNCTION_LINES` lines.

Both read the source with :mod:`ast`, nothing is imported: every ``import vdsr.x`` and
``from vdsr(.x) import ...`` counts, at module level, inside functions and under
``TYPE_CHECKING`` alike, so that a circle cannot hide in a function-level import.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("vdsr", "stages")
MAX_FUNCTION_LINES = 100  # from the ``def`` line to the last line of the body, docstring included


def _sources() -> dict[str, ast.Module]:
    """``{"vdsr.train": tree, "stages.train": tree, ...}`` of every module in :data:`FOLDERS`."""
    return {f"{folder}.{path.stem}": ast.parse(path.read_text(), str(path))
            for folder in FOLDERS for path in sorted((REPO_ROOT / folder).glob("*.py"))}


def _imported(tree: ast.Module, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``tree`` imports (``from vdsr import x`` names ``vdsr.x``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``vdsr`` modules it imports (itself left out)."""
    sources = _sources()
    library = {name for name in sources if name.startswith("vdsr.")}
    return {name: _imported(tree, library) - {name} for name, tree in sources.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles, each as the path that closes it (``[a, b, a]``); depth-first search."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:  # on the path to here: a circle
                here = [*path, name]
                found.append([*here[here.index(target):], target])
            elif target not in state:
                visit(target, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return found


def function_lengths() -> dict[str, int]:
    """``{"vdsr.train:train": lines}`` of every function and method (nested ones too)."""
    lengths = {}
    for module, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{module}:{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_the_cycle_finder_finds_a_circle() -> None:  # so that the test below can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_sees_function_level_and_package_imports() -> None:
    graph = import_graph()
    assert "vdsr.checkpoints" in graph["vdsr.train"]  # from vdsr.checkpoints import ...
    assert "vdsr.tracking" in graph["vdsr.train_record"]  # from vdsr import provenance, tracking
    assert "vdsr.model_card" in graph["vdsr.release"]  # a function-level import


def test_no_import_circles() -> None:
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_function_longer_than_100_lines() -> None:
    lengths = function_lengths()
    assert lengths, "no functions found"
    long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them along their seams): {long}"
