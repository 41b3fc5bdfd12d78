"""An int rank request above a boundary mode size clips to the feasible ranks with a
warning (t3f's tutorial shape with rank 5); explicit rank tuples stay exact."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ttmanifold import TT, FixedTTRank


def test_int_rank_clips_with_warning():
    shape = (3, 4, 4, 5, 7, 5)
    with pytest.warns(UserWarning, match="ranks"):
        M = FixedTTRank(shape, 5)
    assert M.ranks == (1, 3, 5, 5, 5, 5, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert M.ranks == TT.random(shape, 5, dtype=torch.float64).ranks
    p = M.random(dtype=torch.float64)
    M.check_point(p)
    with pytest.warns(UserWarning):
        assert FixedTTRank(shape, np.int64(5)).ranks == M.ranks


def test_int_rank_within_bounds_no_warning_and_tuple_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FixedTTRank((4, 5, 6), 3).ranks == (1, 3, 3, 1)
    with pytest.raises(ValueError, match="ranks"):
        FixedTTRank((3, 4, 4, 5, 7, 5), (5, 5, 5, 5, 5))
    with pytest.raises(ValueError, match="ranks"):
        FixedTTRank((3, 4), 0)
    with pytest.raises((ValueError, TypeError), match="ranks"):
        FixedTTRank((3, 4), True)
