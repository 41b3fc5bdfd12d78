"""The package's architecture: its import graph has no cycle, no module imports a private
name of another, ``import ttmanifold`` loads only torch, geoopt and numpy (not the
comparison harness's matplotlib / scikit-learn), and the manifold's methods show their
signatures and take keyword arguments."""
from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ttmanifold"


def _modules():
    """``{dotted name: path}`` of every module of the package."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges():
    """Import edges between package modules (module-level and function-level imports
    alike), and every imported private name ``(importer, module, name)``."""
    mods = _modules()
    edges = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ttmanifold"):
                        name = a.name
                        while name not in mods and "." in name:
                            name = name.rsplit(".", 1)[0]
                        edges[mod].add(name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node)
                if not target.startswith("ttmanifold"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # `from pkg import module`
                        edges[mod].add(sub)
                    else:
                        edges[mod].add(target)
                        if a.name.startswith("_") and not a.name.startswith("__") \
                                and target != mod:
                            private.append((mod, target, a.name))
    return mods, edges, private


def _cycle(edges):
    """One import cycle as a list of modules, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in edges}
    stack = []

    def visit(m):
        color[m] = GREY
        stack.append(m)
        for n in sorted(edges[m]):
            if n == m or n not in color:
                continue
            # a package importing its own submodules is how packages are built, and a
            # submodule importing a sibling *through* the package would be a cycle only if
            # the package imported it back, which the edge to the package records
            if color[n] == GREY:
                return stack[stack.index(n):] + [n]
            if color[n] == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[m] = BLACK
        return None

    for m in sorted(edges):
        if color[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    mods, edges, _ = _edges()
    # a submodule's import of its own package (`from .. import x` resolving to the
    # package) is the parent-package import Python performs anyway: drop edges from a
    # module to one of its ancestors only when they name the root package's submodules
    assert "ttmanifold.tt" in mods and "ttmanifold.manifold" in mods
    cyc = _cycle(edges)
    assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_cycle_detector_finds_a_cycle():
    """The detector above is not vacuous."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_names_imported_across_modules():
    _, _, private = _edges()
    assert not private, f"private names imported across modules: {private}"


def test_import_loads_only_the_core_dependencies():
    code = ("import sys, ttmanifold; "
            "bad = [m for m in ('matplotlib', 'sklearn', 'ttmanifold.experiments') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**__import__('os').environ, "TTMANIFOLD_BUILD": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_core_modules_do_not_import_the_comparison_extras():
    mods = _modules()
    for mod, path in mods.items():
        if mod.startswith("ttmanifold.experiments"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in ("matplotlib", "sklearn", "tqdm", "scipy"), \
                    f"{mod} imports {n}"


def test_manifold_methods_take_keywords_and_show_signatures():
    import ttmanifold as tm

    M = tm.FixedTTRank((3, 4, 3), 2)
    x = M.random(dtype=torch.float64)
    u = M.proju(x=x, u=torch.randn(M.size, dtype=torch.float64))
    assert torch.equal(M.proju(x, u), M.proju(u=u, x=x))
    y = M.retr(x=x, u=0.1 * u)
    assert torch.allclose(M.transp(x=x, y=y, v=u), M.transp(x, y, u))
    assert torch.allclose(M.egrad2rgrad(x=x, u=u), M.egrad2rgrad(x, u))
    for name in ("proju", "egrad2rgrad", "retr", "transp", "retr_transp", "project", "gauge"):
        params = list(inspect.signature(getattr(M, name)).parameters)
        assert params and params[0] != "args", (name, params)
    assert list(inspect.signature(M.retr).parameters) == ["x", "u"]


@pytest.mark.parametrize("fn", ["right_cores", "project_tt", "retract", "retract_point"])
def test_dispatched_functions_keep_signatures(fn):
    import ttmanifold.manifold as mf

    f = getattr(mf, fn)
    assert hasattr(f, "torch_impl")
    assert inspect.signature(f) == inspect.signature(f.torch_impl)
