"""``benchmarks/gpu_check.py`` runs here on the CPU (``--device cpu --quick``): one table
with every check, the CUDA tests reported as skipped, exit status 0."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; CUDA machines run it in full")
def test_gpu_check_runs_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split("|")[1].strip() for line in table[1:]]
    assert checks[0] == "cuda tests" and "skipped (CUDA not available)" in table[1]
    for name in ("manifold", "completion CG", "compare"):
        assert checks.count(name) >= 1, out.stdout
    assert all(line.rstrip().endswith("| yes |") for line in table[1:]), out.stdout
    assert "B=16" in out.stdout and "B=4" in out.stdout


def test_gpu_check_refuses_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 2 and "CUDA is not available" in out.stderr
