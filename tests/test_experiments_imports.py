"""The comparison harness's import graph: imports flow one way (problems <- solvers <-
compare), no cycle even through imports inside functions, and no private names of other
modules of the package."""
import ast
import pathlib
import re

import ttmanifold.experiments

PKG = pathlib.Path(ttmanifold.experiments.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def _sibling_imports(name):
    """Modules of ttmanifold.experiments that ``name`` imports anywhere in its source."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("ttmanifold.experiments."):
            out.add(node.module.split(".")[2])
    return out & set(MODULES)


def test_no_import_cycle():
    graph = {m: _sibling_imports(m) for m in MODULES}
    assert graph["problems"] == set(), graph  # the bottom layer
    assert "problems" in graph["solvers"] and "compare" not in graph["solvers"]
    # depth-first search for a cycle
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [])


def test_no_private_names_of_other_modules():
    """``obj._name`` is only used on ``self`` / the module's own objects; the manifold,
    index sets and kernels are reached through their public API."""
    pattern = re.compile(r"\b(M|manifold|I|iset|train|test|_native)\._[a-z]\w*")
    for name in MODULES:
        src = (PKG / f"{name}.py").read_text()
        hits = [ln for ln in src.splitlines() if pattern.search(ln)]
        assert not hits, (name, hits)
        assert "_native" not in src, name  # compare records the kernels, never waits
