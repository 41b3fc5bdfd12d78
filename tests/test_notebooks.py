"""The example notebooks: they execute without error, and their committed form is clean.

Every ``notebooks/*.ipynb`` is picked up (glob), so notebooks added later are tested too.

- ``test_notebook_executes``: runs the notebook top to bottom with nbclient in quick mode
  (``TTMANIFOLD_NB_QUICK=1`` in the kernel's environment, working directory
  ``notebooks/``, 300 s per cell); any cell error fails the test with the traceback.
  The kernel is always the interpreter running pytest: a temporary kernelspec whose argv
  is ``[sys.executable, "-m", "ipykernel_launcher", ...]``, so neither a user-installed
  "python3" kernelspec nor the ``python`` found on PATH can substitute another environment.
- ``test_kernel_is_current_interpreter``: checks that claim, and that the environment
  variable and the working directory reach the kernel.
- ``test_committed_notebook``: static checks of the committed file (no kernel needed): the
  first cell is markdown with a title and a statement of purpose, the last cell is a
  markdown summary, the first code cell reads ``TTMANIFOLD_NB_QUICK``, every code cell was
  executed in order in one fresh kernel (execution counts exactly 1..k, which catches
  hidden state and unexecuted cells), no committed output is an error, and no absolute
  path appears in sources or text outputs.

The execution tests skip (with the reason) when nbclient, nbformat or ipykernel is not
installed; the ``test`` extra installs them.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]

CELL_TIMEOUT = 300  # seconds per cell
KERNEL_NAME = "ttmanifold-test-python"

# absolute paths that must not leak into committed notebooks
ABSOLUTE_PATH = re.compile(r"/work\b|/root\b|/home\b|/Users/|C:\\")


def _missing_execution_deps():
    missing = []
    for mod in ("nbclient", "nbformat", "ipykernel", "jupyter_client"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return missing


def _text(src) -> str:
    return "".join(src) if isinstance(src, list) else (src or "")


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec directory whose only kernel runs ``sys.executable``."""
    missing = _missing_execution_deps()
    if missing:
        pytest.skip(f"notebook execution needs {', '.join(missing)} (pip install -e .[test])")
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ttmanifold tests)",
        "language": "python",
    }))
    return root


def _execute(nb, kernel_dir: Path):
    """Execute ``nb`` in place in quick mode, cwd = notebooks/. Raises on a cell error."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient.util import run_sync
    from nbclient import NotebookClient

    env = dict(os.environ)
    env["TTMANIFOLD_NB_QUICK"] = "1"
    km = AsyncKernelManager(kernel_name=KERNEL_NAME,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT,
        startup_timeout=120,
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(NB_DIR)}},
    )
    try:
        client.execute(env=env)
    finally:
        # we own the kernel manager, so nbclient leaves the kernel to us
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)
    return nb


def test_kernel_is_current_interpreter(kernel_dir):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import os, sys\n"
        "print(repr(sys.executable))\n"
        "print(repr(os.environ.get('TTMANIFOLD_NB_QUICK')))\n"
        "print(repr(os.getcwd()))"
    ))
    _execute(nb, kernel_dir)
    out = [o for o in nb.cells[0].outputs if o.output_type == "stream" and o.name == "stdout"]
    lines = "".join(o.text for o in out).splitlines()
    assert len(lines) == 3, lines
    exe, quick, cwd = (eval(line) for line in lines)  # reprs of str / None
    # not realpath: a venv's python is a symlink to the base interpreter, and the point
    # is that the kernel runs in *this* environment
    assert os.path.normcase(os.path.abspath(exe)) == os.path.normcase(os.path.abspath(sys.executable))
    assert quick == "1"
    assert os.path.realpath(cwd) == os.path.realpath(NB_DIR)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path, kernel_dir):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(str(path), as_version=4)
    try:
        _execute(nb, kernel_dir)
    except CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell raised in quick mode\n{exc}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
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
        f"(execution counts 1..{len(code)}), got {counts}; regenerate the outputs")

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
