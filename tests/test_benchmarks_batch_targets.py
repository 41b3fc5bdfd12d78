"""``benchmarks/bench_batch.py --targets`` (issue 12's per-point table) runs in its quick
form, with and without the opt-in ``--keep-freed-memory``: one row per dtype, rank and
operation, and the flag refused without ``--targets``."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_batch.py"


@pytest.mark.parametrize("extra", [[], ["--keep-freed-memory"]])
def test_targets_quick_prints_the_table(extra):
    out = subprocess.run([sys.executable, str(SCRIPT), "--targets", "--quick", *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| float")]
    ops = [line.split("|")[3].strip() for line in rows]
    assert len(rows) == 2 * 2 * 3 and set(ops) == {"retr", "project", "adam step"}, out.stdout
    for line in rows:
        ratio, met = line.split("|")[7].strip(), line.split("|")[9].strip()
        assert float(ratio) > 0 and met in ("yes", "no"), line
    assert ("# keep_freed_memory()" in out.stdout) == bool(extra), out.stdout


def test_keep_freed_memory_flag_needs_targets():
    out = subprocess.run([sys.executable, str(SCRIPT), "--keep-freed-memory"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--keep-freed-memory" in out.stderr
