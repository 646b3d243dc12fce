"""The import layers of the package, read from the source with `ast` (nothing is imported):
no import cycle, lower layers never import the layers built on them, and the report and the
results contract never import torch. The graph builder is first checked on a hand-made package.

Graph: one node per module (a package's ``__init__`` is the package's own node). ``import a.b``
is an edge to ``a.b``; ``from a import b`` is an edge to ``a.b`` when that is a module, else to
``a``; relative imports are resolved; imports inside functions count (they run too) and are
marked as not top level; imports under ``if TYPE_CHECKING:`` never run and are skipped."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = "rayunlearn"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# layer -> the layers it must never import, directly or through other modules of the package.
# `tune` is the sweep's former home: listed so that it cannot come back under its old name.
ENTRY_POINTS = ["train", "sweep", "tune", "report", "demo", "cli"]
NEVER_IMPORTS = {layer: ENTRY_POINTS for layer in ["objectives", "eval", "data", "models", "forward", "effects"]}
# layers that must exist (an entry that matches no module would make its rule pass vacuously)
REQUIRED = list(NEVER_IMPORTS) + ["train", "sweep", "report", "demo", "cli"]
TORCH_FREE = ["report", "runs"]
# importing any of these imports torch
TORCH = ["torch", "transformers", "peft", "deepspeed", "accelerate", "safetensors.torch"]


class Import(NamedTuple):
    target: str        # a module of the package, or the dotted name of an outside import
    top_level: bool    # runs when the importing module is imported (not inside a function)
    line: int


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module under `root` (the package's directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """(import node, top level?) for every import that can run."""
    def walk(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from walk_one(other, top)
                continue
            yield from walk_one(child, top)

    def walk_one(node, top):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from walk(node, inner)

    yield from walk(tree, True)


def _resolve(name: str, modules: dict) -> str:
    """The longest prefix of `name` that is a module of the package, else `name` itself."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return name


def import_graph(root: Path, package: str) -> dict[str, list[Import]]:
    """Module -> its imports (see the module docstring for what counts as an edge)."""
    modules = module_files(root, package)
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = []
        for node, top in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges += [Import(_resolve(a.name, modules), top, node.lineno) for a in node.names]
                continue
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges.append(Import(sub if sub in modules else _resolve(base, modules), top, node.lineno))
        graph[name] = edges
    return graph


def _inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, or a module importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):          # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in {e.target for e in graph[v] if e.target in graph}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(e.target == v for e in graph[v]):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_path(graph, start: str, forbidden, top_level_only: bool = False) -> list[str] | None:
    """The shortest chain of imports from `start` to a module in (or under) `forbidden`, or None."""
    seen, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph.get(v, []):
                if top_level_only and not e.top_level:
                    continue
                if _inside(e.target, forbidden):
                    return seen[v] + [f"{e.target} (line {e.line})"]
                if e.target in graph and e.target not in seen:
                    seen[e.target] = seen[v] + [e.target]
                    nxt.append(e.target)
        frontier = nxt
    return None


def torch_import(graph, start: str) -> list[str] | None:
    """How importing `start` would import torch: its own imports of torch (anywhere in the module),
    or a chain of top-level imports (each module's parent packages included, as Python runs them)."""
    direct = [e for e in graph[start] if _inside(e.target, TORCH)]
    if direct:
        return [start, f"{direct[0].target} (line {direct[0].line})"]
    top = {}
    for name, edges in graph.items():
        parents = [".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)]
        top[name] = [e for e in edges if e.top_level] + [Import(p, True, 0) for p in parents if p in graph]
    return import_path(top, start, TORCH, top_level_only=True)


# ------------------------------------------------------------------------------------------
# the checker, on a hand-made package

def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def toy(tmp_path):
    root = _write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from . import b\n",                                  # submodule by `from pkg import`
        "b.py": "def f():\n    from pkg.a import x\n",                # closes a cycle inside a function
        "low/__init__.py": "from .util import helper\n",
        "low/util.py": "import numpy\n\ndef g():\n    from ..high.top import run\n",
        "high/__init__.py": "",
        "high/top.py": "from pkg.low import helper\n",               # a name from a package: the __init__
        "light.py": "from pkg import mid\n\ndef h():\n    from pkg import heavy\n",
        "mid.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
        "heavy.py": "import torch.nn\n",
        "deep/__init__.py": "import transformers\n",
        "deep/leaf.py": "X = 1\n",
        "uses_leaf.py": "from pkg.deep.leaf import X\n",
        "local_torch.py": "def f():\n    import torch\n",
    })
    return import_graph(root, "pkg")


def test_checker_resolves_relative_submodule_and_package_imports(toy):
    assert toy["pkg.a"] == [Import("pkg.b", True, 1)]
    assert toy["pkg.b"] == [Import("pkg.a", False, 2)]
    assert toy["pkg.low"] == [Import("pkg.low.util", True, 1)]
    assert toy["pkg.low.util"] == [Import("numpy", True, 1), Import("pkg.high.top", False, 4)]
    assert toy["pkg.high.top"] == [Import("pkg.low", True, 1)]
    assert toy["pkg.mid"] == [Import("os", True, 1), Import("typing", True, 2)]      # TYPE_CHECKING skipped
    assert toy["pkg.heavy"] == [Import("torch.nn", True, 1)]


def test_checker_finds_cycles_forbidden_imports_and_torch(toy):
    assert sorted(cycles(toy)) == [["pkg.a", "pkg.b"], ["pkg.high.top", "pkg.low", "pkg.low.util"]]
    assert import_path(toy, "pkg.low.util", ["pkg.high"]) == ["pkg.low.util", "pkg.high.top (line 4)"]
    assert import_path(toy, "pkg.low", ["pkg.high"], top_level_only=True) is None
    assert import_path(toy, "pkg.a", ["pkg.high"]) is None
    assert torch_import(toy, "pkg.light") is None            # heavy only inside a function, mid's torch is typing only
    assert torch_import(toy, "pkg.local_torch") == ["pkg.local_torch", "torch (line 2)"]
    assert torch_import(toy, "pkg.uses_leaf") == ["pkg.uses_leaf", "pkg.deep.leaf", "pkg.deep", "transformers (line 1)"]


# ------------------------------------------------------------------------------------------
# the package

@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR, PACKAGE)


def _modules_of(graph, layer: str) -> list[str]:
    prefix = f"{PACKAGE}.{layer}"
    found = [m for m in graph if _inside(m, [prefix])]
    assert found, f"no module {prefix}: update the layer lists of this test"
    return found


def test_every_module_parses_and_the_layers_exist(graph):
    for layer in REQUIRED + TORCH_FREE:
        _modules_of(graph, layer)


def test_no_import_cycle(graph):
    assert cycles(graph) == []


@pytest.mark.parametrize("layer", list(NEVER_IMPORTS))
def test_lower_layers_never_import_upper_ones(graph, layer):
    upper = [f"{PACKAGE}.{u}" for u in NEVER_IMPORTS[layer]]
    bad = {m: p for m in _modules_of(graph, layer) if (p := import_path(graph, m, upper))}
    assert bad == {}


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_report_and_results_contract_never_import_torch(graph, layer):
    bad = {m: p for m in _modules_of(graph, layer) if (p := torch_import(graph, m))}
    assert bad == {}
