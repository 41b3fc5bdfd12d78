"""ttmanifold: Riemannian optimization on the manifold of fixed tensor-train rank.

Packages and modules (one concept each; imports flow down this list):

- :mod:`ttmanifold.kernels` - the one seam that chooses between torch implementations and
  the compiled CPU kernels, and their build;
- :mod:`ttmanifold.tt` - TT algebra (:class:`TT`, :func:`inner`, :func:`orthogonalize`,
  :func:`round`) and sampled entries (:class:`IndexSet`);
- :mod:`ttmanifold.manifold` - pure functions over cores (projections, retraction, gauge),
  :class:`TangentTT`, Riemannian autodiff, and :class:`FixedTTRank`, a ``geoopt.Manifold``;
- :mod:`ttmanifold.householder` - Householder parameterizations of orthonormal frames;
- :mod:`ttmanifold.nn` - the STTP chart and spectral low-rank layers (STTP and SVDP);
- :mod:`ttmanifold.chart` - re-exports the STTP chart (:class:`STTPChart`) and its
  ``nn.utils.parametrize`` integration from :mod:`ttmanifold.nn`;
- :mod:`ttmanifold.optim` - geoopt's Riemannian SGD and Adam with a step that
  ``torch.compile`` captures;
- :mod:`ttmanifold.experiments` - the chart-versus-Riemannian comparison
  (``ttmanifold compare``; not imported by ``import ttmanifold``, needs the ``compare``
  extra).

The mathematics is in the repository's ``docs/``.
"""
from .tt import TT, IndexSet, feasible_ranks, inner, orthogonalize, round
from .manifold import FixedTTRank, TangentTT
from .chart import (
    STTPChart,
    STTPParametrization,
    d_optimal_penalty,
    lipschitz_normalize,
    register_sttp,
)
from . import householder, nn, optim
from .io import load, save

__version__ = "0.1.0"
__all__ = [
    "TT",
    "inner",
    "orthogonalize",
    "round",
    "feasible_ranks",
    "IndexSet",
    "FixedTTRank",
    "TangentTT",
    "STTPChart",
    "STTPParametrization",
    "register_sttp",
    "d_optimal_penalty",
    "lipschitz_normalize",
    "householder",
    "nn",
    "optim",
    "save", "load",
]
