"""The sparse tangent-space projection for a batch of points, each with its own samples
(a :class:`~ttmanifold.tt.BatchIndexSet`): one projection of the stacked TT, then the gauge
projection per point. Design: ``docs/sampled_entries.md#batches-of-index-sets``."""
from __future__ import annotations

import torch

from .._checks import assert_finite_async, check_right_cores
from ..tt import BatchIndexSet
from .sweeps import right_cores

__all__ = ["project_sampled_batch"]


def project_sampled_batch(M, p: torch.Tensor, index_set: BatchIndexSet,
                          values: torch.Tensor, *, V=None) -> torch.Tensor:
    """Projection, for every point ``b`` of a batch, of the sparse tensor with the values
    of problem ``b`` at problem ``b``'s samples onto the tangent space at point ``b``.

    Args:
        M: the :class:`~ttmanifold.FixedTTRank` of the points.
        p: ``(B, size)`` packed points (left-orthogonal cores).
        index_set: a :class:`~ttmanifold.tt.BatchIndexSet` of ``B`` sets of ``M``'s shape.
        values: ``(N,)`` the values of all samples, concatenated in the order of
            ``index_set`` (its ``offsets``).
        V: the points' right-orthogonal cores ``(B, r, n, r')`` if already known.
    Returns:
        ``(B, size)`` packed gauged deltas; equal to ``B`` calls of
        :meth:`FixedTTRank.project_sampled` (to rounding).
    Cost: O(N d r^2) in one call of the sampled kernels for the whole batch, plus
    O(B d n r^3) for the right cores and the gauge projection (batched).
    """
    if not isinstance(index_set, BatchIndexSet):
        raise TypeError(f"index_set: expected a ttmanifold.tt.BatchIndexSet, got "
                        f"{type(index_set).__name__}")
    B = index_set.batch_size
    if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape != (B, M.size):
        got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"p: expected a batch of {B} points, shape ({B}, {M.size}), got {got}")
    if tuple(index_set.shape) != tuple(M.shape):
        raise ValueError(f"index_set: shape {index_set.shape} differs from {M.shape}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values: expected a tensor of shape ({len(index_set)},), got "
                        f"{type(values).__name__}")
    if values.shape != (len(index_set),):
        raise ValueError(f"values: expected shape ({len(index_set)},), got "
                         f"{tuple(values.shape)}")
    if values.dtype != p.dtype:
        raise TypeError(f"values: dtype {values.dtype} differs from the points' {p.dtype}")
    if values.device != p.device or index_set.device != p.device:
        raise ValueError(f"values, index_set: on {values.device} and {index_set.device}, "
                         f"the points on {p.device}")
    assert_finite_async(values, "values")  # (else NaN deltas, blamed on the projection's u)
    U = M.split(p, "p")
    V = right_cores(U) if V is None else check_right_cores(V, U)
    with torch.no_grad():
        D = index_set.project(U, V, values)
    return M.proju(p, torch.cat([c.flatten(1) for c in D], -1))
