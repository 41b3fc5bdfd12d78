"""Build the example notebooks from their text sources, and execute them.

Each notebook is two committed files in ``notebooks/``:

- ``NN_name.py``, the source, in jupytext's *percent* format: a cell starts at a ``# %%``
  line, a markdown cell at ``# %% [markdown]`` with its lines commented (``# ``), and
  IPython magics are commented too (``# %matplotlib inline``). Edit this file; it diffs
  like code and runs as a plain script (``python notebooks/01_tensor_trains.py``).
- ``NN_name.ipynb``, built from the source and executed in full mode, with its outputs:
  what GitHub and Jupyter show. The tests check that its cells equal the source's.

Usage, from anywhere::

    python notebooks/nbtools.py                # build and execute every notebook (full mode)
    python notebooks/nbtools.py 02 05          # only notebooks whose name contains 02 or 05
    python notebooks/nbtools.py --quick        # execute with TTMANIFOLD_NB_QUICK=1
    python notebooks/nbtools.py --no-execute   # write the notebooks without outputs
    python notebooks/nbtools.py --check        # exit 1 if a committed .ipynb differs from its source
    python notebooks/nbtools.py --markdown-only 04  # prose edits only: keep the committed outputs

The committed notebooks are the output of the full run, which first builds ttmanifold's
compiled CPU kernels (``ttmanifold build-kernels``; see :func:`warm_kernels`) so that one
implementation computes the whole run. ``tests/test_notebooks.py`` loads
this file (``importlib``) and uses the same functions, so the build and the tests share
these conventions:

- the kernel is the interpreter running this code: a temporary kernelspec whose argv is
  ``[sys.executable, "-m", "ipykernel_launcher", ...]``, so neither a user-installed
  ``python3`` kernelspec nor the ``python`` on PATH can substitute another environment;
- the kernel's working directory is ``notebooks/``; quick mode sets
  ``TTMANIFOLD_NB_QUICK=1`` in its environment (full mode removes the variable);
- cell ids are fixed (``nb01-00``, ``nb01-01``, ...), and the committed metadata does not
  depend on the machine, so regenerating a notebook only changes what really changed.

Needs ``jupytext``, ``nbformat``, ``nbclient`` and ``ipykernel`` (the ``notebooks`` and
``test`` extras); they are imported only when used, so importing this module is cheap.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

NB_DIR = Path(__file__).resolve().parent
SOURCE_GLOB = "[0-9][0-9]_*.py"  # NN_name.py; this module and others are not notebooks
SOURCE_FORMAT = "py:percent"
QUICK_ENV = "TTMANIFOLD_NB_QUICK"

# the kernelspec recorded in the committed notebooks (the temporary one only runs them)
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
KERNEL_NAME = "ttmanifold-python"
CELL_TIMEOUT = 600  # seconds per cell
STARTUP_TIMEOUT = 120  # seconds for the kernel to start


# ---------------------------------------------------------------------------------------
# sources and notebooks
# ---------------------------------------------------------------------------------------

def sources(only=()) -> list[Path]:
    """The percent sources ``notebooks/NN_*.py``, sorted; ``only``: name substrings to keep."""
    paths = sorted(NB_DIR.glob(SOURCE_GLOB))
    if only:
        paths = [p for p in paths if any(s in p.name for s in only)]
    return paths


def notebook_path(source: Path) -> Path:
    """The committed notebook built from ``source`` (same folder and stem, ``.ipynb``)."""
    return Path(source).with_suffix(".ipynb")


def cell_id(source: Path, i: int) -> str:
    """The fixed id of cell ``i`` of the notebook built from ``source``: ``nbNN-ii``."""
    return f"nb{Path(source).name.split('_')[0]}-{i:02d}"


def read_source(source: Path):
    """The notebook (nbformat v4, no outputs) built from the percent source ``source``.

    Cell types, sources and cell metadata come from the source; ids are fixed
    (:func:`cell_id`); notebook metadata is :data:`KERNELSPEC` and the language only.
    """
    import jupytext
    import nbformat

    text_nb = jupytext.read(str(source), fmt=SOURCE_FORMAT)
    makers = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell,
              "raw": nbformat.v4.new_raw_cell}
    nb = nbformat.v4.new_notebook()
    for i, c in enumerate(text_nb.cells):
        cell = makers[c.cell_type](c.source, metadata=dict(c.get("metadata", {})))
        cell["id"] = cell_id(source, i)
        nb.cells.append(cell)
    nb.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC),
                                      "language_info": {"name": "python"}})
    return nb


def cells_of(nb) -> list[tuple[str, str]]:
    """``(cell_type, source)`` of every cell of ``nb`` (a NotebookNode or the parsed JSON)."""
    def text(src):
        return "".join(src) if isinstance(src, list) else (src or "")
    return [(c["cell_type"], text(c["source"])) for c in nb["cells"]]


def source_mismatch(source: Path) -> str | None:
    """Why the committed notebook of ``source`` does not match it, or None when it does.

    Compares cell types and sources (not outputs or ids): a stale ``.ipynb`` is caught.
    """
    path = notebook_path(source)
    if not path.exists():
        return f"{path.name} is missing: run python notebooks/nbtools.py {path.stem[:2]}"
    want = cells_of(read_source(source))
    have = cells_of(json.loads(path.read_text(encoding="utf-8")))
    if want == have:
        return None
    hint = (f"regenerate it: python notebooks/nbtools.py {path.stem[:2]} (prose edits only: "
            f"add --markdown-only)")
    if len(want) != len(have):
        return f"{path.name} has {len(have)} cells, {source.name} {len(want)}; {hint}"
    i = next(i for i, (a, b) in enumerate(zip(want, have)) if a != b)
    if want[i][0] != have[i][0]:
        return f"{path.name} cell {i} is {have[i][0]}, in {source.name} {want[i][0]}; {hint}"
    old, new = have[i][1].splitlines(), want[i][1].splitlines()
    j = next((j for j, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    line = lambda lines: repr(lines[j]) if j < len(lines) else "(no line)"  # noqa: E731
    return (f"{path.name} cell {i} differs from {source.name} at line {j + 1} of the cell: "
            f"{line(old)} in the notebook, {line(new)} in the source; {hint}")


# ---------------------------------------------------------------------------------------
# executing
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def kernelspec_dir():
    """A temporary kernelspec directory whose only kernel (:data:`KERNEL_NAME`) runs
    ``sys.executable -m ipykernel_launcher``; removed on exit."""
    with tempfile.TemporaryDirectory(prefix="ttmanifold-kernels-") as tmp:
        spec = Path(tmp) / KERNEL_NAME
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ttmanifold notebooks)",
            "language": "python",
        }))
        yield Path(tmp)


def execute(nb, *, quick: bool, kernel_dir: Path | None = None,
            timeout: int = CELL_TIMEOUT):
    """Execute ``nb`` in place, top to bottom, in a fresh kernel; return it.

    The kernel runs ``sys.executable`` (from ``kernel_dir``, a :func:`kernelspec_dir`;
    a temporary one if None) with working directory ``notebooks/`` and
    ``TTMANIFOLD_NB_QUICK=1`` iff ``quick``. ``timeout``: seconds per cell. A cell error
    raises ``nbclient.exceptions.CellExecutionError``.
    """
    if kernel_dir is None:
        with kernelspec_dir() as tmp:
            return execute(nb, quick=quick, kernel_dir=tmp, timeout=timeout)

    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.util import run_sync

    env = dict(os.environ)
    env.pop(QUICK_ENV, None)
    if quick:
        env[QUICK_ENV] = "1"
    km = AsyncKernelManager(kernel_name=KERNEL_NAME,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = NotebookClient(nb, km=km, timeout=timeout, startup_timeout=STARTUP_TIMEOUT,
                            allow_errors=False, record_timing=False,
                            resources={"metadata": {"path": str(NB_DIR)}})
    try:
        client.execute(env=env)
    finally:
        # we own the kernel manager, so nbclient leaves the kernel to us
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)
    # the committed metadata must not depend on the machine that ran it
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.get("language_info", {}).pop("version", None)
    return nb


def warm_kernels() -> bool:
    """Build ttmanifold's optional compiled CPU kernels now (``ttmanifold build-kernels``).

    With a cold kernel cache, ttmanifold builds them in the background and switches its
    operations to them when the build is done, mid-run; float32 training amplifies the
    rounding differences between the two implementations, so such a run does not repeat.
    Built first, one implementation serves the whole run. A failure (no compiler, an older
    ttmanifold) is reported on one line and the notebooks use the torch implementation.
    """
    import subprocess

    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ttmanifold", "build-kernels"], cwd=NB_DIR,
                         capture_output=True, text=True)
    if res.returncode == 0:
        print(f"compiled kernels ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        return True
    tail = (res.stdout + res.stderr).strip().splitlines()[-1:] or ["no output"]
    print(f"compiled kernels not built ({tail[0]}); the notebooks use the torch implementation",
          flush=True)
    return False


def write(nb, path: Path) -> None:
    """Validate ``nb`` and write it to ``path`` (nbformat's layout, trailing newline)."""
    import nbformat

    nbformat.validate(nb)
    with open(path, "w", encoding="utf-8") as fh:
        nbformat.write(nb, fh)
        fh.write("\n")  # nbformat.write adds no trailing newline


def build(source: Path, *, quick: bool = False, execute_it: bool = True,
          out_dir: Path | None = None) -> Path:
    """Build the notebook of ``source``, execute it (unless ``execute_it`` is false) and
    write it next to the source (or into ``out_dir``); return the written path."""
    nb = read_source(source)
    if execute_it:
        t0 = time.perf_counter()
        execute(nb, quick=quick)
        print(f"{source.stem}: executed in {time.perf_counter() - t0:.1f} s"
              f" ({'quick' if quick else 'full'} mode)", flush=True)
    path = notebook_path(source)
    if out_dir is not None:
        path = Path(out_dir) / path.name
    write(nb, path)
    return path


def refresh_markdown(source: Path) -> Path:
    """Copy the markdown cells of ``source`` into its committed notebook, keeping the outputs.

    For prose-only edits, which need no re-execution: refuses (ValueError) unless the
    notebook's code cells equal the source's, in number, order and source text.
    """
    import nbformat

    path = notebook_path(source)
    fresh = read_source(source)
    nb = nbformat.read(str(path), as_version=4)
    code_old = [c.source for c in nb.cells if c.cell_type == "code"]
    code_new = [c.source for c in fresh.cells if c.cell_type == "code"]
    if code_old != code_new:
        raise ValueError(f"{path.name}: code cells differ from {source.name}; re-execute it "
                         f"(python notebooks/nbtools.py {path.stem[:2]})")
    executed = iter(c for c in nb.cells if c.cell_type == "code")
    cells = []
    for cell in fresh.cells:  # source order and ids; code cells keep their outputs
        if cell.cell_type == "code":
            old = next(executed)
            cell["outputs"], cell["execution_count"] = old.outputs, old.execution_count
        cells.append(cell)
    nb.cells = cells
    write(nb, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", nargs="*", help="substrings selecting notebooks (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"execute with {QUICK_ENV}=1")
    ap.add_argument("--no-execute", action="store_true", help="write without outputs")
    ap.add_argument("--check", action="store_true",
                    help="only check that each committed .ipynb has its source's cells")
    ap.add_argument("--markdown-only", action="store_true",
                    help="copy edited markdown cells into the committed .ipynb, keeping its "
                         "outputs (refused if a code cell changed)")
    ap.add_argument("--no-kernel-build", action="store_true",
                    help="do not build the compiled kernels before a full-mode run")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="write the notebooks there instead of next to their sources")
    args = ap.parse_args(argv)
    selected = sources(args.only)
    if not selected:
        ap.error(f"no notebook source matches {args.only} in {NB_DIR}")
    if args.check:
        problems = [m for m in map(source_mismatch, selected) if m]
        for m in problems:
            print(m)
        return 1 if problems else 0
    if args.markdown_only:
        for source in selected:
            print(f"{refresh_markdown(source).name}: markdown cells updated, outputs kept")
        return 0
    if not (args.quick or args.no_execute or args.no_kernel_build):
        warm_kernels()
    for source in selected:
        build(source, quick=args.quick, execute_it=not args.no_execute, out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
