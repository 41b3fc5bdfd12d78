"""ttmanifold: Riemannian optimization on the manifold of fixed tensor-train rank."""
from .tt import TT, inner, orthogonalize, round, feasible_ranks
from .sparse import IndexSet
from .manifold import FixedTTRank

__version__ = "0.1.0"
__all__ = ["TT", "inner", "orthogonalize", "round", "feasible_ranks", "IndexSet", "FixedTTRank"]
