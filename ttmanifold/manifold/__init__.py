"""The manifold of tensors of fixed TT-rank.

- :mod:`.sweeps` and :mod:`.retraction`: pure functions over sequences of cores (right
  cores, projections, gauge, retraction);
- :mod:`.tangent`: :class:`TangentTT`, the structured rank-2r TT of a tangent vector;
- :mod:`.autodiff`: Riemannian automatic differentiation;
- :mod:`.hessian`: the exact Riemannian Hessian (curvature term included);
- :mod:`.fixed_rank`: :class:`FixedTTRank`, the ``geoopt.Manifold`` adapter over them.

The mathematics: ``docs/manifold.md`` and ``docs/autodiff.md``.
"""
from .autodiff import riemannian_grad, riemannian_hvp
from .fixed_rank import FixedTTRank
from .hessian import hessian_operator, riemannian_hess
from .retraction import retract, retract_point
from .sweeps import (core_runs, gauge_deltas, gauge_project_flat, orth_defect, project_dense,
                     project_sampled, project_tt, project_tt_at_point, right_cores, right_sweep)
from .tangent import TangentTT

__all__ = ["FixedTTRank", "TangentTT", "riemannian_grad", "riemannian_hvp", "riemannian_hess", "hessian_operator",
           "retract",
           "retract_point", "right_cores", "right_sweep", "project_tt", "project_tt_at_point",
           "project_dense",
           "project_sampled", "gauge_project_flat", "gauge_deltas", "orth_defect",
           "core_runs"]
