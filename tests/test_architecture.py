"""The package's shape, checked on its source (no imports): bertfast/ is grouped by role and the data flows one way.

Layers, lowest first; a module may import from its own layer and the ones below, never from above:
    0  bertfast.kernels (Triton), bertfast._C / _build_info (the extension), bertfast._cli (argparse helpers)
    1  bertfast.ops (with ops.padding and ops.reference), bertfast.data
    2  bertfast.model
    3  bertfast.train
    4  bertfast.downstream
    5  the package itself and its command-line entry points (bertfast/__init__.py, pretrain.py, finetune.py,
       fill_mask.py, plot.py, padding.py)
Every import counts, also those inside functions (deferring an upward import hides it, it does not remove it).
Besides: no import cycle between modules (module-level imports), and no function longer than 60 lines in bertfast/
(the Triton kernels of the top-level kernels/ folder are exempt: a @triton.jit kernel is one launch's body).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "bertfast")
MAX_FUNCTION_LINES = 60

LAYERS = {
    "bertfast.kernels": 0, "bertfast._C": 0, "bertfast._build_info": 0, "bertfast._cli": 0,
    # the sm_80/sm_90 compile check and its report are tools over the kernels, not kernels: they take the list of
    # kernel modules from the ops' registry (one list of ops), so they sit at the ops' layer
    "bertfast.kernels._compile": 1, "bertfast.kernels.report": 1,
    "bertfast.ops": 1, "bertfast.data": 1,
    "bertfast.model": 2,
    "bertfast.train": 3,
    "bertfast.downstream": 4,
    "bertfast": 5,
}


def _modules():
    """{dotted module name: path} for every .py file of the package (bertfast/kernels is ../kernels)."""
    out = {}
    for dirpath, _, files in os.walk(PKG, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def layer(name: str) -> int:
    """The layer of a module: its longest prefix in LAYERS."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(name)


def _imports(name: str, path: str, *, top_level_only: bool) -> set[str]:
    """The bertfast modules `name` imports (a `from X import y` counts as X.y when X.y is a module, else X)."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bertfast"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "bertfast":
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return found


def test_the_package_is_grouped_by_role():
    top = sorted(n for n in MODULES if n.count(".") == 1 and not os.path.dirname(MODULES[n]).endswith(
        tuple(os.sep + p for p in ("ops", "data", "model", "train", "downstream", "kernels"))))
    # the top level holds the package's entry points only; everything else lives in a subpackage by role
    assert set(top) <= {"bertfast._cli", "bertfast._build_info", "bertfast.pretrain", "bertfast.finetune",
                        "bertfast.fill_mask", "bertfast.plot", "bertfast.padding"}, top
    for name in MODULES:
        layer(name)  # every module has a layer (a new subpackage must be placed in LAYERS)


def test_no_upward_import():
    bad = [f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"
           for name, path in MODULES.items() for dep in _imports(name, path, top_level_only=False)
           if dep != "bertfast" and layer(dep) > layer(name)]
    assert bad == []


def test_no_import_cycle():
    graph = {name: {d for d in _imports(name, path, top_level_only=True) if d in MODULES and d != name}
             for name, path in MODULES.items()}
    # a package's __init__ importing its own submodules is how a package is made, not a cycle
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_function_over_60_lines():
    long = []
    for name, path in MODULES.items():
        if layer(name) == 0 and name.startswith("bertfast.kernels"):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_checks_can_fail(tmp_path):
    """The helpers above see what they must: an upward import, a cycle edge and a long function."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from bertfast.train import trainer\n" + "    x = 1\n" * 70)
    assert "bertfast.train.trainer" in _imports("bertfast.model.bert", str(src), top_level_only=False)
    assert layer("bertfast.train.trainer") > layer("bertfast.model.bert")
    assert _imports("bertfast.model.bert", str(src), top_level_only=True) == set()
    rel = tmp_path / "r.py"
    rel.write_text("from . import hf\nfrom ..ops import padding\n")
    assert _imports("bertfast.model.bert", str(rel), top_level_only=True) == {"bertfast.model.hf",
                                                                               "bertfast.ops.padding"}
