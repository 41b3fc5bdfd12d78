"""The example notebooks: their sources execute, and their committed form is clean and current.

Each notebook is a percent-format source ``notebooks/NN_name.py`` and the committed, executed
``notebooks/NN_name.ipynb`` built from it by ``notebooks/nbtools.py``. This file loads that
module by path (``importlib``) and uses its functions, so the tests run the notebooks exactly
as the build does. Every source and every ``.ipynb`` is picked up (glob), so notebooks added
later are tested too.

- ``test_sources_and_notebooks_pair``: each source has its ``.ipynb`` and each ``.ipynb`` its
  source.
- ``test_committed_notebook_matches_source``: the committed ``.ipynb`` has exactly the cells
  (types and sources) of its source, so the two cannot drift apart.
- ``test_read_source``: the source-to-notebook conversion on a small example (cell kinds,
  commented magics, fixed ids, metadata).
- ``test_refresh_markdown_keeps_outputs``: ``--markdown-only`` copies prose edits and keeps
  the outputs, and refuses when a code cell changed.
- ``test_notebook_executes``: builds the notebook from its source and runs it top to bottom
  in quick mode (``TTMANIFOLD_NB_QUICK=1``, working directory ``notebooks/``, 300 s per
  cell); any cell error fails the test with the traceback. The kernel is always the
  interpreter running pytest (a temporary kernelspec pointing at ``sys.executable``).
- ``test_kernel_is_current_interpreter``: checks that claim, and that the environment
  variable and the working directory reach the kernel.
- ``test_relative_links_resolve``: every relative link in a notebook (e.g. to ``../docs/``)
  names a file of the repository.
- ``test_committed_notebook``: static checks of the committed file (no kernel needed): the
  first cell is markdown with a title and a statement of purpose, the last cell is a
  markdown summary, the first code cell reads ``TTMANIFOLD_NB_QUICK``, every code cell was
  executed in order in one fresh kernel (execution counts exactly 1..k, which catches
  hidden state and unexecuted cells), no committed output is an error, cell ids are the
  build's fixed ids, and no absolute path appears in sources or text outputs.

The tests that need jupytext, nbclient, nbformat or ipykernel skip (with the reason) when one
is missing; the ``test`` extra installs them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def _load_nbtools():
    spec = importlib.util.spec_from_file_location("ttmanifold_notebooks_nbtools",
                                                  NB_DIR / "nbtools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nbtools = _load_nbtools()

SOURCES = nbtools.sources()
SOURCE_IDS = [p.stem for p in SOURCES]
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
NOTEBOOK_IDS = [p.name for p in NOTEBOOKS]

CELL_TIMEOUT = 300  # seconds per cell in quick mode

# absolute paths that must not leak into committed notebooks
ABSOLUTE_PATH = re.compile(r"/work\b|/root\b|/home\b|/Users/|C:\\")


def _require(*modules):
    missing = []
    for mod in modules:
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -e .[test])")


def _text(src) -> str:
    return "".join(src) if isinstance(src, list) else (src or "")


@pytest.fixture(scope="module")
def kernel_dir():
    """A temporary kernelspec directory whose only kernel runs ``sys.executable``."""
    _require("jupytext", "nbclient", "nbformat", "ipykernel", "jupyter_client")
    with nbtools.kernelspec_dir() as path:
        yield path


def test_sources_and_notebooks_pair():
    assert SOURCES, f"no notebook sources in {NB_DIR}"
    assert sorted(nbtools.notebook_path(s) for s in SOURCES) == NOTEBOOKS, (
        "each notebooks/NN_name.py needs its committed NN_name.ipynb and vice versa")


@pytest.mark.parametrize("source", SOURCES, ids=SOURCE_IDS)
def test_committed_notebook_matches_source(source):
    _require("jupytext", "nbformat")
    mismatch = nbtools.source_mismatch(source)
    assert mismatch is None, mismatch


def test_read_source(tmp_path):
    _require("jupytext", "nbformat")
    import nbformat

    src = tmp_path / "07_demo.py"
    src.write_text(
        "# %% [markdown]\n"
        "# # Title\n"
        "#\n"
        "# Some *text*.\n"
        "\n"
        "# %%\n"
        "# %matplotlib inline\n"
        "x = 1  # a comment\n"
        "\n"
        "\n"
        "def f():\n"
        "    return x\n"
        "\n"
        "# %% [markdown]\n"
        "# ## Summary\n",
        encoding="utf-8")
    nb = nbtools.read_source(src)
    nbformat.validate(nb)
    assert nbtools.cells_of(nb) == [
        ("markdown", "# Title\n\nSome *text*."),
        ("code", "%matplotlib inline\nx = 1  # a comment\n\n\ndef f():\n    return x"),
        ("markdown", "## Summary"),
    ]
    assert [c["id"] for c in nb.cells] == ["nb07-00", "nb07-01", "nb07-02"]
    assert nb.metadata["kernelspec"] == nbtools.KERNELSPEC
    assert nbtools.notebook_path(src) == tmp_path / "07_demo.ipynb"
    assert nbtools.source_mismatch(src) is not None  # no .ipynb yet
    nbtools.write(nb, nbtools.notebook_path(src))
    assert nbtools.source_mismatch(src) is None


def test_refresh_markdown_keeps_outputs(tmp_path):
    _require("jupytext", "nbformat")
    import nbformat

    src = tmp_path / "08_demo.py"
    src.write_text("# %% [markdown]\n# # Old title\n\n# %%\nprint(1)\n", encoding="utf-8")
    nb = nbtools.read_source(src)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[1].execution_count = 1
    nbtools.write(nb, nbtools.notebook_path(src))

    src.write_text("# %% [markdown]\n# # New title\n\n# %%\nprint(1)\n", encoding="utf-8")
    assert nbtools.source_mismatch(src) is not None
    nbtools.refresh_markdown(src)
    assert nbtools.source_mismatch(src) is None
    out = nbformat.read(str(nbtools.notebook_path(src)), as_version=4)
    assert out.cells[0].source == "# New title"
    assert out.cells[1].outputs[0].text == "1\n" and out.cells[1].execution_count == 1

    src.write_text("# %% [markdown]\n# # New title\n\n# %%\nprint(2)\n", encoding="utf-8")
    with pytest.raises(ValueError, match="code cells differ"):
        nbtools.refresh_markdown(src)


def test_kernel_is_current_interpreter(kernel_dir):
    import sys

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import os, sys\n"
        "print(repr(sys.executable))\n"
        "print(repr(os.environ.get('TTMANIFOLD_NB_QUICK')))\n"
        "print(repr(os.getcwd()))"
    ))
    nbtools.execute(nb, quick=True, kernel_dir=kernel_dir, timeout=CELL_TIMEOUT)
    out = [o for o in nb.cells[0].outputs if o.output_type == "stream" and o.name == "stdout"]
    lines = "".join(o.text for o in out).splitlines()
    assert len(lines) == 3, lines
    exe, quick, cwd = (eval(line) for line in lines)  # reprs of str / None
    # not realpath: a venv's python is a symlink to the base interpreter, and the point
    # is that the kernel runs in *this* environment
    assert os.path.normcase(os.path.abspath(exe)) == os.path.normcase(os.path.abspath(sys.executable))
    assert quick == "1"
    assert os.path.realpath(cwd) == os.path.realpath(NB_DIR)


@pytest.mark.parametrize("source", SOURCES, ids=SOURCE_IDS)
def test_notebook_executes(source, kernel_dir):
    from nbclient.exceptions import CellExecutionError

    nb = nbtools.read_source(source)
    try:
        nbtools.execute(nb, quick=True, kernel_dir=kernel_dir, timeout=CELL_TIMEOUT)
    except CellExecutionError as exc:
        pytest.fail(f"{source.name}: a cell raised in quick mode\n{exc}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{source.name}: error outputs {errors}"


# a markdown link target: ](target) or ](target "title"), up to the first space or ')'
LINK = re.compile(r"\]\(([^)\s]+)")


@pytest.mark.parametrize("source", SOURCES, ids=SOURCE_IDS)
def test_relative_links_resolve(source):
    """Every relative link in the notebook's text names a file of the repository."""
    text = source.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # a URL or an anchor in the notebook
            continue
        path = (NB_DIR / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{source.name}: links to missing files {broken}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_committed_notebook(path):
    nb = json.loads(path.read_text(encoding="utf-8"))  # plain json: no dependency
    cells = nb["cells"]
    assert cells, f"{path.name}: no cells"

    first, last = cells[0], cells[-1]
    first_src = _text(first["source"])
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell must be markdown"
    assert re.search(r"^# \S", first_src, re.M), f"{path.name}: the first cell needs a '# Title'"
    assert re.search(r"purpose|this notebook", first_src, re.I), (
        f"{path.name}: the first cell must state the notebook's purpose")
    assert last["cell_type"] == "markdown", f"{path.name}: the last cell must be markdown"
    assert re.search(r"summary", _text(last["source"]), re.I), (
        f"{path.name}: the last cell must be a summary (containing the word 'Summary')")

    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, f"{path.name}: no code cells"
    assert "TTMANIFOLD_NB_QUICK" in _text(code[0]["source"]), (
        f"{path.name}: the first code cell must read TTMANIFOLD_NB_QUICK")
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: code cells must be executed once, top to bottom, in a fresh kernel "
        f"(execution counts 1..{len(code)}), got {counts}; regenerate the outputs with "
        f"python notebooks/nbtools.py {path.stem[:2]}")
    ids = [c.get("id") for c in cells]
    assert ids == [nbtools.cell_id(path, i) for i in range(len(cells))], (
        f"{path.name}: cell ids are not the build's fixed ids; regenerate it")

    for i, c in enumerate(cells):
        src = _text(c["source"])
        m = ABSOLUTE_PATH.search(src)
        assert m is None, f"{path.name}: cell {i} source contains an absolute path ({m.group()!r})"
        for o in c.get("outputs", []):
            assert o["output_type"] != "error", f"{path.name}: cell {i} has an error output"
            texts = [_text(o.get("text"))]
            texts += [_text(v) for k, v in o.get("data", {}).items() if k.startswith("text/")]
            for t in texts:
                m = ABSOLUTE_PATH.search(t)
                assert m is None, (
                    f"{path.name}: cell {i} output contains an absolute path ({m.group()!r})")
