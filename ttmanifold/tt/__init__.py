"""Tensor trains: the :class:`TT` class and its algebra (:mod:`.tensor_train`), and the
entries of TTs at sampled indices (:class:`IndexSet`, :mod:`.index_set`, with its layouts
and kernels in :mod:`.layout`, :mod:`.blocked` and :mod:`.sampled_compiled`).

The mathematics: ``docs/tt_algebra.md`` and ``docs/sampled_entries.md``.
"""
from .._checks import feasible_ranks
from .blocked import SampledPoint
from .index_set import BatchIndexSet, IndexSet
from .tensor_train import (TT, add, inner, lq_pos, orthogonalize, pairwise_inner, qr_pos, round,
                           stack)

__all__ = ["TT", "add", "inner", "pairwise_inner", "stack", "orthogonalize", "round",
           "feasible_ranks", "qr_pos", "lq_pos", "IndexSet", "BatchIndexSet", "SampledPoint"]
