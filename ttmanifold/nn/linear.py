"""The linear family: ``y = x W^T + b`` with an STTP or SVDP weight (one forward)."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FactorizedLayer, plan_batch
from .planner import apply_group, group_matrix

__all__ = ["FactorizedLinear", "STTPLinear", "SVDPLinear"]


def _check_size(v, name: str) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


class FactorizedLinear(FactorizedLayer):
    """``nn.Linear`` with a factorized weight (base of :class:`STTPLinear` and
    :class:`SVDPLinear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 spectrum: str = "learned", out_modes: Optional[Sequence[int]] = None,
                 in_modes: Optional[Sequence[int]] = None, order: Optional[str] = None,
                 tensorization="reference", param: str = "chart",
                 init: str = "orthogonal", contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features = _check_size(in_features, "in_features")
        self.out_features = _check_size(out_features, "out_features")
        self._make_bias(bias, self.out_features, device, dtype)
        self._init_weight(self.out_features, self.in_features, (), rank=rank,
                          spectrum=spectrum, param=param, init=init, out_modes=out_modes,
                          in_modes=in_modes, order=order, tensorization=tensorization,
                          contraction=contraction, device=device, dtype=dtype)

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def _plan_for_input(self, shape: torch.Size, ranks):
        batch = plan_batch(math.prod(shape[:-1])) if len(shape) > 1 else 1
        return self._plan(ranks, max(batch, 1), self.contraction), batch

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)``; equals
        ``F.linear(x, self.weight, self.bias)`` to rounding. Cost: the cheaper of
        ``merge(W) + B d_out d_in`` and the planner's core-by-core contraction."""
        cores = self._cores()
        self._check_input_tensor(x, cores[0])
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: expected shape (..., {self.in_features}) (in_features="
                             f"{self.in_features}), got {tuple(x.shape)}")
        plan, _ = self._plan_for_input(x.shape, self._ranks_of(cores))
        if plan.dense or x.numel() == 0:
            return self._forward_dense(x, cores)
        return self._forward_tt(x, cores, plan)

    def _forward_dense(self, x: Tensor, cores=None) -> Tensor:
        cores = self._cores() if cores is None else cores
        return F.linear(x, self._matrix_from_cores(cores), self.bias)

    def _forward_tt(self, x: Tensor, cores=None, plan=None) -> Tensor:
        """Group-wise contraction of the cores with the batch (never forms ``W``)."""
        cores = self._cores() if cores is None else cores
        if plan is None or plan.dense:
            plan = self._plan(self._ranks_of(cores), max(plan_batch(math.prod(x.shape[:-1])), 1),
                              "tt")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        modes = self.in_modes
        if self.natural and len(modes) > 1:
            # the planner consumes the slowest input digit first from the last core; in
            # natural order that core holds the fastest digit, so reverse the digits
            n = x2.shape[0]
            x2 = x2.reshape((n,) + modes).permute((0,) + tuple(range(len(modes), 0, -1)))
            x2 = x2.reshape(n, self.in_features)
        S = x2.transpose(0, 1)  # (d_in, B): batch fastest
        for k0, k1 in plan.groups:
            Gm = group_matrix(cores, self.tensor_shape, self.center, k0, k1, plan.split)
            S = apply_group(Gm, S, int(cores[k0].shape[0]))
        y = S.reshape(self.out_features, -1).transpose(0, 1).reshape(lead + (self.out_features,))
        if self.bias is not None:
            y = y + self.bias
        return y

    def decompress(self) -> nn.Linear:
        """A plain :class:`torch.nn.Linear` with the current dense weight and bias."""
        W = self.weight.detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=W.device, dtype=W.dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + self._param_repr())

    @classmethod
    def _config_of(cls, layer) -> dict:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer_or_weight: expected an nn.Linear, got {type(layer).__name__}")
        return dict(in_features=layer.in_features, out_features=layer.out_features,
                    bias=layer.bias is not None)

    @classmethod
    def _config_of_weight(cls, W: Tensor) -> dict:
        if W.dim() != 2:
            raise ValueError(f"weight: expected shape (out_features, in_features), got "
                             f"{tuple(W.shape)}")
        return dict(in_features=W.shape[1], out_features=W.shape[0])


class STTPLinear(FactorizedLinear):
    """``nn.Linear`` with an STTP weight (Obukhov et al. 2021).

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`
            (dtype float32 or float64).
        rank: the cap ``r`` of every TT bond, ``R_k = min(r, R_k^max)`` (any ``r >= 1``).
        spectrum: ``"learned"`` | ``"lipschitz"`` (``s / max|s|``, spectral norm 1) |
            ``"identity"`` (``s = 1``).
        tensorization: default modes, ``"reference"`` (prime factors, natural order: the
            paper's tables) or ``"section8"`` (the paper's section 8 example's reversed
            order), or a :class:`~ttmanifold.nn.Tensorization`; ``out_modes``/``in_modes`` (row/column digits, slowest first) and
            ``order`` (``"natural"`` | ``"reversed"``; explicit ``in_modes`` default to
            ``"reversed"``) override it. ``docs/sttp.md``, "Tensorization".
        param: ``"chart"`` (``theta``, any torch optimizer) or ``"manifold"`` (``point``, a
            geoopt ManifoldParameter).
        init: ``"orthogonal"`` (full-rank orthonormal frames) | ``"near_identity"`` (the
            paper's, around them) | ``"random"`` | ``"identity"`` (the paper-literal zero
            Householder parameters: rank-deficient for most layouts, chart mode only);
            ``docs/sttp.md``, "Initialization".
        contraction: ``"auto"`` | ``"dense"`` | ``"tt"``, changeable at any time.

    Weight parameters: ``chart.dim`` = :func:`sttp_dof` (chart mode).
    """

    method = "sttp"


class SVDPLinear(FactorizedLinear):
    """``nn.Linear`` with ``W = U diag(s) V^T`` (rank ``min(r, d_out, d_in)``, Householder
    frames): :func:`svdp_dof` weight parameters. Arguments as :class:`STTPLinear` without
    the tensorization and ``param``. The forward is ``(x V) diag(s) U^T`` or dense,
    whichever the flop estimate prefers."""

    method = "svdp"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 spectrum: str = "learned", init: str = "orthogonal",
                 contraction: str = "auto", device=None, dtype=None, **kw):
        super().__init__(in_features, out_features, bias, rank=rank, spectrum=spectrum,
                         init=init, contraction=contraction, device=device, dtype=dtype, **kw)
