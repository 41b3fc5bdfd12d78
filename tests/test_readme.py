"""The README's Python examples run as written, each on its own (a fresh namespace per
block, as a reader copies one block into a new session)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_example_runs_on_its_own(i):
    block = _blocks()[i]
    try:
        exec(compile(block, f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})
    except Exception as exc:  # pragma: no cover - the message is the point
        pytest.fail(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{block}")


def test_readme_names_no_machine_path():
    text = README.read_text()
    assert not re.search(r"(?<![\w.])/(work|root|home|Users)/", text), "machine path in README"
