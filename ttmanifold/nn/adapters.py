"""Adapters: a frozen torch layer plus a trainable STTP/SVDP update, ``W = W0 + dW``.

``dW`` starts at exactly zero, is trained through the chart (any torch optimizer) or on
the fixed-TT-rank manifold (geoopt), and :meth:`SpectralAdapter.merge` folds it into the
base layer. ``docs/sttp.md``, section "Adapters".
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import FactorizedLayer
from .surgery import LAYER_TYPES, module_paths, swap_module

__all__ = ["SpectralAdapter", "add_adapters", "merge_adapters"]


class SpectralAdapter(nn.Module):
    """``y = base(x) + delta(x)``: ``base`` a torch layer (frozen by default), ``delta`` the
    factorized layer of the same family and configuration, without bias.

    Args:
        base: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or
            ``nn.Embedding`` (``groups=1``).
        rank: rank cap of ``dW``.
        method: ``"sttp"`` | ``"svdp"``.
        param: ``"chart"`` (``dW``'s learned spectrum starts at ``s = 0``: ``dW = 0``
            exactly, and the first gradient reaches ``s`` only, as in LoRA) or
            ``"manifold"`` (STTP only: ``dW = scale * X``, ``X`` a point of the manifold,
            ``scale`` a scalar parameter starting at 0).
        init: frames of ``dW`` (``"random"``, ``"orthogonal"``, ``"near_identity"``; see
            :data:`~ttmanifold.nn.parametrization.INITS`).
        freeze_base: set ``requires_grad=False`` on the base layer's parameters.
        **kw: further keyword arguments of the factorized layer (``tensorization``,
            ``contraction``, ...).

    Cost: the base layer's forward plus the factorized layer's.
    """

    def __init__(self, base: nn.Module, rank: int, *, method: str = "sttp",
                 param: str = "chart", init: str = "random", freeze_base: bool = True, **kw):
        super().__init__()
        entry = next((v for t, v in LAYER_TYPES.items() if type(base) is t), None)
        if entry is None:
            raise TypeError(f"base: expected one of "
                            f"{', '.join(t.__name__ for t in LAYER_TYPES)}, got "
                            f"{type(base).__name__}")
        if method not in ("sttp", "svdp"):
            raise ValueError(f"method: expected 'sttp' or 'svdp', got {method!r}")
        if param not in ("chart", "manifold"):
            raise ValueError(f"param: expected 'chart' or 'manifold', got {param!r}")
        if method == "svdp" and param == "manifold":
            raise ValueError("param: SVDP adapters have only the chart mode")
        if kw.get("spectrum", "learned") != "learned":
            raise ValueError("spectrum: an adapter's update needs the learned spectrum (it "
                             "starts at s = 0)")
        kw.pop("spectrum", None)
        cls = entry[1] if method == "sttp" else entry[2]
        cfg = cls._config_of(base)
        if "bias" in cfg:
            cfg["bias"] = False
        cfg.pop("padding_idx", None)  # the update has no padding row of its own
        W = base.weight
        extra = dict(param=param) if method == "sttp" else {}
        self.base = base
        self.delta = cls(**cfg, rank=rank, init=init, device=W.device, dtype=W.dtype, **extra,
                         **kw)
        if param == "manifold":
            self.scale = nn.Parameter(torch.zeros((), dtype=W.dtype, device=W.device))
        else:
            self.register_parameter("scale", None)
            self._zero_spectrum()
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)

    def _zero_spectrum(self) -> None:
        d = self.delta
        with torch.no_grad():
            if d.method == "svdp":
                d.s.zero_()
            else:
                b = next(blk for blk in d.chart.layout if blk.kind == "spectrum")
                d.theta[b.start:b.start + b.size] = 0.0

    def delta_weight(self) -> Tensor:
        """``dW`` in the base layer's weight layout (differentiable)."""
        w = self.delta.weight
        return w * self.scale if self.scale is not None else w

    def forward(self, x: Tensor) -> Tensor:
        d = self.delta(x)
        if self.scale is not None:
            d = d * self.scale
        return self.base(x) + d

    def merge(self) -> nn.Module:
        """Add ``dW`` into the base layer's weight (in place) and return the base layer;
        the adapter should not be used afterwards. Cost: one dense ``dW``."""
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight())
        return self.base

    def extra_repr(self) -> str:
        return f"param={self.delta.param!r}"


def add_adapters(model: nn.Module, rank: int, names: Optional[Sequence[str]] = None,
                 kinds: Sequence[str] = ("linear",), **kw) -> List[str]:
    """Wrap layers of ``model`` in place in :class:`SpectralAdapter` (``names``: exactly
    these; otherwise every exact-type layer of ``kinds``, e.g. ``("linear", "conv2d")``).
    ``**kw``: :class:`SpectralAdapter`'s arguments. A module shared under several names is
    wrapped once (reported under its first name) and stays shared. Returns the wrapped
    names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    # every name, also the second name of a shared module (wrapped once, kept shared)
    modules = dict(model.named_modules(remove_duplicate=False))
    if names is None:
        paths = module_paths(model)
        inside = tuple(a + "." for a, am in modules.items()
                       if isinstance(am, (SpectralAdapter, FactorizedLayer)))
        names = [n for n, m in model.named_modules()
                 if n and type(m) in LAYER_TYPES and LAYER_TYPES[type(m)][0] in kinds
                 and not any(p.startswith(inside) for p in paths[id(m)])]
    out, done = [], set()
    for n in names:
        if n not in modules or n == "":
            raise ValueError(f"names: model has no submodule {n!r}")
        if id(modules[n]) in done:
            continue
        done.add(id(modules[n]))
        swap_module(model, modules[n], SpectralAdapter(modules[n], rank, **kw))
        out.append(n)
    return out


def merge_adapters(model: nn.Module) -> Dict[str, nn.Module]:
    """Replace every :class:`SpectralAdapter` in ``model`` by its merged base layer (in
    place). Returns ``{name: merged layer}``."""
    merged = {}
    for n, m in list(model.named_modules()):
        if isinstance(m, SpectralAdapter):
            base = m.merge()
            if n == "":
                return {"": base}
            # every name of a shared adapter: one left behind would add dW a second time
            swap_module(model, m, base)
            merged[n] = base
    return merged
