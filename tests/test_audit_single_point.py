"""Regression tests from an audit of the single-point API (points, tangent vectors, the
TT norm): each pins a bug that was found with an independent dense float64 reference or
a bad input, and fails on the code before its fix."""
from __future__ import annotations

import pytest
import torch

from ttmanifold import FixedTTRank, IndexSet

F64 = torch.float64


def test_project_sampled_rejects_non_finite_values():
    """project_sampled returned NaN deltas for a NaN value (project of a sparse Z with the
    same entries raised)."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    p = M.random(dtype=F64, generator=torch.Generator().manual_seed(0))
    iset = IndexSet(torch.tensor([[0, 1, 2], [2, 3, 4]]), M.shape)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="values: contains NaN or Inf"):
            M.project_sampled(p, iset, torch.tensor([1.0, bad], dtype=F64))
    assert torch.isfinite(M.project_sampled(p, iset, torch.tensor([1.0, 2.0], dtype=F64))).all()
