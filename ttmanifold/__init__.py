"""ttmanifold: Riemannian optimization on the manifold of fixed tensor-train rank.

Modules (one per concept):

- :mod:`ttmanifold.tt` - TT algebra (:class:`TT`, :func:`inner`, :func:`orthogonalize`,
  :func:`round`);
- :mod:`ttmanifold.sparse` - sampled entries (:class:`IndexSet`), the completion kernels;
- :mod:`ttmanifold.manifold` - :class:`FixedTTRank`, a ``geoopt.Manifold`` with Riemannian
  autodiff;
- :mod:`ttmanifold.tangent` - :class:`TangentTT`, the structured rank-2r TT of a tangent
  vector (inner products at rank r), and the projection sweeps;
- :mod:`ttmanifold.householder` - Householder parameterizations of orthonormal frames;
- :mod:`ttmanifold.chart` - the STTP chart (:class:`STTPChart`) and ``nn.utils.parametrize``
  integration;
- :mod:`ttmanifold.nn` - spectral low-rank layers (STTP and SVDP);
- :mod:`ttmanifold.problems`, :mod:`ttmanifold.solvers`, :mod:`ttmanifold.compare` - the
  chart-versus-Riemannian comparison (``ttmanifold compare``).
"""
from .tt import TT, feasible_ranks, inner, orthogonalize, round
from .sparse import IndexSet
from .manifold import FixedTTRank
from .tangent import TangentTT
from .chart import (
    STTPChart,
    STTPParametrization,
    d_optimal_penalty,
    lipschitz_normalize,
    register_sttp,
)
from . import householder, nn

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
]
