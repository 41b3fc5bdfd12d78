"""What the documentation names exists: the user-facing text (README.md, docs/*.md, the
notebook sources, docstrings and comments) against the code at HEAD.

- ``test_links_resolve``: every relative Markdown link and every ``docs/<page>.md#<anchor>``
  reference (in the Markdown, in docstrings and comments of the package, benchmarks, tests
  and notebook sources) names an existing file and, for a page, an existing heading or
  ``<a id>`` anchor (GitHub's heading slugs).
- ``test_repository_paths_exist``: every repository file the Markdown names exists.
- ``test_documented_names_resolve``: every backticked dotted name in README.md and docs/*.md
  that starts with ``ttmanifold``, a module of the package (``sweeps.``, ``solvers.``, ...)
  or a public class of the package (``FixedTTRank.``, ``Completion.``, ...) resolves by
  import and ``getattr``.
- ``test_docstring_cross_references_resolve``: every fully qualified Sphinx reference in
  the package's docstrings (``:class:`~ttmanifold.tt.SampledPoint```, ...) resolves.
- ``test_documented_cli_flags_exist``: every ``--flag`` in README.md and docs/*.md is an
  option of some command-line parser of the repository (``ttmanifold compare``,
  ``ttmanifold complete``, ``build-kernels``, the benchmarks, ``notebooks/nbtools.py``).
- ``test_environment_variables_documented``: every ``TTMANIFOLD_*`` variable the docs name
  is read by the code, and every one the package reads is in README.md or docs/*.md.
- ``test_quick_compare_reproduces_committed_run``: the README promises that a fresh
  ``ttmanifold compare --quick`` prints the step sizes and losses of ``docs/compare_quick``;
  the step-size-ruled ``radam`` and ``rcg`` on the two tensor problems are rerun (about 2 s)
  and compared with the committed ``results.csv`` (step sizes exactly, losses to 1e-6).
"""
from __future__ import annotations

import csv
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import ttmanifold

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = [*sorted((ROOT / "ttmanifold").rglob("*.py")), *sorted((ROOT / "ttmanifold").rglob("*.cpp")),
           *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "tests").glob("*.py")),
           *sorted((ROOT / "notebooks").glob("*.py"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = page.read_text()
    return ({_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}
            | set(re.findall(r'<a id="([^"]+)"', text)))


def _broken(base: Path, target: str, cache: dict):
    path, _, anchor = target.partition("#")
    page = base if not path else (base.parent / path).resolve()
    if not page.exists():
        return "no such file"
    if anchor and page.suffix == ".md":
        if page not in cache:
            cache[page] = _anchors(page)
        if anchor not in cache[page]:
            return "no such anchor"
    return None


def test_links_resolve():
    cache, bad = {}, []
    for md in MARKDOWN:
        text = md.read_text()
        targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
        for t in targets:
            why = _broken(md, t, cache)
            if why:
                bad.append(f"{md.relative_to(ROOT)}: ({t}) {why}")
    for f in SOURCES + MARKDOWN:
        for t in re.findall(r"(?<![\w/.])(docs/[\w-]+\.md(?:#[\w-]+)?)", f.read_text()):
            why = _broken(ROOT / "x", t, cache)
            if why:
                bad.append(f"{f.relative_to(ROOT)}: {t} {why}")
    assert not bad, "broken references:\n" + "\n".join(bad)


def test_repository_paths_exist():
    """Files of the repository that the docs name (``benchmarks/bench_batch.py``,
    ``tests/test_compile.py``, ``ttmanifold/kernels/dense.cpp``, ...) exist."""
    bad, checked = [], 0
    pattern = r"(?<![\w/.])((?:benchmarks|tests|notebooks|ttmanifold|docs)/[\w/.-]+\.(?:py|md|cpp|ipynb|png|csv))"
    for md in MARKDOWN:
        for path in re.findall(pattern, md.read_text()):
            checked += 1
            if "NN_name" not in path and not (ROOT / path).exists():
                bad.append(f"{md.relative_to(ROOT)}: {path}")
    assert checked > 20
    assert not bad, "paths in the docs that do not exist:\n" + "\n".join(bad)


def _modules():
    mods = {"ttmanifold": ttmanifold}
    for info in pkgutil.walk_packages(ttmanifold.__path__, "ttmanifold."):
        if info.name.endswith("__main__"):
            continue
        mods[info.name] = importlib.import_module(info.name)
    return mods


def _first_components(mods):
    """Short module names (``sweeps``) and the package's own public classes, by name."""
    heads = {}
    for name, mod in mods.items():
        heads.setdefault(name.rsplit(".", 1)[-1], mod)
    for mod in mods.values():
        for attr, obj in vars(mod).items():
            if (inspect.isclass(obj) and not attr.startswith("_")
                    and getattr(obj, "__module__", "").startswith("ttmanifold")):
                heads.setdefault(attr, obj)
    for short in ("nn", "chart"):  # also the docs' names of torch.nn and of a chart object
        heads.pop(short)
    return heads


def test_documented_names_resolve():
    mods = _modules()
    heads = _first_components(mods)
    bad, checked = [], 0
    for md in MARKDOWN:
        for code in re.findall(r"`([^`\n]+)`", md.read_text()):
            for name in re.findall(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w.]*\.(?:py|md|cpp)\b)",
                                   code):
                parts = name.split(".")
                if name in mods or parts[0] not in heads or parts[-1] in ("py", "md", "cpp"):
                    continue
                obj = mods["ttmanifold"] if parts[0] == "ttmanifold" else heads[parts[0]]
                for i, part in enumerate(parts[1:], 1):
                    if not hasattr(obj, part):
                        sub = ".".join(["ttmanifold", *parts[1:i + 1]]) if parts[0] == "ttmanifold" else None
                        if sub in mods:
                            obj = mods[sub]
                            continue
                        bad.append(f"{md.relative_to(ROOT)}: `{name}` ({part!r} not found)")
                        break
                    obj = getattr(obj, part)
                checked += 1
    assert checked > 100  # the scan finds the names (a regex that matches nothing checks nothing)
    assert not bad, "names in the docs that the code lacks:\n" + "\n".join(sorted(set(bad)))


def _resolve_qualified(name: str, mods) -> bool:
    """Whether ``ttmanifold.a.b.C.m`` names a module, or an attribute reached from one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        obj = mods.get(".".join(parts[:i]))
        if obj is not None:
            for part in parts[i:]:
                if not hasattr(obj, part):
                    return False
                obj = getattr(obj, part)
            return True
    return False


def test_docstring_cross_references_resolve():
    mods = _modules()
    bad, checked = [], 0
    for f in sorted((ROOT / "ttmanifold").rglob("*.py")):
        for target in re.findall(r":(?:class|func|meth|mod|attr|data|exc):`([^`]+)`", f.read_text()):
            name = re.sub(r".*<(.*)>", r"\1", target).lstrip("~.")
            if name.startswith("ttmanifold."):
                checked += 1
                if not _resolve_qualified(name, mods):
                    bad.append(f"{f.relative_to(ROOT)}: {target}")
    assert checked > 50
    assert not bad, "docstring references to names that do not exist:\n" + "\n".join(bad)


def _parser_options() -> set:
    options = set()
    for f in [*sorted((ROOT / "ttmanifold").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
              ROOT / "notebooks" / "nbtools.py"]:
        src = f.read_text()
        options |= set(re.findall(r"add_argument\([^)]*?[\"'](--[\w-]+)[\"']", src, flags=re.S))
        # hand-parsed options (``ttmanifold build-kernels --timeout``, nbtools' flags)
        options |= set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']\s*(?:in\b|==|:)", src))
    return options


def test_documented_cli_flags_exist():
    options = _parser_options()
    assert {"--quick", "--rank", "--methods", "--timeout", "--markdown-only"} <= options
    external = {"--nproc_per_node"}  # torchrun's
    bad = []
    for md in MARKDOWN:
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", md.read_text())):
            if flag not in options and flag not in external:
                bad.append(f"{md.relative_to(ROOT)}: {flag}")
    assert not bad, "command-line options the docs name but no parser defines:\n" + "\n".join(bad)


def test_environment_variables_documented():
    docs = "\n".join(md.read_text() for md in MARKDOWN)
    documented = set(re.findall(r"\bTTMANIFOLD_[A-Z_]+", docs))
    code = "\n".join(f.read_text() for f in [*(ROOT / "ttmanifold").rglob("*.py"),
                                             ROOT / "notebooks" / "nbtools.py"])
    read = set(re.findall(r"[\"'](TTMANIFOLD_[A-Z_]+)[\"']", code))
    assert {"TTMANIFOLD_BUILD", "TTMANIFOLD_NATIVE"} <= read
    assert documented <= read, f"documented but never read: {sorted(documented - read)}"
    assert read <= documented, f"read but not documented: {sorted(read - documented)}"


def _rows(path: Path):
    with open(path) as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def test_quick_compare_reproduces_committed_run(tmp_path):
    from ttmanifold.experiments.compare import main

    out = tmp_path / "cq"
    main(["--quick", "--problems", "approximation,completion", "--methods", "radam,rcg",
          "--out", str(out), "--no-progress"])
    committed = {(r["problem"], r["method"], r["iter"]): r
                 for r in _rows(ROOT / "docs" / "compare_quick" / "results.csv")}
    fresh = _rows(out / "results.csv")
    assert {(r["problem"], r["method"]) for r in fresh} == {
        (p, m) for p in ("approximation", "completion") for m in ("radam", "rcg")}
    for r in fresh:
        key = (r["problem"], r["method"], r["iter"])
        assert key in committed, f"{key}: not in docs/compare_quick/results.csv"
        c = committed[key]
        assert r["lr"] == c["lr"], f"{key}: lr {r['lr']} against the committed {c['lr']}"
        loss, ref = float(r["loss"]), float(c["loss"])
        if max(loss, ref) > 1e-8:  # below, the values are rounding (compiled vs torch kernels)
            assert abs(loss - ref) <= 1e-6 * abs(ref), f"{key}: loss {loss} against {ref}"
    iters = {(p, m): sum(1 for k in committed if k[:2] == (p, m)) for p, m, _ in committed}
    for p, m in {(r["problem"], r["method"]) for r in fresh}:
        assert sum(1 for r in fresh if (r["problem"], r["method"]) == (p, m)) == iters[(p, m)]


def test_readme_guarantee_riemannian_grad_rejects_a_nonfinite_point():
    """README, Guarantees: non-finite data brought by the user is rejected by
    ``riemannian_grad``. A NaN in a core other than the last one leaves ``D`` (and the loss
    ``0.5 <X, X>``) finite and reaches only the gauge-projected result."""
    import pytest
    import torch

    M = ttmanifold.FixedTTRank((4, 5, 6), 2)
    p = M.random(dtype=torch.float64)
    p[2] = float("nan")  # inside the first core
    for point in (p, p.expand(2, -1).clone()):  # one point (compiled or torch path), a batch
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            M.riemannian_grad(point, lambda X: 0.5 * ttmanifold.inner(X, X).sum())
