"""The README's Python examples run as written (one namespace, in order)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 3


def test_readme_examples_run():
    ns = {}
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), ns)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{block}")
