"""No silent wrong answers (round two): a batched completion's test set that overlaps its
training set warns as one problem's does; the torch path's retraction names a NaN/Inf point
or step where its SVD returns NaN instead of raising (a GPU); completion solvers give the
same iterates on data scaled far from 1."""
from __future__ import annotations

import warnings

import pytest
import torch

from ttmanifold.experiments.batched import BatchedCompletion
from ttmanifold.experiments.problems import Completion

F64 = torch.float64


# ---------------------------------------------------------------------------------------
# BatchedCompletion.from_data: a test set that repeats training samples
# ---------------------------------------------------------------------------------------

def test_batched_from_data_warns_on_a_test_set_that_overlaps_the_training_set():
    """Problem 1's test set repeats two of its training samples: one warning naming the
    problem, with Completion.from_data's wording and count (it passed silently). A sample of
    another problem's training set is no overlap."""
    shape = (4, 5, 3, 4)
    g = torch.Generator().manual_seed(0)
    idx = [torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1], [2, 0, 1, 0], [3, 4, 0, 2]]),
           torch.tensor([[0, 0, 0, 0], [1, 2, 1, 3], [2, 3, 2, 1], [0, 4, 1, 2]])]
    vals = [torch.randn(4, dtype=F64, generator=g) for _ in range(2)]
    held = torch.tensor([[3, 4, 2, 3]])
    assert not any((i == held).all(1).any() for i in idx)
    overlap = ([held, torch.cat([idx[1][:2], held])],
               [torch.zeros(1, dtype=F64), torch.zeros(3, dtype=F64)])
    with pytest.warns(UserWarning) as rec:
        BatchedCompletion.from_data(idx, vals, shape, 2, test=overlap)
    msgs = [str(w.message) for w in rec if "test samples" in str(w.message)]
    assert msgs == ["test[0][1]: 2 of the 3 test samples are also training samples, so "
                    "test_err measures the fit there, not generalization"]
    assert rec[0].filename == __file__  # attributed to the caller
    with pytest.warns(UserWarning, match=r"^test: 2 of the 3 test samples are also training"):
        Completion.from_data(idx[1], vals[1], shape, 2, test=(overlap[0][1], overlap[1][1]))
    disjoint = ([held, torch.cat([idx[0][:2], held])],  # problem 0's samples in problem 1's
                [torch.zeros(1, dtype=F64), torch.zeros(3, dtype=F64)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchedCompletion.from_data(idx, vals, shape, 2, test=disjoint)
    # a repeated training sample still raises (before the overlap's warning)
    dup = [idx[0], torch.cat([idx[1], idx[1][:1]])]
    with pytest.raises(ValueError, match=r"indices\[1\]: repeated multi-indices"):
        BatchedCompletion.from_data(dup, [vals[0], torch.zeros(5, dtype=F64)], shape, 2,
                                    test=overlap)
